"""The one exception type users see, and the wrapper that turns it into a clean exit.

A `PipelineError` carries a message written for the person at the terminal: what is
wrong and what to do next. `cli_main` prints it as one paragraph, without a traceback,
and exits nonzero. So it does for an OSError (a full disk, a permission, a path that is
not a directory: the environment, not the code) and for Ctrl-C. Any other exception is
a bug and keeps its traceback. Before the stage runs, it makes the standard streams ones
whose reader may go away (pipeline.core.console): output is never a reason for a stage to die.
"""

from __future__ import annotations

import errno
import functools
import sys
import textwrap

from pipeline.core.console import keep_going_without_console


class PipelineError(Exception):
    """A problem with the user's input or environment, explained in its message."""


def cli_main(func):
    """Decorate a stage's `main()`: PipelineError or OSError -> one paragraph on stderr and
    exit code 2; Ctrl-C -> one line and exit code 130, as a shell reports SIGINT."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        keep_going_without_console()
        try:
            return func(*args, **kwargs)
        except PipelineError as e:
            fail(str(e))
        except OSError as e:
            fail(describe_os_error(e))
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C): stopped; files already complete are kept", file=sys.stderr)
            sys.exit(130)

    return wrapper


def fail(message: str, code: int = 2):
    text = textwrap.fill(
        message, width=100, break_long_words=False, break_on_hyphens=False, subsequent_indent="  "
    )
    print(f"error: {text}", file=sys.stderr)
    sys.exit(code)


def describe_os_error(e: OSError) -> str:
    """An OSError as a sentence: what failed on which path, and the usual remedy."""
    where = f" ({e.filename})" if e.filename else ""
    remedy = {
        errno.ENOSPC: "Free some space (or point data.root / runs_root elsewhere) "
        "and run the command again: it resumes from the last complete files",
        errno.EDQUOT: "Your disk quota is exhausted: free some space and run it again",
        errno.EACCES: "Check the permissions of that path, or choose another location",
        errno.EROFS: "That filesystem is read-only: choose another location",
        errno.ENOTDIR: "A part of that path is a file, not a directory",
    }
    return (
        f"{e.strerror or e}{where}. "
        + remedy.get(e.errno, "Check that path and run the command again.")
    ).rstrip(".") + "."
