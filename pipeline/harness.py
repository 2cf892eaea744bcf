"""`evaluate --harness`: EleutherAI's lm-evaluation-harness on a model of this project.

    python -m pipeline.evaluate --model runs/<name> --harness hellaswag,arc_easy
    python -m pipeline.evaluate --model runs/<name>/export --harness my_task --harness-include tasks/

lm-eval scores a Hugging Face model directory through its own `hf` model (transformers'
AutoModelForCausalLM, its own batching and tokenization), so its numbers are lm-eval's,
not a re-implementation of them. An export is such a directory already and is read in
place; any other source (a run, a checkpoint, GPT-2 by name, the book's model.pth) is
exported on the fly into a temporary directory that is removed afterwards.

Everything the user can get wrong is found before a model is loaded: lm-eval missing (the
`pip install` that adds it), a task name it does not know (with the closest ones), and a
task whose data cannot be read (a Hub data set without a network: what to download, or how
to point a local task at files). The tasks are built once, their data read then, and that
build is what is evaluated.

Results land in eval.json beside the model, under "harness", one entry per task with
lm-eval's metrics (`acc`, `acc_stderr`, `acc_norm`, ...) and what produced them (lm-eval's
version, the dtype, the few-shot count, how many samples); our own val loss and `--task`
results stay beside them.

Knows lm-eval's Python API (TaskManager, simple_evaluate) and the export stage; nothing of
how lm-eval scores.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from pipeline.core import log
from pipeline.core.errors import PipelineError

INSTALL_HINT = (
    "pip install 'gpt-pipeline[harness]' (that is lm-eval>=0.4.13 and transformers); "
    "`make install` puts it in .venv with the test extras"
)
# lm-eval's dtype names for the precisions evaluate takes (after `auto` is resolved):
# lm-eval loads the weights in that dtype, where this project's own scoring autocasts.
DTYPES = {"no": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def task_names(values: list[str]) -> list[str]:
    """`--harness a,b --harness c` as [a, b, c], each once, in order."""
    names = [n.strip() for value in values for n in value.split(",")]
    return list(dict.fromkeys(n for n in names if n))


def require_lm_eval():
    """The lm_eval module, or a paragraph saying how to install it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401 (0.4.13's API, checked here)
    except ImportError as e:
        raise PipelineError(
            f"--harness runs EleutherAI's lm-evaluation-harness, which is not installed "
            f"here ({e}). Install it with {INSTALL_HINT}."
        ) from None
    return lm_eval


def task_manager(names: list[str], include: list[str]):
    """lm-eval's TaskManager knowing `names`: the --harness-include directories alone when
    they hold every task (indexing lm-eval's own ~15,000 task files takes seconds), else
    those and lm-eval's own. A name neither knows is one paragraph with the closest ones."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=list(include), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=list(include) or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        close = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        hints = "; ".join(
            f"'{n}'" + (f" (did you mean {', '.join(c)}?)" if c else "") for n, c in close.items()
        )
        where = f"in {', '.join(include)} nor " if include else ""
        raise PipelineError(
            f"--harness: lm-eval knows no task {hints} {where}among its own "
            f"{len(manager.all_tasks):,} tasks, groups and tags. `lm-eval ls tasks` lists "
            f"them; a task of your own is a YAML file in a folder given with --harness-include."
        )
    return manager


def load_tasks(manager, names: list[str]) -> list:
    """The task and group objects of `names`, built (their data read) before any model is
    loaded; a task whose data cannot be read is one paragraph."""
    try:
        with quiet_hub_retries():
            loaded = manager.load(names)
    except Exception as e:  # lm-eval and datasets raise anything for a bad task or no network
        raise PipelineError(unreadable_task_message(names, e)) from None
    children = {child for kids in loaded["group_map"].values() for child in kids}
    everything = {**loaded["groups"], **loaded["tasks"]}
    return [task for name, task in everything.items() if name not in children]


def unreadable_task_message(names: list[str], error: Exception) -> str:
    what = (
        f"lm-eval could not build the task(s) {', '.join(names)}: {type(error).__name__}: {error}"
    )
    if not (isinstance(error, ConnectionError) or "offline" in str(error).lower()):
        return f"{what}. Check the task's YAML (its dataset_path, data_files and templates)."
    named = re.search(r"reach '([^']+)'", str(error))  # datasets names the data set it wanted
    dataset = named.group(1) if named else "<the task's dataset_path>"
    return (
        f"{what}. Its data set comes from the Hugging Face Hub, which cannot be reached from "
        f'here. Download it on a machine with a network (`python -c "import datasets; '
        f"datasets.load_dataset('{dataset}')\"`, with the task's dataset_name as a second "
        f"argument if its YAML has one), copy ~/.cache/huggingface/datasets (or "
        f"HF_DATASETS_CACHE) to this machine and run again with HF_DATASETS_OFFLINE=1; or "
        f"point a task YAML of your own at local files (dataset_path: json, "
        f"dataset_kwargs.data_files) and give its folder with --harness-include."
    )


@contextlib.contextmanager
def quiet_hub_retries():
    """huggingface_hub logs every retry of an unreachable Hub as a warning (5 of them);
    the failure that follows is explained in one paragraph instead."""
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def check_one_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PipelineError(
            "--harness runs in one process (lm-eval batches on one device). For lm-eval's "
            "data parallelism, export the model and run `accelerate launch -m lm_eval --model "
            "hf --model_args pretrained=DIR --tasks TASKS` yourself."
        )


@contextlib.contextmanager
def hf_directory(info, n_heads: int | None = None):
    """A Hugging Face model directory lm-eval can load, tokenizer included, of the source
    `info` (pipeline.model.weights.resolve's): the source itself when it is one, else an
    export of it in a temporary directory."""
    if info.kind == "hf" and has_tokenizer(info.path):
        yield info.path
        return
    from pipeline.export import export

    with tempfile.TemporaryDirectory(prefix="gpt-pipeline-harness-") as tmp:
        out, _ = export(info.source, Path(tmp) / "model", dtype="fp32", n_heads=n_heads)
        log.note(f"exported {info.source} for lm-eval to a temporary directory")
        yield out


def has_tokenizer(path: Path) -> bool:
    return any(all((path / name).is_file() for name in files) for files in TOKENIZER_FILES)


def evaluate_tasks(
    model_dir: Path,
    tasks: list,
    manager,
    batch_size: int,
    precision: str,
    limit: int | None = None,
    max_length: int | None = None,
) -> dict:
    """lm-eval's simple_evaluate on the model in `model_dir`: {task: its entry}."""
    import lm_eval

    model_args = {
        "pretrained": str(model_dir),
        "dtype": DTYPES[precision],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if max_length is not None:
        model_args["max_length"] = max_length
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        task_manager=manager,
        batch_size=batch_size,
        limit=limit,
    )
    seconds = time.perf_counter() - start  # all tasks together: lm-eval batches across them
    version = lm_eval_version()
    return {
        name: {
            **task_entry(name, metrics, out, model_args["dtype"], version, limit),
            "seconds": seconds,
        }
        for name, metrics in out["results"].items()
    }


def task_entry(name: str, metrics: dict, out: dict, dtype: str, version: str, limit) -> dict:
    """One task's metrics as eval.json keeps them: lm-eval's "acc,none" is "acc" (a filter
    other than none stays in the name: "exact_match,strict-match"), with what made them."""
    entry = {
        key.removesuffix(",none"): value
        for key, value in metrics.items()
        if "," in key and isinstance(value, (int, float))
    }
    samples = out.get("n-samples", {}).get(name, {})
    return {
        **entry,
        "samples": samples.get("effective"),
        "num_fewshot": out.get("n-shot", {}).get(name),
        "version": out.get("versions", {}).get(name),
        "lm_eval": version,
        "dtype": dtype,
        "limit": limit,
    }


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def summary(name: str, entry: dict) -> str:
    """`hellaswag: acc 0.2891 ± 0.0045 | acc_norm 0.3112 ± 0.0046 | 10,042 samples`."""
    shown = [
        f"{key} {value:.4f}"
        + (f" ± {entry[key + '_stderr']:.4f}" if key + "_stderr" in entry else "")
        for key, value in entry.items()
        if isinstance(value, float) and not key.endswith("_stderr") and "stderr," not in key
    ]
    samples = f" | {entry['samples']:,} samples" if entry.get("samples") else ""
    return f"harness {name}: {' | '.join(shown) or 'no metrics'}{samples}"
