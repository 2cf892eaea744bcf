"""GGUF, the one-file format of llama.cpp and Ollama: a model written the way llama.cpp's
own converter (convert_hf_to_gguf.py) writes its architecture, and read back to check it.

The file is written and read with the `gguf` package, the writer and reader llama.cpp
ships (an optional dependency: `pip install 'gpt-pipeline[gguf]'`). An architecture is a
table, `Arch`: its name, a `source` that lays our state dict out as the architecture
wants it, which of those tensors becomes which GGUF tensor (named through gguf's own
MODEL_TENSOR / TENSOR_NAMES, checked against its MODEL_TENSORS for the architecture), and
its hyperparameter keys. There are two, chosen by model.arch:

GPT2 (architecture "gpt2"), as the converter writes HF's GPT-2:
- the weights need no transpose: GGUF lists a tensor's dimensions fastest first, so
  llama.cpp's `{n_embd, 3*n_embd}` attn_qkv is the (out, in) matrix of torch's Linear,
  the layout this model trains in (HF's Conv1D (in, out) is what the converter transposes);
- llama.cpp's gpt2 requires `attn_qkv.bias`: a model without q/k/v biases gets zeros,
  which compute the same function.

LLAMA (architecture "llama"), as the converter's LlamaModel writes our HF Llama export:
- the fused tensors are split as pipeline/model/llama_hf.py splits them for that export:
  qkv into attn_q, attn_k, attn_v (rows: query heads, then key heads, then value heads),
  the SwiGLU fc into ffn_gate and ffn_up (gate rows first); nothing is transposed;
- the rows of attn_q and attn_k are permuted within each head (`rope_pairs_interleaved`):
  our RoPE pairs dimension i with i + head_dim/2 (HF's rotate_half), llama.cpp's llama
  pairs neighbours 2i and 2i+1 (GGML's NORM mode), so rows i and i + head_dim/2 are put
  at 2i and 2i+1, as the converter's LlamaModel.permute does, and q.k stays the same;
- hyperparameters: head_count_kv (grouped-query attention), feed_forward_length (the
  resolved MLP width), rope.freq_base, layer_norm_rms_epsilon, rope.dimension_count.

For both:
- a tied head is not written: without `output.weight` llama.cpp's gpt2 and llama use
  token_embd;
- fp16 stores the matrices (embeddings included) in f16 and keeps vectors (norms,
  biases) in f32, as the converter's "mostly f16" does.

The tokenizer goes in as the converter writes GPT-2's: model "gpt2", pre-tokenizer
"gpt-2", the tokens by id (<|endoftext|> a control token, ids past the tokenizer's
vocabulary "[PADn]" and unused), the merges, <|endoftext|> as bos and eos, no bos added.

Knows GGUF names, metadata and dtypes; not where the weights come from, the tokenizer's
files (handed in as a Vocab), or destinations (pipeline/export.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.model import llama_hf

# Marks a file this project wrote (general.tags), so that an export replaces only its own.
TAG = "gpt-pipeline"
INSTALL = "pip install 'gguf>=0.10' (or pip install 'gpt-pipeline[gguf]')"


def gguf_module():
    """The `gguf` package, or a PipelineError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise PipelineError(
            "--format gguf writes the file with the `gguf` package (llama.cpp's own GGUF "
            f"writer and reader), which is not installed here. Install it ({INSTALL}) and "
            "run the export again; --format hf needs nothing more."
        ) from None
    return gguf


@dataclass(frozen=True)
class Vocab:
    """A BPE tokenizer as GGUF stores it."""

    tokens: list[str]  # by id
    merges: list[str]  # "a b", in rank order
    eot_id: int  # <|endoftext|>: bos, eos, the one control token


@dataclass(frozen=True)
class Arch:
    """One architecture: its GGUF name, tensor tables and hyperparameters.

    The tables name the tensors of `source(cfg, state)`: our state dict as GGUF wants it
    before renaming (for gpt2 ours, with zero q/k/v biases where there are none; for
    llama the HF Llama tensors, q and k rows permuted), `block_prefix` leading a block's."""

    name: str  # general.architecture, gguf's MODEL_ARCH_NAMES spelling
    model_arch: str  # gguf.MODEL_ARCH member
    pre_tokenizer: str  # tokenizer.ggml.pre
    block_prefix: str  # a block's source names start with it, "{bid}" its index
    top: tuple[tuple[str, str, str], ...]  # (source name, gguf MODEL_TENSOR member, suffix)
    block: tuple[tuple[str, str, str], ...]  # the same, per block (after block_prefix)
    hparams: Callable[[ModelConfig], dict[str, int | float]]  # "{arch}.key" -> value
    source: Callable[[ModelConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _gpt2_hparams(cfg: ModelConfig) -> dict[str, int | float]:
    return {
        "context_length": cfg.context_length,
        "embedding_length": cfg.emb_dim,
        "feed_forward_length": 4 * cfg.emb_dim,
        "block_count": cfg.n_layers,
        "attention.head_count": cfg.n_heads,
        "attention.layer_norm_epsilon": 1e-5,  # the model's LayerNorm eps
    }


def _gpt2_source(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours as they are, plus zero q/k/v biases for a model without them: llama.cpp's
    gpt2 requires attn_qkv.bias, and zeros compute the same function."""
    if cfg.qkv_bias:
        return state
    zeros = {
        f"trf_blocks.{i}.att.qkv.bias": torch.zeros(3 * cfg.emb_dim) for i in range(cfg.n_layers)
    }
    return {**state, **zeros}


GPT2 = Arch(
    name="gpt2",
    model_arch="GPT2",
    pre_tokenizer="gpt-2",
    block_prefix="trf_blocks.{bid}.",
    top=(
        ("tok_emb.weight", "TOKEN_EMBD", "weight"),
        ("pos_emb.weight", "POS_EMBD", "weight"),
        ("final_norm.weight", "OUTPUT_NORM", "weight"),
        ("final_norm.bias", "OUTPUT_NORM", "bias"),
        ("out_head.weight", "OUTPUT", "weight"),
    ),
    block=(
        ("norm1.weight", "ATTN_NORM", "weight"),
        ("norm1.bias", "ATTN_NORM", "bias"),
        ("att.qkv.weight", "ATTN_QKV", "weight"),
        ("att.qkv.bias", "ATTN_QKV", "bias"),
        ("att.out_proj.weight", "ATTN_OUT", "weight"),
        ("att.out_proj.bias", "ATTN_OUT", "bias"),
        ("norm2.weight", "FFN_NORM", "weight"),
        ("norm2.bias", "FFN_NORM", "bias"),
        ("ff.fc.weight", "FFN_UP", "weight"),
        ("ff.fc.bias", "FFN_UP", "bias"),
        ("ff.proj.weight", "FFN_DOWN", "weight"),
        ("ff.proj.bias", "FFN_DOWN", "bias"),
    ),
    hparams=_gpt2_hparams,
    source=_gpt2_source,
)


def _llama_hparams(cfg: ModelConfig) -> dict[str, int | float]:
    """The keys convert_hf_to_gguf.py writes for our HF Llama config.json (its TextModel's
    and LlamaModel's set_gguf_parameters)."""
    return {
        "context_length": cfg.context_length,
        "embedding_length": cfg.emb_dim,
        "feed_forward_length": cfg.ffn_dim,  # ffn_hidden, or Meta's rule when null
        "block_count": cfg.n_layers,
        "attention.head_count": cfg.n_heads,
        "attention.head_count_kv": cfg.kv_heads,
        "rope.freq_base": float(cfg.rope_theta),
        "attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        # config.json spells head_dim out, so the converter writes these two as well
        "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rope.dimension_count": cfg.head_dim,  # every dimension of a head is rotated
    }


def rope_pairs_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q or k projection reordered for llama.cpp's rotary layout.

    Ours (and HF's, `rotate_half`) turns dimension i of a head together with i +
    head_dim/2; llama.cpp's llama ropes in GGML's NORM mode, neighbours 2i and 2i+1,
    with the same angle for the pair (rope_theta^(-2i/head_dim)). Putting row i at 2i and
    row i + head_dim/2 at 2i+1 within each head makes q.k, and so attention, the same:
    what convert_hf_to_gguf.py's LlamaModel.permute does to q_proj and k_proj."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def _llama_source(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF Llama tensors (pipeline/model/llama_hf.py splits our fused qkv into q, k, v
    and fc into gate, up, as the HF export writes them), q and k rows permuted as the
    converter permutes them: what convert_hf_to_gguf.py would read from our HF export."""
    hf = llama_hf.to_hf(state, cfg)
    for i in range(cfg.n_layers):
        for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            hf[name] = rope_pairs_interleaved(hf[name], heads)
    return hf


LLAMA = Arch(
    name="llama",
    model_arch="LLAMA",
    pre_tokenizer="gpt-2",  # the tokenizer is GPT-2's whatever the architecture
    block_prefix="model.layers.{bid}.",
    top=(
        ("model.embed_tokens.weight", "TOKEN_EMBD", "weight"),
        ("model.norm.weight", "OUTPUT_NORM", "weight"),
        ("lm_head.weight", "OUTPUT", "weight"),
    ),
    block=(
        ("input_layernorm.weight", "ATTN_NORM", "weight"),
        ("self_attn.q_proj.weight", "ATTN_Q", "weight"),
        ("self_attn.k_proj.weight", "ATTN_K", "weight"),
        ("self_attn.v_proj.weight", "ATTN_V", "weight"),
        ("self_attn.o_proj.weight", "ATTN_OUT", "weight"),
        ("post_attention_layernorm.weight", "FFN_NORM", "weight"),
        ("mlp.gate_proj.weight", "FFN_GATE", "weight"),
        ("mlp.up_proj.weight", "FFN_UP", "weight"),
        ("mlp.down_proj.weight", "FFN_DOWN", "weight"),
    ),
    hparams=_llama_hparams,
    source=_llama_source,
)

ARCHES = {"gpt2": GPT2, "llama": LLAMA}  # by model.arch


def arch_of(cfg: ModelConfig) -> Arch:
    """The GGUF architecture a model of `cfg` is written as."""
    return ARCHES[cfg.arch]


# ----------------------------------------------------------------------------- tensors


def name_map(arch: Arch, n_layers: int) -> list[tuple[str, str]]:
    """(source name, GGUF name) of every tensor, from gguf's own name tables; a name the
    architecture does not have in gguf is a bug in the table, said at once."""
    gguf = gguf_module()
    model_arch = gguf.MODEL_ARCH[arch.model_arch]
    known = set(gguf.MODEL_TENSORS[model_arch])

    def gguf_name(member: str, suffix: str, bid: int | None = None) -> str:
        tensor = gguf.MODEL_TENSOR[member]
        assert tensor in known, f"{member} is not a tensor of {arch.name} in gguf"
        return f"{gguf.TENSOR_NAMES[tensor].format(bid=bid)}.{suffix}"

    pairs = [(ours, gguf_name(member, suffix)) for ours, member, suffix in arch.top]
    for i in range(n_layers):
        pairs += [
            (arch.block_prefix.format(bid=i) + ours, gguf_name(member, suffix, i))
            for ours, member, suffix in arch.block
        ]
    return pairs


def gguf_tensors(
    cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: str, arch: Arch = GPT2
) -> dict[str, np.ndarray]:
    """The tensors as they are stored: GGUF names, numpy in the stored dtype (fp16:
    matrices f16, vectors f32), laid out by the architecture's `source`, no output tensor
    for a tied head (llama.cpp's gpt2 and llama both use token_embd without one)."""
    gguf = gguf_module()
    output = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT]}.weight"
    source = arch.source(cfg, state)
    out = {}
    for source_name, name in name_map(arch, cfg.n_layers):
        if name == output and cfg.tie_embeddings:
            continue
        tensor = source[source_name]
        stored = torch.float16 if dtype == "fp16" and tensor.dim() >= 2 else torch.float32
        out[name] = tensor.detach().to("cpu", stored).contiguous().numpy()
    return out


# ----------------------------------------------------------------------------- metadata


def metadata(cfg: ModelConfig, dtype: str, name: str, vocab: Vocab, arch: Arch = GPT2) -> dict:
    """Every key this project writes, with its value: general.*, the architecture's
    hyperparameters and the tokenizer."""
    gguf = gguf_module()
    if cfg.vocab_size < len(vocab.tokens):
        raise PipelineError(
            f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
            f"({len(vocab.tokens)}): GGUF needs a token for every row of token_embd"
        )
    padding = [f"[PAD{i}]" for i in range(len(vocab.tokens), cfg.vocab_size)]
    types = [gguf.TokenType.NORMAL] * len(vocab.tokens) + [gguf.TokenType.UNUSED] * len(padding)
    types[vocab.eot_id] = gguf.TokenType.CONTROL
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "fp16" else gguf.LlamaFileType.ALL_F32
    return {
        "general.name": name,
        "general.tags": [TAG],
        "general.file_type": int(file_type),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        **{f"{arch.name}.{key}": value for key, value in arch.hparams(cfg).items()},
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": arch.pre_tokenizer,
        "tokenizer.ggml.tokens": vocab.tokens + padding,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": vocab.merges,
        "tokenizer.ggml.bos_token_id": vocab.eot_id,
        "tokenizer.ggml.eos_token_id": vocab.eot_id,
        "tokenizer.ggml.add_bos_token": False,
    }


def _value_type(value):
    """GGUF's type for a value: (type, array element type or None)."""
    gguf = gguf_module()
    T = gguf.GGUFValueType
    if isinstance(value, list):
        return T.ARRAY, T.STRING if value and isinstance(value[0], str) else T.INT32
    if isinstance(value, bool):
        return T.BOOL, None
    if isinstance(value, str):
        return T.STRING, None
    if isinstance(value, float):
        return T.FLOAT32, None
    return T.UINT32, None


# ----------------------------------------------------------------------------- the file


def write(path: Path, tensors: dict[str, np.ndarray], meta: dict, arch: Arch = GPT2) -> None:
    """Write a GGUF file at `path` (created or truncated)."""
    gguf = gguf_module()
    writer = gguf.GGUFWriter(path, arch.name)  # adds general.architecture itself
    for key, value in meta.items():
        vtype, sub = _value_type(value)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def differences(path: Path, tensors: dict[str, np.ndarray], meta: dict, arch: Arch = GPT2) -> list:
    """What in the GGUF file at `path`, read with gguf's reader, is not what was meant to
    be written: tensor by tensor (names, shapes, dtypes, every value bit for bit) and
    key by key. Empty when the file is exact."""
    gguf = gguf_module()
    reader = gguf.GGUFReader(path)
    want_meta = {"general.architecture": arch.name, **meta}
    diff = [key for key, value in want_meta.items() if not _same(field_value(reader, key), value)]
    got = {t.name: t for t in reader.tensors}
    diff += sorted(set(got) - set(tensors))
    for name, want in tensors.items():
        t = got.get(name)
        data = None if t is None else np.asarray(t.data).reshape(want.shape)
        if data is None or data.dtype != want.dtype or not np.array_equal(data, want):
            diff.append(name)
    del reader, got  # the reader maps the file; let go of it before the file moves
    return diff


def field_value(reader, key: str):
    """A metadata value as Python: str, number, bool or list; None when absent."""
    gguf = gguf_module()
    field = reader.fields.get(key)
    if field is None:
        return None
    T = gguf.GGUFValueType

    def decode(part):
        return bytes(part).decode("utf-8") if field.types[-1] == T.STRING else part.tolist()[0]

    if field.types[0] == T.ARRAY:
        return [decode(field.parts[i]) for i in field.data]
    return decode(field.parts[field.data[0]])


def _same(got, want) -> bool:
    if isinstance(want, float):  # stored as float32
        return got is not None and np.float32(got) == np.float32(want)
    return got == want


def is_own_file(path: Path) -> bool:
    """Whether `path` is a GGUF file this project wrote (general.tags holds TAG)."""
    gguf = gguf_module()
    try:
        tags = field_value(gguf.GGUFReader(path), "general.tags")
    except (OSError, ValueError, IndexError, KeyError, struct.error):  # not GGUF at all
        return False
    return isinstance(tags, list) and TAG in tags
