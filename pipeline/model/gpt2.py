"""Name and shape mapping between this project's GPT and the Hugging Face GPT-2 layout.

The Hugging Face layout (`GPT2LMHeadModel`: `transformer.wte`, `transformer.h.N.attn.c_attn`,
...) is what OpenAI's weights are published in and what `export` writes. Its attention
and MLP layers are `Conv1D`, which stores weights as (in, out): every Linear weight is
transposed on the way. This module is pure tensor bookkeeping; reading and writing files
is the job of `pipeline/export.py` and the import code.
"""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig, model_config_from_file
from pipeline.model.gpt import state_shapes

# OpenAI's released sizes: (emb_dim, n_layers, n_heads). All have context 1024,
# vocabulary 50257, biases on q/k/v, and the head tied to the token embedding.
OPENAI_SIZES = {
    "gpt2": (768, 12, 12),  # 124M
    "gpt2-medium": (1024, 24, 16),  # 355M
    "gpt2-large": (1280, 36, 20),  # 774M
    "gpt2-xl": (1600, 48, 25),  # 1558M
}


# (our suffix, HF suffix, transposed) for the tensors of one block
_BLOCK = [
    ("norm1.weight", "ln_1.weight", False),
    ("norm1.bias", "ln_1.bias", False),
    ("att.qkv.weight", "attn.c_attn.weight", True),
    ("att.qkv.bias", "attn.c_attn.bias", False),
    ("att.out_proj.weight", "attn.c_proj.weight", True),
    ("att.out_proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False),
    ("norm2.bias", "ln_2.bias", False),
    ("ff.fc.weight", "mlp.c_fc.weight", True),
    ("ff.fc.bias", "mlp.c_fc.bias", False),
    ("ff.proj.weight", "mlp.c_proj.weight", True),
    ("ff.proj.bias", "mlp.c_proj.bias", False),
]
_TOP = [
    ("tok_emb.weight", "transformer.wte.weight", False),
    ("pos_emb.weight", "transformer.wpe.weight", False),
    ("final_norm.weight", "transformer.ln_f.weight", False),
    ("final_norm.bias", "transformer.ln_f.bias", False),
    ("out_head.weight", "lm_head.weight", False),
]


def name_map(n_layers: int) -> list[tuple[str, str, bool]]:
    """Every (our name, HF name, transposed) triple of a model with `n_layers` blocks."""
    pairs = list(_TOP)
    for i in range(n_layers):
        pairs += [
            (f"trf_blocks.{i}.{ours}", f"transformer.h.{i}.{hf}", t) for ours, hf, t in _BLOCK
        ]
    return pairs


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF GPT-2 tensors (contiguous, ready for safetensors).

    Without q/k/v biases the HF layout still needs `c_attn.bias`: it gets zeros, which
    compute the same function. A tied head is written once, as `wte` (HF ties on load).
    """
    out = {}
    for ours, hf, transpose in name_map(cfg.n_layers):
        if ours == "out_head.weight" and cfg.tie_embeddings:
            continue
        if ours.endswith("att.qkv.bias") and not cfg.qkv_bias:
            tensor = torch.zeros(3 * cfg.emb_dim, dtype=state_dict["tok_emb.weight"].dtype)
        else:
            tensor = state_dict[ours]
        out[hf] = (tensor.t() if transpose else tensor).contiguous()
    return out


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> our state dict for `cfg`; a ValueError names what does not fit.

    Position embeddings longer than `cfg.context_length` are cropped (as nanoGPT does to
    train GPT-2 at a shorter context). Buffers such as `attn.bias` are ignored.
    """
    hf_state = {k.removeprefix("module."): v for k, v in hf_state.items()}
    if "transformer.wte.weight" not in hf_state and "wte.weight" in hf_state:
        hf_state = {f"transformer.{k}": v for k, v in hf_state.items()}  # GPT2Model, no head
    expected = state_shapes(cfg)
    out, missing, wrong = {}, [], []
    for ours, hf, transpose in name_map(cfg.n_layers):
        if ours == "out_head.weight" and (cfg.tie_embeddings or hf not in hf_state):
            if not cfg.tie_embeddings:
                missing.append(hf)
            continue
        if ours.endswith("att.qkv.bias") and not cfg.qkv_bias:
            continue
        if hf not in hf_state:
            missing.append(hf)
            continue
        tensor = hf_state[hf].t() if transpose else hf_state[hf]
        if ours == "pos_emb.weight" and tensor.shape[0] > cfg.context_length:
            tensor = tensor[: cfg.context_length]
        if tuple(tensor.shape) != expected[ours]:
            wrong.append(f"{hf} {tuple(hf_state[hf].shape)} (expected {expected[ours]})")
            continue
        out[ours] = tensor.contiguous()
    check_mapped(missing, wrong)
    return out


def check_mapped(missing: list[str], wrong: list[str]) -> None:
    """A ValueError naming the first few missing tensors and misfit shapes, if any."""
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
        if wrong:
            parts.append(f"shapes that do not fit the config: {'; '.join(wrong[:3])}")
        raise ValueError("; ".join(parts))


def qkv_biases_are_zero(biases) -> bool:
    """GPT-2's layout has no switch for q/k/v biases: a model without them exports zeros,
    and weights whose q/k/v biases are all exactly zero read back as qkv_bias false. The
    one rule for both directions (no biases at all: False)."""
    biases = list(biases)
    return bool(biases) and all(not b.any() for b in biases)


def hf_config(cfg: ModelConfig) -> dict:
    """`config.json` of the HF GPT-2 layout for a model of this config."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True,
    }


def model_config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """Our ModelConfig for an HF GPT-2 `config.json`. Biases on q/k/v are always present
    in that layout, so `qkv_bias` is True unless an override says the file's are zeros."""
    missing = [
        k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in hf
    ]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"n_inner={hf['n_inner']} is not supported (the MLP is 4 x n_embd)")
    base = dict(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        emb_dim=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        drop_rate=hf.get("resid_pdrop", 0.0),
        qkv_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )
    return model_config_from_file({**base, **overrides}, where)


# ----------------------------------------------------------------------------- the book's names
#
# The book's chapter 4 GPTModel keeps q, k and v as three Linear layers, the MLP as an
# nn.Sequential (Linear, GELU, Linear) and LayerNorm's weight/bias as scale/shift. Its
# attention also registers its causal mask as a buffer (`att.mask`), which a state dict
# saved with torch.save(model.state_dict(), "model.pth") carries along; it is ignored.
_BOOK_BLOCK = [
    ("norm1.weight", "norm1.scale"),
    ("norm1.bias", "norm1.shift"),
    ("att.out_proj.weight", "att.out_proj.weight"),
    ("att.out_proj.bias", "att.out_proj.bias"),
    ("norm2.weight", "norm2.scale"),
    ("norm2.bias", "norm2.shift"),
    ("ff.fc.weight", "ff.layers.0.weight"),
    ("ff.fc.bias", "ff.layers.0.bias"),
    ("ff.proj.weight", "ff.layers.2.weight"),
    ("ff.proj.bias", "ff.layers.2.bias"),
]
_BOOK_TOP = [
    ("tok_emb.weight", "tok_emb.weight"),
    ("pos_emb.weight", "pos_emb.weight"),
    ("final_norm.weight", "final_norm.scale"),
    ("final_norm.bias", "final_norm.shift"),
    ("out_head.weight", "out_head.weight"),
]


def is_book_state(state: dict) -> bool:
    return "trf_blocks.0.att.W_query.weight" in state


def book_heads(
    emb_dim: int, n_heads: int | None = None, default_heads: int | None = None
) -> tuple[int, str | None]:
    """The number of attention heads of a book-format model of width `emb_dim`, which its
    tensor shapes do not record, and None or the reason when it is a guess: `n_heads`
    when given (--n-heads); else `default_heads` (model.n_heads of an init_from config)
    when it divides the width; else the one OpenAI's GPT-2 uses at that width."""
    if n_heads is not None:
        return n_heads, None
    if default_heads and emb_dim % default_heads == 0:
        return default_heads, None
    by_width = {d: h for d, _, h in OPENAI_SIZES.values()}
    if emb_dim in by_width:
        return by_width[emb_dim], f"GPT-2's head count at width {emb_dim}"
    raise ValueError(
        f"the book-format weights have emb_dim {emb_dim}, not one of GPT-2's widths "
        f"({', '.join(map(str, sorted(by_width)))}), so the number of attention heads "
        f"cannot be read from them: give it (--n-heads for evaluate, export and generate; "
        f"model.n_heads for model.init_from)"
    )


def book_config(state: dict[str, torch.Tensor], n_heads: int) -> ModelConfig:
    """The ModelConfig of a book-format state dict: its tensor shapes, and `n_heads`."""
    vocab_size, emb_dim = state["tok_emb.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("trf_blocks."))
    if emb_dim % n_heads:
        raise ValueError(f"emb_dim {emb_dim} is not divisible by {n_heads} heads")
    return ModelConfig(
        vocab_size=vocab_size,
        context_length=state["pos_emb.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        drop_rate=0.0,
        qkv_bias="trf_blocks.0.att.W_query.bias" in state,
        tie_embeddings=False,
    )


def from_book(
    state: dict[str, torch.Tensor], n_heads: int
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The book's GPTModel state dict with `n_heads` heads (book_heads) -> (our config,
    our state dict).

    q, k and v are stacked in that order into `att.qkv`, whose output this model splits
    as (3, heads, head_dim): the same per-head columns the book's `.view` takes.
    A KeyError names the first book tensor that is missing.
    """
    cfg = book_config(state, n_heads)
    out = {ours: state[book] for ours, book in _BOOK_TOP}
    for i in range(cfg.n_layers):
        pre = f"trf_blocks.{i}."
        for ours, book in _BOOK_BLOCK:
            out[pre + ours] = state[pre + book]
        parts = [f"{pre}att.W_{n}" for n in ("query", "key", "value")]
        out[pre + "att.qkv.weight"] = torch.cat([state[p + ".weight"] for p in parts])
        if cfg.qkv_bias:
            out[pre + "att.qkv.bias"] = torch.cat([state[p + ".bias"] for p in parts])
    return cfg, out
