"""Importing GPT-2 (HF layout) and the book's model.pth, against transformers and the book's
architecture as references; and the errors a user sees for bad sources."""

import json
import math

import pytest
import torch
import torch.nn as nn

from pipeline.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.model.weights import init_from_weights, load_model, load_state

transformers = pytest.importorskip("transformers")


def hf_gpt2(n_embd=64, n_layer=2, n_head=4, n_positions=64, tie=True, seed=0):
    """A random transformers GPT-2 with nonzero biases and norms (so any misplaced tensor shows)."""
    config = transformers.GPT2Config(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=n_positions,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def tokens(n=24, batch=2, seed=1):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = hf_gpt2()
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_imported_logits_equal_transformers(tmp_path, safe):
    reference = hf_gpt2(tie=safe)  # the .bin case also covers an untied head
    if safe:
        reference.save_pretrained(tmp_path)
    else:  # the older layout transformers no longer writes: a pickled state dict
        reference.config.save_pretrained(tmp_path)
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    ours, info = load_model(tmp_path)
    assert info.kind == "hf" and ours.cfg.qkv_bias and ours.cfg.tie_embeddings == safe
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference(idx).logits, rtol=0, atol=1e-5)


@pytest.mark.slow  # end to end: real models, seconds
def test_gpt2_124m_shape_imports_as_the_default_config_with_its_logits(tmp_path):
    """The one full-size case: GPT-2 124M's files read as this project's default model
    (the mapping itself, export included, is checked on tiny models, in less time)."""
    reference = hf_gpt2(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    reference.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    assert ours.cfg == ModelConfig(
        context_length=1024, qkv_bias=True, tie_embeddings=True, drop_rate=ours.cfg.drop_rate
    )
    idx = tokens(n=64, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference(idx).logits, rtol=0, atol=1e-5)


def test_context_length_crops_the_position_table(tiny):
    reference, path = tiny
    ours, _ = load_model(path, context_length=16)
    assert ours.cfg.context_length == 16 and ours.pos_emb.weight.shape == (16, 64)
    idx = tokens(n=16)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference(idx).logits, rtol=0, atol=1e-5)
    with pytest.raises(PipelineError, match="only be cropped"):
        load_model(path, context_length=65)


def test_all_zero_qkv_biases_load_as_qkv_bias_false(tmp_path):
    reference = hf_gpt2()
    with torch.no_grad():
        for block in reference.transformer.h:
            block.attn.c_attn.bias.zero_()
    reference.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    assert not ours.cfg.qkv_bias and ours.trf_blocks[0].att.qkv.bias is None
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference(idx).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the book's model
#
# A re-implementation of the book's chapter 4 GPTModel, module names and all, as the
# reference for model.pth files: separate W_query/W_key/W_value, explicit masked softmax
# attention, the book's own LayerNorm (scale/shift) and tanh GELU.


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


class BookAttention(nn.Module):
    def __init__(self, d, ctx, n_heads, qkv_bias):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.W_query = nn.Linear(d, d, bias=qkv_bias)
        self.W_key = nn.Linear(d, d, bias=qkv_bias)
        self.W_value = nn.Linear(d, d, bias=qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(0.0)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class BookBlock(nn.Module):
    def __init__(self, d, ctx, n_heads, qkv_bias):
        super().__init__()
        self.att = BookAttention(d, ctx, n_heads, qkv_bias)
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(d, 4 * d), BookGELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = BookLayerNorm(d), BookLayerNorm(d)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff.layers(self.norm2(x))


class BookGPT(nn.Module):
    def __init__(self, vocab, ctx, d, n_heads, n_layers, qkv_bias):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.trf_blocks = nn.Sequential(
            *[BookBlock(d, ctx, n_heads, qkv_bias) for _ in range(n_layers)]
        )
        self.final_norm = BookLayerNorm(d)
        self.out_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():  # random norms and biases, so a misplaced tensor shows
            for name, p in self.named_parameters():
                if name.endswith(("scale", "shift", "bias")):
                    p.normal_(1.0 if name.endswith("scale") else 0.0, 0.1)

    def forward(self, idx):
        pos = self.pos_emb(torch.arange(idx.shape[1]))
        return self.out_head(self.final_norm(self.trf_blocks(self.tok_emb(idx) + pos)))


def book_pth(path, qkv_bias, d=64, n_heads=4, n_layers=2, vocab=50257, ctx=32, wrap=False):
    torch.manual_seed(3)
    book = BookGPT(vocab, ctx, d, n_heads, n_layers, qkv_bias).eval()
    state = book.state_dict()
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}} if wrap else state, path)
    return book


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_model_pth_gives_the_book_architectures_logits(tmp_path, qkv_bias):
    book = book_pth(tmp_path / "model.pth", qkv_bias)
    ours, info = load_model(tmp_path / "model.pth", n_heads=4)
    assert info.kind == "book"
    assert (ours.cfg.context_length, ours.cfg.qkv_bias, ours.cfg.tie_embeddings) == (
        32,
        qkv_bias,
        False,
    )
    idx = tokens(n=20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-5)


def test_book_heads_come_from_gpt2_widths_and_model_and_optimizer_pth_loads(tmp_path):
    book = book_pth(
        tmp_path / "model_and_optimizer.pth",
        False,
        d=768,
        n_heads=12,
        n_layers=1,
        vocab=1000,
        wrap=True,
    )
    ours, _ = load_model(tmp_path / "model_and_optimizer.pth")
    assert (ours.cfg.n_heads, ours.cfg.vocab_size) == (12, 1000)
    idx = tokens(n=12, seed=5) % 1000
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-5)


def test_an_8_head_book_model_of_gpt2_width_is_read_with_the_heads_given(tmp_path, capsys):
    """Width 768 with 8 heads: GPT-2's 12 would be a wrong guess, announced as a guess;
    --n-heads (evaluate, export, generate) and model.n_heads (init_from) give the truth."""
    book = book_pth(tmp_path / "model.pth", True, d=768, n_heads=8, n_layers=1, vocab=1000)
    idx = tokens(n=12, seed=6) % 1000
    guessed, _ = load_model(tmp_path / "model.pth")
    assert guessed.cfg.n_heads == 12
    assert "using 12 (GPT-2's head count at width 768)" in " ".join(capsys.readouterr().err.split())
    with torch.no_grad():
        assert not torch.allclose(guessed(idx), book(idx), atol=1e-3)  # why it is announced
    ours, _ = load_model(tmp_path / "model.pth", n_heads=8)
    assert capsys.readouterr().err == ""  # given, not guessed: nothing to announce
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-5)
    cfg, _ = init_from_weights(
        ModelConfig(context_length=32, emb_dim=768, n_heads=8), str(tmp_path / "model.pth")
    )
    assert cfg.n_heads == 8
    from pipeline.export import main as export_main

    export_main(
        ["--model", str(tmp_path / "model.pth"), "--n-heads", "8", "--out", str(tmp_path / "hf")]
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_head"] == 8


def test_book_width_outside_gpt2_sizes_asks_for_the_head_count(tmp_path):
    book_pth(tmp_path / "model.pth", False)
    with pytest.raises(PipelineError, match="model.n_heads"):
        load_model(tmp_path / "model.pth")


def test_pickles_with_arbitrary_objects_are_refused(tmp_path):
    torch.save({"tok_emb.weight": torch.zeros(2), "extra": ModelConfig()}, tmp_path / "evil.pth")
    with pytest.raises(PipelineError, match="weights_only=True"):
        load_model(tmp_path / "evil.pth")


# ----------------------------------------------------------------------------- init_from


def test_init_weights_takes_the_architecture_from_the_weights(tiny):
    _, path = tiny
    user = ModelConfig(context_length=32, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.2)
    cfg, state = init_from_weights(user, str(path))
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.qkv_bias, cfg.tie_embeddings) == (
        64,
        2,
        4,
        True,
        True,
    )
    assert (cfg.context_length, cfg.drop_rate, cfg.init_from) == (32, 0.2, str(path))
    assert state["pos_emb.weight"].shape == (32, 64)


def test_init_weights_refuses_a_longer_context(tiny):
    with pytest.raises(PipelineError, match="model.context_length is 128"):
        init_from_weights(ModelConfig(context_length=128), str(tiny[1]))


# ----------------------------------------------------------------------------- bad sources


def test_unknown_gpt2_name_lists_the_valid_ones():
    with pytest.raises(PipelineError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl") as e:
        load_state("gpt2-small")
    assert "unknown GPT-2 model name 'gpt2-small'" in str(e.value)


def test_a_directory_without_weights_says_what_it_expected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_gpt2().config.to_dict()))
    with pytest.raises(PipelineError, match="no weights: expected one of model.safetensors"):
        load_state(tmp_path)
    with pytest.raises(PipelineError, match="holds no model"):
        load_state(tmp_path / "..")


def test_shapes_that_do_not_fit_the_config_are_named(tiny, tmp_path):
    _, path = tiny
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(
        PipelineError, match=r"transformer\.wte\.weight \(50257, 64\) \(expected \(50257, 128\)\)"
    ):
        load_state(tmp_path)


def test_hub_name_offline_says_how_to_proceed(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE") as e:
        load_state("gpt2")
    assert "openai-community/gpt2" in str(e.value) and "local directory" in str(e.value)


def test_init_weights_on_a_book_file_takes_heads_from_the_config_where_they_fit(tmp_path, capsys):
    book_pth(tmp_path / "narrow.pth", True)  # width 64: not a GPT-2 width
    cfg, _ = init_from_weights(
        ModelConfig(context_length=32, n_heads=4), str(tmp_path / "narrow.pth")
    )
    assert (cfg.emb_dim, cfg.n_heads, cfg.qkv_bias, cfg.tie_embeddings) == (64, 4, True, False)
    book_pth(tmp_path / "wide.pth", False, d=768, n_heads=12, n_layers=1, vocab=1000)
    cfg, _ = init_from_weights(
        ModelConfig(context_length=32, n_heads=4), str(tmp_path / "wide.pth")
    )
    assert cfg.n_heads == 4  # model.n_heads wins over GPT-2's count at that width
    assert capsys.readouterr().err == ""
    # a config of its own width (40 / 5 heads) whose head count does not divide the file's 768
    cfg, _ = init_from_weights(
        ModelConfig(context_length=32, emb_dim=40, n_heads=5), str(tmp_path / "wide.pth")
    )
    assert cfg.n_heads == 12  # 5 does not divide 768: GPT-2's count, announced as a guess
    assert "using 12 (GPT-2's head count at width 768)" in " ".join(capsys.readouterr().err.split())
