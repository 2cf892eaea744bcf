"""The GPT of the book's chapter 4, as a plain nn.Module, plus its size and cost; and the
same module in Llama's shape (`model.arch: llama`).

arch gpt2 (the book's): token + position embeddings, dropout, `n_layers` pre-LayerNorm
blocks (causal multi-head attention and a GELU MLP, each around a residual), a final
LayerNorm and a linear head. Differences from the book's listing, none of which change
the function:
- query, key and value are one Linear (`att.qkv`) so they cost one matmul;
- attention runs through `scaled_dot_product_attention` (flash kernels on GPU);
- LayerNorm is `nn.LayerNorm` (weight/bias for the book's scale/shift);
- an optional KV cache for generation;
- `forward(idx, targets=...)` returns the mean cross-entropy directly, computed a chunk of
  rows at a time (`head_cross_entropy`, pipeline/model/head_loss.py) so the (tokens x
  vocab) logits never exist whole.

arch llama: the same blocks with Llama's parts, under the same parameter names: no
position table (`pos_emb` is absent) but rotary embeddings on each head's queries and
keys (base `rope_theta`; dimension i is paired with i + head_dim/2, the Hugging Face
`rotate_half` layout, so HF Llama checkpoints need no permutation; Meta's original
checkpoints pair neighbours and would); `nn.RMSNorm` (weight only) for norm1, norm2 and
final_norm; grouped-query attention, `att.qkv` holding n_heads query heads, then
n_kv_heads key and n_kv_heads value heads (rows in that order); a SwiGLU MLP,
`ff.proj(silu(gate) * up)` with gate and up one Linear `ff.fc` (gate rows first); no
biases anywhere. The KV cache then holds n_kv_heads heads.

Init (`model.init`): gpt2 draws every Linear and Embedding from N(0, 0.02), the
residual projections (`att.out_proj`, `ff.proj`) from N(0, 0.02 / sqrt(2 n_layers)),
biases 0, norm weights 1, for both architectures; torch_default keeps each layer's own
PyTorch init (the book's, for gpt2).

`pipeline/model/gpt2.py` maps these names to the Hugging Face GPT-2 and the book's names,
`pipeline/model/llama_hf.py` to Hugging Face Llama's.

Knows nothing about training, files, or devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.model.config import ModelConfig
from pipeline.model.head_loss import head_cross_entropy


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32
    ):
        shape = (config.n_layers, batch_size, config.kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v for `layer`; return all keys and values up to now."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def rope_angles(cfg: ModelConfig, start: int, t: int, device=None) -> tuple[torch.Tensor, ...]:
    """cos and sin (t, head_dim) of the rotary angles of positions start .. start+t-1:
    position p turns the pair of dimensions (i, i + head_dim/2) by p * theta^(-2i/head_dim),
    computed in fp32 (recomputed each forward: a few thousand numbers, and no buffer
    that building on the meta device would leave empty)."""
    steps = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / cfg.rope_theta ** (steps / cfg.head_dim)
    pos = torch.arange(start, start + t, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, t, head_dim) rotated: each pair (x1[i], x2[i]) of its two halves
    turned by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = cfg.head_dim
        self.gqa = cfg.kv_heads != cfg.n_heads
        self.dropout = cfg.drop_rate
        kv_width = cfg.kv_heads * cfg.head_dim
        self.sizes = (cfg.emb_dim, kv_width, kv_width)  # the q, k, v rows of qkv
        self.qkv = nn.Linear(cfg.emb_dim, sum(self.sizes), bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.arch == "gpt2")

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, rope: tuple | None = None
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            part.view(b, t, -1, self.head_dim).transpose(1, 2)
            for part in self.qkv(x).split(self.sizes, dim=-1)
        )
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, is_causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
            if past > 0:  # new queries see every cached key and the causal part of their own
                is_causal = False
                if t > 1:
                    mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.gqa,  # each k/v head serves n_heads / n_kv_heads query heads
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Llama's MLP: proj(silu(gate(x)) * up(x)), gate and up one Linear (`fc`, gate rows
    first) so they cost one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 2 * cfg.ffn_dim, bias=False)
        self.proj = nn.Linear(cfg.ffn_dim, cfg.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


def norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.emb_dim, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.emb_dim, eps=1e-5)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = norm(cfg)
        self.att = CausalSelfAttention(cfg, layer)
        self.norm2 = norm(cfg)
        self.ff = SwiGLU(cfg) if cfg.arch == "llama" else FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, rope: tuple | None = None
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, rope))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        # llama has no position table: positions enter as rotations of q and k
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.arch == "gpt2" else None
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = norm(cfg)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        # Activation checkpointing (train.activation_checkpointing): each block keeps only
        # its input for backward and recomputes the rest there (same RNG, same values).
        # A switch on the model, not in its config: it changes memory, never the weights.
        self.recompute_blocks = False
        # "torch_default" keeps what each layer drew when it was built: the book's init.
        # The layers are built in the book's order and its three q, k, v matrices draw
        # from the generator one after the other, as the one qkv matrix here does, so
        # under the same seed the initial weights are the book's own.
        if cfg.init == "gpt2":
            self._init_gpt2()

    def compile_blocks(self) -> None:
        """torch.compile each transformer block in place (train.compile), as torchtitan
        does, and leave the embeddings and the fused head eager: compiling the whole model
        traces the head's loop over row blocks into one graph (4,110 nodes and 384 matmuls
        at GPT-2 124M's micro batch 64) for no gain, the head being matmuls already. The
        blocks share one compiled graph; the model stays a GPTModel (no wrapper), so FSDP
        wraps and checkpoints see the same modules and names as without compile."""
        for block in self.trf_blocks:
            block.compile()

    def _init_gpt2(self) -> None:
        self.apply(self._init_gpt2_layer)
        # GPT-2: scale the init of projections that add into the residual stream, so its
        # variance does not grow with depth.
        for block in self.trf_blocks:
            for proj in (block.att.out_proj, block.ff.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @staticmethod
    def _init_gpt2_layer(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for token ids (batch, tokens).

        With `targets` (batch, tokens) it returns instead the mean cross-entropy over the
        targets that are not IGNORE_INDEX: the same value and gradients as
        `F.cross_entropy(logits.flatten(0, 1), targets.flatten())`, faster and in far less
        memory (see `head_cross_entropy`).
        """
        t = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.context_length:
            raise ValueError(
                f"{start + t} positions exceed the context length {self.cfg.context_length}"
            )
        x, rope = self.tok_emb(idx), None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + t, device=idx.device))
        else:
            rope = rope_angles(self.cfg, start, t, idx.device)
        x = self.drop_emb(x)
        recompute = self.recompute_blocks and cache is None and torch.is_grad_enabled()
        for block in self.trf_blocks:
            # the block module itself is checkpointed, so FSDP's hooks run in the recompute
            if recompute:
                x = checkpoint(block, x, None, rope, use_reentrant=False)
            else:
                x = block(x, cache, rope)
        if cache is not None:
            cache.length += t
        if targets is not None:
            return head_cross_entropy(
                self.final_norm(x), self.out_head.weight, targets, pad_to=self.cfg.vocab_padding
            )
        return self.out_head(self.final_norm(x))


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the state dict of GPTModel(cfg), without allocating
    it (built on the meta device)."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, a tied matrix counted once (as the book's chapter 4 counts)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token: 6N + 12·L·d·T.

    N counts the weights that take part in matmuls: everything but the position table
    (gpt2) and, when the head is untied, the token table (a lookup, not a matmul). The
    second term is attention's QK^T and AV, whose cost grows with the sequence length T
    (PaLM, appendix B; the estimate nanoGPT's MFU uses); grouped-query attention does
    not change it (every query head still meets T keys).
    """
    seq_len = seq_len or cfg.context_length
    n = _num_params(cfg) - _position_table(cfg)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.emb_dim
    return 6 * n + 12 * cfg.n_layers * cfg.emb_dim * seq_len


def _position_table(cfg: ModelConfig) -> int:
    return cfg.context_length * cfg.emb_dim if cfg.arch == "gpt2" else 0


def _num_params(cfg: ModelConfig) -> int:
    d, v = cfg.emb_dim, cfg.vocab_size
    head = 0 if cfg.tie_embeddings else v * d
    if cfg.arch == "llama":
        kv = cfg.kv_heads * cfg.head_dim
        block = (
            d * (d + 2 * kv)  # qkv: n_heads query heads, n_kv_heads key and value heads
            + d * d  # out_proj
            + 3 * d * cfg.ffn_dim  # fc (gate and up) and proj
            + 2 * d  # two RMSNorms
        )
        return v * d + cfg.n_layers * block + d + head
    block = (
        3 * d * d
        + (3 * d if cfg.qkv_bias else 0)  # qkv
        + d * d
        + d  # out_proj
        + 8 * d * d
        + 5 * d  # fc (d -> 4d) and proj (4d -> d), with biases
        + 4 * d
    )  # two LayerNorms
    return v * d + _position_table(cfg) + cfg.n_layers * block + 2 * d + head


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    flops_per_token: float


def model_size(cfg: ModelConfig) -> ModelSize:
    """Parameter count and training FLOPs per token, without building the model."""
    return ModelSize(_num_params(cfg), flops_per_token(cfg))
