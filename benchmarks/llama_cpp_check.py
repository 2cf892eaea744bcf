"""`make llama-cpp-check MODEL=runs/<name>`: llama.cpp itself on this project's GGUF export.

    PYTHONPATH=.llama-cpp python -m benchmarks.llama_cpp_check --model runs/<name> \\
        [--dtype fp32,fp16] [--new-tokens 24] [--prompt TEXT ...] [--out FILE]

Exports the model as GGUF (each dtype, into a temporary directory), loads the file with
llama.cpp through llama-cpp-python, and holds it against this project's own model on each
prompt: the token ids of llama.cpp's tokenizer (read from the GGUF) against tiktoken's,
the logits at every prompt position (largest absolute difference), and a greedy
continuation of --new-tokens tokens. Prints a table, writes the JSON (default
benchmarks/results/llama-cpp.json), and exits 1 when a tokenization or a continuation
differs.

llama-cpp-python compiles llama.cpp from source (about 6 minutes on 2 cores), so it is not
in the lock or the test suite: `make llama-cpp-check` installs the version pinned in
requirements/llama-cpp.txt into .llama-cpp/ once and runs this with it on the path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, machine
from pipeline.core.errors import cli_main
from pipeline.core.fileio import atomic_write_json

PROMPTS = ["Every effort moves you", "def main(args):\n    ", "The quick brown fox"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.llama_cpp_check", description=__doc__
    )
    parser.add_argument("--model", required=True, help="a run, checkpoint or model directory")
    parser.add_argument("--dtype", default="fp32,fp16", help="GGUF dtypes to check (fp32, fp16)")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens to compare")
    parser.add_argument("--prompt", action="append", help="repeat for several (default: three)")
    parser.add_argument("--out", type=Path, default=RESULTS / "llama-cpp.json")
    return parser.parse_args(argv)


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        sys.exit(
            "error: llama-cpp-python is not importable. Run `make llama-cpp-check MODEL=...`, "
            "which builds it into .llama-cpp/ (about 6 minutes, once)."
        )
    return llama_cpp


def greedy_llama_cpp(llm, ids: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits at each prompt position, and its greedy continuation."""
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out


def compare(model, llm, prompt: str, new_tokens: int) -> dict:
    from pipeline.data.tokenizer import decode, encode
    from pipeline.generate import generate

    ids = encode(prompt)
    theirs_ids = list(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False))
    with torch.no_grad():
        ours_logits = model(torch.tensor([ids]))[0].float().numpy()
    prompt_tensor = torch.tensor([ids])
    ours = generate(model, prompt_tensor, new_tokens, temperature=0.0, eos_id=None)[0].tolist()
    theirs_logits, theirs = greedy_llama_cpp(llm, ids, new_tokens)
    return {
        "prompt": prompt,
        "same_token_ids": theirs_ids == ids,
        "max_logit_diff": float(np.abs(theirs_logits - ours_logits).max()),
        "same_greedy": ours[len(ids) :] == theirs,
        "ours": decode(ours[len(ids) :]),
        "llama_cpp": decode(theirs),
    }


def check(args) -> dict:
    llama_cpp = require_llama_cpp()
    from pipeline.data.tokenizer import encode
    from pipeline.export import export_gguf
    from pipeline.model.weights import load_model

    model, _ = load_model(args.model)
    model.eval()
    prompts = args.prompt or PROMPTS
    if any(len(encode(p)) + args.new_tokens > model.cfg.context_length for p in prompts):
        sys.exit(
            f"error: a prompt plus --new-tokens exceeds the context ({model.cfg.context_length})"
        )
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpt-pipeline-gguf-") as tmp:
        for dtype in args.dtype.split(","):
            path = Path(tmp) / f"model-{dtype}.gguf"
            export_gguf(args.model, path, dtype)
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=model.cfg.context_length,
                logits_all=True,
                verbose=False,
                n_threads=torch.get_num_threads(),
            )
            results[dtype] = [compare(model, llm, p, args.new_tokens) for p in prompts]
            llm.close()  # before the file goes: llama.cpp maps it
    return {
        "model": str(args.model),
        "llama_cpp_python": llama_cpp.__version__,
        "new_tokens": args.new_tokens,
        "machine": machine(),
        "results": results,
    }


def table(report: dict) -> str:
    lines = [
        f"llama.cpp (llama-cpp-python {report['llama_cpp_python']}) on {report['model']}",
        "| dtype | prompt | same ids | max logit diff | same greedy | continuation |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, rows in report["results"].items():
        for r in rows:
            lines.append(
                f"| {dtype} | {r['prompt']!r} | {r['same_token_ids']} | {r['max_logit_diff']:.1e} "
                f"| {r['same_greedy']} | {r['ours'][:48]!r} |"
            )
    return "\n".join(lines)


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    report = check(args)
    atomic_write_json(args.out, report)
    print(table(report))
    print(f"written: {args.out}")
    rows = [r for rows in report["results"].values() for r in rows]
    if not all(r["same_token_ids"] and r["same_greedy"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
