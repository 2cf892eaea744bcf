"""Generation tokens/s of the 124M GPT-2 shape, with and without the KV cache, next to
transformers' generate(use_cache=True), in one run on the same weights.

    .venv/bin/python -m benchmarks.generate_speed [--new-tokens 200] [--repeats 1]

Batch 1, greedy, random weights (speed does not depend on them); end-of-text is ignored
so every contender produces exactly --new-tokens tokens, and the three outputs are
checked equal. Contenders take turns (benchmarks.common.interleave) because the machine is
shared; the warm-up is a short 8-token generation each, since without the cache one full
run costs minutes on a small CPU (every step re-runs the whole sequence: ~5 TFLOP in all
for 200 tokens). Writes benchmarks/results/generate_speed.json.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleave, machine, median, table, write_result
from pipeline.config import ModelConfig
from pipeline.generate import generate
from pipeline.gpt2 import hf_config, to_hf
from pipeline.model import GPTModel
from pipeline.tokenizer import encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompt", default="Every effort moves you")
    args = parser.parse_args()
    import transformers

    cfg = ModelConfig(context_length=1024, qkv_bias=True, tie_embeddings=True, drop_rate=0.0)
    torch.manual_seed(0)
    ours = GPTModel(cfg).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{
        k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")})).eval()
    hf.load_state_dict(to_hf(ours.state_dict(), cfg), strict=False)  # lm_head is tied
    idx = torch.tensor([encode(args.prompt)])
    outputs = {}

    def contenders(n):
        def run(name, fn):
            def call():
                with torch.inference_mode():
                    outputs[name] = fn()
            return call

        return {
            "ours, KV cache": run("cache", lambda: generate(ours, idx, n, eos_id=None)),
            "ours, no cache": run("full", lambda: generate(ours, idx, n, eos_id=None,
                                                           use_cache=False)),
            "transformers generate(use_cache=True)": run("hf", lambda: hf.generate(
                idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, use_cache=True, pad_token_id=50256)),
        }

    interleave(contenders(8), repeats=0, warmup=1)
    n = args.new_tokens
    times = interleave(contenders(n), args.repeats, warmup=0)
    assert torch.equal(outputs["cache"], outputs["full"]) and torch.equal(outputs["cache"], outputs["hf"])
    rows = [{"contender": name, "seconds": median(t), "tokens/s": n / median(t)}
            for name, t in times.items()]
    info = machine()
    print(f"124M GPT-2 shape, batch 1, prompt {idx.shape[1]} tokens + {n} new, greedy, "
          f"median of {args.repeats}; {info['cpu']}, {info['torch_threads']} threads, "
          f"load average {info['load_average_1m']:.1f}")
    print(table(rows, ["contender", "seconds", "tokens/s"]))
    path = write_result("generate_speed", {"machine": info, "new_tokens": n,
                                           "prompt_tokens": idx.shape[1], "rows": rows,
                                           "seconds": times})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
