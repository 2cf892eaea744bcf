"""A paragraph before NCCL's watchdog ends a process that waits for a hung peer.

When one process of a run hangs or dies, the others wait in their next collective. Over
gloo that wait ends in a Python exception after train.collective_timeout_minutes, and the
train stage turns it into one paragraph (train.timed_out). NCCL never gets that far: its
watchdog thread aborts the process at the timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING's
default tears the process down), leaving a C++ log line about a WorkNCCL sequence number.
So on NCCL a thread of our own watches the loop's progress and, when nothing has moved
for most of the timeout, says what is happening while there is still time to say it.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class HangWatch:
    """Calls `warn(seconds_without_progress)` once when `beat()` has not been called for
    `limit_s` seconds; a later beat re-arms it (the step was slow, not hung)."""

    def __init__(self, limit_s: float, warn: Callable[[float], None], poll_s: float = 5.0):
        self.limit_s, self.warn, self.poll_s = limit_s, warn, poll_s
        self._last = time.monotonic()
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hangwatch", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()
        self._warned = False

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            quiet = time.monotonic() - self._last
            if quiet >= self.limit_s and not self._warned:
                self._warned = True
                self.warn(quiet)


def warning_margin_s(timeout_s: float) -> float:
    """How long before the collective timeout the paragraph comes: a tenth of it, at
    most two minutes, so that it is printed and flushed before the abort."""
    return min(0.1 * timeout_s, 120.0)
