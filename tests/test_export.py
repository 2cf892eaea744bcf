"""Export of trained checkpoints to the Hugging Face GPT-2 layout, checked by loading the
export in transformers (the reference) and in this project."""

import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.export import export, main
from pipeline.model.gpt import GPTModel
from pipeline.model.weights import load_model

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(
    vocab_size=50257,
    context_length=32,
    emb_dim=64,
    n_heads=4,
    n_layers=2,
    drop_rate=0.0,
    qkv_bias=True,
    tie_embeddings=True,
)


def trained_model(cfg: ModelConfig, seed=0) -> GPTModel:
    """A model whose biases and norms are not at their init values, as after training."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


def write_checkpoint(run_dir, model: GPTModel, step=100):
    """A checkpoint in the layout the train stage writes (model.safetensors + meta.json)."""
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state["out_head.weight"]
    save_file(state, str(path / "model.safetensors"))
    meta = {
        "step": step,
        "tokens": step * 1024,
        "model": asdict(model.cfg),
        "config": {"name": run_dir.name},
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def tokens(n=20, seed=1):
    return torch.randint(0, 50257, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "qkv_bias,tie", [(True, True), (False, False)], ids=["gpt2-like", "untied-no-qkv-bias"]
)
def test_export_loads_in_transformers_with_the_checkpoints_logits(tmp_path, qkv_bias, tie):
    cfg = replace(TINY, qkv_bias=qkv_bias, tie_embeddings=tie)
    model = trained_model(cfg)
    write_checkpoint(tmp_path / "run", model)
    out, info = export(tmp_path / "run")
    assert out == tmp_path / "run" / "export" and info.meta["step"] == 100
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in load_file(str(out / "model.safetensors"))) is not tie
    reference = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = tokens()
    with torch.no_grad():
        expected = model(idx)
        torch.testing.assert_close(reference(idx).logits, expected, rtol=0, atol=1e-5)
        again, _ = load_model(out)
        assert again.cfg == replace(cfg, drop_rate=again.cfg.drop_rate)  # qkv_bias read back
        torch.testing.assert_close(again(idx), expected, rtol=0, atol=1e-5)


def test_bfloat16_export_stores_the_rounded_weights(tmp_path):
    model = trained_model(TINY)
    write_checkpoint(tmp_path / "run", model)
    out, _ = export(tmp_path / "run", tmp_path / "bf16", dtype="bfloat16")
    stored = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert torch.equal(
        stored["transformer.h.1.mlp.c_fc.weight"],
        model.trf_blocks[1].ff.fc.weight.t().to(torch.bfloat16),
    )
    reference = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    rounded, _ = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens()).logits, rounded(tokens()), rtol=0, atol=1e-5)


def test_a_fresh_model_with_zero_qkv_biases_verifies_and_reads_back_without_them(tmp_path):
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "run", GPTModel(TINY))  # biases at their init: zeros
    out, _ = export(tmp_path / "run")
    again, _ = load_model(out)
    assert not again.cfg.qkv_bias


def test_reexport_replaces_the_previous_export_and_refuses_other_directories(tmp_path):
    write_checkpoint(tmp_path / "run", trained_model(TINY, seed=0), step=100)
    first = load_file(str(export(tmp_path / "run")[0] / "model.safetensors"))
    (tmp_path / "run" / "export" / "eval.json").write_text("{}")  # results of the old weights
    write_checkpoint(tmp_path / "run", trained_model(TINY, seed=1), step=200)
    out, info = export(tmp_path / "run")
    assert info.meta["step"] == 200 and sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    second = load_file(str(out / "model.safetensors"))
    assert not torch.equal(first["transformer.wte.weight"], second["transformer.wte.weight"])
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PipelineError, match="not an earlier export"):
        export(tmp_path / "run", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_reports_the_export_and_fails_cleanly(tmp_path, capsys):
    write_checkpoint(tmp_path / "run", trained_model(TINY))
    main(["--model", str(tmp_path / "run")])
    assert "(step 100)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--model",
                str(tmp_path / "run" / "checkpoints" / "step_000100"),
                "--out",
                str(tmp_path / "run" / "checkpoints" / "step_000100"),
            ]
        )
    message = " ".join(capsys.readouterr().err.split())  # the message is wrapped at 100 columns
    assert exit_.value.code == 2 and "is the source itself" in message


def test_an_export_is_a_complete_model_directory_for_transformers(tmp_path):
    """AutoTokenizer gives this project's token ids, and pipeline("text-generation") the
    same greedy continuation as this project's generate; files are readable by the group."""
    from pipeline.data.tokenizer import encode
    from pipeline.generate import continue_text

    model = trained_model(TINY)
    write_checkpoint(tmp_path / "run", model)
    out, _ = export(tmp_path / "run")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = [
        "Every effort moves you",
        " leading space, tabs\tand  spaces ",
        "naïve café — 東京 😀\n\nnew lines",
    ]
    for text in texts:
        assert tok(text)["input_ids"] == encode(text), text
        assert tok.decode(encode(text)) == text
    # <|endoftext|> written in a text: transformers reads the special token, as tiktoken's
    # encode(allowed_special=...) does; this project's encode reads text as text.
    marked = "end<|endoftext|>start"
    assert tok(marked)["input_ids"] == [437, 50256, 9688]
    assert tok(marked, split_special_tokens=True)["input_ids"] == encode(marked)
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    generator = transformers.pipeline(
        "text-generation", model=str(out), tokenizer=str(out), device="cpu"
    )
    got = generator(
        "Every effort moves you", max_new_tokens=8, do_sample=False, return_full_text=False
    )[0]["generated_text"]
    _, ours = continue_text(model, "Every effort moves you", 8, temperature=0.0)
    assert got == ours and len(encode(got)) >= 1
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert all(mode & 0o044 == 0o044 for mode in modes.values()), modes


def test_the_model_card_says_what_the_model_is_and_how_it_did(tmp_path):
    model = trained_model(TINY)
    write_checkpoint(tmp_path / "run", model)
    (tmp_path / "run" / "eval.json").write_text(
        json.dumps({"loss": 3.25, "perplexity": 25.79, "tokens": 12345})
    )
    out, _ = export(tmp_path / "run")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    parameters = sum(p.numel() for p in model.parameters())  # the tied head once
    assert f"| parameters | {parameters:,} |" in card and "| attention heads | 4 |" in card
    assert "- optimizer steps: 100" in card and "- tokens seen: 102,400" in card
    assert "loss 3.2500, perplexity 25.79" in card and "12,345 tokens" in card
    assert 'pipeline("text-generation", model="PATH_OR_REPO")' in card


def test_push_to_hub_offline_fails_cleanly_after_a_complete_export(tmp_path, capsys, monkeypatch):
    """The upload itself needs the network (untested here); what would be uploaded is the
    export directory, complete before the upload starts."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    write_checkpoint(tmp_path / "run", trained_model(TINY))
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path / "run"), "--push-to-hub", "someone/tiny-gpt"])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "could not push" in err and "someone/tiny-gpt" in err and "Traceback" not in err
    out = tmp_path / "run" / "export"
    assert {"README.md", "vocab.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    with pytest.raises(SystemExit):  # a bad repo id is refused before any work
        main(["--model", str(tmp_path / "run"), "--push-to-hub", "not a repo id"])
    assert "is not a Hub repo id" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an empty name is refused too, not a silently skipped push
        main(["--model", str(tmp_path / "run"), "--push-to-hub", ""])
    assert "is not a Hub repo id" in capsys.readouterr().err
