"""Stop requests from outside: SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C).

The handler only records the signal; the train loop asks `requested()` after each
optimizer step, so a step is never cut in half and a checkpoint can be written before
exiting. A second Ctrl-C interrupts at once. Every process must agree to stop at the
same step (a signal may reach only some of them), so the answer is all-reduced; the
loop asks that collective question only at its logging steps, to keep a device sync
out of every step.
"""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True on every process when any process received a stop signal."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        import torch  # here, not above: train installs a StopRequest before importing torch

        flag = torch.tensor([1 if self.signal_name else 0], device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="sum").item())
        if stop and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return stop

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
