"""The sections of the config the train stage owns: `train:` (batch, length, optimizer,
schedule, precision), `eval:` (the evaluations and samples during training),
`checkpoint:` and `tracking:`. Declared here, beside the code that reads them; a new
tracker is a line in TRACKERS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from pipeline.core.schema import Section, check, setting


@dataclass
class TrainConfig(Section):
    SECTION = "train."

    micro_batch_size: int = setting(8, "sequences per process per forward pass")
    grad_accum_steps: int = setting(1, "micro batches per optimizer step")
    max_steps: Optional[int] = setting(
        None,
        "length of the run in optimizer steps: the first that is set of max_steps, "
        "max_tokens, epochs (none set: 1 epoch)",
    )
    max_tokens: Optional[int] = setting(None, "... or in tokens (inputs of the global batch)")
    epochs: Optional[float] = setting(None, "... or in passes over the train split")
    stride: Optional[int] = setting(None, "tokens between window starts (null: context_length)")
    order: Literal["shuffle", "book"] = setting(
        "shuffle",
        "shuffle: a seeded permutation per epoch, split over processes, independent "
        "of everything else (pretraining). book: torch's DataLoader(shuffle=True, "
        "drop_last=True) as the book iterates it, seeds drawn from torch's global "
        "generator (so dropout and order interleave as in the book); one process "
        "only.",
    )
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw",
        "adamw: AdamW for every parameter. muon: Muon for the transformer blocks' "
        "matrices (lr scaled to AdamW's update size, so the same lr and weight_decay "
        "apply), AdamW for embeddings, head, biases and norms "
        "(pipeline/training/muon.py).",
    )
    lr: float = setting(4e-4, "peak learning rate")
    min_lr: Optional[float] = setting(None, "end of the cosine decay (null: lr / 10)")
    warmup_steps: int = setting(0, "linear warmup, in optimizer steps")
    warmup_start_lr: Optional[float] = setting(
        None,
        "the lr of the first warmup step, rising linearly to lr at the end of warmup (the "
        "book's appendix D initial_lr); null: lr / warmup_steps, reaching lr at the last "
        "warmup step",
    )
    schedule: Literal["cosine", "wsd", "constant"] = setting(
        "cosine",
        "after warmup: cosine to min_lr at the last step; wsd (warmup-stable-decay): lr "
        "until the last decay_fraction of the steps, then down to min_lr (a wsd run can be "
        "lengthened from its stable phase by resuming with more steps); constant: lr",
    )
    decay_fraction: float = setting(0.2, "wsd: the share of the steps spent decaying")
    decay_shape: Literal["linear", "1-sqrt"] = setting(
        "linear", "wsd: how the lr falls during the decay (1-sqrt: lr x (1 - sqrt(progress)))"
    )
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay")
    weight_decay_on: Literal["matrices", "all"] = setting(
        "matrices",
        "matrices: decay linear weights and embeddings only (GPT-2, nanoGPT); all: "
        "every parameter, biases and LayerNorms too, as the book's "
        "AdamW(model.parameters())",
    )
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's beta1, beta2")
    grad_clip: Optional[float] = setting(1.0, "max global grad norm (null: no clipping)")
    grad_clip_after_warmup: bool = setting(
        False, "clip only from the end of warmup on, as the book's appendix D (false: every step)"
    )
    precision: Literal["auto", "fp32", "no", "bf16", "fp16"] = setting(
        "no",
        "mixed precision through Accelerate: fp32 (also written `no`, Accelerate's word: "
        "no autocast), bf16, fp16; auto: bf16 where the hardware has bf16 units (GPUs "
        "from Ampere on, CPUs with AVX512_BF16 or AMX), fp16 on older GPUs, else fp32: on "
        "a CPU without bf16 units bf16 is ~40x slower (pipeline/training/precision.py)",
    )
    compile: bool = setting(
        False,
        "torch.compile each transformer block in place (the embeddings and the fused head stay eager)",
    )
    activation_checkpointing: bool = setting(
        False,
        "recompute each transformer block's activations in backward instead of keeping "
        "them: about a third more compute for a fraction of the activation memory "
        "(what lets GPT-2 1.5B train at micro batch 64 x 1024 on 80 GB GPUs)",
    )
    tf32: bool = setting(
        True,
        "fp32 matmuls on GPUs (precision: no) on TF32 tensor cores "
        "(Ampere on): ~8x faster, a 10-bit mantissa in the products. "
        "false: full fp32. No effect on CPUs.",
    )
    peak_flops: Optional[float] = setting(None, "device peak FLOP/s for MFU (null: known GPUs)")
    log_every_steps: int = setting(10, "write metrics every N optimizer steps")
    collective_timeout_minutes: float = setting(
        10.0,
        "how long a process waits for the others in a collective (an all-reduce, a "
        "barrier) before the run ends with an error naming it: a hung or dead peer then "
        "costs minutes, not torch's default of 30. Checkpoint writes and evaluations "
        "count as one wait.",
    )

    def __post_init__(self) -> None:
        self.require_positive("micro_batch_size", "grad_accum_steps", "log_every_steps")
        for name in ("max_steps", "max_tokens", "stride"):
            self.require(
                getattr(self, name) is None or getattr(self, name) > 0, name, "positive, or null"
            )
        self.require(
            self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0),
            "epochs",
            "a positive number, or null",
        )
        self.require(math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number")
        self.require(
            self.min_lr is None or (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr),
            "min_lr",
            f"0 .. train.lr ({self.lr}), or null for lr / 10",
        )
        self.require(self.warmup_steps >= 0, "warmup_steps", "0 or more")
        self.require(
            self.warmup_start_lr is None
            or (math.isfinite(self.warmup_start_lr) and 0 <= self.warmup_start_lr <= self.lr),
            "warmup_start_lr",
            f"0 .. train.lr ({self.lr}), or null",
        )
        self.require(0 < self.decay_fraction <= 1, "decay_fraction", "in (0, 1]")
        self.require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "0 or more"
        )
        check(
            all(math.isfinite(b) and 0 <= b < 1 for b in self.betas),
            f"{self.key('betas')}={list(self.betas)!r} is not allowed: it must be two "
            f"numbers in [0, 1)",
        )
        self.require(
            self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
            "grad_clip",
            "a positive norm, or null for no clipping",
        )
        self.require(
            self.peak_flops is None or self.peak_flops > 0,
            "peak_flops",
            "a positive FLOP/s, or null",
        )
        self.require(
            math.isfinite(self.collective_timeout_minutes) and self.collective_timeout_minutes > 0,
            "collective_timeout_minutes",
            "a positive number of minutes",
        )


TASKS = ("hellaswag", "mc")


@dataclass
class EvalConfig(Section):
    SECTION = "eval."

    every_steps: int = setting(100, "evaluate (and sample) every N optimizer steps")
    first_step: Optional[int] = setting(
        None,
        "step of the first evaluation, then every every_steps after it (null: "
        'every_steps). 1 is the book\'s schedule: its "Step 000000" is the evaluation '
        "after the first update.",
    )
    batches: int = setting(10, "micro batches of train and of val per evaluation")
    prompt: str = setting("Every effort moves you", "start of the sample printed at each eval")
    max_new_tokens: int = setting(50, "length of that sample in tokens")
    temperature: float = setting(0.0, "0: greedy, as the book's generate_and_print_sample")
    top_k: Optional[int] = setting(None, "sample only among the k most likely tokens (null: all)")
    tasks: list[str] = setting(
        help="multiple-choice tasks scored during training (metrics <task>_acc, "
        "<task>_acc_norm): hellaswag (HellaSwag's val set, downloaded once, or task_file) "
        'or mc (task_file: one {"context", "choices", "label"} per line). [] for none.',
        default_factory=list,
    )
    task_file: Optional[str] = setting(None, "the tasks' examples (jsonl)")
    task_every_steps: Optional[int] = setting(
        None, "score the tasks every N steps (null: at every evaluation)"
    )
    task_examples: Optional[int] = setting(500, "the first N examples, for speed (null: all)")
    whole_split_at_end: bool = setting(
        True,
        "at the end of the run, score the whole val split once and print it beside the last "
        "estimate (skipped for splits over 4,096 windows: the evaluate stage's job)",
    )

    def __post_init__(self) -> None:
        self.require_positive("every_steps", "batches", "max_new_tokens")
        self.require(
            self.first_step is None or self.first_step > 0,
            "first_step",
            "a positive step, or null for every_steps",
        )
        self.require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            "0 (greedy) or a positive number",
        )
        self.require(self.top_k is None or self.top_k > 0, "top_k", "null or 1 .. model.vocab_size")
        self.require(all(t in TASKS for t in self.tasks), "tasks", "a list of hellaswag and mc")
        self.require(
            "mc" not in self.tasks or bool(self.task_file),
            "task_file",
            "a jsonl file when eval.tasks has mc",
        )
        for name in ("task_every_steps", "task_examples"):
            self.require(
                getattr(self, name) is None or getattr(self, name) > 0, name, "positive, or null"
            )


@dataclass
class CheckpointConfig(Section):
    SECTION = "checkpoint."

    every_steps: int = setting(500, "write a checkpoint every N optimizer steps (and at the end)")
    keep_last: int = setting(3, "older checkpoints are deleted (0: keep all)")
    resume: str = setting("auto", "auto: continue from the latest checkpoint | never | a path")

    def __post_init__(self) -> None:
        self.require_positive("every_steps")
        self.require(self.keep_last >= 0, "keep_last", "0 (keep all) or more")
        self.require(bool(self.resume), "resume", "auto, never or a checkpoint path")


@dataclass
class SpikeConfig(Section):
    """Loss spikes: an update skipped (llm.c's -sl/-sg), or the run rolled back to its
    newest checkpoint with the data the bad steps drew skipped (pipeline/training/spikes.py).
    A z-score is a step's value against the mean and standard deviation of the last
    `window` trained steps, and is taken once 20 of them are there."""

    SECTION = "spikes."

    skip_loss_z: Optional[float] = setting(
        None,
        "skip the update of a step whose loss is more than this many standard deviations "
        "above the recent mean (the step is counted and logged, its data consumed); null: off",
    )
    skip_grad_z: Optional[float] = setting(
        None, "the same for the gradient norm (before clipping); null: off"
    )
    rollback_loss_z: Optional[float] = setting(
        None,
        "beyond this loss z-score, reload the newest checkpoint and skip the samples the "
        "steps since it drew, exactly (a range of the global sample count); null: off",
    )
    rollback_nonfinite: bool = setting(
        False, "a non-finite loss rolls back likewise instead of stopping the run"
    )
    window: int = setting(100, "trained steps the z-scores are taken over")
    max_rollbacks: int = setting(
        5, "rollbacks a run may make before it stops (the data or the lr is at fault)"
    )

    def __post_init__(self) -> None:
        for name in ("skip_loss_z", "skip_grad_z", "rollback_loss_z"):
            value = getattr(self, name)
            self.require(
                value is None or (math.isfinite(value) and value > 0),
                name,
                "a positive number of standard deviations, or null (off)",
            )
        self.require(self.window >= 20, "window", "20 steps or more")
        self.require(self.max_rollbacks >= 1, "max_rollbacks", "1 or more")
        if self.skip_loss_z is not None and self.rollback_loss_z is not None:
            self.require(
                self.rollback_loss_z > self.skip_loss_z,
                "rollback_loss_z",
                f"above spikes.skip_loss_z ({self.skip_loss_z}): a rollback is for what "
                f"a skip cannot absorb",
            )

    @property
    def on(self) -> bool:
        return (
            self.skip_loss_z is not None
            or self.skip_grad_z is not None
            or self.rollback_loss_z is not None
            or self.rollback_nonfinite
        )


@dataclass
class WandbConfig(Section):
    SECTION = "tracking.wandb."

    mode: Optional[Literal["disabled", "offline", "online"]] = setting(
        None, "null: online when an API key is configured, else offline; WANDB_MODE wins"
    )
    project: Optional[str] = setting(None, "null: $WANDB_PROJECT, else gpt-pipeline")
    entity: Optional[str] = setting(None, "null: $WANDB_ENTITY, else your default entity")
    group: Optional[str] = setting(None, "null: $WANDB_RUN_GROUP, else none")
    tags: list[str] = setting(help="the run's tags", default_factory=list)


# The trackers tracking.log_with may name (Accelerate's), and the module each needs.
TRACKERS = {
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
}


@dataclass
class TrackingConfig(Section):
    SECTION = "tracking."

    log_with: list[str] = setting(
        help="where metrics go besides metrics.jsonl and loss.png, through Accelerate's "
        "trackers: any of wandb, tensorboard (pip install 'gpt-pipeline[tensorboard]'; "
        "event files in runs/<name>/tensorboard/), mlflow, comet_ml, aim, clearml, "
        "dvclive. [] for none.",
        default_factory=lambda: ["wandb"],
    )
    wandb: WandbConfig = setting(help="Weights & Biases", default_factory=WandbConfig)

    def __post_init__(self) -> None:
        unknown = [t for t in self.log_with if t not in TRACKERS]
        self.require(
            not unknown and len(set(self.log_with)) == len(self.log_with),
            "log_with",
            f"a list of distinct trackers among {', '.join(TRACKERS)} ([] for none)",
        )
