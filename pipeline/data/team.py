"""The machines that run one stage together, outside of Accelerate: prepare on several
machines at once.

A launcher (torchrun, `accelerate launch`, launch/multinode.sh, launch/slurm.sbatch)
gives each process RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. With WORLD_SIZE > 1 the
processes form a gloo group over TCP (no GPU needed) and agree through it: the main
process decides and broadcasts, everyone reports how its share went. gloo notices a
process that dies (its connections close), so the others stop with a message instead of
waiting for it. Alone (no launcher), a Team of one needs no torch at all.
"""

from __future__ import annotations

import os
from datetime import timedelta

from pipeline.core.errors import PipelineError

# How long the machines wait for each other: to meet (all must be started within it) and
# at the end of the work (the slowest machine's share may take hours longer than the
# fastest one's). A machine that dies is noticed at once, not after this.
MEET_TIMEOUT = timedelta(minutes=30)
WORK_TIMEOUT = timedelta(days=2)


class TeamError(PipelineError):
    """The machines could not meet, or one stopped while the others waited."""


def check_master_address() -> None:
    """MASTER_ADDR must resolve to an address: torch's rendezvous retries a failed lookup
    until its timeout (30 minutes) with nothing but socket warnings."""
    import socket

    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT") or "29500"
    if not address:
        return
    try:
        socket.getaddrinfo(address, int(port) if port.isdigit() else None)
    except (socket.gaierror, UnicodeError) as e:
        raise TeamError(
            f"MASTER_ADDR={address} cannot be resolved to an address from this machine "
            f"({e}); give the main machine's IP address or a host name every machine can "
            f"resolve."
        ) from None


def _count(name: str, default: int) -> int:
    """A launcher variable as a whole number (unset or empty: the default)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise TeamError(
            f"{name}={value!r} is not a whole number; it is a launcher's variable "
            f"(torchrun, accelerate launch, launch/multinode.sh set it), so unset "
            f"it to prepare on this machine alone."
        ) from None


class Team:
    def __init__(self):
        self.rank = _count("RANK", 0)
        self.world = _count("WORLD_SIZE", 1)
        self.local_world = _count("LOCAL_WORLD_SIZE", 1)
        self._group = None
        if self.world < 1 or self.local_world < 1:
            raise TeamError(
                f"WORLD_SIZE={self.world} and LOCAL_WORLD_SIZE={self.local_world} "
                f"must be at least 1: the launcher's variables do not fit together."
            )
        if not 0 <= self.rank < self.world:
            raise TeamError(
                f"RANK={self.rank} is not below WORLD_SIZE={self.world}: the "
                f"launcher's variables do not fit together."
            )

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.world == 1

    def meet(self) -> None:
        """Form the group (no-op alone). Made after any process pool has forked."""
        if self.alone:
            return
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise TeamError(
                f"WORLD_SIZE={self.world} but {' and '.join(missing)} is not set: start the "
                f"processes with torchrun, accelerate launch or launch/multinode.sh, or unset "
                f"WORLD_SIZE to run on this machine alone."
            )
        check_master_address()
        import torch.distributed as dist

        try:
            dist.init_process_group(
                "gloo", rank=self.rank, world_size=self.world, timeout=MEET_TIMEOUT
            )
            self._group = dist.new_group(backend="gloo", timeout=WORK_TIMEOUT)
        except Exception as e:  # torch raises several types when a rendezvous fails
            raise TeamError(
                f"machine {self.rank} of {self.world} could not meet the others at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({e}). Check that "
                f"every machine runs the same command with its own rank, and that the "
                f"address is reachable (GLOO_SOCKET_IFNAME picks the network interface)."
            ) from None

    def broadcast(self, obj):
        """The main process's `obj`, on every process."""
        if self.alone:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._collective(dist.broadcast_object_list, box, src=0, group=self._group)
        return box[0]

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if self.alone:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        self._collective(dist.all_gather_object, out, obj, group=self._group)
        return out

    def _collective(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # gloo: a peer closed its connection, or the timeout
            raise TeamError(
                f"another machine stopped while machine {self.rank} of {self.world} waited "
                f"for it ({str(e).splitlines()[0] if str(e) else type(e).__name__}). Rerun the "
                f"same command on every machine: the work already committed is kept."
            ) from None

    def leave(self) -> None:
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = None
