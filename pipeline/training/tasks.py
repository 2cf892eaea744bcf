"""Multiple-choice tasks scored by the model itself, completion style, as llm.c scores
HellaSwag (dev/data/hellaswag.py): each choice is appended to the context, the model's
cross-entropy is taken over the choice's tokens only, and the choice with the lowest
sum (acc) and the lowest mean per token (acc_norm) is the model's answer.

The general format, one JSON object per line:

    {"context": "A man is sitting on a roof. he", "choices": [" is ...", " starts ..."], "label": 1}

Choices are appended to the context as they are, so they carry their own leading space.
HellaSwag's val jsonl (ctx, endings, label; ctx_a/ctx_b are parts of ctx) converts into
it with a space before each ending, as llm.c does. A context and choice longer than the
model's context are cut from the left of the context (never inside the choice while it fits).

Knows the tokenizer and a model's forward; nothing of files beyond reading jsonl.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.data.tokenizer import encode

# The file llm.c and build-nanogpt download. Its sha256 is not recorded here: this
# project's machines have no network to read it from. Pin it with --task-sha256.
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_MAX_BYTES = 64 * 2**20  # the val file is ~11 MB; a wrong URL stops here


class TaskError(PipelineError):
    """A task file that is not in its format."""


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


def read_examples(path: str | Path, task: str) -> list[Example]:
    """The examples of a task file: `task` is "mc" (the general format) or "hellaswag"."""
    convert = {"mc": _from_mc, "hellaswag": _from_hellaswag}[task]
    examples = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:  # bytes: a line that is not UTF-8 is named like any other bad line
                examples.append(convert(json.loads(line.decode("utf-8"))))
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                why = "nested too deeply" if isinstance(e, RecursionError) else e
                raise TaskError(
                    f"{path} line {number} is not a {task} example ({why}); {FORMATS[task]}"
                ) from None
    if not examples:
        raise TaskError(f"{path} holds no examples; {FORMATS[task]}")
    return examples


FORMATS = {
    "mc": 'each line must be {"context": str, "choices": [str, ...], "label": index of the '
    "right choice}",
    "hellaswag": "each line must be a HellaSwag example with ctx, endings and label",
}


def _from_mc(row: dict) -> Example:
    return _checked(row["context"], row["choices"], row["label"])


def _from_hellaswag(row: dict) -> Example:
    return _checked(row["ctx"], [" " + ending for ending in row["endings"]], row["label"])


def _checked(context, choices, label) -> Example:
    # An empty context leaves a one-token choice with no prediction to score: it would
    # count as wrong in silence.
    if (
        not isinstance(context, str)
        or not context
        or not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise ValueError("context must be non-empty text and choices at least two non-empty texts")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"label {label!r} is not an index into the {len(choices)} choices")
    return Example(context, tuple(choices), label)


def load_task(
    task: str, task_file: str | None = None, url: str | None = None, sha256: str | None = None
) -> list[Example]:
    """The examples of `task`: from `task_file`, or for hellaswag the val jsonl downloaded
    once into ~/.cache/gpt-pipeline (size limited; its sha256 checked when given)."""
    from pipeline.data.corpus import CorpusError, download

    if task_file:
        if not Path(task_file).is_file():
            raise TaskError(f"the task file {task_file} does not exist")
        if sha256 is not None:  # pinned: the file must be that one, wherever it came from
            from pipeline.core.fileio import file_sha256

            found = file_sha256(Path(task_file))
            if found != sha256.lower():
                raise TaskError(
                    f"the task file {task_file} has sha256 {found}, not the "
                    f"{sha256} given with --task-sha256; it is not the pinned file"
                )
        return read_examples(task_file, task)
    if task != "hellaswag":
        raise TaskError(
            f"task {task} needs a task file (one JSON object per line: context, choices, label)"
        )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt-pipeline"
    try:
        path = download(
            url or HELLASWAG_URL, cache / "hellaswag", sha256=sha256, max_bytes=HELLASWAG_MAX_BYTES
        )
    except CorpusError as e:
        raise TaskError(
            f"HellaSwag's val file (--task-url, --task-sha256): {e} With no "
            f"network, download it elsewhere and give its path as the task "
            f"file."
        ) from None
    return read_examples(path, "hellaswag")


# ----------------------------------------------------------------------------- scoring


def choice_rows(example: Example, context_length: int) -> list[tuple[list[int], int]]:
    """Per choice: the token ids context + choice (at most context_length + 1, cut from
    the left) and how many of the last ids are the choice's."""
    context = encode(example.context)
    rows = []
    for choice in example.choices:
        ending = encode(choice)
        ids = (context + ending)[-(context_length + 1) :]
        rows.append((ids, min(len(ending), len(ids) - 1)))
    return rows


def choice_losses(
    model: torch.nn.Module, rows: list[tuple[list[int], int]], device, autocast=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) of the token losses of each row's choice, in one padded forward."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (ids, n_choice) in enumerate(rows):
        n = len(ids) - 1
        inputs[i, :n], targets[i, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        mask[i, n - n_choice : n] = True  # predictions of the choice's tokens
    with torch.no_grad(), autocast() if autocast else torch.autocast(device.type, enabled=False):
        logits = model(inputs.to(device))
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), targets.to(device), reduction="none"
    ) * mask.to(device)
    sums = losses.sum(dim=1)
    return sums, sums / mask.sum(dim=1).to(device)


def rows_per_forward(batch_examples: int) -> int:
    return batch_examples * 4  # a forward's rows, however many choices an example has


def forwards_needed(examples: list[Example], batch_examples: int) -> int:
    """How many forwards score_examples makes for `examples`."""
    most = rows_per_forward(batch_examples)
    return sum(
        -(-sum(len(ex.choices) for ex in examples[i : i + batch_examples]) // most)
        for i in range(0, len(examples), batch_examples)
    )


def score_examples(
    model,
    examples: list[Example],
    context_length: int,
    device,
    autocast=None,
    batch_examples: int = 8,
    forwards: int | None = None,
) -> torch.Tensor:
    """[right by sum, right by mean, examples] (float64) over `examples`. With `forwards`,
    one-token forwards that count for nothing follow until that many were made: under
    FSDP every forward is a collective, and a process with fewer would leave the others
    waiting forever."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    max_rows = rows_per_forward(batch_examples)
    for start in range(0, len(examples), batch_examples):
        chunk = examples[start : start + batch_examples]
        rows = [row for ex in chunk for row in choice_rows(ex, context_length)]
        scored = [
            choice_losses(model, rows[i : i + max_rows], device, autocast)
            for i in range(0, len(rows), max_rows)
        ]
        sums, means = (torch.cat(parts) for parts in zip(*scored))
        first = 0
        for ex in chunk:
            n = len(ex.choices)
            counts[0] += int(sums[first : first + n].argmin()) == ex.label
            counts[1] += int(means[first : first + n].argmin()) == ex.label
            first += n
        counts[2] += len(chunk)
    for _ in range((forwards or 0) - forwards_needed(examples, batch_examples)):
        with (
            torch.no_grad(),
            autocast() if autocast else torch.autocast(device.type, enabled=False),
        ):
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
    return counts


def evaluate_task(model, examples: list[Example], accelerator, batch_examples: int = 8) -> dict:
    """acc, acc_norm and the number of examples, each process scoring a disjoint share
    (every num_processes-th example) and the counts summed once."""
    was_training = model.training
    model.eval()
    share = examples[accelerator.process_index :: accelerator.num_processes]
    context_length = accelerator.unwrap_model(model).cfg.context_length
    forwards = None
    if accelerator.num_processes > 1:  # every process makes as many forwards as the most
        mine = torch.tensor([forwards_needed(share, batch_examples)], device=accelerator.device)
        forwards = int(accelerator.gather(mine).max())
    counts = score_examples(
        model,
        share,
        context_length,
        accelerator.device,
        accelerator.autocast,
        batch_examples,
        forwards,
    )
    right, right_norm, n = accelerator.reduce(counts, reduction="sum").tolist()
    model.train(was_training)
    return {"acc": right / n, "acc_norm": right_norm / n, "examples": int(n)}
