"""Load a model from wherever its weights are, for the stages that use a trained model.

A *source* is any of:
    runs/<name>/                 a run: its latest complete checkpoint
    runs/<name>/checkpoints/step_NNNNNN/   one checkpoint
    a model directory            Hugging Face GPT-2 or Llama layout (config.json +
                                 model.safetensors, sharded safetensors, or
                                 pytorch_model.bin): an export, a download, or
                                 `save_pretrained` output
    gpt2 | gpt2-medium | gpt2-large | gpt2-xl   OpenAI's weights via the Hugging Face Hub
    a .pth file                  the state dict of the book's GPTModel (chapter 5's model.pth)

Every source ends as (ModelConfig, state dict in this project's names), checked tensor by
tensor against the config, so a mismatch names the tensors instead of failing inside torch.

Decisions:
- A model directory whose `c_attn` biases are all exactly zero loads with qkv_bias=False:
  that is what `export` writes for a model trained without them, so export -> import gives
  the config back. Zero biases compute the same function either way; the difference only
  shows if training continues (without the option the biases stay absent).
- `context_length` may crop the position table (as nanoGPT trains GPT-2 at shorter
  contexts); it can never grow it. A llama model has no table: its context only shrinks.
- A Llama directory must hold a model of GPT-2's vocabulary (50257 tokens, and GPT-2's
  tokenizer files if it holds any): the stages tokenize with GPT-2's BPE only, and another
  vocabulary's ids would be read as GPT-2 tokens without a word of warning.
- Pickles are never trusted: .pth/.bin files load with torch.load(weights_only=True).

Owns source resolution and the file formats of *other* tools. The checkpoint layout is
pipeline/model/checkpoints.py's and the name mappings pipeline/model/gpt2.py's and
pipeline/model/llama_hf.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from pipeline.core import log
from pipeline.core.errors import PipelineError
from pipeline.core.schema import require, setting
from pipeline.model import checkpoints as checkpoint
from pipeline.model import gpt2, llama_hf
from pipeline.model.config import ModelConfig
from pipeline.model.gpt import GPTModel, state_shapes
from pipeline.model.tensorfile import read_tensors

HUB_ORG = "openai-community"
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class ModelInfo:
    """Where a loaded model came from."""

    source: str  # what the user named
    kind: str  # run | checkpoint | hf | hub | book
    path: Path  # the checkpoint dir, model dir or file the weights were read from
    home: Path | None  # where results about this model belong (eval.json); None for the Hub
    config: ModelConfig | None = None
    meta: dict | None = None  # a checkpoint's meta.json (step, tokens, run config)


# ----------------------------------------------------------------------------- public API


def load_state(
    source: str | Path,
    *,
    context_length: int | None = None,
    n_heads: int | None = None,
    default_heads: int | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor], ModelInfo]:
    """Config and weights (this project's names, CPU) of any source; see the module doc.

    Only book-format files, whose shapes do not tell the number of heads, consult
    `n_heads` (wins), then `default_heads` where it divides the width, then GPT-2's head
    count at that width (announced on stderr as a guess).
    """
    info = resolve(source)
    if info.kind == "checkpoint" or info.kind == "run":
        cfg, state = _read_checkpoint(info)
    elif info.kind == "book":
        cfg, state = _read_book(info.path, n_heads, default_heads)
    else:
        cfg, state = _read_hf_dir(info.path)
    check_shapes(cfg, state, where=str(info.path))
    cfg, state = crop_context(cfg, state, context_length, where=str(info.path))
    info.config = cfg
    return cfg, state, info


def load_model(
    source: str | Path,
    *,
    context_length: int | None = None,
    device="cpu",
    n_heads: int | None = None,
) -> tuple[GPTModel, ModelInfo]:
    """A GPTModel in eval mode with the weights of `source` (fp32 on `device`)."""
    cfg, state, info = load_state(source, context_length=context_length, n_heads=n_heads)
    return build_model(cfg, state, device), info


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device="cpu") -> GPTModel:
    """GPTModel(cfg) holding `state`, without spending time on a random init first."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own tensor: tie again
        model.out_head.weight = model.tok_emb.weight
        state = {**state, "out_head.weight": state["tok_emb.weight"]}
    model.load_state_dict(state, strict=True)
    return model.eval()


def init_from_weights(
    user_cfg: ModelConfig, init_from: str
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Starting weights for training with `model.init_from` (anything but "scratch").

    The architecture comes from the weights (`arch` too; OpenAI GPT-2: context 1024,
    qkv_bias true, tied head). From the user's config only `context_length` (which may crop the
    positions, never extend them), `drop_rate` (a training choice) and `init_from` are
    taken; `n_heads` too for book-format files, whose shapes do not tell it (it wins over
    GPT-2's count at that width wherever it divides the width).
    """
    cfg, state, info = load_state(init_from, default_heads=user_cfg.n_heads)
    if user_cfg.context_length > cfg.context_length:
        raise PipelineError(
            f"model.context_length is {user_cfg.context_length}, but {init_from} was trained "
            f"with {cfg.context_length} positions: positions cannot be added to pretrained "
            f"weights. Set model.context_length to {cfg.context_length} or less."
        )
    cfg, state = crop_context(cfg, state, user_cfg.context_length, where=init_from)
    return replace(cfg, drop_rate=user_cfg.drop_rate, init_from=init_from), state


def crop_context(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    context_length: int | None,
    where: str = "the model",
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Keep the first `context_length` positions (None or the same length: unchanged)."""
    if context_length is None or context_length == cfg.context_length:
        return cfg, state
    if not 0 < context_length < cfg.context_length:
        raise PipelineError(
            f"context length {context_length} is not possible for {where}: it has "
            f"{cfg.context_length} positions, and positions can only be cropped (1 to "
            f"{cfg.context_length}), not added"
        )
    if "pos_emb.weight" in state:  # llama has none: rotary positions need no cropping
        state = {**state, "pos_emb.weight": state["pos_emb.weight"][:context_length].contiguous()}
    return replace(cfg, context_length=context_length), state


def check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """PipelineError naming every tensor that is missing, extra, or of the wrong shape."""
    check_block_count(cfg, state, prefix="trf_blocks.", where=where)
    expected = state_shapes(cfg)
    if cfg.tie_embeddings:
        expected.pop("out_head.weight")
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    problems = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems += [f"{k} missing" for k in expected if k not in state]
    problems += [f"{k} unexpected" for k in state if k not in expected]
    if problems:
        raise PipelineError(
            f"the weights in {where} do not fit their config ({_describe(cfg)}): "
            f"{'; '.join(problems[:6])}"
            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        )


# ----------------------------------------------------------------------------- resolving


def resolve(source: str | Path) -> ModelInfo:
    """What kind of source this is and where its weights are; PipelineError if none."""
    text = str(source)
    path = Path(source)
    if path.is_dir():
        return _resolve_dir(text, path)
    if path.is_file():
        if path.suffix in (".safetensors", ".json"):
            raise PipelineError(f"give the directory that holds {path.name}, not the file")
        return ModelInfo(text, "book", path, home=path.parent)
    name = text.removeprefix(f"{HUB_ORG}/")
    if name in gpt2.OPENAI_SIZES:
        snapshot = _download(name)
        return ModelInfo(text, "hub", snapshot, home=None)
    valid = ", ".join(gpt2.OPENAI_SIZES)
    if name.startswith("gpt2") or text.startswith(f"{HUB_ORG}/"):
        raise PipelineError(f"unknown GPT-2 model name '{text}'; the valid names are: {valid}")
    raise PipelineError(
        f"'{text}' is neither an existing path nor a GPT-2 name. Give a run directory "
        f"(runs/<name>), a checkpoint directory, a model directory in the Hugging Face GPT-2 "
        f"or Llama layout, a book-format model.pth file, or one of: {valid}"
    )


def _resolve_dir(text: str, path: Path) -> ModelInfo:
    if (path / checkpoint.CHECKPOINTS).is_dir() or (path / "config.yaml").is_file():
        latest = checkpoint.newest_readable(path, warn=log.warn)
        if latest is None:
            raise PipelineError(
                f"run {path} has no complete, undamaged checkpoint (none under "
                f"{path / checkpoint.CHECKPOINTS} with a {checkpoint.META_FILE}); train it first "
                f"or name a checkpoint or model directory"
            )
        return ModelInfo(text, "run", latest, home=path)
    if (path / checkpoint.META_FILE).is_file():
        return ModelInfo(text, "checkpoint", path, home=path)
    if (path / HF_CONFIG).is_file():
        return ModelInfo(text, "hf", path, home=path)
    raise PipelineError(
        f"{path} holds no model: expected a run directory (with checkpoints/), a checkpoint "
        f"(with {checkpoint.META_FILE} and {checkpoint.MODEL_FILE}), or a model directory in "
        f"the Hugging Face GPT-2 or Llama layout ({HF_CONFIG} and one of "
        f"{', '.join(HF_WEIGHTS)})"
    )


def _download(name: str) -> Path:
    """OpenAI's GPT-2 `name` from the Hub into (or straight from) the local HF cache."""
    from huggingface_hub import snapshot_download

    repo = f"{HUB_ORG}/{name}"
    try:
        return Path(snapshot_download(repo, allow_patterns=[HF_CONFIG, "model.safetensors"]))
    except OSError as e:  # huggingface_hub's offline and HTTP errors are OSErrors
        raise PipelineError(
            f"could not get {repo} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[-1] if str(e) else ''}). It needs the network the first time "
            f"(after that it is cached); check the connection, unset HF_HUB_OFFLINE if it is "
            f"set, or download the model elsewhere and give its local directory (config.json + "
            f"model.safetensors) instead of the name."
        ) from None


# ----------------------------------------------------------------------------- reading


def _read_checkpoint(info: ModelInfo) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if not (info.path / checkpoint.MODEL_FILE).is_file():
        raise PipelineError(f"checkpoint {info.path} has no {checkpoint.MODEL_FILE}")
    problem = checkpoint.damage(info.path, only={checkpoint.MODEL_FILE})
    if problem:
        raise PipelineError(
            f"checkpoint {info.path} is damaged: {problem}. Use an earlier "
            f"checkpoint of the run (or the run directory, which skips it)."
        )
    info.meta = checkpoint.read_meta(info.path)
    return checkpoint.load_model_state(info.path)


def _read_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    hf = _read_json(path / HF_CONFIG)
    kind = hf.get("model_type", "gpt2")
    if kind == "llama":
        return _read_llama_dir(path, hf)
    if kind != "gpt2":
        raise PipelineError(f"{path} holds a '{kind}' model; only GPT-2 and Llama models load here")
    try:  # the config is checked before a single tensor is read
        gpt2.model_config_from_hf(hf, where=str(path / HF_CONFIG))
    except ValueError as e:
        raise PipelineError(f"{path / HF_CONFIG} is not a GPT-2 config: {e}") from None
    hf_state = read_hf_tensors(path)
    zero_bias = gpt2.qkv_biases_are_zero(
        v for k, v in hf_state.items() if k.endswith("attn.c_attn.bias")
    )
    cfg = gpt2.model_config_from_hf(hf, where=str(path / HF_CONFIG), qkv_bias=not zero_bias)
    check_block_count(cfg, hf_state, prefix="transformer.h.", where=str(path))
    try:
        return cfg, gpt2.from_hf(hf_state, cfg)
    except (KeyError, ValueError) as e:
        raise PipelineError(f"the weights in {path} do not fit its {HF_CONFIG}: {e}") from None


def _read_llama_dir(path: Path, hf: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    where = str(path / HF_CONFIG)
    try:  # the config is checked before a single tensor is read
        cfg = llama_hf.model_config_from_hf(hf, where=where)
    except ValueError as e:
        raise PipelineError(f"{where} is not a Llama config this project can run: {e}") from None
    _require_gpt2_vocabulary(path, cfg)
    hf_state = read_hf_tensors(path)
    check_block_count(cfg, hf_state, prefix="model.layers.", where=str(path))
    try:
        return cfg, llama_hf.from_hf(hf_state, cfg)
    except ValueError as e:
        raise PipelineError(f"the weights in {path} do not fit its {HF_CONFIG}: {e}") from None


# What transformers names GPT-2's BPE in tokenizer_config.json.
GPT2_TOKENIZERS = {"GPT2Tokenizer", "GPT2TokenizerFast"}


def _require_gpt2_vocabulary(path: Path, cfg: ModelConfig) -> None:
    """One paragraph for a Llama checkpoint of another vocabulary: every stage tokenizes
    with GPT-2's BPE, so its ids would mean other words."""
    tokenizer = path / "tokenizer_config.json"
    named = _read_json(tokenizer).get("tokenizer_class") if tokenizer.is_file() else None
    why = None
    if cfg.vocab_size != llama_hf.GPT2_VOCAB:
        why = f"its vocabulary has {cfg.vocab_size:,} tokens, GPT-2's {llama_hf.GPT2_VOCAB:,}"
    elif (path / "tokenizer.model").is_file():
        why = "it comes with a SentencePiece tokenizer (tokenizer.model)"
    elif named is not None and named not in GPT2_TOKENIZERS:
        why = f"its tokenizer_config.json names {named}"
    if why:
        raise PipelineError(
            f"{path} holds a Llama model whose tokenizer is not GPT-2's: {why}. This "
            f"project reads, writes and generates GPT-2 BPE tokens only (tiktoken's gpt2), "
            f"so that model's token ids would stand for other text; until other tokenizers "
            f"are supported, only Llama-layout models with GPT-2's vocabulary of "
            f"{llama_hf.GPT2_VOCAB:,} tokens load (such as this project's own exports)."
        )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise PipelineError(f"{path} cannot be read as JSON ({why})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory, by its HF name."""
    single, index, pickle = (path / f for f in HF_WEIGHTS)
    if single.is_file():
        return read_tensors(single)
    if index.is_file():
        return {
            k: v for shard in index_shards(index) for k, v in read_tensors(path / shard).items()
        }
    if pickle.is_file():
        return _torch_load(pickle)
    raise PipelineError(
        f"{path} has a {HF_CONFIG} but no weights: expected one of {', '.join(HF_WEIGHTS)}"
    )


def index_shards(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names: plain file names inside the
    model directory only (a name like ../../etc/passwd would make the loader read any
    file the user can)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PipelineError(f"{index} has no weight_map (tensor name -> shard file)")
    shards = sorted(set(map(str, weight_map.values())))
    outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
    if outside:
        raise PipelineError(
            f"{index} names shard files outside its directory "
            f"({', '.join(outside[:3])}); only file names in {index.parent} "
            f"are read"
        )
    return shards


def check_block_count(cfg: ModelConfig, state: dict, prefix: str, where: str) -> None:
    """The config's layer count against the blocks the tensors hold, by arithmetic on
    their names, before anything is built from the config (a config.json claiming
    100,000 layers over one would otherwise build them)."""
    blocks = {name[len(prefix) :].split(".", 1)[0] for name in state if name.startswith(prefix)}
    if len(blocks) != cfg.n_layers:
        raise PipelineError(
            f"the config of {where} says {cfg.n_layers} layers, and its weights "
            f"hold {len(blocks)}; they do not belong together"
        )


def _read_book(
    path: Path, n_heads: int | None, default_heads: int | None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    state = _torch_load(path)
    if isinstance(state.get("model_state_dict"), dict):  # the book's model_and_optimizer.pth
        state = state["model_state_dict"]
    if not gpt2.is_book_state(state):
        hint = (
            " It looks like a Hugging Face GPT-2 state dict: give the directory that holds it "
            f"with its {HF_CONFIG}."
            if any("c_attn" in k for k in state)
            else ""
        )
        raise PipelineError(
            f"{path} is not the state dict of the book's GPTModel (no "
            f"trf_blocks.0.att.W_query.weight).{hint}"
        )
    try:
        heads, guess = gpt2.book_heads(state["tok_emb.weight"].shape[1], n_heads, default_heads)
        if guess:  # shapes do not record it: say so every time, a wrong guess is silent
            log.warn(
                f"{path}: a book-format model.pth does not record its number of attention "
                f"heads; using {heads} ({guess}). If it was trained with another, give "
                f"--n-heads N (or model.n_heads for model.init_from)."
            )
        return gpt2.from_book(state, heads)
    except KeyError as e:
        raise PipelineError(f"{path} lacks the book's tensor {e}") from None
    except ValueError as e:
        raise PipelineError(f"{path}: {e}") from None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise PipelineError(
            f"{path} cannot be read as a plain state dict with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); only tensors "
            f"and plain containers are accepted, never arbitrary pickles"
        ) from None
    if not isinstance(state, dict):
        raise PipelineError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _describe(cfg: ModelConfig) -> str:
    if cfg.arch == "llama":
        return (
            f"llama, vocab {cfg.vocab_size}, emb_dim {cfg.emb_dim}, {cfg.n_layers} layers, "
            f"{cfg.n_heads} heads, {cfg.kv_heads} key/value heads, MLP {cfg.ffn_dim}, "
            f"tied head {cfg.tie_embeddings}"
        )
    return (
        f"vocab {cfg.vocab_size}, context {cfg.context_length}, emb_dim {cfg.emb_dim}, "
        f"{cfg.n_layers} layers, {cfg.n_heads} heads, qkv_bias {cfg.qkv_bias}, "
        f"tied head {cfg.tie_embeddings}"
    )


# Storage dtypes, in the one spelling every stage uses (train.precision's bf16 and fp16;
# fp32 is its `no`). The names torch and transformers print are accepted too.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(text: str, key: str = "--dtype") -> str:
    """fp32 | bf16 | fp16, from that spelling or torch's (float32, bfloat16, float16)."""
    name = DTYPE_ALIASES.get(text, text)
    require(name in DTYPES, key, text, "fp32, bf16 or fp16")
    return name


@dataclass
class ModelSource:
    """The options every stage that reads a model shares (evaluate, export, generate)."""

    model: str = setting(
        help="a run dir (its latest checkpoint), a checkpoint dir, a model "
        f"dir, {' | '.join(gpt2.OPENAI_SIZES)}, or a book-format "
        "model.pth",
        metavar="SOURCE",
    )
    n_heads: Optional[int] = setting(
        None,
        "attention heads of a book-format model.pth, whose "
        "tensors do not record them (default: GPT-2's count "
        "at its width, announced)",
    )

    def __post_init__(self) -> None:
        require(
            bool(self.model.strip()),
            "--model",
            self.model,
            "a run dir, checkpoint dir, model dir or GPT-2 size",
        )
        require(
            self.n_heads is None or self.n_heads > 0, "--n-heads", self.n_heads, "a positive count"
        )
