"""The `model:` section of the config: the GPT's shape and where its weights start.
Declared here, beside the model that reads it; SHAPE_KEYS are the keys a checkpoint or
an export must agree on to be read back into the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.core.schema import Section, check, setting


@dataclass
class ModelConfig(Section):
    # The defaults are the book's GPT_CONFIG_124M (chapter 5 uses context 256).
    SECTION = "model."

    vocab_size: int = setting(50257, "tokens in the vocabulary (GPT-2 BPE: 50257)")
    context_length: int = setting(256, "tokens the model sees at once")
    emb_dim: int = setting(768, "width of the residual stream")
    n_heads: int = setting(12, "attention heads (emb_dim must divide by it)")
    n_layers: int = setting(12, "transformer blocks")
    drop_rate: float = setting(0.1, "dropout probability")
    vocab_padding: int = setting(
        64,
        "the head's matmuls run on the vocabulary padded to a multiple of this (64: "
        "50257 -> 50304, nanoGPT's size; 1: off), which matmul kernels tile better. "
        "Never seen outside the head: parameters, checkpoints and exports keep "
        "vocab_size rows, and padded ids get no probability",
    )
    qkv_bias: bool = setting(False, "bias on the query/key/value projection (the book: false)")
    tie_embeddings: bool = setting(False, "share the token embedding with the output head")
    init_from: str = setting(
        "scratch", "scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a model directory"
    )
    init: Literal["gpt2", "torch_default"] = setting(
        "gpt2",
        "how fresh weights are drawn (init_from: scratch). gpt2: N(0, 0.02) for "
        "embeddings and linears, residual projections scaled by 1/sqrt(2 n_layers), "
        "zero biases, as GPT-2 and nanoGPT (what real pretraining wants). "
        "torch_default: each layer's own PyTorch init (Embedding N(0, 1), Linear "
        "kaiming-uniform), which the book keeps.",
    )

    def __post_init__(self) -> None:
        self.require_positive(
            "vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_padding"
        )
        check(
            self.emb_dim % self.n_heads == 0,
            f"{self.key('emb_dim')} ({self.emb_dim}) must be divisible by "
            f"{self.key('n_heads')} ({self.n_heads})",
        )
        self.require(0 <= self.drop_rate < 1, "drop_rate", "in [0, 1)")


# The ModelConfig keys that fix the tensors' shapes: a checkpoint resumes, and an export
# reads back, only where these agree.
SHAPE_KEYS = (
    "vocab_size",
    "context_length",
    "emb_dim",
    "n_heads",
    "n_layers",
    "qkv_bias",
    "tie_embeddings",
)
