"""What the stages say to the person at the terminal, through one door.

    log.info(text)    results and progress, on stdout
    log.warn(text)    "warning: text" on stderr: something is off, the stage goes on
    log.note(text)    "note: text" on stderr: advice about the request itself

Under a launcher only the main process speaks (RANK 0; torchrun, accelerate launch and
srun set RANK), so eight GPUs print one line, not eight; `everywhere=True` is for what
only one process knows about itself. While a progress bar holds the terminal
(`above(bar)`), lines are written above it instead of through it. GPT_PIPELINE_QUIET=1
(or `set_quiet`) keeps warnings and errors and drops the rest. Errors that end a stage
are not logged: they are raised as PipelineError and printed once by cli_main.
"""

from __future__ import annotations

import contextlib
import os
import sys

_bar = None  # the progress bar lines are written above, when one is showing
_quiet: bool | None = None  # None: GPT_PIPELINE_QUIET decides


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def set_quiet(quiet: bool | None) -> None:
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    return _quiet if _quiet is not None else os.environ.get("GPT_PIPELINE_QUIET") == "1"


def info(text: str, *, everywhere: bool = False) -> None:
    if not quiet() and (everywhere or is_main_process()):
        _write(text, sys.stdout)


def warn(text: str, *, everywhere: bool = False) -> None:
    if everywhere or is_main_process():
        _write(f"warning: {text}", sys.stderr)


def note(text: str, *, everywhere: bool = False) -> None:
    if not quiet() and (everywhere or is_main_process()):
        _write(f"note: {text}", sys.stderr)


@contextlib.contextmanager
def above(bar):
    """Lines logged inside go above `bar` (a tqdm bar), which stays whole below them."""
    global _bar
    previous, _bar = _bar, bar
    try:
        yield
    finally:
        _bar = previous


def _write(text: str, stream) -> None:
    if _bar is not None:
        _bar.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)
