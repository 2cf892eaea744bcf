"""Name and shape mapping between this project's GPT with `model.arch: llama` and the
Hugging Face Llama layout (`LlamaForCausalLM`, `config.json` of model_type llama).

HF names (all Linear weights (out, in), as ours: nothing is transposed):
    model.embed_tokens.weight                      tok_emb.weight
    model.layers.N.input_layernorm.weight          trf_blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight   trf_blocks.N.att.qkv.weight (stacked)
    model.layers.N.self_attn.o_proj.weight         trf_blocks.N.att.out_proj.weight
    model.layers.N.post_attention_layernorm.weight trf_blocks.N.norm2.weight
    model.layers.N.mlp.{gate,up}_proj.weight       trf_blocks.N.ff.fc.weight (stacked)
    model.layers.N.mlp.down_proj.weight            trf_blocks.N.ff.proj.weight
    model.norm.weight                              final_norm.weight
    lm_head.weight                                 out_head.weight (untied only)

Rotary embeddings here use HF's layout (a head's dimension i paired with i + head_dim/2,
`rotate_half`), so q_proj and k_proj are taken as they are. Meta's original checkpoints
pair neighbouring dimensions; HF's conversion script permutes their q/k rows, and so
would anyone reading them here (not supported: only HF-layout directories are read).

Pure tensor bookkeeping, as pipeline/model/gpt2.py; files are export's and weights'.
"""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig, model_config_from_file
from pipeline.model.config import llama_ffn_hidden
from pipeline.model.gpt import state_shapes
from pipeline.model.gpt2 import check_mapped

GPT2_VOCAB = 50257  # the only tokenizer this project has (tiktoken's GPT-2 BPE)
GPT2_EOT = 50256  # <|endoftext|>, bos and eos alike


def _layer_names(i: int) -> dict[str, list[str]]:
    """Our tensor name -> the HF tensors stacked (in order) into it, for block i."""
    hf, ours = f"model.layers.{i}.", f"trf_blocks.{i}."
    return {
        ours + "norm1.weight": [hf + "input_layernorm.weight"],
        ours + "att.qkv.weight": [hf + f"self_attn.{p}_proj.weight" for p in "qkv"],
        ours + "att.out_proj.weight": [hf + "self_attn.o_proj.weight"],
        ours + "norm2.weight": [hf + "post_attention_layernorm.weight"],
        ours + "ff.fc.weight": [hf + f"mlp.{p}_proj.weight" for p in ("gate", "up")],
        ours + "ff.proj.weight": [hf + "mlp.down_proj.weight"],
    }


def name_map(cfg: ModelConfig) -> dict[str, list[str]]:
    """Every tensor of ours -> the HF tensors it is made of, for a model of `cfg`."""
    names = {"tok_emb.weight": ["model.embed_tokens.weight"]}
    for i in range(cfg.n_layers):
        names.update(_layer_names(i))
    names["final_norm.weight"] = ["model.norm.weight"]
    if not cfg.tie_embeddings:
        names["out_head.weight"] = ["lm_head.weight"]
    return names


def _split_sizes(cfg: ModelConfig, ours: str) -> list[int]:
    """The rows of each HF tensor stacked into ours (qkv: q, k, v; fc: gate, up)."""
    if ours.endswith("att.qkv.weight"):
        kv = cfg.kv_heads * cfg.head_dim
        return [cfg.emb_dim, kv, kv]
    if ours.endswith("ff.fc.weight"):
        return [cfg.ffn_dim, cfg.ffn_dim]
    return [-1]


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF Llama tensors (contiguous, ready for safetensors). A tied head
    is written once, as embed_tokens (transformers ties on load)."""
    out = {}
    for ours, hf_names in name_map(cfg).items():
        sizes = _split_sizes(cfg, ours)
        parts = state_dict[ours].split(sizes) if len(sizes) > 1 else [state_dict[ours]]
        out.update({hf: part.contiguous() for hf, part in zip(hf_names, parts)})
    return out


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> our state dict for `cfg`; a ValueError names every tensor that
    is missing or of the wrong shape (each HF tensor is checked before it is stacked)."""
    hf_state = {k.removeprefix("module."): v for k, v in hf_state.items()}
    expected = state_shapes(cfg)
    out, missing, wrong = {}, [], []
    for ours, hf_names in name_map(cfg).items():
        sizes = _split_sizes(cfg, ours)
        width = expected[ours][1:]
        for hf, rows in zip(hf_names, sizes):
            want = (rows if rows > 0 else expected[ours][0], *width)
            if hf not in hf_state:
                missing.append(hf)
            elif tuple(hf_state[hf].shape) != want:
                wrong.append(f"{hf} {tuple(hf_state[hf].shape)} (expected {want})")
        if not missing and not wrong:
            out[ours] = torch.cat([hf_state[hf] for hf in hf_names]).contiguous()
    check_mapped(missing, wrong)
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """`config.json` of the HF Llama layout for a model of this config."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": GPT2_EOT,
        "eos_token_id": GPT2_EOT,
    }


def model_config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """Our ModelConfig for an HF Llama `config.json`; a ValueError says what this model
    cannot be (another activation, biases, RoPE scaling, a head size of its own). An
    n_kv_heads equal to n_heads and Meta's MLP width read back as null, as a config that
    left them out is written."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    missing = [k for k in (*required, "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    _refuse_unsupported(hf)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    base = dict(
        arch="llama",
        vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 2048),
        emb_dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=None if kv_heads == heads else kv_heads,
        ffn_hidden=hf["intermediate_size"],
        rope_theta=float(_rope(hf).get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        drop_rate=0.0,  # Llama has no residual dropout; a training choice anyway
        qkv_bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )
    cfg = model_config_from_file({**base, **overrides}, where)
    if cfg.ffn_hidden == llama_ffn_hidden(cfg.emb_dim):
        cfg = model_config_from_file({**base, **overrides, "ffn_hidden": None}, where)
    return cfg


def _rope(hf: dict) -> dict:
    """RoPE's settings in either spelling: transformers 5 writes `rope_parameters`
    ({rope_theta, rope_type, ...}), earlier versions (and export, which both read)
    `rope_theta` beside `rope_scaling` (null when plain)."""
    if isinstance(hf.get("rope_parameters"), dict):
        return hf["rope_parameters"]
    legacy = hf.get("rope_scaling") if isinstance(hf.get("rope_scaling"), dict) else {}
    return {**legacy, **({"rope_theta": hf["rope_theta"]} if "rope_theta" in hf else {})}


def _refuse_unsupported(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=true is not supported (this Llama has no biases)")
    kind = _rope(hf).get("rope_type", _rope(hf).get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"RoPE scaling ({kind!r}: {_rope(hf)!r}) is not supported (plain RoPE only, "
            f"as Llama 1 and 2; Llama 3.1's frequency scaling is not implemented)"
        )
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, width // heads) or width % heads:
        raise ValueError(
            f"head_dim={hf.get('head_dim')} with hidden_size {width} and {heads} heads is "
            f"not supported (the head size here is hidden_size / num_attention_heads)"
        )
