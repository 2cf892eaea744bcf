"""One writer per directory: prepare holds its data directory, train its run directory.

The lock is a POSIX record lock (`lockf`) on a `.lock` file inside the directory. The
kernel releases it when the holder exits in any way (SIGKILL included), so a killed run
never leaves a stale lock behind; the file itself stays and is harmless. Unlike flock, a
record lock is not inherited by forked children (prepare's tokenizer workers), so an
orphaned worker cannot keep a directory locked, and it works over NFS (through lockd).
The holder writes its pid and host into the file so that a refusal can say who holds it.

Filesystems without locking answer ENOLCK or EOPNOTSUPP: there the run goes on without
the lock, after a warning, rather than refusing to work at all.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from pipeline.core import log
from pipeline.core.errors import PipelineError

LOCK_FILE = ".lock"


class Busy(PipelineError):
    """Another process is writing the same directory."""


@contextmanager
def exclusive(directory: str | os.PathLike, what: str):
    """Hold `directory`'s lock for the duration of the block (the directory is created).
    `what` names the holder's job in the refusal, e.g. "prepare" or "training"."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        if _acquire(fd, path, what):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _acquire(fd: int, path: Path, what: str) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            return _no_locking(e, path, what)
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
        raise Busy(
            f"{path.parent} is in use: {who} is running {what} there (it holds "
            f"{path}). Two at once would overwrite each other's files; wait for it to "
            f"finish or stop it, or use another name."
        ) from None


def _no_locking(e: OSError, path: Path, what: str) -> bool:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise e
    log.warn(
        f"{path.parent} cannot be locked on this filesystem ({e.strerror}); make sure "
        f"no other {what} uses it at the same time",
        everywhere=True,
    )
    return False
