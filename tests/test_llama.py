"""`model.arch: llama` checked against independent references: transformers'
LlamaForCausalLM on the same weights (logits, greedy generation, its files both ways) and
the book's `llms_from_scratch.llama3.Llama3Model`.

The book's Llama3Model and this model agree on the conventions that fix the function:
RoPE in the same half-split layout as transformers (`rotate_half`: dimension i paired
with i + head_dim/2, cos/sin of angles computed in fp32), RMSNorm with eps 1e-5
(nn.RMSNorm), SwiGLU with gate = fc1, up = fc2, down = fc3, k/v heads repeated with
repeat_interleave (query head h reads k/v head h // group). Where they differ, the test
maps or sets: its q, k, v are three Linears (stacked here into att.qkv) and gate/up two
(stacked into ff.fc); it takes `dtype` from its config (bf16 in its published configs:
set to fp32 here), always applies Llama 3's RoPE frequency scaling when `rope_freq` is
given (None here: plain RoPE, as this model) and its RMSNorm eps is fixed at 1e-5; it has
no KV cache, no dropout and no fused loss. With those mapped it is compared exactly in
fp32 (atol 1e-5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from test_export import write_checkpoint
from train_runs import env

from pipeline.config import ModelConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.schema import ConfigError
from pipeline.export import export
from pipeline.generate import generate
from pipeline.model import llama_hf
from pipeline.model.config import llama_ffn_hidden
from pipeline.model.gpt import (
    GPTModel,
    KVCache,
    count_parameters,
    flops_per_token,
    model_size,
    state_shapes,
)
from pipeline.model.weights import init_from_weights, load_model, load_state

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(
    arch="llama",
    vocab_size=50257,
    context_length=64,
    emb_dim=64,
    n_heads=4,
    n_kv_heads=2,
    n_layers=2,
    drop_rate=0.0,
    tie_embeddings=False,
)
LAYOUTS = [(2, False), (4, True), (1, False), (4, False)]
LAYOUT_IDS = ["gqa-untied", "mha-tied", "mqa-untied", "mha-untied"]


def llama(cfg: ModelConfig = TINY, seed=0) -> GPTModel:
    """A model whose RMSNorm weights are not all 1, as after training."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def hf_twin(model: GPTModel):
    """transformers' LlamaForCausalLM holding `model`'s weights, through llama_hf."""
    config = transformers.LlamaConfig(**llama_hf.hf_config(model.cfg))
    hf = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(
        llama_hf.to_hf(model.state_dict(), model.cfg), strict=False
    )
    # a tied head is stored once (as embed_tokens) and tied by transformers
    assert unexpected == [] and missing == (["lm_head.weight"] if model.cfg.tie_embeddings else [])
    return hf


def tokens(n=24, batch=2, seed=1):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("kv_heads,tie", LAYOUTS, ids=LAYOUT_IDS)
def test_logits_equal_transformers_llama_on_the_same_weights(kv_heads, tie):
    model = llama(replace(TINY, n_kv_heads=kv_heads, tie_embeddings=tie))
    hf = hf_twin(model)
    idx = tokens()
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    print(
        f"max |logit difference| vs LlamaForCausalLM ({kv_heads} kv heads, tied {tie}):",
        max_diff(ours, theirs),
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_rope_theta_and_norm_eps_reach_the_function():
    cfg = replace(TINY, rope_theta=500000.0, norm_eps=1e-6, ffn_hidden=96)
    model = llama(cfg)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_twin(model)(idx).logits, rtol=0, atol=1e-5)
        assert max_diff(model(idx), llama(replace(cfg, rope_theta=10000.0))(idx)) > 1e-3


def test_fused_head_loss_and_gradients_equal_logits_and_cross_entropy():
    model = llama(replace(TINY, tie_embeddings=True, vocab_padding=64))
    idx, targets = tokens(), tokens(seed=2)
    targets[0, :5] = -100  # ignored positions count for nothing in both
    fused = model(idx, targets=targets)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_recomputed_blocks_give_the_same_loss_and_gradients():
    model = llama()
    idx, targets = tokens(), tokens(seed=2)
    model(idx, targets=targets).backward()
    kept = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.recompute_blocks = True
    model(idx, targets=targets).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(kept[name], p.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kv_heads,tie", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_greedy_decoding_with_the_cache_equals_without_and_transformers(kv_heads, tie):
    model = llama(replace(TINY, n_kv_heads=kv_heads, tie_embeddings=tie))
    prompt = tokens(n=7, batch=2, seed=3)
    cached = generate(model, prompt, 20, eos_id=None)
    uncached = generate(model, prompt, 20, eos_id=None, use_cache=False)
    hf = hf_twin(model)
    theirs = hf.generate(
        prompt,
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=llama_hf.GPT2_EOT,
    )
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, theirs)


def test_the_cache_holds_the_key_value_heads_only():
    cache = KVCache(TINY, batch_size=2, max_len=16)
    assert cache.keys.shape == (TINY.n_layers, 2, TINY.n_kv_heads, 16, TINY.head_dim)
    model = llama()
    with torch.no_grad():
        logits = model(tokens(n=5), cache=cache)
        step = model(tokens(n=1, seed=4), cache=cache)
        whole = model(torch.cat([tokens(n=5), tokens(n=1, seed=4)], dim=1))
    torch.testing.assert_close(step[:, -1], whole[:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, whole[:, :5], rtol=0, atol=1e-5)


def book_llama3(model: GPTModel):
    """The book's Llama3Model (fp32, plain RoPE) holding `model`'s weights."""
    from llms_from_scratch.llama3 import Llama3Model

    cfg = model.cfg
    book = Llama3Model(
        {
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.context_length,
            "emb_dim": cfg.emb_dim,
            "n_heads": cfg.n_heads,
            "n_layers": cfg.n_layers,
            "hidden_dim": cfg.ffn_dim,
            "n_kv_groups": cfg.kv_heads,
            "rope_base": cfg.rope_theta,
            "dtype": torch.float32,
            "rope_freq": None,
        }
    ).eval()
    ours = model.state_dict()
    state = {k: ours[k] for k in ("tok_emb.weight", "final_norm.weight", "out_head.weight")}
    kv = cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        pre = f"trf_blocks.{i}."
        q, k, v = ours[pre + "att.qkv.weight"].split([cfg.emb_dim, kv, kv])
        gate, up = ours[pre + "ff.fc.weight"].chunk(2)
        state.update(
            {
                pre + "att.W_query.weight": q,
                pre + "att.W_key.weight": k,
                pre + "att.W_value.weight": v,
                pre + "att.out_proj.weight": ours[pre + "att.out_proj.weight"],
                pre + "ff.fc1.weight": gate,
                pre + "ff.fc2.weight": up,
                pre + "ff.fc3.weight": ours[pre + "ff.proj.weight"],
                pre + "norm1.weight": ours[pre + "norm1.weight"],
                pre + "norm2.weight": ours[pre + "norm2.weight"],
            }
        )
    book.load_state_dict(state, strict=True)
    return book


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_logits_equal_the_books_llama3_model_with_its_weights_mapped(kv_heads):
    model = llama(replace(TINY, n_kv_heads=kv_heads))
    idx = tokens()
    with torch.no_grad():
        ours, book = model(idx), book_llama3(model)(idx)
    print(
        f"max |logit difference| vs the book's Llama3Model ({kv_heads} kv heads):",
        max_diff(ours, book),
    )
    torch.testing.assert_close(ours, book, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- size


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        replace(TINY, n_kv_heads=None, tie_embeddings=True, ffn_hidden=100),
        replace(TINY, emb_dim=96, n_heads=6, n_kv_heads=3, n_layers=3),
    ],
    ids=["gqa-untied", "mha-tied", "odd-widths"],
)
def test_parameter_count_flops_and_shapes_match_the_built_model(cfg):
    model = GPTModel(cfg)
    n = count_parameters(model)
    assert model_size(cfg).parameters == n
    embedding = cfg.vocab_size * cfg.emb_dim  # a lookup; a matmul only as the tied head
    matmul_weights = n - (0 if cfg.tie_embeddings else embedding)
    attention = 12 * cfg.n_layers * cfg.emb_dim * cfg.context_length
    assert flops_per_token(cfg) == 6 * matmul_weights + attention
    assert state_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert "pos_emb.weight" not in state_shapes(cfg)
    assert not any(k.endswith(".bias") for k in state_shapes(cfg))
    kv = cfg.kv_heads * cfg.head_dim
    assert state_shapes(cfg)["trf_blocks.0.att.qkv.weight"] == (cfg.emb_dim + 2 * kv, cfg.emb_dim)
    assert state_shapes(cfg)["trf_blocks.0.ff.fc.weight"] == (2 * cfg.ffn_dim, cfg.emb_dim)


def test_llama_init_gpt2_draws_from_0_02_and_scales_residual_projections():
    cfg = replace(TINY, n_layers=8, emb_dim=256, n_heads=8, n_kv_heads=None)
    model = GPTModel(cfg)
    block = model.trf_blocks[0]
    assert abs(block.att.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(block.ff.proj.weight.std().item() - 0.02 / 4) < 3e-4  # 1/sqrt(2 x 8)
    assert torch.equal(block.norm1.weight, torch.ones(cfg.emb_dim))


# ----------------------------------------------------------------------------- config


def test_ffn_hidden_null_is_metas_rounding():
    # Meta's llama/model.py: int(2 x 4d / 3) rounded up to 256; Llama 2 7B has 11008
    assert llama_ffn_hidden(4096) == 11008
    assert llama_ffn_hidden(768) == 2048
    assert llama_ffn_hidden(64) == 256
    assert replace(TINY, ffn_hidden=None).ffn_dim == 256
    assert replace(TINY, ffn_hidden=100).ffn_dim == 100


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(n_kv_heads=3), ["model.n_kv_heads=3", "a divisor of model.n_heads (4)"]),
        (dict(emb_dim=36, n_heads=4, n_kv_heads=None), ["= 9 is odd", "even head size"]),
        (dict(qkv_bias=True), ["model.qkv_bias=True", "false with model.arch: llama"]),
        (dict(n_kv_heads=0), ["model.n_kv_heads=0", "a positive count, or null"]),
        (
            dict(arch="gpt2", n_kv_heads=None, rope_theta=5e5),
            ["model.rope_theta=500000.0", "applies to llama only"],
        ),
        (dict(arch="gpt2", n_kv_heads=2), ["model.n_kv_heads=2", "applies to llama only"]),
    ],
    ids=[
        "kv-heads-not-dividing",
        "odd-head-size",
        "qkv-bias",
        "zero-kv-heads",
        "gpt2-rope-theta",
        "gpt2-kv-heads",
    ],
)
def test_bad_combinations_are_one_message_naming_the_key(overrides, words):
    raw = {**asdict(TINY), **overrides}
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in raw.items()])
    message = str(refused.value)
    assert all(w in message for w in words), message


def test_a_gpt2_checkpoint_is_not_resumed_as_llama_and_old_checkpoints_still_resume(tmp_path):
    from pipeline.training.checkpoint_manager import check_resumable

    gpt2 = dict(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    old_meta = {**asdict(ModelConfig(**gpt2))}
    for key in ("arch", "n_kv_heads", "ffn_hidden", "rope_theta", "norm_eps"):
        del old_meta[key]  # a checkpoint written before the keys existed
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "model": old_meta, "config": {}}))
    same = [f"model.{k}={v}" for k, v in gpt2.items()]
    check_resumable(ckpt, load_config(None, same))  # no arch saved: gpt2, resumable
    with pytest.raises(PipelineError) as refused:
        check_resumable(ckpt, load_config(None, [*same, "model.arch=llama"]))
    assert "model.arch: checkpoint 'gpt2', config 'llama'" in str(refused.value)
    # a llama checkpoint: null and the number it stands for are the same shape
    (ckpt / "meta.json").write_text(
        json.dumps({"step": 1, "model": asdict(ModelConfig(**gpt2, arch="llama")), "config": {}})
    )
    llama_same = [*same, "model.arch=llama", "model.n_kv_heads=4", "model.ffn_hidden=256"]
    check_resumable(ckpt, load_config(None, llama_same))
    with pytest.raises(PipelineError) as refused:
        check_resumable(ckpt, load_config(None, [*same, "model.arch=llama", "model.n_kv_heads=2"]))
    assert "model.n_kv_heads: checkpoint 4, config 2" in str(refused.value)


# ----------------------------------------------------------------------------- import


def save_hf(path, hf_config: dict, seed=0, **save_kwargs):
    """A Llama directory as transformers writes it, random weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf_config)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(path, **save_kwargs)
    return hf


HF_TINY = dict(
    vocab_size=50257,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_a_transformers_llama_directory_imports_with_its_logits(tmp_path, sharded):
    hf = save_hf(tmp_path / "hf", HF_TINY, **({"max_shard_size": "2MB"} if sharded else {}))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() is sharded
    model, info = load_model(tmp_path / "hf")
    assert info.kind == "hf" and model.cfg.arch == "llama"
    got = model.cfg
    assert (got.n_kv_heads, got.ffn_hidden, got.norm_eps, got.rope_theta) == (2, 160, 1e-6, 5e5)
    assert "rope_parameters" in json.loads((tmp_path / "hf" / "config.json").read_text())
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-5)


def test_init_from_a_llama_directory_takes_its_architecture_and_crops_the_context(tmp_path):
    save_hf(tmp_path / "hf", {**HF_TINY, "tie_word_embeddings": True})
    user = ModelConfig(context_length=32, drop_rate=0.05)  # arch gpt2, as a default config
    cfg, state = init_from_weights(user, str(tmp_path / "hf"))
    assert (cfg.arch, cfg.context_length, cfg.drop_rate, cfg.tie_embeddings) == (
        "llama",
        32,
        0.05,
        True,
    )
    assert "pos_emb.weight" not in state and "out_head.weight" not in state
    with pytest.raises(PipelineError, match="positions cannot be added"):
        init_from_weights(ModelConfig(context_length=128), str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "change,words",
    [
        (
            dict(vocab_size=32000),
            [
                "tokenizer is not GPT-2's",
                "32,000 tokens, GPT-2's 50,257",
                "until other tokenizers are supported",
            ],
        ),
        (
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            ),
            ["RoPE scaling ('llama3'", "is not supported"],
        ),
        (dict(attention_bias=True), ["attention_bias=true is not supported"]),
    ],
    ids=["vocabulary", "rope-scaling", "biases"],
)
def test_llama_directories_this_project_cannot_run_are_one_paragraph(tmp_path, change, words):
    save_hf(tmp_path / "hf", {**HF_TINY, **change})
    with pytest.raises(PipelineError) as refused:
        load_state(tmp_path / "hf")
    message = " ".join(str(refused.value).split())
    assert all(w in message for w in words), message


def test_a_llama_directory_with_another_tokenizer_is_refused(tmp_path):
    save_hf(tmp_path / "hf", HF_TINY)
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizerFast"})
    )
    with pytest.raises(PipelineError, match="tokenizer_config.json names LlamaTokenizerFast"):
        load_state(tmp_path / "hf")


def test_llama_tensors_that_do_not_fit_the_config_are_named(tmp_path):
    save_hf(tmp_path / "hf", HF_TINY)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(PipelineError) as refused:
        load_state(tmp_path / "hf")
    message = str(refused.value)
    assert "model.layers.0.mlp.gate_proj.weight (160, 64) (expected (128, 64))" in message


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("kv_heads,tie", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_export_writes_the_hf_llama_layout_and_reads_back_equal(tmp_path, kv_heads, tie):
    cfg = replace(TINY, n_kv_heads=kv_heads, tie_embeddings=tie, rope_theta=500000.0)
    model = llama(cfg)
    write_checkpoint(tmp_path / "run", model)
    out, _ = export(tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == kv_heads
    assert (config["bos_token_id"], config["eos_token_id"]) == (50256, 50256)
    assert config["tie_word_embeddings"] is tie and config["rope_theta"] == 500000.0
    card = (out / "README.md").read_text()
    assert (
        "Llama-architecture" in card and "- llama" in card and "| RoPE theta | 500000.0 |" in card
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    again, _ = load_model(out)
    # n_kv_heads equal to n_heads reads back as null, which means the same
    assert again.cfg == replace(cfg, n_kv_heads=None if kv_heads == cfg.n_heads else kv_heads)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reference(idx).logits, model(idx), rtol=0, atol=1e-5)
        torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)
    export(tmp_path / "run")  # an earlier llama export is replaced


HF_SIDE = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
export, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(export)
model = AutoModelForCausalLM.from_pretrained(export)
generate = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
print(json.dumps({
    "class": type(model).__name__,
    "model": [tok.decode(model.generate(**tok(p, return_tensors="pt"), max_new_tokens=10,
                                        do_sample=False, eos_token_id=None)[0])
              for p in prompts],
    "pipeline": [generate(p, max_new_tokens=10, do_sample=False, eos_token_id=None,
                          return_full_text=True)[0]["generated_text"] for p in prompts],
}))
"""


def test_a_llama_export_reads_in_a_fresh_transformers_process_as_gpt_pipeline_generates(
    tmp_path, capsys
):
    from pipeline.cli import main as gpt_pipeline

    write_checkpoint(tmp_path / "run", llama(replace(TINY, tie_embeddings=True)))
    out = tmp_path / "export"
    gpt_pipeline(["export", "--model", str(tmp_path / "run"), "--out", str(out)])
    prompts = ["Every effort moves you", "naïve café — 東京"]
    capsys.readouterr()
    gpt_pipeline(
        [
            "generate",
            "--model",
            str(out),
            "--max-new-tokens",
            "10",
            *[arg for p in prompts for arg in ("--prompt", p)],
        ]
    )
    ours = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")[: len(prompts)]
    hf = subprocess.run(
        [sys.executable, "-c", HF_SIDE, str(out), json.dumps(prompts)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert hf.returncode == 0, hf.stderr[-3000:]
    got = json.loads(hf.stdout.strip().splitlines()[-1])
    assert got["class"] == "LlamaForCausalLM"
    assert got["model"] == got["pipeline"] == ours
