"""`export --format gguf`: the file read back with the `gguf` package's own reader (the
one llama.cpp ships) holds every tensor of the checkpoint, laid out as llama.cpp's gpt2
expects, and GPT-2's tokenizer; destinations it did not write are refused."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.data.tokenizer import bpe_vocab
from pipeline.export import export_gguf, main
from pipeline.model import gguf_file
from tests.test_export import TINY, trained_model, write_checkpoint

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
        half = dtype == "fp16" and tensor.dim() == 2
        want[theirs] = tensor.to(torch.float16 if half else torch.float32).numpy()
    return want


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
    tokens, merges = bpe_vocab()
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == tokens and len(tokens) == 50257
    assert field("tokenizer.ggml.merges") == merges and len(merges) == 50000
    types = field("tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {1}
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == 50256


def test_tensor_names_are_ggufs_own_for_gpt2():
    known = {
        gguf.TENSOR_NAMES[t].format(bid=i)
        for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]
        for i in range(2)
    }
    names = [n for _, n in gguf_file.name_map(gguf_file.GPT2, 2)]
    assert {n.rsplit(".", 1)[0] for n in names} <= known


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


def test_a_llama_model_is_refused_with_the_way_to_convert_it_and_nothing_is_written(tmp_path):
    llama = replace(TINY, arch="llama", qkv_bias=False, n_kv_heads=2)
    write_checkpoint(tmp_path / "run", trained_model(llama))
    with pytest.raises(PipelineError, match="convert_hf_to_gguf.py"):
        export_gguf(tmp_path / "run", tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
