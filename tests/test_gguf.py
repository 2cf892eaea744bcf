"""`export --format gguf`: the file read back with the `gguf` package's own reader (the
one llama.cpp ships) holds every tensor of the checkpoint, laid out as llama.cpp's gpt2 or
llama expects, and GPT-2's tokenizer; destinations it did not write are refused. For llama,
the q and k rows written turn llama.cpp's neighbour-pair RoPE into our attention scores."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_export import TINY, trained_model, write_checkpoint

from pipeline.core.errors import PipelineError
from pipeline.data.tokenizer import bpe_vocab
from pipeline.export import export_gguf, main
from pipeline.model import gguf_file
from pipeline.model.gpt import apply_rope, rope_angles

gguf = pytest.importorskip("gguf")


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {
        t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors
    }
    return reader, tensors


def expected(model, dtype):
    """Our tensors under llama.cpp's gpt2 names, as stored: fp16 rounds the matrices."""
    state = model.state_dict()
    names = {
        "token_embd.weight": "tok_emb.weight",
        "position_embd.weight": "pos_emb.weight",
        "output_norm.weight": "final_norm.weight",
        "output_norm.bias": "final_norm.bias",
    }
    if not model.cfg.tie_embeddings:
        names["output.weight"] = "out_head.weight"
    block = {
        "attn_norm": "norm1",
        "attn_qkv": "att.qkv",
        "attn_output": "att.out_proj",
        "ffn_norm": "norm2",
        "ffn_up": "ff.fc",
        "ffn_down": "ff.proj",
    }
    for i in range(model.cfg.n_layers):
        for theirs, ours in block.items():
            for part in ("weight", "bias"):
                names[f"blk.{i}.{theirs}.{part}"] = f"trf_blocks.{i}.{ours}.{part}"
    want = {}
    for theirs, ours in names.items():
        tensor = state.get(ours, torch.zeros(3 * model.cfg.emb_dim))  # no q/k/v bias: zeros
        want[theirs] = as_stored(tensor, dtype)
    return want


def as_stored(tensor, dtype):
    """A tensor as the file holds it: fp16 rounds the matrices, vectors stay f32."""
    half = dtype == "fp16" and tensor.dim() == 2
    return tensor.to(torch.float16 if half else torch.float32).numpy()


def assert_gpt2_tokenizer(reader):
    def field(key):
        return gguf_file.field_value(reader, key)

    tokens, merges = bpe_vocab()
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == tokens and len(tokens) == 50257
    assert field("tokenizer.ggml.merges") == merges and len(merges) == 50000
    types = field("tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {1}
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == 50256
    assert field("tokenizer.ggml.add_bos_token") is False


@pytest.mark.parametrize(
    "dtype,qkv_bias,tie",
    # each export reads ~100k tokenizer strings back (4 s): two cover both dtypes, both
    # heads and both bias settings
    [("fp32", True, True), ("fp16", False, False)],
    ids=["fp32", "fp16-untied-no-qkv-bias"],
)
def test_every_tensor_and_the_tokenizer_read_back_through_ggufs_reader(
    tmp_path, dtype, qkv_bias, tie
):
    model = trained_model(replace(TINY, qkv_bias=qkv_bias, tie_embeddings=tie))
    write_checkpoint(tmp_path / "run", model)
    out, _ = export_gguf(tmp_path / "run", dtype=dtype)
    assert out == tmp_path / "run" / "model.gguf"
    reader, got = read(out)
    want = expected(model, dtype)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert np.array_equal(got[name], array), name
    # llama.cpp reads a matrix {ne0 = in, ne1 = out}: qkv is {n_embd, 3 n_embd}
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == [64, 192]
    assert shapes["blk.0.ffn_up.weight"] == [64, 256]
    assert shapes["token_embd.weight"] == [64, 50257]

    def field(key):
        return gguf_file.field_value(reader, key)

    assert field("general.architecture") == "gpt2"
    assert field("general.name") == "run"
    assert field("general.file_type") == (1 if dtype == "fp16" else 0)
    assert field("gpt2.block_count") == 2
    assert field("gpt2.attention.head_count") == 4
    assert field("gpt2.context_length") == 32
    assert field("gpt2.embedding_length") == 64
    assert field("gpt2.feed_forward_length") == 256
    assert np.isclose(field("gpt2.attention.layer_norm_epsilon"), 1e-5)
    assert_gpt2_tokenizer(reader)


@pytest.mark.parametrize("arch", [gguf_file.GPT2, gguf_file.LLAMA], ids=lambda a: a.name)
def test_tensor_names_are_ggufs_own_for_the_architecture(arch):
    known = {
        gguf.TENSOR_NAMES[t].format(bid=i)
        for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.model_arch]]
        for i in range(2)
    }
    names = [n for _, n in gguf_file.name_map(arch, 2)]
    assert {n.rsplit(".", 1)[0] for n in names} <= known
    assert gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.model_arch]] == arch.name


# ----------------------------------------------------------------------------- llama

# (dtype, config beside TINY's, feed_forward_length): each export reads ~100k tokenizer
# strings back, so two exports, shared by the tests below, cover both dtypes, both heads,
# grouped-query and plain attention, Meta's MLP width and one of its own, RoPE bases.
LLAMA_VARIANTS = {
    "fp32-gqa-tied": ("fp32", dict(n_kv_heads=2), 256),  # Meta's rule at width 64: 256
    "fp16-untied": (
        "fp16",
        dict(tie_embeddings=False, ffn_hidden=96, rope_theta=500000.0, norm_eps=1e-6),
        96,
    ),
}


@pytest.fixture(scope="module", params=list(LLAMA_VARIANTS))
def llama_export(request, tmp_path_factory):
    """(model, dtype, expected feed_forward_length, reader, tensors) of one exported
    Llama-style checkpoint."""
    dtype, overrides, ffn = LLAMA_VARIANTS[request.param]
    model = trained_model(replace(TINY, arch="llama", qkv_bias=False, **overrides))
    home = tmp_path_factory.mktemp(request.param)
    write_checkpoint(home / "run", model)
    out, _ = export_gguf(home / "run", dtype=dtype)
    assert out == home / "run" / "model.gguf"
    return (model, dtype, ffn, *read(out))


def neighbour_paired(weight, heads):
    """q or k rows as llama.cpp's rope wants them, built row by row: within each head our
    row i (which rotate_half pairs with i + half) goes to 2i, row i + half to 2i + 1."""
    head_dim = weight.shape[0] // heads
    half = head_dim // 2
    order = [
        h * head_dim + i + second * half
        for h in range(heads)
        for i in range(half)
        for second in (0, 1)
    ]
    return weight[order]


def q_k_v(model, i):
    """Block i's q, k, v projections, cut from our fused qkv by rows."""
    cfg = model.cfg
    kv_rows = cfg.kv_heads * cfg.head_dim
    qkv = model.state_dict()[f"trf_blocks.{i}.att.qkv.weight"]
    return qkv.split([cfg.n_heads * cfg.head_dim, kv_rows, kv_rows])


def llama_expected(model, dtype):
    """Our tensors under llama.cpp's llama names, built here from the state dict: fused
    qkv and gate/up cut by rows, q and k rows reordered by `neighbour_paired`."""
    cfg, state = model.cfg, model.state_dict()
    want = {
        "token_embd.weight": state["tok_emb.weight"],
        "output_norm.weight": state["final_norm.weight"],
    }
    if not cfg.tie_embeddings:
        want["output.weight"] = state["out_head.weight"]
    for i in range(cfg.n_layers):
        ours, blk = f"trf_blocks.{i}.", f"blk.{i}."
        q, k, v = q_k_v(model, i)
        gate, up = state[ours + "ff.fc.weight"].chunk(2)  # gate rows first, then up
        want.update(
            {
                blk + "attn_norm.weight": state[ours + "norm1.weight"],
                blk + "attn_q.weight": neighbour_paired(q, cfg.n_heads),
                blk + "attn_k.weight": neighbour_paired(k, cfg.kv_heads),
                blk + "attn_v.weight": v,
                blk + "attn_output.weight": state[ours + "att.out_proj.weight"],
                blk + "ffn_norm.weight": state[ours + "norm2.weight"],
                blk + "ffn_gate.weight": gate,
                blk + "ffn_up.weight": up,
                blk + "ffn_down.weight": state[ours + "ff.proj.weight"],
            }
        )
    return {name: as_stored(tensor, dtype) for name, tensor in want.items()}


def test_a_llama_model_reads_back_through_ggufs_reader_as_llamacpps_llama(llama_export):
    model, dtype, ffn, reader, got = llama_export
    cfg = model.cfg
    want = llama_expected(model, dtype)
    assert sorted(got) == sorted(want)  # no output.weight for a tied head
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert np.array_equal(got[name], array), name
    # llama.cpp's shapes, fastest dimension first: wq {n_embd, n_embd}, wk {n_embd, n_embd_gqa}
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    kv_width = cfg.kv_heads * 16
    assert shapes["blk.0.attn_q.weight"] == [64, 64]
    assert shapes["blk.0.attn_k.weight"] == shapes["blk.0.attn_v.weight"] == [64, kv_width]
    assert shapes["blk.0.ffn_gate.weight"] == shapes["blk.0.ffn_up.weight"] == [64, ffn]
    assert shapes["blk.0.ffn_down.weight"] == [ffn, 64]
    assert shapes["token_embd.weight"] == [64, 50257]

    def field(key):
        return gguf_file.field_value(reader, key)

    assert field("general.architecture") == "llama"
    assert field("general.name") == "run"
    assert field("general.file_type") == (1 if dtype == "fp16" else 0)
    K = gguf.Keys  # the key names as gguf spells them, not as the code under test does
    want_keys = {
        K.LLM.CONTEXT_LENGTH: 32,
        K.LLM.EMBEDDING_LENGTH: 64,
        K.LLM.BLOCK_COUNT: 2,
        K.LLM.FEED_FORWARD_LENGTH: ffn,
        K.LLM.VOCAB_SIZE: 50257,
        K.Attention.HEAD_COUNT: 4,
        K.Attention.HEAD_COUNT_KV: cfg.n_kv_heads or 4,
        K.Attention.KEY_LENGTH: 16,
        K.Attention.VALUE_LENGTH: 16,
        K.Attention.LAYERNORM_RMS_EPS: cfg.norm_eps,
        K.Rope.FREQ_BASE: cfg.rope_theta,
        K.Rope.DIMENSION_COUNT: 16,
    }
    want_keys = {key.format(arch="llama"): value for key, value in want_keys.items()}
    assert sorted(k for k in reader.fields if k.startswith("llama.")) == sorted(want_keys)
    for key, value in want_keys.items():
        assert field(key) == pytest.approx(value, rel=1e-6), key
    assert_gpt2_tokenizer(reader)


def rotary_angles(t, head_dim, theta):
    """(t, head_dim / 2): position p turns pair i by p * theta^(-2i / head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)


def rope_rotate_half(x, theta):
    """Ours and HF's: dimension i of a head paired with i + head_dim / 2."""
    angles = rotary_angles(x.shape[-2], x.shape[-1], theta).repeat(1, 2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()


def rope_neighbours(x, theta):
    """GGML's NORM mode, llama.cpp's for llama: dimensions 2i and 2i + 1 paired."""
    angles = rotary_angles(x.shape[-2], x.shape[-1], theta)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def attention_scores(x, wq, wk, cfg, rope):
    """q.k (heads, t, t) of every query head with its key head, after `rope`."""
    t = x.shape[0]
    q = (x @ wq.T).view(t, cfg.n_heads, cfg.head_dim).transpose(0, 1)
    k = (x @ wk.T).view(t, cfg.kv_heads, cfg.head_dim).transpose(0, 1)
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    # query head h reads key head h // (n_heads / kv_heads), as SDPA's enable_gqa does
    k = k.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=0)
    return q @ k.transpose(1, 2)


def test_llamacpps_neighbour_pair_rope_on_the_written_q_k_gives_our_attention_scores(
    llama_export,
):
    model, dtype, _, _, got = llama_export
    cfg = model.cfg
    torch.manual_seed(0)
    x = torch.randn(cfg.context_length, cfg.emb_dim)

    # the reference RoPE here is the model's own
    q = torch.randn(cfg.n_heads, cfg.context_length, cfg.head_dim)
    cos, sin = rope_angles(cfg, 0, cfg.context_length)
    assert torch.allclose(rope_rotate_half(q, cfg.rope_theta), apply_rope(q, cos, sin), atol=1e-5)

    def read_back(name):
        return torch.from_numpy(got[name]).float()

    for i in range(cfg.n_layers):
        # the weights as stored (fp16 rounds them), in our layout
        wq, wk, _ = (torch.from_numpy(as_stored(w, dtype)).float() for w in q_k_v(model, i))
        ours = attention_scores(x, wq, wk, cfg, rope_rotate_half)
        wq_file, wk_file = read_back(f"blk.{i}.attn_q.weight"), read_back(f"blk.{i}.attn_k.weight")
        theirs = attention_scores(x, wq_file, wk_file, cfg, rope_neighbours)
        assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5), i
        # and the check can fail: q and k as they are, roped in neighbour pairs, differ
        unpermuted = attention_scores(x, wq, wk, cfg, rope_neighbours)
        assert not torch.allclose(unpermuted, ours, rtol=1e-2, atol=1e-3), i


def test_a_gguf_export_replaces_its_own_file_and_refuses_any_other(tmp_path):
    write_checkpoint(tmp_path / "run", trained_model(TINY))
    out = tmp_path / "model.gguf"
    export_gguf(tmp_path / "run", out)
    export_gguf(tmp_path / "run", out, dtype="fp16")  # its own earlier export: replaced
    assert gguf_file.field_value(gguf.GGUFReader(out), "general.file_type") == 1
    other = tmp_path / "notes.gguf"
    other.write_text("mine")
    with pytest.raises(PipelineError, match="not a GGUF file this project wrote"):
        export_gguf(tmp_path / "run", other)
    assert other.read_text() == "mine"
    with pytest.raises(PipelineError, match="not a GGUF file this project wrote"):
        export_gguf(tmp_path / "run", tmp_path)  # a directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "notes.gguf", "run"]


def test_the_cli_refuses_bf16_for_gguf_before_reading_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "nothing"), "--format", "gguf", "--dtype", "bf16"])
    assert e.value.code == 2
    assert "fp32 or fp16 for gguf" in capsys.readouterr().err


def test_without_the_gguf_package_the_export_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # import gguf fails
    with pytest.raises(PipelineError, match=r"pip install 'gguf>=0.10'"):
        export_gguf(tmp_path / "nothing")
