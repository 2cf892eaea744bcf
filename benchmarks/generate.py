"""Generation: tokens/s for 200 new tokens after a 10-token prompt, 124M GPT-2 shape, greedy,
batch 1 and 8: pipeline.generate with its KV cache, without it (the book's loop: the
whole sequence through the model for every new token), and transformers'
generate(use_cache=True) on the same weights. End-of-text is ignored so every contender
makes exactly the same number of tokens, and their outputs are checked equal.

fp32 at batch 1 and 8, and bf16 (`--dtype bf16`: both models cast) at batch 1. Ours holds
its weights as the generate CLI does (pipeline.generate.lay_out_for_decoding).
The no-cache loop costs about 20x the cached one at 200 tokens; in the full run it is
timed at fp32 batch 1 only (at batch 8 it alone would take most of the time budget).
Knows generate's public function only.
"""

from __future__ import annotations

import torch

from benchmarks.common import interleave, machine, median, print_tables, transformers_gpt2
from pipeline.config import ModelConfig
from pipeline.generate import generate, lay_out_for_decoding
from pipeline.model.gpt import GPTModel
from pipeline.model.gpt2 import to_hf

PROMPT = 10


def models(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """Our model as `python -m pipeline.generate --dtype` holds it, and transformers'
    GPT-2 with the same weights in the same dtype."""
    torch.manual_seed(0)
    ours = GPTModel(cfg).eval()
    hf = transformers_gpt2(cfg)
    hf.load_state_dict(to_hf(ours.state_dict(), cfg), strict=False)  # lm_head is tied
    return lay_out_for_decoding(ours.to(dtype)), hf.to(dtype).eval()


def contenders(ours, hf, idx, new: int, with_full: bool, outputs: dict) -> dict:
    def timed(name, fn):
        def call():
            with torch.inference_mode():
                outputs[name] = fn()

        return call

    runs = {
        "ours, KV cache": timed("cache", lambda: generate(ours, idx, new, eos_id=None)),
        "transformers generate(use_cache=True)": timed(
            "hf",
            lambda: hf.generate(
                idx,
                attention_mask=torch.ones_like(idx),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=50256,
            ),
        ),
    }
    if with_full:
        runs["ours, no cache (book's loop)"] = timed(
            "full", lambda: generate(ours, idx, new, eos_id=None, use_cache=False)
        )
    return runs


def run_batch(
    ours, hf, batch: int, new: int, repeats: int, with_full: bool, dtype: str = "fp32"
) -> dict:
    g = torch.Generator().manual_seed(batch)
    idx = torch.randint(0, 50257, (batch, PROMPT), generator=g)
    outputs: dict = {}
    for call in contenders(ours, hf, idx, 4, with_full, outputs).values():
        call()  # warm-up on a short generation
    times = interleave(contenders(ours, hf, idx, new, with_full, outputs), repeats, warmup=0)
    same = all(torch.equal(outputs["cache"], out) for out in outputs.values())
    rows = [
        {
            "batch": batch,
            "dtype": dtype,
            "new_tokens": new,
            "contender": name,
            "seconds": median(t),
            "all_seconds": t,
            "tokens_per_s": batch * new / median(t),
        }
        for name, t in times.items()
    ]
    hf_row = next(r for r in rows if r["contender"].startswith("transformers"))
    for r in rows:
        r["x_transformers"] = r["tokens_per_s"] / hf_row["tokens_per_s"]
    return {"batch": batch, "dtype": dtype, "outputs_equal": same, "rows": rows}


def run(quick: bool = False) -> dict:
    cfg = ModelConfig(context_length=1024, qkv_bias=True, tie_embeddings=True, drop_rate=0.0)
    if quick:  # smoke: a small model and few tokens
        cfg = ModelConfig(
            context_length=256,
            emb_dim=128,
            n_heads=4,
            n_layers=2,
            qkv_bias=True,
            tie_embeddings=True,
            drop_rate=0.0,
        )
    new, repeats = (20, 1) if quick else (200, 2)
    ours, hf = models(cfg)
    batches = [
        run_batch(ours, hf, 1, new, repeats, with_full=True),
        run_batch(ours, hf, 8, new, repeats, with_full=quick),
    ]
    # bf16 at batch 1: `--dtype bf16`, both models cast (greedy picks may differ from fp32)
    # (50 tokens: transformers' bf16 Conv1D matmuls take a slow kernel on AVX2-only CPUs,
    # ~3 tokens/s at 124M on 2 cores, and 200 would take minutes)
    ours, hf = models(cfg, torch.bfloat16)
    batches.append(run_batch(ours, hf, 1, min(new, 50), repeats, with_full=False, dtype="bf16"))
    result = {
        "benchmark": "generate",
        "quick": quick,
        "machine": machine(),
        "model": cfg.__dict__,
        "prompt_tokens": PROMPT,
        "new_tokens": new,
        "greedy": True,
        "ours_layout": "lay_out_for_decoding (as the generate CLI)",
        "batches": batches,
    }
    print_tables(tables(result))
    return result


def tables(result: dict) -> list[tuple[str, list[dict], list[str]]]:
    rows = [r for b in result["batches"] for r in b["rows"]]
    shape = "tiny model (quick)" if result["quick"] else "124M GPT-2 shape"
    return [
        (
            f"generation: {result['prompt_tokens']}-token prompt + {result['new_tokens']} new "
            f"tokens, greedy, {shape}",
            rows,
            [
                "batch",
                "dtype",
                "new_tokens",
                "contender",
                "seconds",
                "tokens_per_s",
                "x_transformers",
            ],
        )
    ]
