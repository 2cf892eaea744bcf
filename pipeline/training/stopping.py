"""Stop requests from outside: SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C).

The handler only records the signal; the train loop asks `poll()` after every optimizer
step, so a step is never cut in half and a checkpoint can be written before exiting. A
second Ctrl-C interrupts at once. Every process must agree to stop at the same step (a
signal may reach only some of them, as when a scheduler signals one node), so the flags
are summed over the processes: a sum started after step N is read after step N+1, on a
CPU (gloo) group, so no step waits for it or syncs a GPU for it. A signal therefore stops
every process at the end of the step after the one it arrived in: at GPT-2 1.5B's
seconds-long steps that is well inside torchrun's grace period, where the earlier check
at logging steps only could take ten steps.
"""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._pending = None  # (the all-reduce in flight, its tensor)
        self._group = None  # the CPU group the flags are summed over
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

    def attach(self, accelerator) -> None:
        """Before the loop, on every process (creating a group is collective): the group
        poll() sums over, the default one where it already runs on the CPU (gloo)."""
        if accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        if dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def poll(self, accelerator) -> bool:
        """Asked after every optimizer step, on every process: True on all of them once
        any had a stop signal by the end of the step before this one."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        import torch
        import torch.distributed as dist

        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # started a whole step ago: done by now
            stop = bool(flag.item())
        flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, group=self._group, async_op=True), flag)
        if stop and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return stop

    def settle(self) -> None:
        """Wait for the sum in flight: no collective is left pending when the loop ends."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
