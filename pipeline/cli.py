"""`gpt-pipeline <stage> [args]`: one command for every stage.

Each stage keeps its own arguments and its `python -m pipeline.<stage>` form; this only
dispatches to the stage's `main`. Under a launcher, use the module form
(`accelerate launch -m pipeline.train ...`) or `accelerate launch --no_python
gpt-pipeline train ...`.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.core.console import keep_going_without_console

# stage -> what it does, in pipeline order (the modules' own first lines say more)
STAGES = {
    "prepare": "tokenize a corpus into train/val token shards (data/<data.name>/)",
    "train": "train the GPT with Accelerate; resumes an unfinished run",
    "evaluate": "val loss and perplexity of a run, checkpoint or model directory",
    "export": "write a model as a Hugging Face GPT-2 directory (transformers-ready)",
    "generate": "continue a prompt with a model (temperature, top-k)",
    "book": "the book's chapter-5 table beside a run's evaluations",
    "config": "print the resolved config, or one value of it (--get KEY)",
    "clean": "delete a config's run and data directories (only what the project wrote)",
}


# where a stage's main lives when it is not pipeline/<stage>.py
STAGE_MODULES = {"config": "pipeline.config.__main__"}


def usage() -> str:
    width = max(map(len, STAGES))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, what in STAGES.items())
    return (
        f"usage: gpt-pipeline STAGE [ARGS ...]\n\nstages:\n{rows}\n\n"
        f"`gpt-pipeline STAGE --help` lists a stage's arguments (and, for prepare, train, "
        f"config and clean, every config key)."
    )


def main(argv: list[str] | None = None) -> None:
    keep_going_without_console()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        from difflib import get_close_matches

        near = get_close_matches(stage, STAGES, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        print(f"error: unknown stage '{stage}'{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(STAGE_MODULES.get(stage, f"pipeline.{stage}")).main(rest)


if __name__ == "__main__":
    main()
