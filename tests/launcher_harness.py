"""Start a launcher, SIGKILL it once its run is training, and report how its workers ended.

    python tests/launcher_harness.py RUN_DIR TIMEOUT_S -- LAUNCHER ARGS...

The workers are the launcher's children (or grandchildren), so nobody could wait for
them once it is dead. This process makes itself their "subreaper" (Linux's
PR_SET_CHILD_SUBREAPER): orphans are handed to it instead of to init, and it can collect
their exit codes. It prints one JSON object: {"workers": {pid: exit code or -signal}}.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def wait_until_training(run_dir: Path, deadline: float) -> None:
    """Until metrics.jsonl has two rows: the run is in its loop, writing its progress."""
    log = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if log.is_file() and log.read_text().count("\n") >= 2:
            return
        time.sleep(0.05)
    sys.exit("the run never started training")


def reap_all(deadline: float) -> dict[int, int]:
    """Exit codes of every child (orphans included) until none is left."""
    ended = {}
    while time.time() < deadline:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            time.sleep(0.05)
            continue
        ended[pid] = os.waitstatus_to_exitcode(status)
    sys.exit(f"workers still alive after the deadline; ended so far: {ended}")


def main() -> None:
    run_dir, timeout = Path(sys.argv[1]), float(sys.argv[2])
    command = sys.argv[sys.argv.index("--") + 1 :]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    deadline = time.time() + timeout
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_training(run_dir, deadline)
    os.kill(launcher.pid, signal.SIGKILL)
    ended = reap_all(deadline)
    launcher.returncode = ended.pop(launcher.pid, None)  # subprocess must not wait again
    print(json.dumps({"launcher": launcher.returncode, "workers": ended}))


if __name__ == "__main__":
    main()
