"""Generation: KV cache against no cache and against transformers' generate; sampling
filters; per-row end-of-text; prompt cropping; the streaming CLI."""

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.data.tokenizer import decode, encode
from pipeline.generate import generate, main, next_token, text_sample
from pipeline.model.gpt import GPTModel
from pipeline.model.gpt2 import hf_config, to_hf

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


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def reference(model: GPTModel):
    config = transformers.GPT2Config(
        **{
            k: v
            for k, v in hf_config(model.cfg).items()
            if k not in ("architectures", "model_type")
        }
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict(to_hf(model.state_dict(), model.cfg), strict=False)  # lm_head is tied
    return hf


def prompts(batch=2, n=6, seed=1):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_with_cache_equals_without_and_equals_transformers(model):
    idx = prompts()
    cached = generate(model, idx, 20, use_cache=True, eos_id=None)
    full = generate(model, idx, 20, use_cache=False, eos_id=None)
    expected = reference(model).generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        pad_token_id=50256,
    )
    assert cached.shape == (2, 26)
    assert torch.equal(cached, full) and torch.equal(cached, expected)


def test_cache_and_no_cache_agree_past_the_context(model):
    idx = prompts(n=30)  # 30 + 25 tokens: the window slides over the 32 positions
    cached = generate(model, idx, 25, use_cache=True, eos_id=None)
    assert cached.shape == (2, 55)
    assert torch.equal(cached, generate(model, idx, 25, use_cache=False, eos_id=None))


def test_each_row_stops_at_end_of_text_on_its_own(model):
    idx = prompts(seed=2)
    free = generate(model, idx, 12, eos_id=None)[:, 6:]
    # Choose as "end of text" a token the first row produces that the second never does.
    step = next(
        i
        for i, t in enumerate(free[0].tolist())
        if t not in free[1].tolist() and t not in free[0, :i].tolist()
    )
    eos = int(free[0, step])
    out = generate(model, idx, 12, eos_id=eos)[:, 6:]
    assert torch.equal(out[1], free[1])  # untouched by the other row's end
    assert torch.equal(out[0, : step + 1], free[0, : step + 1])
    assert (out[0, step:] == eos).all()


def test_generation_ends_when_every_row_is_done(model):
    idx = prompts(batch=1, seed=3)
    first = int(generate(model, idx, 1)[0, -1])
    assert generate(model, idx, 10, eos_id=first).shape == (1, 7)


def allowed_top_k(logits, k):
    return logits >= torch.topk(logits, k).values[:, -1:]


def allowed_top_p(logits, p, temperature):
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep = torch.zeros_like(probs, dtype=torch.bool)
    return keep.scatter(-1, order, mass_before < p)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.5), (40, 0.3)])
def test_sampling_never_picks_outside_the_allowed_set(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=gen)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if top_k is not None:
        allowed &= allowed_top_k(logits, top_k)
    if top_p is not None:
        filtered = logits.masked_fill(~allowed, float("-inf"))
        allowed &= allowed_top_p(filtered, top_p, 0.8)
    drawn = torch.stack([next_token(logits, 0.8, top_k, top_p, gen) for _ in range(500)], dim=1)
    assert allowed.gather(1, drawn).all()
    # and it samples, not picks one: every row uses more than one allowed token
    assert all(len(set(row)) > 1 for row in drawn.tolist())


def test_sampling_follows_the_softmax_of_logits_over_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = torch.cat([next_token(logits.expand(1000, 4), 2.0, generator=gen) for _ in range(20)])
    freq = torch.bincount(draws, minlength=4) / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, -1), rtol=0, atol=0.015)


def test_top_k_larger_than_the_vocabulary_is_refused(model):
    with pytest.raises(PipelineError, match="vocabulary size 50257"):
        generate(model, prompts(), 1, temperature=1.0, top_k=50258)


def test_long_prompt_is_cropped_with_a_note(model, capsys):
    prompt = " ".join(["one two three"] * 20)  # 60 tokens, context 32
    ids = encode(prompt)
    text = text_sample(model, prompt, max_new_tokens=5, eos_id=None)
    assert "only its last 32 tokens are used" in capsys.readouterr().err
    cropped = generate(model, torch.tensor([ids[-32:]]), 5, eos_id=None)[0].tolist()
    assert text == decode(cropped)


def test_generate_restores_training_mode(model):
    model.train()
    try:
        generate(model, prompts(), 2)
        assert model.training
    finally:
        model.eval()


def test_cli_streams_the_sample_it_generates(model, tmp_path, capsys):
    reference(model).save_pretrained(tmp_path)
    main(
        [
            "--model",
            str(tmp_path),
            "--prompt",
            "Every effort moves you",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.9",
            "--top-k",
            "20",
            "--seed",
            "7",
        ]
    )
    streamed = capsys.readouterr().out
    expected = text_sample(
        model,
        "Every effort moves you",
        8,
        temperature=0.9,
        top_k=20,
        generator=torch.Generator().manual_seed(7),
    )
    assert streamed.startswith(expected + "\n---")


def test_a_prompt_longer_than_the_context_keeps_every_generated_token():
    """The train loop's sample once sliced the output by the uncropped prompt length."""
    from pipeline.generate import continue_text

    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=16, emb_dim=32, n_heads=2, n_layers=1))
    prompt = "one two three four five six seven eight nine ten eleven twelve " * 3
    seen, continuation = continue_text(model, prompt, max_new_tokens=6, eos_id=None)
    last16 = encode(prompt)[-16:]
    assert len(encode(prompt)) > 16 and seen == decode(last16)
    out = generate(model, torch.tensor([last16]), 6, eos_id=None)[0, 16:]
    assert len(out) == 6 and continuation == decode(out.tolist())


def test_cli_dtype_bf16_generates_with_bf16_weights_and_cache(model, tmp_path, capsys):
    """--dtype bf16: the same tokens as generate() on the model cast to bf16 (whose KV
    cache is then bf16 too)."""
    import copy

    reference(model).save_pretrained(tmp_path)
    main(
        [
            "--model",
            str(tmp_path),
            "--prompt",
            "Every effort moves you",
            "--max-new-tokens",
            "8",
            "--dtype",
            "bf16",
        ]
    )
    captured = capsys.readouterr()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.tensor([encode("Every effort moves you")])
    out = generate(bf16, ids, 8)
    assert captured.out.startswith(decode(out[0].tolist()) + "\n---")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--dtype", "int8"])
    assert "--dtype='int8' is not allowed: it must be fp32, bf16 or fp16" in capsys.readouterr().err


def test_decoding_layout_keeps_every_weight_and_every_token(model):
    """lay_out_for_decoding stores fp32 Linear weights column-major (the fast form of
    x @ W.T on a CPU) without changing a value, a shape or a generated token; bf16
    weights, fast in the usual layout, are left as they are."""
    import copy

    from pipeline.generate import lay_out_for_decoding

    ids = prompts(batch=2, n=5)
    expected = generate(model, ids, 12, eos_id=None)
    laid = lay_out_for_decoding(copy.deepcopy(model))
    for (name, before), after in zip(model.state_dict().items(), laid.state_dict().values()):
        assert torch.equal(before, after), name
    head = laid.out_head.weight
    assert head.shape == (50257, 64) and head.stride() == (1, 50257)
    assert head is laid.tok_emb.weight  # still tied
    assert torch.equal(generate(laid, ids, 12, eos_id=None), expected)
    bf16 = lay_out_for_decoding(copy.deepcopy(model).to(torch.bfloat16))
    assert bf16.out_head.weight.is_contiguous()


def test_a_vanishing_temperature_is_greedy_not_a_crash():
    logits = torch.tensor([[100.0, 99.0, -50.0], [1.0, 3.0, -2.0]])
    for temperature in (1e-40, 1e-300, 5e-324):
        ids = next_token(logits, temperature, generator=torch.Generator().manual_seed(0))
        assert ids.tolist() == [0, 1]


def test_ids_past_the_tokenizer_are_never_drawn_and_never_crash_decoding():
    from dataclasses import replace

    torch.manual_seed(0)
    padded = GPTModel(replace(TINY, vocab_size=50304, tie_embeddings=False)).eval()
    with torch.no_grad():  # make the 47 padded rows the most likely tokens by far
        padded.out_head.weight[50257:] = 0.0
        padded.out_head.weight[:50257] *= 0.0
        padded.out_head.weight[50257:, 0] = 1.0
        padded.final_norm.weight.zero_()
        padded.final_norm.bias.fill_(1.0)
    out = generate(
        padded,
        torch.tensor([encode("Hello")]),
        20,
        temperature=1.0,
        eos_id=None,
        generator=torch.Generator().manual_seed(0),
    )
    assert int(out[0, 1:].max()) < 50257
    assert decode([15496, 50300, 995, -1]) == "Hello\ufffd world\ufffd"
