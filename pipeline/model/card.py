"""The README.md model card of an export: what the model is, what it was trained on, how
well it did, and how to load it, from the files the other stages wrote (the checkpoint's
meta.json with the run config, and the evaluate stage's eval.json when there is one).

The front matter is the Hugging Face Hub's model-card metadata, so a pushed export shows
as a transformers text-generation model.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.model.config import ModelConfig
from pipeline.model.weights import ModelInfo

EVAL_FILE = "eval.json"  # the evaluate stage's result, beside the model it measured

ARCH_NAMES = {
    "gpt2": "GPT-2-architecture",
    "llama": "Llama-architecture (RoPE, RMSNorm, SwiGLU, grouped-query attention)",
}


def model_card(info: ModelInfo, cfg: ModelConfig, parameters: int, dtype: str) -> str:
    run = (info.meta or {}).get("config") or {}
    title = run.get("name") or Path(str(info.source)).name
    sections = [
        _front_matter(run, cfg),
        f"# {title}\n",
        f"A {ARCH_NAMES[cfg.arch]} language model exported by gpt-pipeline from "
        f"{info.kind} `{info.source}`.\n",
        _architecture(cfg, parameters, dtype),
        _training(info.meta or {}, run),
        _evaluation(info),
        _how_to_load(),
    ]
    if run:
        sections.append(
            "## Config\n\n<details><summary>the run's resolved config</summary>"
            f"\n\n```yaml\n{yaml.safe_dump(run, sort_keys=False)}```\n\n</details>\n"
        )
    return "\n".join(s for s in sections if s)


def _front_matter(run: dict, cfg: ModelConfig) -> str:
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [cfg.arch, "gpt-pipeline"],
    }
    source = (run.get("data") or {}).get("source") or {}
    if source.get("kind") == "hf" and source.get("path"):
        meta["datasets"] = [source["path"]]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _architecture(cfg: ModelConfig, parameters: int, dtype: str) -> str:
    rows = [
        ("architecture", cfg.arch),
        ("parameters", f"{parameters:,}"),
        ("layers", cfg.n_layers),
        ("width", cfg.emb_dim),
        ("attention heads", cfg.n_heads),
        *_llama_rows(cfg),
        ("context length", cfg.context_length),
        ("vocabulary", f"{cfg.vocab_size:,} (GPT-2 BPE)"),
        ("q/k/v biases", cfg.qkv_bias),
        ("tied embeddings", cfg.tie_embeddings),
        ("stored dtype", dtype),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Architecture\n\n| | |\n|---|---|\n{table}\n"


def _llama_rows(cfg: ModelConfig) -> list[tuple[str, object]]:
    if cfg.arch != "llama":
        return []
    return [
        (
            "key/value heads",
            f"{cfg.kv_heads} (grouped-query)" if cfg.kv_heads != cfg.n_heads else cfg.kv_heads,
        ),
        ("MLP width (SwiGLU)", cfg.ffn_dim),
        ("RoPE theta", cfg.rope_theta),
        ("RMSNorm epsilon", cfg.norm_eps),
    ]


def _training(meta: dict, run: dict) -> str:
    if not meta:
        return ""
    data = run.get("data") or {}
    source = data.get("source") or {}
    what = (
        source.get("path")
        or source.get("url")
        or ", ".join(source.get("paths") or [])
        or source.get("kind", "?")
    )
    lines = [
        f"- data set: `{data.get('name', '?')}` ({source.get('kind', '?')}: {what})",
        f"- optimizer steps: {meta.get('step', '?'):,}"
        if isinstance(meta.get("step"), int)
        else "",
        f"- tokens seen: {meta['tokens']:,}" if isinstance(meta.get("tokens"), int) else "",
        f"- processes: {meta['num_processes']}" if meta.get("num_processes") else "",
    ]
    return "## Training\n\n" + "\n".join(line for line in lines if line) + "\n"


def _evaluation(info: ModelInfo) -> str:
    path = info.home / EVAL_FILE if info.home is not None else None
    if path is None or not path.is_file():
        return (
            "## Evaluation\n\nNot evaluated yet: `gpt-pipeline evaluate --model "
            "<this directory> --data <a prepared data set>` writes eval.json.\n"
        )
    try:
        result = json.loads(path.read_text())
        loss, ppl, tokens = result["loss"], result["perplexity"], result["tokens"]
    except (ValueError, KeyError, TypeError):
        return ""
    return (
        f"## Evaluation\n\nOn the val split ({tokens:,} tokens): loss {loss:.4f}, "
        f"perplexity {ppl:.2f} (from {EVAL_FILE}).\n"
    )


def _how_to_load() -> str:
    return (
        "## How to load\n\n```python\nfrom transformers import pipeline\n\n"
        'generate = pipeline("text-generation", model="PATH_OR_REPO")\n'
        'print(generate("Every effort moves you", max_new_tokens=30)[0]["generated_text"])\n'
        '```\n\nor `gpt-pipeline generate --model PATH --prompt "..."`.\n'
    )
