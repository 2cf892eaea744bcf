"""`make clean`: delete one experiment's run directory and prepared data, and nothing else.

    python -m pipeline.clean --config CONFIG [key=value ...]

A directory is deleted only when it is one this project wrote: a run holds the
config.yaml the train stage writes first (or its metrics or checkpoints), a data set its
manifest.json or only the files prepare writes. Anything else at that path (a runs_root
or data.root pointed somewhere else, a directory the user made) is left alone, with a
paragraph saying why, and the exit code is 2.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from pipeline.errors import PipelineError, cli_main

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")
# What prepare leaves in a data directory (shards, temporaries, a url download, its lock,
# its verification cache, an unfinished build).
DATA_FILES = re.compile(r"^(manifest\.json|(train|val)_\d{6}\.bin|\..*\.tmp.*|download|\.lock"
                        r"|\.verified\.json|\.staging|\.replaced-manifest\.json)$")


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def is_data_dir(path: Path) -> bool:
    names = [p.name for p in path.iterdir()]
    return (path / "manifest.json").is_file() or (bool(names) and all(
        DATA_FILES.match(n) for n in names))


def clean(run_dir: Path, data_dir: Path) -> list[Path]:
    """Delete the run and data directories that are this project's; return them.
    Refuses (before deleting anything) when either path holds something else."""
    targets = []
    for path, ours, what, made_by in ((run_dir, is_run_dir, "a run", "the train stage"),
                                      (data_dir, is_data_dir, "a data set", "prepare")):
        if not path.exists():
            continue
        if path.is_symlink() or not path.is_dir() or not ours(path):
            raise PipelineError(
                f"{path} is not {what} that {made_by} wrote (no files of its own there), so "
                f"make clean leaves it alone and deletes nothing. Check runs_root, data.root, "
                f"name and data.name; remove the directory yourself if you mean to.")
        targets.append(path)
    for path in targets:
        shutil.rmtree(path)
    return targets


@cli_main
def main(argv: list[str] | None = None) -> None:
    from pipeline.config import load_config
    from pipeline.keys import add_config_arguments, parse_stage_args

    parser = argparse.ArgumentParser(prog="python -m pipeline.clean", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    args = parse_stage_args(parser, argv)
    config = load_config(args.config, args.overrides)
    removed = clean(config.run_dir, config.data_dir)
    print("removed " + ", ".join(map(str, removed)) if removed else "nothing to remove")


if __name__ == "__main__":
    main()
