"""`make gpu-check` (`python -m benchmarks.gpu_check`): on one GPU with no network, in
under 8 minutes, what only a GPU can show. Every check prints one row, PASS, FAIL, SKIP
or INFO (a figure, no verdict); the table goes to stdout, to <out>/gpu-check.md (for the
README) and with every number to <out>/gpu-check.json.

    make gpu-check                         # one GPU: the checks below, ~7 minutes
    python -m benchmarks.gpu_check --cpu   # the same steps on tiny shapes, on the CPU

The steps, in order: the environment (GPU, precision `auto` picks, the MFU peak table);
parity with transformers' GPT-2 in fp32 and bf16; the fused head's gradients in bf16 and
fp16 under loss scaling against logits + F.cross_entropy; a short run of the train stage
(loss falls; tokens/s, MFU, peak memory); fp16 with loss scaling; resume against an
uninterrupted run; FSDP2 through Accelerate (configs/accelerate/fsdp.yaml) against the
same run without it, then with train.compile; generation against transformers on the
export; the evaluate stage on the GPU against the CPU; GPT-2 124M at context 1024: the
largest micro batch that fits, tokens/s and MFU for ours and for transformers (bf16
autocast, SDPA, fused AdamW) at that batch, and the vocabulary padding's gain.

The CPU mode (--cpu) runs every step on tiny shapes so the check keeps working while
nobody has a GPU (tests/test_gpu_check.py runs it in the suite): fp16 training is
skipped there (loss scaling needs a GPU), and FSDP runs over two gloo processes with
Accelerate's device check faked (benchmarks/fsdp_on_cpu.py). A step that does not fit
the remaining budget is skipped, not cut short.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, median, table, transformers_gpt2

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("PASS", "FAIL", "SKIP", "INFO")


@dataclass
class Row:
    check: str
    status: str
    seconds: float
    detail: str
    numbers: dict = field(default_factory=dict)


@dataclass
class Check:
    """One run of the check: where it works, what it found."""

    device: str  # cuda | cpu
    out: Path
    work: Path
    budget_s: float
    data_root: Path | None = None
    data_name: str = "python-stdlib-1mb"
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    step_started: float = 0.0

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def precision(self) -> str:
        """What the runs train in: bf16 on a GPU (the check is of bf16 hardware), else what
        `auto` picks on this CPU."""
        from pipeline.training.precision import resolve

        return "bf16" if self.on_gpu else resolve("auto", "cpu")[0].replace("no", "fp32")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def say(self, name: str, ok: bool | None, detail: str, **numbers) -> None:
        status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.add(Row(name, status, time.perf_counter() - self.step_started, detail, numbers))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"{row.status:<5} {row.check:<34} ({row.seconds:5.1f}s)  {row.detail}", flush=True)


# ------------------------------------------------------------------------------- helpers


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpt2_shape(c: Check, **changes):
    """GPT-2 124M at context 1024 on a GPU; a tiny model of the same layout on the CPU."""
    from pipeline.config import ModelConfig

    shape = dict(context_length=1024, emb_dim=768, n_heads=12, n_layers=12)
    if not c.on_gpu:
        shape = dict(context_length=64, emb_dim=64, n_heads=4, n_layers=2)
    base = dict(vocab_size=50257, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
    return ModelConfig(**{**base, **shape, **changes})


def twins(cfg, device: str):
    """Our GPT and transformers' GPT-2 (SDPA attention) holding the same weights."""
    from pipeline.model.gpt import GPTModel
    from pipeline.model.gpt2 import to_hf

    torch.manual_seed(0)
    ours = GPTModel(cfg)
    hf = transformers_gpt2(cfg)
    hf.load_state_dict(to_hf(ours.state_dict(), cfg), strict=False)
    return ours.to(device), hf.to(device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def run_args(c: Check, name: str, *extra: str) -> list[str]:
    """The train stage's arguments for a check run: configs/tiny.yaml, trackers off, the
    data and runs under the work directory; on the CPU a smaller model and batch."""
    args = [
        f"data.root={c.data_root}",
        f"data.name={c.data_name}",
        f"runs_root={c.work / 'runs'}",
        f"name={name}",
        "tracking.wandb.mode=disabled",
        "eval.whole_split_at_end=false",
        "eval.batches=2",
        "eval.max_new_tokens=8",
        "checkpoint.keep_last=0",
        f"train.precision={c.precision}",
    ]
    if not c.on_gpu:
        args += ["model.context_length=64", "model.emb_dim=64", "model.n_layers=2"]
        args += ["train.micro_batch_size=4", "eval.every_steps=10"]
    return args + list(extra)


def train_in_process(c: Check, args: list[str]) -> dict:
    """The train stage's own run() in this process, Accelerate's state reset around it as
    a fresh process would have it."""
    from accelerate.state import AcceleratorState

    from pipeline.config import load_config
    from pipeline.train import run

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return run(load_config(ROOT / "configs" / "tiny.yaml", args))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def launch(c: Check, cmd: list[str], log: str, env: dict | None = None) -> None:
    """A stage as its own process tree (a launcher), its output in <out>/logs/."""
    (c.out / "logs").mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(c.out / "logs" / log, "w") as out:
        done = subprocess.run(
            cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, timeout=c.left()
        )
    if done.returncode != 0:
        tail = (c.out / "logs" / log).read_text()[-600:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {done.returncode}: {tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def speed_line(run: Path) -> tuple[str, dict]:
    rows = [r for r in metrics(run) if "tokens_per_s" in r]
    rows = rows[1:] or rows  # the first interval holds start-up
    numbers = {
        "tokens_per_s": median([r["tokens_per_s"] for r in rows]),
        "mfu": median([r["mfu"] for r in rows]),
        "peak_memory_gib": max((r.get("peak_memory_gb") or 0.0) for r in rows),
    }
    line = f"{numbers['tokens_per_s']:,.0f} tokens/s, MFU {numbers['mfu']:.1%}"
    if numbers["peak_memory_gib"]:
        line += f", peak memory {numbers['peak_memory_gib']:.1f} GiB"
    return line, numbers


def loss_falls(c: Check, name: str, run: Path, drop: float) -> None:
    seen = losses(run)
    first, last = seen[min(seen)], seen[max(seen)]
    line, numbers = speed_line(run)
    c.say(
        name,
        last < first - drop,
        f"loss {first:.3f} -> {last:.3f} over {max(seen)} steps; {line}",
        first_loss=first,
        last_loss=last,
        **numbers,
    )


# ------------------------------------------------------------------------------- steps


def step_environment(c: Check) -> None:
    from pipeline.training.mfu import peak_flops
    from pipeline.training.precision import resolve

    m = machine()
    chosen, why = resolve("auto", c.device)
    peak, source = peak_flops(torch.device(c.device), "bf16" if chosen == "bf16" else "no", None)
    if c.on_gpu:
        props = torch.cuda.get_device_properties(0)
        what = f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
    else:
        what = f"CPU mode: {m['cpu']}, capability {m['cpu_capability']}"
    c.say(
        "environment",
        None,
        f"{what}; torch {m['torch']}, transformers {m['transformers']}; precision auto -> "
        f"{chosen} ({why}); MFU against {peak / 1e12:.3g} TFLOP/s ({source})",
        machine=m,
        precision_auto=chosen,
        peak_flops=peak,
    )
    if c.on_gpu:
        c.say("precision-auto-is-bf16", chosen == "bf16", f"train.precision=auto -> {chosen}")


def step_parity(c: Check) -> None:
    cfg = gpt2_shape(c)
    ours, hf = twins(cfg, c.device)
    ours.eval(), hf.eval()
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randint(0, 50257, (2, cfg.context_length), generator=g).to(c.device) for _ in "xy"
    )
    with torch.no_grad():
        lo, lh = ours(x).float(), hf(input_ids=x).logits.float()
        fused = ours(x, targets=y).item()
        reference = F.cross_entropy(lh.flatten(0, 1), y.flatten()).item()
        with torch.autocast(c.device, dtype=torch.bfloat16):
            lob, lhb = ours(x).float(), hf(input_ids=x).logits.float()
    worst = (lo - lh).abs().max().item()
    c.say("logits-fp32-vs-transformers", worst < 2e-3, f"max |logit difference| {worst:.2e}")
    ours_err, hf_err = relative(lob, lo), relative(lhb, lh)
    c.say(
        "logits-bf16-vs-transformers",
        ours_err < 2 * hf_err + 2e-3,
        f"bf16 autocast logits against fp32: ours {ours_err:.2e}, transformers {hf_err:.2e}",
    )
    c.say(
        "fused-loss-fp32",
        abs(fused - reference) < 1e-4,
        f"fused head {fused:.6f}, transformers logits + cross-entropy {reference:.6f}",
    )


def step_head_gradients(c: Check) -> None:
    """The fused head against logits + F.cross_entropy under autocast, each against fp32;
    fp16 with GradScaler's 65536 loss scale, the gradients divided back."""
    cfg = gpt2_shape(c, n_layers=1)
    ours, _ = twins(cfg, c.device)
    g = torch.Generator().manual_seed(2)
    batch = 8 if c.on_gpu else 4
    x, y = (
        torch.randint(0, 50257, (batch, cfg.context_length), generator=g).to(c.device) for _ in "xy"
    )
    params = list(ours.parameters())

    def grads(fused: bool, dtype, scale: float) -> torch.Tensor:
        with torch.autocast(c.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            if fused:
                loss = ours(x, targets=y)
            else:
                loss = F.cross_entropy(ours(x).float().flatten(0, 1), y.flatten())
        return torch.cat(
            [p.flatten().float() / scale for p in torch.autograd.grad(loss * scale, params)]
        )

    exact = grads(False, None, 1.0)
    for name, dtype, scale in (("bf16", torch.bfloat16, 1.0), ("fp16", torch.float16, 65536.0)):
        fused, plain = (
            relative(grads(True, dtype, scale), exact),
            relative(grads(False, dtype, scale), exact),
        )
        c.say(
            f"fused-head-gradients-{name}",
            fused <= 2 * plain + 1e-3,
            f"relative error against fp32 over {batch}x{cfg.context_length} tokens: fused "
            f"{fused:.2e}, logits + cross-entropy {plain:.2e}",
            fused=fused,
            plain=plain,
        )


def step_short_run(c: Check) -> None:
    steps = 150 if c.on_gpu else 20
    args = run_args(c, "short", f"train.max_steps={steps}", f"checkpoint.every_steps={steps}")
    train_in_process(c, args)
    loss_falls(c, f"short-run-{c.precision}", c.work / "runs" / "short", 1.0 if c.on_gpu else 0.3)


def step_fp16(c: Check) -> None:
    if not c.on_gpu:
        c.add(Row("fp16-loss-scaling", "SKIP", 0.0, "fp16 training needs a GPU (loss scaling)"))
        return
    args = run_args(c, "fp16", "train.max_steps=150", "checkpoint.every_steps=150")
    train_in_process(c, [*args, "train.precision=fp16"])
    run = c.work / "runs" / "fp16"
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    parts = torch.load(newest / "trainer.pt", weights_only=True)
    c.say("fp16-scaler-in-checkpoint", "scaler" in parts, f"trainer.pt holds {sorted(parts)}")
    loss_falls(c, "fp16-run", run, 1.0)


def weights_at(run: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def step_resume(c: Check) -> None:
    """A: 2k steps; B: A's step-k checkpoint resumed to 2k; C: A again (the run-to-run
    spread, 0 where kernels are deterministic). Dropout on: the RNG state matters."""
    k = 30 if c.on_gpu else 6
    args = [f"train.max_steps={2 * k}", f"checkpoint.every_steps={k}", "model.drop_rate=0.1"]
    runs = c.work / "runs"
    train_in_process(c, run_args(c, "resume-a", *args))
    shutil.copytree(runs / "resume-a", runs / "resume-b")
    shutil.rmtree(runs / "resume-b" / "checkpoints" / f"step_{2 * k:06d}")
    (runs / "resume-b" / "metrics.jsonl").unlink()
    train_in_process(c, run_args(c, "resume-b", *args))
    train_in_process(c, run_args(c, "resume-c", *args))
    a, b, again = (weights_at(runs / n, 2 * k) for n in ("resume-a", "resume-b", "resume-c"))
    resumed = max((a[n] - b[n]).abs().max().item() for n in a)
    spread = max((a[n] - again[n]).abs().max().item() for n in a)
    ok = resumed == 0.0 if not c.on_gpu else resumed <= max(10 * spread, 1e-6)
    c.say(
        "resume-vs-uninterrupted",
        ok,
        f"max |weight difference| at step {2 * k}: resumed {resumed:.2e}, two uninterrupted "
        f"runs {spread:.2e} ({'bit-exact' if resumed == 0 else 'not bit-exact'})",
        resumed=resumed,
        spread=spread,
    )


def fsdp_run(c: Check, name: str, *extra: str) -> Path:
    """The train stage under configs/accelerate/fsdp.yaml: one GPU, or two CPU processes
    through benchmarks/fsdp_on_cpu.py (Accelerate enables FSDP on accelerators only)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if c.on_gpu:
        cmd = [*launcher, "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "1"]
        cmd += ["-m", "pipeline.train"]
        env = {}
    else:
        port = str(free_port())
        cmd = [*launcher, "--multi_gpu", "--num_processes", "2", "--main_process_port", port]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += [str(ROOT / "benchmarks" / "fsdp_on_cpu.py")]
        env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    config = ["--config", str(ROOT / "configs" / "tiny.yaml")]
    launch(c, [*cmd, *config, *run_args(c, name, *extra)], f"{name}.log", env)
    return c.work / "runs" / name


def step_fsdp(c: Check) -> None:
    """FSDP2 against the same run without it: one process on a GPU; on the CPU two
    processes against one with two accumulation steps (the same global batch)."""
    steps = 40 if c.on_gpu else 8
    args = [f"train.max_steps={steps}", f"checkpoint.every_steps={steps}"]
    sharded = fsdp_run(c, "fsdp", *args)
    plain = args if c.on_gpu else [*args, "train.grad_accum_steps=2"]
    train_in_process(c, run_args(c, "fsdp-reference", *plain))
    a, b = losses(sharded), losses(c.work / "runs" / "fsdp-reference")
    gap = max(abs(a[s] - b[s]) for s in a)
    c.say(
        "fsdp2-vs-without",
        gap < 2e-2,
        f"largest loss difference over {steps} steps: {gap:.1e} ({c.precision} autocast, fp32 "
        f"gradient reduction); last loss {a[max(a)]:.4f} / {b[max(b)]:.4f}",
        largest_loss_difference=gap,
    )


def step_fsdp_compile(c: Check) -> None:
    steps = 20 if c.on_gpu else 4
    args = [f"train.max_steps={steps}", "train.log_every_steps=1", "train.compile=true"]
    run = fsdp_run(c, "fsdp-compile", *args)
    samples = [r["sample"] for r in metrics(run) if "sample" in r]
    loss_falls(c, "fsdp2-compile-runs", run, 0.0)
    c.say(
        "fsdp2-compile-samples",
        bool(samples),
        f"{len(samples)} evaluation samples, e.g. {samples[-1][:40]!r}",
    )


def step_generate(c: Check) -> None:
    import transformers

    from pipeline.data.tokenizer import EOT_ID, encode
    from pipeline.export import main as export
    from pipeline.generate import generate
    from pipeline.model.weights import load_model

    run, out = c.work / "runs" / "short", c.work / "export"
    export(["--model", str(run), "--out", str(out)])
    model, _ = load_model(run, device=c.device)
    prompt = torch.tensor([encode("def main():\n")])
    ours = generate(model, prompt, 40)[0].tolist()  # to and with <|endoftext|>, as theirs
    uncached = generate(model, prompt, 40, use_cache=False)[0].tolist()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).to(c.device).eval()
    with torch.no_grad():
        theirs = hf.generate(
            prompt.to(c.device),
            attention_mask=torch.ones_like(prompt).to(c.device),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=EOT_ID,
            pad_token_id=EOT_ID,
        )[0].tolist()
    new = len(ours) - prompt.shape[1]
    c.say(
        "kv-cache-vs-none", ours == uncached, f"greedy, fp32, {new} tokens: " + same(ours, uncached)
    )
    c.say(
        "generate-vs-transformers", ours == theirs, f"greedy, on the export: {same(ours, theirs)}"
    )


def same(a: list[int], b: list[int]) -> str:
    if a == b:
        return "identical"
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differ from position {first} ({len(a)} and {len(b)} tokens)"


def step_evaluate(c: Check) -> None:
    """The evaluate stage on this device and on the CPU, both fp32, one val split."""
    from pipeline.evaluate import main as evaluate

    run = c.work / "runs" / "short"
    args = ["--model", str(run), "--precision", "fp32"]
    if not c.on_gpu:
        args += ["--max-batches", "20"]
    here = evaluate([*args, "--out", str(c.work / "eval-here.json")])
    cmd = [sys.executable, "-m", "pipeline.evaluate", *args, "--out", str(c.work / "eval-cpu.json")]
    launch(c, cmd, "evaluate-cpu.log", {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"})
    cpu = json.loads((c.work / "eval-cpu.json").read_text())
    gap = abs(here["loss"] - cpu["loss"])
    c.say(
        f"evaluate-{c.device}-vs-cpu",
        gap < 1e-3 and here["tokens"] == cpu["tokens"],
        f"val loss {here['loss']:.5f} here, {cpu['loss']:.5f} on the CPU, {cpu['tokens']:,} tokens",
        difference=gap,
    )


def train_step(model, optimizer, loss_fn, device: str):
    def step(x, y):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ours_loss(model, x, y):
    return model(x, targets=y)


def transformers_loss(model, x, y):
    return model(input_ids=x, labels=y, shift_labels=y).loss


def fits(step, batch, device: str) -> bool:
    try:
        for _ in range(2):
            step(*batch)
        sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def timed(step, batch, device: str, rounds: int) -> list[float]:
    step(*batch)
    seconds = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        step(*batch)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def step_throughput(c: Check) -> None:
    """GPT-2 124M at context 1024 (a tiny shape on the CPU): the largest micro batch that
    fits ours in bf16 (eager, no activation checkpointing), then ours and transformers
    at that batch, then ours with the vocabulary unpadded."""
    from pipeline.model.gpt import flops_per_token
    from pipeline.training.mfu import peak_flops

    cfg = gpt2_shape(c)
    shape = f"{cfg.n_layers} layers x {cfg.emb_dim}, bf16 autocast, eager"
    ours, hf = twins(cfg, c.device)
    ours.train(), hf.train()
    fused = c.device == "cuda"
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=6e-4, fused=fused or None)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=6e-4, fused=fused or None)
    steps = {
        "ours": train_step(ours, opt_ours, ours_loss, c.device),
        "transformers": train_step(hf, opt_hf, transformers_loss, c.device),
    }
    unpadded = replace(ours.cfg, vocab_padding=1)
    padded_cfg = ours.cfg

    def ours_unpadded(x, y):
        ours.cfg = unpadded
        try:
            steps["ours"](x, y)
        finally:
            ours.cfg = padded_cfg

    sizes = [64, 48, 32, 24, 16, 8, 4] if c.on_gpu else [4, 2]
    g = torch.Generator().manual_seed(3)

    def batch(b):
        return [
            torch.randint(0, 50257, (b, cfg.context_length), generator=g).to(c.device) for _ in "xy"
        ]

    largest = next((b for b in sizes if fits(steps["ours"], batch(b), c.device)), None)
    if largest is None:
        c.say("124m-largest-micro-batch", False, f"none of {sizes} fits")
        return
    c.say("124m-largest-micro-batch", None, f"{largest} x {cfg.context_length} tokens ({shape})")
    smaller = [b for b in sizes if b <= largest]
    both = next((b for b in smaller if fits(steps["transformers"], batch(b), c.device)), None)
    contenders = {"ours": steps["ours"], "ours-unpadded": ours_unpadded}
    if both is not None:
        contenders["transformers"] = steps["transformers"]
    at = both or largest
    speed = tokens_per_s(contenders, batch(at), c.device, rounds=6 if c.on_gpu else 2)
    peak, _ = peak_flops(torch.device(c.device), "bf16", None)
    per_token = flops_per_token(cfg)
    for name, tps in speed.items():
        mfu = tps * per_token / peak
        line = f"{tps:,.0f} tokens/s, MFU {mfu:.1%} at micro batch {at}"
        c.say(f"124m-{name}", None, line, tokens_per_s=tps, mfu=mfu, micro_batch=at)
    if both is None:
        c.say("124m-ours-over-transformers", None, f"transformers fits none of {smaller}")
    else:
        ratio = speed["ours"] / speed["transformers"]
        c.say("124m-ours-over-transformers", ratio >= 0.9, f"{ratio:.2f}x", ratio=ratio)
    gain = speed["ours"] / speed["ours-unpadded"]
    c.say("vocab-padding-gain", None, f"{gain:.2f}x (50304 head rows against 50257)", gain=gain)
    if at != largest:
        alone = tokens_per_s({"ours": steps["ours"]}, batch(largest), c.device, rounds=3)["ours"]
        mfu = alone * per_token / peak
        line = f"{alone:,.0f} tokens/s, MFU {mfu:.1%} at micro batch {largest}"
        c.say("124m-ours-largest-batch", None, line, tokens_per_s=alone, mfu=mfu)


def tokens_per_s(contenders: dict, batch: list, device: str, rounds: int) -> dict[str, float]:
    """Median tokens/s of each contender, timed in turns."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            times[name] += timed(step, batch, device, 1)
    tokens = batch[0].numel()
    return {name: tokens / median(seconds) for name, seconds in times.items()}


STEPS = [  # (name, seconds it needs at least, the step)
    ("environment", 5, step_environment),
    ("parity", 20, step_parity),
    ("head-gradients", 20, step_head_gradients),
    ("short-run", 30, step_short_run),
    ("fp16", 30, step_fp16),
    ("resume", 45, step_resume),
    ("fsdp", 40, step_fsdp),
    ("fsdp-compile", 60, step_fsdp_compile),
    ("generate", 20, step_generate),
    ("evaluate", 20, step_evaluate),
    ("throughput", 60, step_throughput),
]


def prepare_data(c: Check) -> None:
    """The tiny config's corpus (Python's standard library: no network), prepared into
    the work directory, unless --data-root names a prepared one."""
    if c.data_root is not None:
        return
    c.data_root = c.work / "data"
    cmd = [sys.executable, "-m", "pipeline.prepare", "--config", "configs/tiny.yaml"]
    launch(c, [*cmd, f"data.root={c.data_root}"], "prepare.log")


def run_steps(c: Check, only: set[str] | None = None) -> None:
    prepare_data(c)
    for name, needs, step in STEPS:
        if only and name not in only:
            continue
        c.step_started = time.perf_counter()
        if c.left() < needs:
            c.add(Row(name, "SKIP", 0.0, f"not started: {c.left():.0f} s of the budget left"))
            continue
        try:
            step(c)
        except Exception as e:  # one step's failure is a row; the others still run
            (c.out / "logs").mkdir(parents=True, exist_ok=True)
            (c.out / "logs" / f"{name}.error").write_text(traceback.format_exc())
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            c.say(name, False, f"{type(e).__name__}: {first[:300]}")


def report(c: Check) -> dict:
    counts = {s: sum(r.status == s for r in c.rows) for s in STATUSES}
    result = {
        "benchmark": "gpu-check",
        "device": c.device,
        "machine": machine(),
        "seconds": time.perf_counter() - c.started,
        "counts": counts,
        "rows": [vars(r) for r in c.rows],
    }
    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / "gpu-check.json").write_text(json.dumps(result, indent=2, default=str))
    columns = ["status", "check", "seconds", "detail"]
    rows = [{**vars(r), "seconds": round(r.seconds, 1)} for r in c.rows]
    head = f"gpu-check on {result['machine']['device']}: " + ", ".join(
        f"{n} {s}" for s, n in counts.items()
    )
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[k]).replace("|", "/") for k in columns) + " |" for r in rows]
    (c.out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    print(head)
    print(table(rows, columns))
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--cpu", action="store_true", help="the same steps on tiny shapes on the CPU"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "gpu-check-results", help="where the table and JSON go"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds after which no step starts (default 450)",
    )
    parser.add_argument(
        "--data-root", type=Path, help="a prepared data root to use instead of preparing"
    )
    parser.add_argument(
        "--data-name", default="python-stdlib-1mb", help="the data set under --data-root"
    )
    parser.add_argument(
        "--only", nargs="*", metavar="STEP", help=f"some of: {', '.join(n for n, _, _ in STEPS)}"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        sys.exit(
            "gpu-check: no GPU is visible here (torch.cuda.is_available() is False); "
            "`python -m benchmarks.gpu_check --cpu` runs the same steps on the CPU"
        )
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    check = Check(
        device="cpu" if args.cpu else "cuda",
        out=args.out,
        work=work,
        budget_s=args.budget,
        data_root=args.data_root,
        data_name=args.data_name,
    )
    try:
        run_steps(check, set(args.only) if args.only else None)
        return report(check)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
