"""Text generation: the book's `generate` with top-p and a KV cache, and its CLI.

    python -m pipeline.generate --model runs/<name> --prompt "Every effort moves you" \\
        [--max-new-tokens 100] [--temperature 0.8] [--top-k 50] [--top-p 0.95] \\
        [--seed 1337] [--num-samples 3] [--no-cache] [--dtype fp32|bf16|fp16]
    python -m pipeline.generate model=gpt2 prompt="Every effort moves you" temperature=0.8

(every option also as key=value, as train's config keys)

Semantics of the book's chapter 5 `generate`: the input is cropped to the model's context
length; the logits of the last position are filtered to the top-k first, then divided by
the temperature, then (our addition) cut to the nucleus of top-p probability mass, then
sampled; temperature 0 takes the argmax (greedy). Each sequence of a batch stops at
<|endoftext|> on its own: the token is kept and the finished row is padded with it (as
transformers pads with pad_token_id = eos), and generation ends when all rows are done.

With the KV cache the prompt is run once (prefill) and then one token per step. Once the
sequence fills the whole context, each further step re-runs the last context_length tokens
from position 0 (the cache is refilled): exactly what the book's cropping computes, so
cached and uncached generation agree token for token at any length; past the context the
cache no longer saves work.

`generate` is also what the train loop calls for its samples. Knows the model's forward
and the tokenizer, nothing of files except in the CLI.
"""

from __future__ import annotations

import codecs
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from pipeline.config.options import Usage, parse_options
from pipeline.core import log
from pipeline.core.errors import PipelineError, cli_main
from pipeline.core.schema import require, setting
from pipeline.data.tokenizer import EOT_ID, VOCAB_SIZE, decode, encode, get_tokenizer
from pipeline.model.gpt import GPTModel, KVCache
from pipeline.model.weights import DTYPES, ModelSource, dtype_name


def base_model(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP/FSDP (`.module`) or torch.compile (`._orig_mod`) wrappers:
    generation runs eagerly on it, so varying lengths cause no recompiles."""
    while not isinstance(model, GPTModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a GPTModel, got {type(model).__name__}")
        model = inner
    return model


def check_sampling(
    vocab_size: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise PipelineError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise PipelineError(
            f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}"
        )
    if top_p is not None and not 0 < top_p <= 1:  # also refuses nan
        raise PipelineError(f"top_p must be in (0, 1], got {top_p}")


def checked_device(name: str) -> str:
    """A torch device that exists here, or a PipelineError saying which do."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    usable = device is not None and (
        device.type == "cpu"
        or (
            device.type == "cuda"
            and torch.cuda.is_available()
            and (device.index or 0) < torch.cuda.device_count()
        )
    )
    if not usable:
        have = "cpu" + (
            f", cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            if torch.cuda.is_available()
            else " (no GPU is visible)"
        )
        raise PipelineError(f"--device {name!r} is not a device here; use one of: {have}")
    return name


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token ids (batch,) drawn from last-position logits (batch, vocab)."""
    if top_k is not None:  # the book keeps every logit >= the k-th largest
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Temperature 0 is greedy, and so is its limit: one below float32's smallest normal
    # number would be 0 (or overflow) in the division below.
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    # Shifted so the largest is 0 before dividing: however small the temperature, the
    # scaled logits stay <= 0 (no inf - inf = nan).
    logits = logits.float()
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        # Keep the most probable tokens until their mass reaches top_p (at least one).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = EOT_ID,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token=None,
) -> torch.Tensor:
    """`idx` (batch, tokens) followed by up to `max_new_tokens` new tokens per row.

    A row that produced `eos_id` is padded with it; the loop ends early once every row has
    (eos_id None: never). `on_token(ids)` is called with each step's (batch,) tokens.
    The model is put in eval mode for the call and restored after.
    """
    model = base_model(model)
    cfg = model.cfg
    check_sampling(cfg.vocab_size, temperature, top_k, top_p)
    device = next(model.parameters()).device
    out = idx.to(device)[:, -cfg.context_length :]
    was_training = model.training
    model.eval()
    # Eager even where train.compile compiled the blocks in place: every new length and
    # cache position would be a recompile.
    try:
        with torch.compiler.set_stance("force_eager"):
            step = _CachedStep(model, out) if use_cache else _FullStep(model)
            logits = step.first(out)
            done = torch.zeros(out.shape[0], dtype=torch.bool, device=device)
            for i in range(max_new_tokens):
                # Ids past the tokenizer's (a padded vocabulary) are never drawn: no text has them.
                new = next_token(logits[:, :VOCAB_SIZE], temperature, top_k, top_p, generator)
                if eos_id is not None:
                    new = new.masked_fill(done, eos_id)
                    done |= new == eos_id
                out = torch.cat([out, new[:, None]], dim=1)
                if on_token is not None:
                    on_token(new)
                if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                    break
                logits = step.next(out)
    finally:
        model.train(was_training)
    return out


def lay_out_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each fp32 Linear weight on a CPU stored column-major: the same
    (out, in) tensor and values, laid out as its transpose's contiguous memory.

    A decoding step multiplies one row per sequence by every weight: reading the weights
    is the cost. With (out, in) rows F.linear asks for x @ W.T, and on a CPU the fp32
    kernels for that form are slower than for x @ W with W contiguous: the 50257-way head
    measured 11.8 ms against 7.9 ms a token, a 768 -> 3072 layer 0.39 against 0.25 ms (2
    AVX2 cores). bf16 is the other way round, so only fp32 is changed. For a model that
    only generates (the CLI, benchmarks): training keeps the usual layout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
                w.data = w.data.t().contiguous().t()
    return model


class _FullStep:
    """Without a cache: the book's way, the whole (cropped) sequence every step."""

    def __init__(self, model: GPTModel):
        self.model = model

    def first(self, seq: torch.Tensor) -> torch.Tensor:
        return self.model(seq[:, -self.model.cfg.context_length :])[:, -1]

    next = first


class _CachedStep:
    """Prefill once, then feed only the newest token; refill once the context is full."""

    def __init__(self, model: GPTModel, seq: torch.Tensor):
        self.model, self.ctx = model, model.cfg.context_length
        dtype = next(model.parameters()).dtype
        kind = seq.device.type
        if torch.is_autocast_enabled(kind):  # the cache holds k, v as attention computes them
            dtype = torch.get_autocast_dtype(kind)
        self.cache = KVCache(model.cfg, seq.shape[0], self.ctx, device=seq.device, dtype=dtype)

    def first(self, seq: torch.Tensor) -> torch.Tensor:
        self.cache.length = 0
        return self.model(seq[:, -self.ctx :], self.cache)[:, -1]

    def next(self, seq: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.ctx:  # no position left: recompute the cropped window
            return self.first(seq)
        return self.model(seq[:, -1:], self.cache)[:, -1]


# ----------------------------------------------------------------------------- text


def prompt_ids(
    prompt: str, context_length: int, vocab_size: int | None = None
) -> tuple[list[int], str | None]:
    """Token ids of a prompt, cropped to the context; and a note when cropping happened.

    An empty prompt starts from <|endoftext|>, the token that precedes every document.
    A prompt with a token the model's vocabulary lacks (a model trained with a smaller
    vocab_size) is refused by name instead of failing inside the embedding.
    """
    ids = encode(prompt) or [EOT_ID]
    if vocab_size is not None and max(ids) >= vocab_size:
        raise PipelineError(
            f"the prompt {prompt[:40]!r} has token {max(ids)}, and the model's vocabulary has "
            f"{vocab_size} tokens (0 .. {vocab_size - 1}); give a prompt of tokens it knows, "
            f"or a model with GPT-2's vocabulary of 50257"
        )
    if len(ids) <= context_length:
        return ids, None
    note = (
        f"the prompt has {len(ids)} tokens, more than the model's context of "
        f"{context_length}; only its last {context_length} tokens are used"
    )
    return ids[-context_length:], note


def completion(ids, eos_id: int | None = EOT_ID) -> list[int]:
    """Generated ids up to (not including) the first end-of-text."""
    ids = list(ids)
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def continue_text(
    model: torch.nn.Module, prompt: str, max_new_tokens: int = 50, **kwargs
) -> tuple[str, str]:
    """(the prompt as the model saw it, cropped to the context; its continuation up to
    the first end-of-text). `kwargs` are generate()'s."""
    cfg = base_model(model).cfg
    ids, note = prompt_ids(prompt, cfg.context_length, cfg.vocab_size)
    if note:
        log.note(note)
    out = generate(model, torch.tensor([ids]), max_new_tokens, **kwargs)[0].tolist()
    return decode(ids), decode(completion(out[len(ids) :], kwargs.get("eos_id", EOT_ID)))


def text_sample(model: torch.nn.Module, prompt: str, max_new_tokens: int = 50, **kwargs) -> str:
    """The prompt (as the model saw it: cropped to the context) and its continuation."""
    seen, continuation = continue_text(model, prompt, max_new_tokens, **kwargs)
    return seen + continuation


class TextStream:
    """Prints token ids as text as they arrive; a character split over tokens waits for
    its last byte."""

    def __init__(self, file=None, eos_id: int = EOT_ID):
        self.file, self.eos_id, self.ended = file or sys.stdout, eos_id, False
        self.enc = get_tokenizer()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: torch.Tensor) -> None:
        token = int(ids[0])
        if self.ended or token == self.eos_id:
            self.ended = True
            return
        self.write(self.decoder.decode(self.enc.decode_single_token_bytes(token)))

    def write(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()

    def close(self) -> None:
        self.write(self.decoder.decode(b"", final=True))


# ----------------------------------------------------------------------------- CLI


@dataclass
class GenerateOptions(ModelSource):
    prompt: list[str] = setting(
        help="text to continue; repeat for several (default: the book's 'Every effort moves you')",
        default_factory=list,
    )
    max_new_tokens: int = setting(100, "tokens to generate per sample")
    temperature: float = setting(0.0, "0: greedy (the argmax); higher: more random")
    top_k: Optional[int] = setting(None, "sample only among the k likeliest tokens")
    top_p: Optional[float] = setting(
        None, "nucleus: sample in the smallest set of probability mass p"
    )
    seed: int = setting(1337, "seeds the sampling")
    num_samples: int = setting(1, "samples per prompt")
    cache: bool = setting(True, "a KV cache (--no-cache recomputes the whole sequence each step)")
    device: str = setting("auto", "cpu, cuda, cuda:N or mps (auto: cuda when there is one)")
    dtype: str = setting(
        "fp32",
        "weights and KV cache in fp32, bf16 or fp16; bf16 halves the bytes each new token reads",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("max_new_tokens", "num_samples"):
            require(
                getattr(self, key) >= 1,
                "--" + key.replace("_", "-"),
                getattr(self, key),
                "at least 1",
            )
        require(0 <= self.seed < 2**64, "--seed", self.seed, "0 .. 2**64 - 1")
        self.dtype = dtype_name(self.dtype)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


USAGE = Usage(
    "python -m pipeline.generate", "Generate text from a trained, imported or exported model."
)


def parse_args(argv=None) -> GenerateOptions:
    return parse_options(GenerateOptions, argv, USAGE)


@cli_main
def main(argv=None) -> None:
    from pipeline.model.weights import load_model

    args = parse_args(argv)
    args.device = checked_device(args.device)
    model, info = load_model(args.model, device=args.device, n_heads=args.n_heads)
    # bf16 needs no warning here, unlike training: one row at a time is bound by reading
    # the weights, and bf16 halves those bytes even on AVX2-only CPUs (30 against 26
    # tokens/s for 124M on 2 cores), where bf16 matmuls of many rows are ~40x slower
    lay_out_for_decoding(model.to(DTYPES[args.dtype]))
    check_sampling(model.cfg.vocab_size, args.temperature, args.top_k, args.top_p)
    if args.num_samples > 1 and args.temperature == 0:
        log.note(
            "temperature 0 is greedy, so every sample is the same; use --temperature > 0 to sample"
        )
    generator = torch.Generator(args.device).manual_seed(args.seed)
    for prompt in args.prompt or ["Every effort moves you"]:
        ids, note = prompt_ids(prompt, model.cfg.context_length, model.cfg.vocab_size)
        if note:
            log.note(note)
        for _ in range(args.num_samples):
            stream = TextStream()
            stream.write(decode(ids))
            generate(
                model,
                torch.tensor([ids]),
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                use_cache=args.cache,
                generator=generator,
                on_token=stream,
            )
            stream.close()
            stream.write("\n" + "-" * 40 + "\n")


if __name__ == "__main__":
    main()
