"""launch/slurm.sbatch lets no value reach a shell as code: the numbers it does arithmetic
on are checked before anything runs, and the config path and overrides reach the launcher
as plain arguments. Runs the script with bash and stand-ins for srun, scontrol and
accelerate that only record what they were given (the real launch is in test_launch.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "slurm.sbatch"

STUBS = {
    # srun: runs its command once, as node 0, and notes that it was called
    "srun": """#!/usr/bin/env bash
echo srun >> "$RECORD/calls"
echo "${SRUN_CPUS_PER_TASK:-unset}" >> "$RECORD/srun_cpus"
while [[ $1 == -* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
""",
    "scontrol": """#!/usr/bin/env bash
echo scontrol >> "$RECORD/calls"
echo 127.0.0.1
""",
    # the launcher and the prepare stage: write their arguments one per line
    "accelerate": """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD/accelerate"
""",
    "python": """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD/prepare"
""",
}


def run_script(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    bin_dir, record, job = tmp_path / "bin", tmp_path / "record", tmp_path / "job"
    for d in (bin_dir, record, job):
        d.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_SUBMIT_DIR": str(job),
        "ACCELERATE": str(bin_dir / "accelerate"),
        "PYTHON": str(bin_dir / "python"),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=job,
    )


@pytest.mark.parametrize(
    "name, value",
    [
        ("GPUS_PER_NODE", "1; touch {marker}"),
        ("GPUS_PER_NODE", "x[$(touch {marker})]"),  # bash arithmetic would run this
        ("GPUS_PER_NODE", "0"),
        ("MASTER_PORT", "29500; touch {marker}"),
        ("MASTER_PORT", "65536"),
        ("SLURM_JOB_NUM_NODES", "2 $(touch {marker})"),
    ],
)
def test_bad_numbers_stop_the_job_before_anything_runs(tmp_path, name, value):
    marker = tmp_path / "MARKER"
    value = value.format(marker=marker)
    result = run_script(tmp_path, ["configs/tiny.yaml"], **{name: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}='{value}' is not allowed")
    assert "from 1 to" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "record" / "calls").exists()  # neither srun nor scontrol ran


def test_config_path_and_overrides_reach_the_launcher_as_plain_arguments(tmp_path):
    marker = tmp_path / "MARKER"
    config = f"configs/x$(touch {marker}).yaml"
    overrides = [f"name=`touch {marker}`", f"train.lr='; touch {marker}; '", "data.name=$HOME"]
    result = run_script(
        tmp_path,
        [config, *overrides],
        GPUS_PER_NODE="2",
        MASTER_PORT="1234",
        SLURM_JOB_NUM_NODES="3",
    )
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    record = tmp_path / "record"
    assert (record / "prepare").read_text().splitlines() == [
        "-m",
        "pipeline.prepare",
        "--config",
        config,
        *overrides,
    ]
    assert (record / "accelerate").read_text().splitlines() == [
        "launch",
        "--machine_rank",
        "0",
        "--config_file",
        "configs/accelerate/multi-node.yaml",
        "--num_machines",
        "3",
        "--num_processes",
        "6",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        "1234",
        "--rdzv_backend",
        "c10d",
        "-m",
        "pipeline.train",
        "--config",
        config,
        *overrides,
    ]


def test_every_srun_gets_the_jobs_cpus_per_task(tmp_path):
    """Slurm >= 22.05: srun does not inherit --cpus-per-task; SRUN_CPUS_PER_TASK carries it."""
    result = run_script(tmp_path, ["configs/tiny.yaml"], SLURM_CPUS_PER_TASK="64")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "record" / "srun_cpus").read_text().split() == ["64", "64"]
