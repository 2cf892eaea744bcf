"""Stage 3: loss and perplexity of a model over a prepared data set's whole val split.

    python -m pipeline.evaluate --model runs/<name> [--max-batches N] [--batch-size B]
    python -m pipeline.evaluate model=runs/<name> task=mc task_file=my-task.jsonl
    python -m pipeline.evaluate --model gpt2 --data data/<name> --context-length 256 --out gpt2-eval.json
    python -m pipeline.evaluate --model runs/<name> --harness hellaswag     # lm-eval's tasks
    accelerate launch -m pipeline.evaluate --model runs/<name>      # several processes

`--model` takes every source pipeline.model.weights reads. The data set is `--data`, else the
one of `--config`, else the one of the run (its config.yaml) or checkpoint (its meta.json).
Every val window (context_length inputs, next-token targets, non-overlapping) is scored
once: under `accelerate launch` each process takes its disjoint share (loader.fixed_batches)
and the processes add up sum(loss x tokens) and the token count, so nothing is counted
twice and the mean is over tokens whatever the process count. Writes eval.json beside the
model (the run dir, checkpoint dir or model dir; `--out` for anything else) and prints one
line. Evaluating OpenAI's GPT-2 on your own val split at your context length is how a run
is compared with it.

Knows Accelerate, the loader's interface and a run's config.yaml (through the schema);
checkpoints and exports only as pipeline.model.weights reads them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from accelerate.utils import DistributedType

from pipeline.config import Config, from_dict, load_config
from pipeline.config.options import Usage, parse_options
from pipeline.core import log
from pipeline.core.errors import PipelineError, cli_main
from pipeline.core.fileio import atomic_write_json
from pipeline.core.schema import require, setting
from pipeline.data.loader import TokenWindows, fixed_batches
from pipeline.data.shards import load_manifest
from pipeline.model.head_loss import IGNORE_INDEX
from pipeline.model.weights import ModelSource

EVAL_FILE = "eval.json"


def loss_sums(model: torch.nn.Module, batches, device, autocast=None) -> torch.Tensor:
    """[sum of token losses, number of tokens] (float64) over `batches` on this process.

    The caller adds these up across processes; their ratio is the mean loss per token.
    """
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                loss = model(x, targets=y)  # mean over the batch, never the whole logits
            counted = (y != IGNORE_INDEX).sum().double()
            # A batch with nothing to count has a nan mean: it adds zero, not nan.
            sums += torch.stack([torch.where(counted > 0, loss.double() * counted, 0.0), counted])
    return sums


def _padded(batches, total: int, filler):
    """`batches`, then `filler` until `total` batches went by. Under FSDP every process
    must join every forward (each gathers weights from all), but the val split gives some
    processes one batch fewer: they run a batch whose targets are all ignored."""
    done = 0
    for batch in batches:
        done += 1
        yield batch
    for _ in range(total - done):
        yield filler


def evaluate(
    model: torch.nn.Module,
    windows: TokenWindows,
    micro_batch_size: int,
    accelerator,
    max_batches: int | None = None,
    order: np.ndarray | None = None,
) -> dict:
    """Loss, perplexity and tokens over `windows` (those listed in `order`, when given),
    summed over all of accelerator's processes."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    batches = fixed_batches(
        windows,
        micro_batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        max_batches,
        order,
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        count = len(windows) if order is None else len(order)
        most = len(range(0, count, micro_batch_size * accelerator.num_processes))
        x, y = windows.batch(np.arange(1))  # rank 0 gets the most batches: as many as this
        batches = _padded(
            batches,
            most if max_batches is None else min(most, max_batches),
            (x, torch.full_like(y, IGNORE_INDEX)),
        )
    sums = accelerator.reduce(
        loss_sums(model, batches, accelerator.device, accelerator.autocast), reduction="sum"
    )
    seconds = time.perf_counter() - start
    model.train(was_training)
    loss_total, tokens = sums.tolist()
    if tokens == 0:
        raise PipelineError("no val tokens were evaluated (--max-batches 0?)")
    loss = loss_total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": int(tokens),
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
    }


def sliding_window_sums(
    model: torch.nn.Module,
    ids: list[int],
    context_length: int,
    stride: int,
    device,
    autocast=None,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """[sum of token losses, tokens] over one token sequence, windowed exactly as the
    Hugging Face perplexity guide does: windows of context_length tokens start every
    `stride` tokens, and each scores only the tokens after the previous window's end, with
    up to context_length - stride tokens of context before them. No token is scored twice;
    with stride = context_length the first token of each window is not scored (nothing
    precedes it there). Process `rank` of `world` takes every world-th window."""
    windows, previous_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context_length, len(ids))
        windows.append((begin, end, end - previous_end))  # the last n tokens are new
        previous_end = end
        if end == len(ids):
            break
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for begin, end, new in windows[rank::world]:
        if end - begin < 2:
            continue
        window = torch.tensor(ids[begin:end], device=device)
        x, y = window[:-1].unsqueeze(0), window[1:].clone().unsqueeze(0)
        y[0, : max(end - begin - new - 1, 0)] = IGNORE_INDEX  # scored by an earlier window
        counted = (y != IGNORE_INDEX).sum().double()
        with (
            torch.no_grad(),
            autocast() if autocast else torch.autocast(device.type, enabled=False),
        ):
            loss = model(x, targets=y)
        sums += torch.stack([loss.double() * counted, counted])
    return sums


def text_ids(paths: list[str]) -> list[int]:
    """The documents of text files (txt, jsonl, parquet: the corpus readers) as one token
    sequence, each document preceded by <|endoftext|> as prepare lays them out."""
    from pipeline.config import SourceConfig
    from pipeline.data.parts import documents
    from pipeline.data.tokenizer import EOT_ID, encode

    ids: list[int] = []
    for doc in documents(SourceConfig(kind="files", paths=list(paths)), Path(".")):
        ids += [EOT_ID, *encode(doc)]
    return ids


# ----------------------------------------------------------------------------- CLI


def run_config(info) -> Config | None:
    """The config that produced the model, read back through the schema, when the source
    is a run (its config.yaml) or a checkpoint (its meta.json); else None."""
    if info.kind == "run" and (info.home / "config.yaml").is_file():
        return load_config(info.home / "config.yaml")
    if info.kind in ("run", "checkpoint") and (info.meta or {}).get("config"):
        return from_dict(info.meta["config"])
    return None


def _data_dir(args, config: Config | None) -> Path:
    if args.data:
        return Path(args.data)
    if config is not None:
        return config.data_dir
    raise PipelineError(
        f"which data set should {args.model} be evaluated on? Give --data DIR (a prepared "
        f"data set, made by `python -m pipeline.prepare`) or --config CONFIG"
    )


def _out_path(args, info) -> Path | None:
    if args.out:
        return Path(args.out)
    if info.kind == "book":
        return info.path.with_name(f"{info.path.stem}.{EVAL_FILE}")
    return info.home / EVAL_FILE if info.home is not None else None


@dataclass
class EvaluateOptions(ModelSource):
    data: Optional[str] = setting(
        None, "the prepared data set to score (default: the run's, or --config's)", metavar="DIR"
    )
    config: Optional[str] = setting(
        None, "an experiment YAML: its data set and micro batch size are used", metavar="CONFIG"
    )
    max_batches: Optional[int] = setting(
        None, "micro batches per process (default: the whole val split)"
    )
    batch_size: Optional[int] = setting(
        None, "sequences per micro batch (default: the run's train.micro_batch_size, or 8)"
    )
    context_length: Optional[int] = setting(
        None, "crop the model to this context (default: the model's own)"
    )
    precision: Optional[Literal["auto", "fp32", "no", "bf16", "fp16"]] = setting(
        None,
        "autocast: fp32 (also `no`), bf16 or fp16; auto: bf16 where the hardware has "
        "bf16 units (default: the run's train.precision, else fp32)",
    )
    out: Optional[str] = setting(
        None, f"where to write the results (default: {EVAL_FILE} beside the model)", metavar="FILE"
    )
    task: Literal["val", "hellaswag", "mc"] = setting(
        "val",
        "val: loss and perplexity of the val split; hellaswag: accuracy on HellaSwag's "
        "val set as llm.c scores it; mc: your own multiple-choice jsonl (--task-file)",
    )
    task_file: Optional[str] = setting(
        None, "the task's examples (hellaswag: default, downloaded once)", metavar="JSONL"
    )
    task_url: Optional[str] = setting(
        None, "where HellaSwag's val jsonl is downloaded from (default: llm.c's URL)", metavar="URL"
    )
    task_sha256: Optional[str] = setting(
        None, "the sha256 the downloaded task file must have", metavar="HEX"
    )
    text: list[str] = setting(
        help="instead of a data set: perplexity of these files (txt, "
        "jsonl, parquet); repeat for several",
        default_factory=list,
        metavar="FILE",
    )
    stride: Optional[int] = setting(
        None,
        "with --text: tokens between window starts (default: "
        "the context length; smaller gives each token more "
        "context, as HF's guide)",
    )
    harness: list[str] = setting(
        help="instead: lm-evaluation-harness tasks (TASK[,TASK...]; repeat for more), "
        "scored by lm-eval on an HF export of the model",
        default_factory=list,
        metavar="TASKS",
    )
    harness_include: list[str] = setting(
        help="with --harness: a folder of your own lm-eval task YAMLs; repeat for several",
        default_factory=list,
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("max_batches", "batch_size", "context_length", "stride"):
            value = getattr(self, key)
            require(
                value is None or value >= 1, "--" + key.replace("_", "-"), value, "a positive count"
            )


USAGE = Usage(
    "python -m pipeline.evaluate",
    "Val loss and perplexity of a model, its accuracy "
    "on a multiple-choice task, the perplexity of text files, or lm-evaluation-harness tasks.",
    "examples:\n  python -m pipeline.evaluate --model runs/tiny\n"
    "  python -m pipeline.evaluate model=gpt2 data=data/python-stdlib-1mb "
    "context_length=128\n  python -m pipeline.evaluate --model runs/tiny --task mc "
    "--task-file my-task.jsonl\n  python -m pipeline.evaluate --model runs/tiny --harness "
    "my_mc --harness-include configs/harness",
)


def parse_args(argv=None) -> EvaluateOptions:
    return parse_options(EvaluateOptions, argv, USAGE)


def check_inputs(args) -> None:
    """The files a run will read, before the model is loaded."""
    from pipeline.data.corpus import resolve_files

    if args.harness or args.harness_include:
        check_harness_inputs(args)
    if args.text:
        resolve_files(args.text)  # names an entry that matches no file
    if args.task_file and not Path(args.task_file).is_file():
        raise PipelineError(f"--task-file {args.task_file} does not exist")
    if args.task == "mc" and not args.task_file:
        raise PipelineError(
            "--task mc needs --task-file FILE (one JSON object per line: context, choices, label)"
        )
    if args.out:
        check_out_file(Path(args.out))


def check_harness_inputs(args) -> None:
    if not args.harness:
        raise PipelineError("--harness-include names task folders for --harness TASK; give both")
    from pipeline.harness import task_names

    if not task_names(args.harness):
        raise PipelineError(
            f"--harness {','.join(args.harness)!r} names no task; give lm-eval task names, "
            f"e.g. --harness hellaswag,arc_easy"
        )
    if args.task != "val" or args.text:
        raise PipelineError(
            "--harness runs lm-eval's tasks on the model; give it alone, or run --task or "
            "--text in another command (their results are kept side by side in eval.json)"
        )
    for path in args.harness_include:
        if not Path(path).is_dir():
            raise PipelineError(
                f"--harness-include {path} is not a directory; give the folder that holds "
                f"your task YAML files"
            )


def check_out_file(out: Path) -> None:
    """--out may name a new file or an earlier result of evaluate (a JSON object with its
    "model" key), never a file of the user's, which atomic_write_json would replace."""
    if not out.exists() and not out.is_symlink():
        return
    try:
        earlier = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        earlier = None
    if not (
        out.is_file() and not out.is_symlink() and isinstance(earlier, dict) and "model" in earlier
    ):
        raise PipelineError(
            f"--out {out} exists and is not an earlier evaluate result, so it "
            f"is left as it is; choose another --out FILE, or move that file "
            f"away yourself."
        )


def run_text(args, model, info, accelerator) -> dict:
    context = model.cfg.context_length
    stride = args.stride or context
    if not 0 < stride <= context:
        raise PipelineError(f"--stride {stride}: it must be 1 .. the context length ({context})")
    ids = text_ids(args.text)
    start = time.perf_counter()
    sums = accelerator.reduce(
        sliding_window_sums(
            model,
            ids,
            context,
            stride,
            accelerator.device,
            accelerator.autocast,
            accelerator.process_index,
            accelerator.num_processes,
        ),
        reduction="sum",
    )
    loss_total, tokens = sums.tolist()
    loss = loss_total / tokens
    result = {
        "text": list(args.text),
        "stride": stride,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": int(tokens),
        "seconds": time.perf_counter() - start,
    }
    if accelerator.is_main_process:
        if args.out:
            atomic_write_json(Path(args.out), {"model": str(args.model), **result})
        log.info(
            f"text loss {loss:.4f} | perplexity {result['perplexity']:.2f} | "
            f"{int(tokens):,} tokens | stride {stride} | {args.out or 'not saved (give --out FILE)'}"
        )
    return result


def run_task(args, model, info, accelerator) -> dict:
    from pipeline.training.tasks import evaluate_task, load_task

    examples = load_task(args.task, args.task_file, args.task_url, args.task_sha256)
    if args.max_batches is not None:  # a quick look: that many batches of examples
        examples = examples[: args.max_batches * (args.batch_size or 8) * accelerator.num_processes]
    start = time.perf_counter()
    result = evaluate_task(model, examples, accelerator, args.batch_size or 8)
    result["seconds"] = time.perf_counter() - start
    out = _out_path(args, info)
    if accelerator.is_main_process:
        if out is not None:  # beside the val loss of the same weights, when one is there
            record = earlier_results(out, info) or {
                "model": str(args.model),
                "weights": str(info.path),
            }
            record.setdefault("tasks", {})[args.task] = result
            atomic_write_json(out, record)
        log.info(
            f"{args.task}: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | "
            f"{result['examples']:,} examples | {out or 'not saved (give --out FILE)'}"
        )
    return result


@cli_main
def main(argv=None) -> dict:
    from accelerate import Accelerator

    from pipeline.model.weights import load_model

    args = parse_args(argv)
    check_inputs(args)
    if args.harness:
        return run_harness(args)
    model, info = load_model(args.model, context_length=args.context_length, n_heads=args.n_heads)
    config = load_config(args.config) if args.config else run_config(info)
    data_dir = None
    if args.task == "val" and not args.text:
        data_dir = _data_dir(args, config)
        vocab = load_manifest(data_dir).vocab_size
        if vocab > model.cfg.vocab_size:
            raise PipelineError(
                f"{data_dir} uses a vocabulary of {vocab} tokens, more than the "
                f"model's {model.cfg.vocab_size}"
            )
    precision = _precision(args, config)
    accelerator = Accelerator(mixed_precision=precision)
    model = model.to(accelerator.device)
    try:
        if data_dir is None:
            run_other = run_text if args.text else run_task
            return run_other(args, model, info, accelerator)
        return run_val(args, model, info, accelerator, config, data_dir, precision)
    finally:
        # Destroys the process group under a launcher: left to the interpreter's exit,
        # its gloo threads could abort a process now and then ("terminate called
        # without an active exception", exit -6) after the results were written.
        accelerator.end_training()


def run_harness(args) -> dict:
    """lm-evaluation-harness's tasks on the model (pipeline/harness.py), every check made
    before the model is loaded; the results go under "harness" in eval.json."""
    from pipeline import harness
    from pipeline.model.checkpoints import read_meta
    from pipeline.model.weights import load_state, resolve

    names = harness.task_names(args.harness)
    harness.require_lm_eval()
    harness.check_one_process()
    info = resolve(args.model)
    if info.kind == "checkpoint" or info.kind == "run":
        info.meta = read_meta(info.path)
    if args.context_length is not None:  # lm-eval's max_length: a crop, never more positions
        load_state(args.model, context_length=args.context_length, n_heads=args.n_heads)
    manager = harness.task_manager(names, args.harness_include)
    tasks = harness.load_tasks(manager, names)
    precision = _precision(args, load_config(args.config) if args.config else run_config(info))
    batch_size = args.batch_size or 8
    limit = args.max_batches * batch_size if args.max_batches is not None else None
    with harness.hf_directory(info, args.n_heads) as model_dir:
        results = harness.evaluate_tasks(
            model_dir, tasks, manager, batch_size, precision, limit, args.context_length
        )
    out = _out_path(args, info)
    if out is not None:  # beside the val loss and --task results of the same weights
        record = earlier_results(out, info) or {"model": str(args.model), "weights": str(info.path)}
        record.setdefault("harness", {}).update(results)
        atomic_write_json(out, record)
    for name, entry in results.items():
        log.info(harness.summary(name, entry))
    log.info(f"harness results: {out or 'not saved (give --out FILE)'}")
    return results


def run_val(args, model, info, accelerator, config, data_dir: Path, precision: str) -> dict:
    batch_size = args.batch_size or (config.train.micro_batch_size if config else 8)
    windows = TokenWindows(data_dir, "val", model.cfg.context_length)
    result = evaluate(model, windows, batch_size, accelerator, args.max_batches)
    by_source = {}  # a mixture's val loss per source, over each source's whole val split
    for name in load_manifest(data_dir).sources:
        own = TokenWindows(data_dir, "val", model.cfg.context_length, source=name)
        by_source[name] = evaluate(model, own, batch_size, accelerator, args.max_batches)
    record = {
        "model": str(args.model),
        "weights": str(info.path),
        "step": (info.meta or {}).get("step"),
        "data": str(data_dir),
        "split": "val",
        "context_length": model.cfg.context_length,
        "windows": len(windows),
        "micro_batch_size": batch_size,
        "max_batches": args.max_batches,
        "processes": accelerator.num_processes,
        "precision": precision,
        **result,
    }
    if by_source:
        record["sources"] = {
            name: {k: r[k] for k in ("loss", "perplexity", "tokens")}
            for name, r in by_source.items()
        }
    out = _out_path(args, info)
    if accelerator.is_main_process:
        if out is not None:  # task results of the same weights stay beside the new loss
            earlier = earlier_results(out, info) or {}
            kept = {key: earlier[key] for key in ("tasks", "harness") if earlier.get(key)}
            atomic_write_json(out, {**record, **kept})
        where = out if out is not None else "not saved (give --out FILE)"
        log.info(
            f"val loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
            f"{result['tokens']:,} tokens | {result['tokens_per_second']:,.0f} tokens/s | {where}"
        )
        for name, r in by_source.items():
            log.info(
                f"  source {name}: val loss {r['loss']:.4f} | perplexity "
                f"{r['perplexity']:.2f} | {r['tokens']:,} tokens"
            )
    return record


def earlier_results(out: Path, info) -> dict | None:
    """What an earlier evaluate wrote to `out` about these same weights (None when the
    file is missing, unreadable or about other weights: results of an older checkpoint
    are not kept beside a newer one's)."""
    try:
        record = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("weights") != str(info.path):
        return None
    return record


def _precision(args, config) -> str:
    """--precision, else the run's train.precision (auto resolved for this machine)."""
    from pipeline.training.precision import resolve

    requested = args.precision or (config.train.precision if config else "no")
    return resolve(requested, "cuda" if torch.cuda.is_available() else "cpu")[0]


if __name__ == "__main__":
    main()
