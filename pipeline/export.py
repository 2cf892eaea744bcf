"""Stage 4: a model to a directory in the Hugging Face GPT-2 (or Llama) layout.

    python -m pipeline.export --model runs/<name> [--out DIR] [--dtype fp32|bf16|fp16]
    python -m pipeline.export --model runs/<name> --format gguf [--out FILE] [--dtype fp32|fp16]

writes
    config.json              GPT2Config (pipeline.model.gpt2.hf_config) plus torch_dtype
    model.safetensors        HF names, Conv1D weights transposed to (in, out); a tied head
                             is stored once as wte (transformers ties it on load)
    generation_config.json   <|endoftext|> as bos/eos
    vocab.json, merges.txt   GPT-2's BPE: OpenAI's encoder.json and vocab.bpe, the files
                             tiktoken verified (so AutoTokenizer and pipeline() tokenize
                             exactly as this project does)
    tokenizer_config.json,   GPT2Tokenizer, <|endoftext|> as bos/eos/unk, no prefix space,
    special_tokens_map.json  model_max_length = the context length
    README.md                the model card (pipeline/model/card.py)

every file readable as the umask allows (safetensors alone would write 0600), so an export
on a shared filesystem is readable by the user's group.

A `model.arch: llama` model is written in the HF Llama layout instead: config.json a
LlamaConfig (pipeline.model.llama_hf.hf_config: GPT-2's <|endoftext|> as bos/eos, no
biases, rope_scaling null), model.safetensors in LlamaForCausalLM's names, the same
tokenizer files and card.

so that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it with the same logits,
and so does this project (`--model DIR` for evaluate and generate, `model.init_from: DIR`).
Any source pipeline.model.weights reads can be exported: a run (its latest checkpoint, default
destination runs/<name>/export/), one checkpoint, OpenAI GPT-2 by name, or the book's
model.pth (both need --out): exporting those is how they are imported into the HF layout.

The directory is written under a temporary name, re-read through the same loader every
stage uses and compared tensor by tensor with the source, and only then renamed into place;
a previous export there is replaced, anything else is refused.

`--format gguf` writes one GGUF file for llama.cpp and Ollama instead (default destination
runs/<name>/model.gguf), laid out by pipeline/model/gguf_file.py: written under a temporary
name, read back with gguf's reader and compared tensor by tensor and key by key, then
renamed into place; a previous GGUF export there is replaced, any other file is refused.
A GPT-2-style model is written as llama.cpp's `gpt2`, a Llama-style one as its `llama`
(q and k rows permuted for llama.cpp's neighbour-pair RoPE, as convert_hf_to_gguf.py does).

Knows the HF directory layout; the name mappings are pipeline/model/gpt2.py's and
pipeline/model/llama_hf.py's, GGUF's pipeline/model/gguf_file.py's.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.config.options import Usage, parse_options
from pipeline.core import log
from pipeline.core.errors import PipelineError, cli_main
from pipeline.core.fileio import atomic_write_json, atomic_write_text, fsync_dir, fsync_file
from pipeline.core.schema import require, setting
from pipeline.data.tokenizer import EOT_ID, EOT_TEXT, bpe_file, bpe_vocab
from pipeline.model import gguf_file, gpt2, llama_hf
from pipeline.model.card import model_card
from pipeline.model.config import shape_values
from pipeline.model.weights import DTYPES, ModelInfo, ModelSource, dtype_name, load_state

GGUF_DTYPES = ("fp32", "fp16")  # what llama.cpp's converter writes unquantized
# What an export directory may hold; a destination with anything else is not replaced.
TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
EXPORT_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "eval.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
    *TOKENIZER_FILES,
}


def export(
    source: str | Path,
    out: str | Path | None = None,
    dtype: str = "fp32",
    n_heads: int | None = None,
) -> tuple[Path, ModelInfo]:
    """Write `source` as an HF GPT-2 directory at `out`, verified; return (out, info).
    `dtype`: fp32 | bf16 | fp16 (or torch's names). `n_heads`: the head count of a
    book-format source (its shapes do not record it)."""
    dtype = dtype_name(dtype)
    cfg, state, info = load_state(source, n_heads=n_heads)
    out = Path(out) if out is not None else default_destination(info)
    _check_destination(out, info)
    hf_state = {
        k: v.to(DTYPES[dtype]).contiguous() for k, v in layout(cfg).to_hf(state, cfg).items()
    }
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_hf_dir(tmp, cfg, hf_state, dtype)
        card = model_card(info, cfg, parameter_count(cfg, state), dtype)
        atomic_write_text(tmp / "README.md", card)
        readable_as_umask_allows(tmp)
        verify_export(tmp, cfg, state, dtype)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, info


def layout(cfg: ModelConfig):
    """The name mapping of the HF layout an architecture is exported in (the module: its
    `to_hf` and `hf_config`)."""
    return llama_hf if cfg.arch == "llama" else gpt2


def write_hf_dir(
    path: Path, cfg: ModelConfig, hf_state: dict[str, torch.Tensor], dtype: str
) -> None:
    # transformers refuses safetensors files without format metadata
    save_file(hf_state, str(path / "model.safetensors"), metadata={"format": "pt"})
    torch_name = str(DTYPES[dtype]).removeprefix("torch.")  # transformers' spelling
    hf_config = layout(cfg).hf_config(cfg)
    atomic_write_json(path / "config.json", {**hf_config, "torch_dtype": torch_name})
    atomic_write_json(
        path / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
    )
    write_tokenizer_files(path, cfg.context_length)


def write_tokenizer_files(path: Path, context_length: int) -> None:
    """GPT-2's tokenizer in the layout AutoTokenizer reads."""
    for hf_name, openai_name in TOKENIZER_FILES.items():
        shutil.copyfile(bpe_file(openai_name), path / hf_name)
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    atomic_write_json(path / "special_tokens_map.json", special)
    atomic_write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            **special,
            "add_prefix_space": False,
            "add_bos_token": False,
            "model_max_length": context_length,
        },
    )


def readable_as_umask_allows(path: Path) -> None:
    """Give every file the mode an ordinary new file gets (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in path.iterdir():
        file.chmod(0o666 & ~umask)


def parameter_count(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> int:
    """Distinct parameters: a tied head counts once."""
    return sum(
        v.numel() for k, v in state.items() if not (cfg.tie_embeddings and k == "out_head.weight")
    )


def verify_export(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: str) -> None:
    """Re-read `path` as every stage would and compare it with the source, tensor by tensor."""
    want = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    zero_bias = gpt2.qkv_biases_are_zero(v for k, v in want.items() if k.endswith("att.qkv.bias"))
    want_cfg = replace(cfg, qkv_bias=cfg.qkv_bias and not zero_bias)
    if not want_cfg.qkv_bias:
        want = {k: v for k, v in want.items() if not k.endswith("att.qkv.bias")}
    if cfg.tie_embeddings:
        want.pop("out_head.weight", None)
    got_cfg, got, _ = load_state(path)
    got_shape, want_shape = shape_values(got_cfg), shape_values(want_cfg)
    diff = [f"config {k}" for k in want_shape if got_shape[k] != want_shape[k]]
    # not shapes, but the function: llama's rotary base and RMSNorm epsilon
    diff += [
        f"config {k}"
        for k in ("rope_theta", "norm_eps")
        if getattr(got_cfg, k) != getattr(want_cfg, k)
    ]
    diff += [
        k
        for k, v in want.items()
        if k not in got or got[k].dtype != v.dtype or not torch.equal(got[k], v)
    ]
    if diff:
        raise PipelineError(
            f"the export written to {path} does not read back equal to the "
            f"source (differs in: {', '.join(diff[:5])}); nothing was replaced"
        )


def export_gguf(
    source: str | Path,
    out: str | Path | None = None,
    dtype: str = "fp32",
    n_heads: int | None = None,
) -> tuple[Path, ModelInfo]:
    """Write `source` as one GGUF file at `out` (fp32 or fp16), verified; return (out, info)."""
    gguf_file.gguf_module()  # missing: said before the model is read
    cfg, state, info = load_state(source, n_heads=n_heads)
    arch = gguf_file.arch_of(cfg)
    out = Path(out) if out is not None else default_destination(info).with_name("model.gguf")
    _check_gguf_destination(out, info)
    tokens, merges = bpe_vocab()
    vocab = gguf_file.Vocab(tokens, merges, EOT_ID)
    tensors = gguf_file.gguf_tensors(cfg, state, dtype, arch)
    meta = gguf_file.metadata(cfg, dtype, _model_name(info), vocab, arch)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        gguf_file.write(tmp, tensors, meta, arch)
        fsync_file(tmp)
        diff = gguf_file.differences(tmp, tensors, meta, arch)
        if diff:
            raise PipelineError(
                f"the GGUF file written to {tmp} does not read back equal to the source "
                f"(differs in: {', '.join(diff[:5])}); nothing was replaced"
            )
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return out, info


def _model_name(info: ModelInfo) -> str:
    """general.name: the run's name for a run or its checkpoint, else the source's."""
    if info.kind == "run":
        return info.home.name
    if info.kind == "checkpoint" and info.path.parent.name == "checkpoints":
        return info.path.parent.parent.name
    return Path(info.source).stem or info.source


def _check_gguf_destination(out: Path, info: ModelInfo) -> None:
    """A new file, or a GGUF file this project wrote (general.tags); nothing else."""
    if out.resolve() == info.path.resolve():
        raise PipelineError(f"--out {out} is the source itself; choose another file")
    if not out.exists() and not out.is_symlink():
        if not out.parent.is_dir():
            raise PipelineError(f"--out {out}: the directory {out.parent} does not exist")
        return
    if out.is_symlink() or not out.is_file() or not gguf_file.is_own_file(out):
        raise PipelineError(
            f"{out} exists and is not a GGUF file this project wrote (its general.tags "
            f"would hold {gguf_file.TAG}), so it is not replaced. Choose another --out, or "
            f"move that file away yourself."
        )


def default_destination(info: ModelInfo) -> Path:
    if info.kind == "run":
        return info.home / "export"
    if info.kind == "checkpoint" and info.path.parent.name == "checkpoints":
        return info.path.parent.parent / "export"  # runs/<name>/export
    raise PipelineError(f"name the destination of the export of {info.source} with --out DIR")


def _check_destination(out: Path, info: ModelInfo) -> None:
    """Refuse any destination but a new directory or an earlier export: a directory is
    replaced only when it reads back as one (see earlier_export), never merely because
    its file names look like an export's."""
    where, source = out.resolve(), info.path.resolve()
    if where == source or where in source.parents:
        raise PipelineError(
            f"--out {out} is the source itself, or holds it; replacing it "
            f"would delete the source. Choose a directory of its own."
        )
    if where == Path.cwd() or where in Path.cwd().parents:
        raise PipelineError(
            f"--out {out} is the directory you are in (or holds it); choose "
            f"a directory of its own, e.g. --out {out / 'export'}"
        )
    if not out.exists() and not out.is_symlink():
        return
    problem = earlier_export_problem(out)
    if problem:
        raise PipelineError(
            f"{out} exists and is not an earlier export of this project "
            f"({problem}), so nothing there is replaced. Choose another --out, "
            f"or move that directory away yourself."
        )


def earlier_export_problem(path: Path) -> str | None:
    """None when `path` reads back as an export this project wrote: only export files,
    config.json a GPT-2 or Llama config, and README.md this project's model card (its front
    matter tagged gpt-pipeline); else what differs."""
    if path.is_symlink() or not path.is_dir():
        return "it is not a directory"
    other = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES)
    if other:
        return f"it holds {', '.join(other[:5])}"
    try:
        config = json.loads((path / "config.json").read_text())
        card = (path / "README.md").read_text()
        front = yaml.safe_load(card.split("---\n")[1]) if card.startswith("---\n") else None
    except (OSError, ValueError, IndexError, yaml.YAMLError):
        front, config = None, None
    if not (isinstance(config, dict) and config.get("model_type") in ("gpt2", "llama")):
        return "its config.json is not a GPT-2 or Llama config written by export"
    if not (isinstance(front, dict) and "gpt-pipeline" in (front.get("tags") or [])):
        return "its README.md is not this project's model card"
    return None


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an earlier export there is moved aside first, then deleted."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- CLI


@dataclass
class ExportOptions(ModelSource):
    out: Optional[str] = setting(
        None,
        "destination directory, or file for gguf (default for a run or checkpoint: "
        "runs/<name>/export, runs/<name>/model.gguf)",
        metavar="PATH",
    )
    format: Literal["hf", "gguf"] = setting(
        "hf",
        "hf: a Hugging Face GPT-2 directory | gguf: one GGUF file with the tokenizer, "
        "for llama.cpp and Ollama (needs the gguf package)",
    )
    dtype: str = setting(
        "fp32",
        "dtype of the stored weights: fp32 (as trained), bf16 or fp16 "
        "(torch's float32, bfloat16, float16 also accepted); gguf: fp32 or fp16",
    )
    push_to_hub: Optional[str] = setting(
        None,
        "then upload the directory to this Hugging Face Hub model repo (user/name; "
        "created if missing; token from `hf auth login` or HF_TOKEN)",
        metavar="REPO",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dtype = dtype_name(self.dtype)
        if self.format == "gguf":
            require(self.dtype in GGUF_DTYPES, "--dtype", self.dtype, "fp32 or fp16 for gguf")
            require(self.push_to_hub is None, "--push-to-hub", self.push_to_hub, "unset for gguf")
        if self.push_to_hub is not None:  # "" too: an empty name is refused, not skipped
            check_repo_id(self.push_to_hub)  # before the work, not after it


USAGE = Usage(
    "python -m pipeline.export",
    __doc__.split("\n\n")[0].strip(),
    "examples:\n  python -m pipeline.export --model runs/tiny\n"
    "  python -m pipeline.export model=gpt2 out=exports/gpt2 dtype=bf16",
)


def parse_args(argv=None) -> ExportOptions:
    return parse_options(ExportOptions, argv, USAGE)


def check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise PipelineError(f"--push-to-hub {repo!r} is not a Hub repo id ({e})") from None


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload an export directory as it is (huggingface_hub's upload_folder); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            repo_type="model",
            commit_message="Upload model exported by gpt-pipeline",
        )
    except (OSError, ValueError) as e:  # the Hub's HTTP and offline errors are OSErrors
        raise PipelineError(
            f"could not push {folder} to the Hub repo {repo} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The export itself is complete in "
            f"{folder}; check the network and your token (`hf auth login` or HF_TOKEN), then "
            f"upload that directory again (`hf upload {repo} {folder}`)."
        ) from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.format == "gguf":
        return report_gguf(*export_gguf(args.model, args.out, args.dtype, args.n_heads), args)
    out, info = export(args.model, args.out, args.dtype, args.n_heads)
    cfg = info.config
    step = f" (step {info.meta['step']})" if info.meta and "step" in info.meta else ""
    size = (out / "model.safetensors").stat().st_size
    log.info(
        f"exported {info.source}{step} to {out}: {cfg.n_layers} layers x {cfg.emb_dim}, "
        f"context {cfg.context_length}, {args.dtype}, {size / 1e6:.1f} MB; re-read and "
        f"equal to the source"
    )
    if args.push_to_hub is not None:
        log.info(f"pushed to the Hub: {push_to_hub(out, args.push_to_hub)}")


def report_gguf(out: Path, info: ModelInfo, args: ExportOptions) -> None:
    cfg = info.config
    log.info(
        f"exported {info.source} to {out}: GGUF ({gguf_file.arch_of(cfg).name}, "
        f"{cfg.n_layers} layers x {cfg.emb_dim}, context {cfg.context_length}, {args.dtype}, "
        f"{out.stat().st_size / 1e6:.1f} MB, GPT-2's tokenizer); read back with gguf's "
        f"reader and equal to what was meant to be written"
        + (
            "; llama.cpp's gpt2 needs q/k/v biases: written as zeros"
            if cfg.arch == "gpt2" and not cfg.qkv_bias
            else ""
        )
        + f". Run it: llama-cli -m {out} -p 'Every effort moves you'"
    )


if __name__ == "__main__":
    main()
