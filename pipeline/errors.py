"""The one exception type users see, and the wrapper that turns it into a clean exit.

A `PipelineError` carries a message written for the person at the terminal: what is
wrong and what to do next. `cli_main` prints it as one paragraph, without a traceback,
and exits nonzero. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys
import textwrap


class PipelineError(Exception):
    """A problem with the user's input or environment, explained in its message."""


def cli_main(func):
    """Decorate a stage's `main()`: PipelineError -> message on stderr and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PipelineError as e:
            text = textwrap.fill(str(e), width=100, break_long_words=False,
                                 break_on_hyphens=False, subsequent_indent="  ")
            print(f"error: {text}", file=sys.stderr)
            sys.exit(2)
    return wrapper
