"""The ways in: shipped configs, the Makefile, and the cluster launch scripts, run for real.

Multi-node runs happen on this one machine: two "machines" on 127.0.0.1, one CPU process
each, talking over gloo. launch/multinode.sh is run twice (NODE_RANK 0 and 1), exactly
as on two hosts. launch/slurm.sbatch runs with stand-ins for srun / scontrol / scancel
that start each node's task here, so its c10d rendezvous, its preemption path
(USR1 -> SIGTERM -> checkpoint -> requeue) and the resume after the requeue are real.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import from_dict, load_config, parse_yaml, save_config
from pipeline.training.checkpoint import latest_checkpoint, read_meta

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_SCRIPTS = [ROOT / "launch" / "multinode.sh", ROOT / "launch" / "slurm.sbatch"]

# Small enough that a step takes a fraction of a second on one CPU thread.
TINY = [
    "model.context_length=32",
    "model.emb_dim=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.tie_embeddings=true",
    "model.drop_rate=0.0",
    "train.micro_batch_size=2",
    "eval.batches=2",
    "eval.max_new_tokens=4",
    "eval.whole_split_at_end=false",
    "train.log_every_steps=1",
    "checkpoint.keep_last=0",
    "tracking.wandb.mode=disabled",
]


def env(**extra: str) -> dict:
    e = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
        "ACCELERATE": str(BIN / "accelerate"),
        "PYTHON": sys.executable,
        **extra,
    }
    e.pop("WANDB_API_KEY", None)
    return e


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A tiny experiment whose data (~100k tokens of the standard library) is prepared."""
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("launch")
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"data.root={root / 'data'}",
            "data.name=stdlib-200k",
            "data.source.max_bytes=200000",
            "data.num_workers=1",
            f"runs_root={root / 'runs'}",
            *TINY,
        ],
    )
    prepare(config)
    path = root / "tiny-launch.yaml"
    save_config(config, path)
    return path


# ----------------------------------------------------------------------------- cheap checks


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_comments_each_key(path):
    config = load_config(path)  # unknown keys and wrong types raise
    assert config.name and config.data.name
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        key, sep, value = line.partition(":")
        is_leaf = sep and key.strip() and not key.lstrip().startswith("#") and value.strip()
        if is_leaf and not value.strip().startswith("#"):  # a key with a value: documented
            above = lines[number - 2].strip() if number > 1 else ""  # on its line or above
            assert "#" in value or above.startswith(f"# {key.strip()}:"), (
                f"{path.name}:{number}: say what {key.strip()} means: {line!r}"
            )


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_holds_only_what_differs_from_the_defaults(path):
    """A key that restates a default would silently diverge from it when the default
    changes; every key must also still exist (load_config refuses unknown ones)."""
    from pipeline.config import Config, to_dict

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    raw = parse_yaml(path.read_text())
    resolved, defaults = to_dict(load_config(path)), to_dict(Config())

    def get(tree, key):
        for part in key.split("."):
            tree = tree[part]
        return tree

    restated = [key for key in leaves(raw) if get(resolved, key) == get(defaults, key)]
    assert not restated, f"{path.name} restates the defaults of {restated}"


def test_the_mixture_shown_in_the_124m_config_loads_when_uncommented():
    """configs/gpt2-124m.yaml shows a mixture in comments; uncommented in place of
    `source:` it must be a valid config."""
    lines = (ROOT / "configs" / "gpt2-124m.yaml").read_text().splitlines()
    start = lines.index("  # sources:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  # "):
            break
        block.append("  " + line[4:])
    text = "\n".join(lines).replace("\n".join(lines[start : start + len(block)]), "\n".join(block))
    config = from_dict(
        {
            **parse_yaml(text),
            "data": {**{k: v for k, v in parse_yaml(text)["data"].items() if k != "source"}},
        }
    )
    assert [(s.name, s.weight) for s in config.data.sources] == [
        ("fineweb-edu", 0.9),
        ("python", 0.1),
    ]
    assert config.data.sources[1].source.text_field == "content"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_accelerate_config_parses_as_accelerate_reads_it(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.num_processes >= 1 and config.num_machines >= 1


def test_fsdp_config_wraps_the_models_transformer_block():
    from pipeline.model import gpt as model

    fsdp = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert hasattr(model, fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"])


def test_tiny_config_tokens_per_step_match_its_comment():
    """The arithmetic written at the top of configs/tiny.yaml is the config's own."""
    c = load_config(ROOT / "configs" / "tiny.yaml")
    per_step = c.train.micro_batch_size * c.model.context_length * c.train.grad_accum_steps
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    assert f"= {per_step:,} tokens" in text
    assert f"{c.train.max_steps} steps = {per_step * c.train.max_steps:,} tokens" in text


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse_and_are_executable(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & stat.S_IXUSR


def test_multinode_script_refuses_bad_rank_and_missing_data(config_file, tmp_path):
    script = str(ROOT / "launch" / "multinode.sh")
    bad = subprocess.run(
        [script, str(config_file)],
        env=env(NUM_NODES="2", NODE_RANK="2"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "NODE_RANK=2" in bad.stderr
    empty = subprocess.run(
        [script, str(config_file), f"data.root={tmp_path}"],
        env=env(),
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 2 and "make data" in empty.stderr
    stage = subprocess.run(
        [script, str(config_file)], env=env(STAGE="evaluate"), capture_output=True, text=True
    )
    assert stage.returncode == 2 and "STAGE=evaluate must be train or prepare" in stage.stderr


def test_makefile_resolves_the_experiment_paths_from_config_and_args(stand_in_venv):
    """`make -n` shows the commands the chain would run, with ARGS moving the paths."""
    make = ["make", "-n", f"VENV={stand_in_venv}", "NUM_GPUS=0"]
    out = subprocess.run(
        make + ["eval", "ARGS=name=probe data.name=probe-data"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "ARGS='name=probe data.name=probe-data'; set -f; " in out
        and "pipeline.prepare --config 'configs/tiny.yaml' $ARGS" in out
    )
    assert "touch 'data/probe-data/manifest.json'" in out
    assert "ACCELERATE_USE_CPU=1" in out and "--config_file 'configs/accelerate/cpu.yaml'" in out
    assert "-m pipeline.evaluate --model 'runs/probe'" in out
    bad = subprocess.run(make + ["train", "ARGS=nope=1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown config key 'nope'" in bad.stderr


# ----------------------------------------------------------------------------- real launches


def start(args: list[str], env: dict) -> subprocess.Popen:
    """A launch in its own process group, so that a hung one is killed whole."""
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Its output once it exits; on a timeout its whole process group is killed."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{proc.args[0]} did not finish in {timeout} s:\n{proc.communicate()[0]}")


def assert_trained_together(run_dir: Path, steps: int) -> dict:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == f"step_{steps:06d}"
    meta = read_meta(ckpt)
    assert meta["num_processes"] == 2  # one group of two, not two runs of one
    assert meta["config"]["name"] == run_dir.name and meta["config"]["train"]["max_steps"] == steps
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # each step once: one run
    losses = [r["loss"] for r in rows if "loss" in r]
    # An untrained GPT-2-vocabulary model starts near ln(50257) = 10.8, and a loss reduced
    # wrongly over the 2 ranks (summed, not averaged) would be twice that.
    assert losses and 9.0 < losses[0] < 11.5 and all(0 < x < 11.5 for x in losses), losses
    return meta


@pytest.mark.slow
def test_two_machines_on_localhost_train_together_through_multinode_sh(config_file, free_port):
    port = str(free_port())
    args = [
        str(ROOT / "launch" / "multinode.sh"),
        str(config_file),
        "name=two-machines",
        "train.max_steps=3",
    ]
    nodes = [
        start(
            args, env(NUM_NODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        )
        for rank in (0, 1)
    ]
    logs = [finish(node, timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(logs)
    assert "2 process(es)" in logs[0]
    config = load_config(config_file, ["name=two-machines"])
    meta = assert_trained_together(config.run_dir, 3)
    assert meta["tokens"] == 3 * 2 * 2 * 32  # steps x processes x micro batch x context


FAKE_SLURM = {
    # srun: one task per node of the job, here, with SLURM_NODEID, SLURM_PROCID and
    # SLURM_NTASKS set (one task per node, as the script asks); records task pids
    # so that scancel can signal them, and exits with the worst task status. On one host
    # every node could host the c10d store, and accelerate refuses to start node 0 when
    # its port is taken: node 0 starts first, the others once its port listens.
    "srun": r"""#!/usr/bin/env bash
nodes=$SLURM_JOB_NUM_NODES
while [[ $1 == -* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
listening() {
    awk -v port="$(printf ':%04X' "$MASTER_PORT")" '$4 == "0A" && $2 ~ port"$" {found=1}
        END {exit !found}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
pids=()
for (( i = 0; i < nodes; i++ )); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_NTASKS=$nodes "$@" & pids+=($!)
    if (( i == 0 && nodes > 1 )); then
        for (( t = 0; t < 1200; t++ )); do listening && break; sleep 0.1; done
    fi
done
printf '%s\n' "${pids[@]}" >> "$FAKE_SLURM/tasks"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
""",
    "scancel": r"""#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_SLURM/log"
while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done < "$FAKE_SLURM/tasks"
""",
    "scontrol": r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM/log"
[[ $1 == show ]] && echo 127.0.0.1
exit 0
""",
}


@pytest.mark.slow
def test_slurm_script_checkpoints_on_time_limit_signal_requeues_and_resumes(
    config_file, tmp_path, free_port
):
    fake = tmp_path / "slurm"
    fake.mkdir()
    for name, text in FAKE_SLURM.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (fake / "tasks").write_text("")
    job = env(
        PATH=f"{fake}:{os.environ['PATH']}",
        FAKE_SLURM=str(fake),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_SUBMIT_DIR=str(ROOT),
        GPUS_PER_NODE="1",
        MASTER_PORT=str(free_port()),
    )
    config = load_config(config_file, ["name=slurm"])
    script = [str(ROOT / "launch" / "slurm.sbatch"), str(config_file), "name=slurm"]

    # The first allocation: train "forever" until the time-limit warning (USR1) arrives.
    first = start(script + ["train.max_steps=100000"], job)
    deadline = time.monotonic() + 240
    metrics = config.run_dir / "metrics.jsonl"  # its first row: the loop is running
    while not (metrics.is_file() and metrics.stat().st_size) and first.poll() is None:
        if time.monotonic() > deadline:
            finish(first, timeout=0)
        time.sleep(1)
    first.send_signal(signal.SIGUSR1)
    log = finish(first, timeout=240)
    assert first.returncode == 0, log
    assert "scontrol requeue 4242" in (fake / "log").read_text(), log
    stopped = read_meta(latest_checkpoint(config.run_dir))
    assert 0 < stopped["step"] < 100000 and stopped["num_processes"] == 2

    # The requeued job runs the same script again and resumes from that checkpoint. On a
    # cluster it starts minutes later; here at once, so it gets a port that the previous
    # rendezvous did not leave in TIME_WAIT.
    (fake / "tasks").write_text("")
    job["MASTER_PORT"] = str(free_port())
    end = stopped["step"] + 2
    second = start(script + [f"train.max_steps={end}"], job)
    log = finish(second, timeout=300)
    assert second.returncode == 0, log
    assert f"Resumed from {config.run_dir / 'checkpoints' / ('step_%06d' % stopped['step'])}" in log
    assert_trained_together(config.run_dir, end)
