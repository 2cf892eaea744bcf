"""The `model:` section of the config: the GPT's shape and where its weights start.
Declared here, beside the model that reads it; SHAPE_KEYS are the keys a checkpoint or
an export must agree on to be read back into the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pipeline.core.schema import Section, check, setting


@dataclass
class ModelConfig(Section):
    # The defaults are the book's GPT_CONFIG_124M (chapter 5 uses context 256).
    SECTION = "model."

    arch: Literal["gpt2", "llama"] = setting(
        "gpt2",
        "gpt2: the book's GPT (learned positions, LayerNorm, GELU MLP, biases). llama: "
        "rotary positions (rope_theta), RMSNorm (norm_eps), SwiGLU MLP (ffn_hidden), "
        "grouped-query attention (n_kv_heads), no biases; a config without the key is gpt2",
    )
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
    n_kv_heads: Optional[int] = setting(
        None,
        "llama only: key/value heads of grouped-query attention, each shared by "
        "n_heads / n_kv_heads query heads (null: n_heads, plain multi-head attention)",
    )
    ffn_hidden: Optional[int] = setting(
        None,
        "llama only: width of the SwiGLU MLP (null: Meta's rule, int(2 x 4 x emb_dim / 3) "
        "rounded up to a multiple of 256: 2048 at width 768, 11008 at 4096)",
    )
    rope_theta: float = setting(
        10000.0,
        "llama only: the base of the rotary position frequencies (10000: Llama 1 and 2 and "
        "transformers' default, enough for the contexts trained here; Llama 3 uses 500000 "
        "for 8k and longer)",
    )
    norm_eps: float = setting(1e-5, "llama only: the epsilon of RMSNorm (Llama 2 and 3: 1e-5)")
    init_from: str = setting(
        "scratch", "scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a model directory"
    )
    init: Literal["gpt2", "torch_default"] = setting(
        "gpt2",
        "how fresh weights are drawn (init_from: scratch). gpt2: N(0, 0.02) for "
        "embeddings and linears, residual projections scaled by 1/sqrt(2 n_layers), "
        "zero biases, RMSNorm weights 1, as GPT-2 and nanoGPT (what real pretraining "
        "wants; llama too). "
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
        self.require_positive("n_kv_heads", "ffn_hidden", nullable="null for the default")
        self.require(self.rope_theta > 0, "rope_theta", "a positive number")
        self.require(self.norm_eps > 0, "norm_eps", "a positive number")
        if self.arch == "llama":
            self._check_llama()
        else:
            self._check_gpt2()

    def _check_llama(self) -> None:
        self.require(
            self.n_heads % self.kv_heads == 0,
            "n_kv_heads",
            f"a divisor of {self.key('n_heads')} ({self.n_heads}): each key/value head "
            f"serves a whole group of query heads",
        )
        check(
            self.head_dim % 2 == 0,
            f"{self.key('emb_dim')} / {self.key('n_heads')} = {self.head_dim} is odd: "
            f"rotary position embeddings turn pairs of a head's dimensions, so "
            f"{self.key('arch')}: llama needs an even head size",
        )
        self.require(not self.qkv_bias, "qkv_bias", f"false with {self.key('arch')}: llama")

    def _check_gpt2(self) -> None:
        # Keys of the other architecture are refused rather than ignored: a value set for
        # them would otherwise be silently without effect.
        for name, default in LLAMA_ONLY.items():
            self.require(
                getattr(self, name) == default,
                name,
                f"{default if default is not None else 'null'} (or left out) with "
                f"{self.key('arch')}: gpt2; it applies to llama only",
            )

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when null (always so for gpt2)."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        """The MLP's hidden width: 4 x emb_dim for gpt2; ffn_hidden or Meta's rule for llama."""
        if self.arch == "gpt2":
            return 4 * self.emb_dim
        return self.ffn_hidden or llama_ffn_hidden(self.emb_dim)


def llama_ffn_hidden(emb_dim: int, multiple_of: int = 256) -> int:
    """Meta's Llama MLP width (llama/model.py, FeedForward): 2/3 of 4 x emb_dim, so that
    SwiGLU's three matrices cost what GELU's two would, rounded up to `multiple_of`.
    transformers has no rule (LlamaConfig takes intermediate_size as given)."""
    hidden = int(2 * 4 * emb_dim / 3)
    return multiple_of * -(-hidden // multiple_of)


# The llama keys and their defaults, which a gpt2 config must keep.
LLAMA_ONLY = {"n_kv_heads": None, "ffn_hidden": None, "rope_theta": 10000.0, "norm_eps": 1e-5}


# The ModelConfig keys that fix the tensors' shapes: a checkpoint resumes, and an export
# reads back, only where these agree.
SHAPE_KEYS = (
    "arch",
    "vocab_size",
    "context_length",
    "emb_dim",
    "n_heads",
    "n_layers",
    "qkv_bias",
    "tie_embeddings",
    "n_kv_heads",
    "ffn_hidden",
)


def shape_values(cfg: ModelConfig) -> dict:
    """SHAPE_KEYS' values with null resolved (n_kv_heads: the key/value head count,
    ffn_hidden: the MLP width), so a config that leaves them null and one that spells out
    the same numbers (an import from config.json) have the same shape."""
    resolved = {"n_kv_heads": cfg.kv_heads, "ffn_hidden": cfg.ffn_dim}
    return {k: resolved.get(k, getattr(cfg, k)) for k in SHAPE_KEYS}
