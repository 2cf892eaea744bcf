"""Standard streams that can go away without taking the run with them.

A stage's stdout and stderr are someone else's: a launcher's pipe (`accelerate launch`
tees each worker's stderr through one), a terminal, `| head -1`, a file on a disk that
fills up. When that reader dies, Python's next write raises BrokenPipeError (or
EIO/ENOSPC), from whichever print or progress bar happens to come next, and the run dies
before it saves its checkpoint. The answer is decided once, here, not per print:

`keep_going_without_console()` wraps sys.stdout and sys.stderr. The first write or flush
that fails points that file descriptor at /dev/null (so C-level writes, torch's and
gloo's, stop failing too) and sends the stream's later text to a fallback file, when the
stage named one with `fall_back_to(path)` (train: the run directory's console.log), or
nowhere. (What the stream had buffered when it failed is lost with it: a line or so.)
The run carries on: it finishes its step, writes its checkpoint and exits with its usual
code. A failed stream never raises.

This module knows nothing of stages; cli_main installs it before a stage's main runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

_fallback: Path | None = None


def keep_going_without_console() -> None:
    """Wrap sys.stdout and sys.stderr (once; a second call changes nothing)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ResilientStream):
            setattr(sys, name, ResilientStream(stream, name))


def fall_back_to(path: Path | None) -> None:
    """Where the text of a standard stream that went away is appended from then on
    (None: discarded)."""
    global _fallback
    _fallback = Path(path) if path is not None else None


class ResilientStream:
    """A text stream that delegates to `inner` until a write fails, then diverts.

    Attributes it does not define (encoding, isatty, fileno, buffer...) are the inner
    stream's, so tqdm, logging and print treat it as the real thing."""

    def __init__(self, inner, name: str):
        self._inner = inner
        self._name = name
        self.lost: str | None = None  # why the console went away, once it has

    def write(self, text: str) -> int:
        if self.lost is None:
            try:
                return self._inner.write(text)
            except (OSError, ValueError) as e:  # ValueError: the stream was closed
                self._divert(e)
        _append_to_fallback(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.lost is not None:
            return
        try:
            self._inner.flush()
        except (OSError, ValueError) as e:
            self._divert(e)

    def _divert(self, error: Exception) -> None:
        self.lost = getattr(error, "strerror", None) or str(error) or type(error).__name__
        _point_at_devnull(self._inner)
        _append_to_fallback(
            f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {self._name} went away "
            f"({self.lost}); its output continues here\n"
        )

    def __getattr__(self, attribute):
        return getattr(self._inner, attribute)


def _point_at_devnull(stream) -> None:
    """Make the stream's descriptor /dev/null, then drop what its buffer still holds
    (flushed into /dev/null), so that neither Python's exit flush nor C code writing
    to the descriptor meets the dead reader again."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


def _append_to_fallback(text: str) -> None:
    if _fallback is None:
        return
    try:
        with open(_fallback, "a", encoding="utf-8", errors="replace") as f:
            f.write(text)
    except OSError:
        pass  # the console is gone and the log cannot be written: the run still goes on
