"""`make clean`: delete one experiment's run directory and prepared data, and nothing else.

    python -m pipeline.clean --config CONFIG [key=value ...]

A directory is deleted only when it reads back as one this project wrote, and holds
nothing else: a run's config.yaml loads as a run config and there are metrics or
checkpoints beside it; a data set's manifest.json loads as a manifest of this project (or
the directory holds only what an interrupted prepare leaves). A file merely named like
ours is no proof. Anything else at that path (a runs_root or data.root pointed somewhere
else, a directory the user made, a file of the user's inside a run) is left alone, with a
paragraph naming what is not ours, and the exit code is 2; nothing is deleted.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from pipeline.core import log
from pipeline.core.errors import PipelineError, cli_main

# What the stages write into a run directory: train (config, metrics, plot, checkpoints
# with damaged ones set aside, its lock, the console's fallback log, trackers' files),
# evaluate, export, book.
RUN_FILES = re.compile(
    r"^(config\.yaml|metrics\.jsonl|loss\.png|checkpoints|\.lock|eval\.json"
    r"|export|\.export\.tmp\d+|\.export\.old\d+|tensorboard|wandb_run_id|wandb"
    r"|book\.png|console(\.rank\d+)?\.log|\..*\.tmp.*)$"
)
# What prepare leaves in a data directory besides the files its manifest lists
# (temporaries, a url download, its lock, its verification cache, an unfinished build).
DATA_FILES = re.compile(
    r"^(manifest\.json|\..*\.tmp.*|download|\.lock"
    r"|\.verified\.json|\.staging|\.replaced-manifest\.json)$"
)
SHARD = re.compile(r"^(train|val)_\d{6}\.bin$")


def foreign_in_run(path: Path) -> list[str]:
    """What in `path` is not a run's (all of it, when it is not a run at all)."""
    names = sorted(p.name for p in path.iterdir())
    if not _loads_as_run_config(path / "config.yaml") or not (
        (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir()
    ):
        return names or ["(an empty directory)"]
    return [n for n in names if not RUN_FILES.match(n)]


def _loads_as_run_config(path: Path) -> bool:
    from pipeline.config import load_config

    try:
        load_config(path)
        return True
    except (PipelineError, OSError, ValueError):
        return False


def foreign_in_data(path: Path) -> list[str]:
    """What in `path` is not a data set's: its manifest must load, and every other entry
    be a file it lists or one prepare leaves (an interrupted first build has no manifest
    yet, and only prepare's own files)."""
    from pipeline.data.shards import DataError, load_manifest

    names = sorted(p.name for p in path.iterdir())
    listed: set[str] = set()
    if (path / "manifest.json").exists():
        try:
            manifest = load_manifest(path)
        except DataError:
            return names
        listed = {s.file for shards in manifest.splits.values() for s in shards}
    elif not names:
        return ["(an empty directory)"]
    sources = {name.split("/")[0] for name in listed if "/" in name}
    foreign = [
        n
        for n in names
        if not (
            DATA_FILES.match(n) or n in listed or n in sources or (not listed and SHARD.match(n))
        )
    ]
    for source in sources & set(names):  # a mixture's per-source shard directories
        foreign += [
            f"{source}/{p.name}"
            for p in (path / source).iterdir()
            if f"{source}/{p.name}" not in listed and not DATA_FILES.match(p.name)
        ]
    return foreign


def clean(run_dir: Path, data_dir: Path) -> list[Path]:
    """Delete the run and data directories that are this project's; return them.
    Refuses (before deleting anything) when either path holds something else."""
    targets = []
    for path, foreign, what, made_by in (
        (run_dir, foreign_in_run, "a run", "the train stage"),
        (data_dir, foreign_in_data, "a data set", "prepare"),
    ):
        if not path.exists():
            continue
        other = [path.name] if path.is_symlink() or not path.is_dir() else foreign(path)
        if other:
            shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
            raise PipelineError(
                f"{path} is not {what} that {made_by} wrote, or holds files it did not write "
                f"({shown}), so make clean leaves it alone and deletes nothing. Check "
                f"runs_root, data.root, name and data.name; move your files out, or remove the "
                f"directory yourself if you mean to."
            )
        targets.append(path)
    for path in targets:
        shutil.rmtree(path)
    return targets


@cli_main
def main(argv: list[str] | None = None) -> None:
    from pipeline.config import load_config
    from pipeline.keys import add_config_arguments, parse_stage_args

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.clean", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser)
    args = parse_stage_args(parser, argv)
    config = load_config(args.config, args.overrides)
    removed = clean(config.run_dir, config.data_dir)
    log.info("removed " + ", ".join(map(str, removed)) if removed else "nothing to remove")


if __name__ == "__main__":
    main()
