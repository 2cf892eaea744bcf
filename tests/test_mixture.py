"""Mixtures (data.sources): prepare lays each source out as it would alone, in a directory of
its own, with per-source files and counts in the manifest; weights are the loader's, not
the data set's; the train stream draws each sample from a source by the weights, within a
stated tolerance, each source walking a permutation of its windows, resumable on any
process count; bad configs are refused naming the key; evaluate reports each source's
val loss. The real 1-process-with-accumulation = 2-processes run is test_train.py's."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.core.errors import PipelineError
from pipeline.data.loader import Mixture, TokenWindows, TrainBatches, mixed_train_windows
from pipeline.data.shards import Manifest, ShardInfo, load_manifest, shard_name, write_shard
from pipeline.prepare import PrepareError, prepare

VOCAB = 50257
CTX = 8
WORDS = (
    "every effort moves you toward the picture that Jack Gisburn painted at the "
    "Riviera, a cheap genius, though a good fellow enough; ünïcode & emoji 🙂 too"
).split()


# ----------------------------------------------------------------------------- prepared data


def write_texts(directory: Path, seed: int, count: int) -> Path:
    directory.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(30 + (i * 7) % 50))
        (directory / f"{i:03d}.txt").write_text(words + ".\n")
    return directory


# Each source as its own data.source, and the same three as one mixture.
ALONE = {
    "code": ["data.source.kind=python-stdlib", "data.source.max_bytes=40000"],
    "prose": ["data.source.kind=files", "data.source.paths=[{prose}]"],
    "notes": ["data.source.kind=files", "data.source.paths=[{notes}]"],
}
MIX = (
    "data.sources=[{{name: code, weight: 0.5, source: {{kind: python-stdlib, "
    "max_bytes: 40000}}}}, {{name: prose, weight: 0.3, source: {{kind: files, paths: "
    "[{prose}]}}}}, {{name: notes, weight: 0.2, source: {{kind: files, paths: [{notes}]}}}}]"
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A three-source mixture prepared into data/mix, and each source prepared alone into
    data/<name>, all with the same settings (small shards, so sources span several)."""
    root = tmp_path_factory.mktemp("mixture")
    dirs = {
        "prose": write_texts(root / "prose", 1, 40),
        "notes": write_texts(root / "notes", 2, 25),
    }
    common = [
        f"data.root={root / 'data'}",
        "data.num_workers=1",
        f"model.context_length={CTX}",
        "data.shard_tokens=1500",
        "data.val_fraction=0.2",
    ]
    mix = MIX.format(**dirs)
    manifest = prepare(load_config(None, [*common, "data.name=mix", mix]))
    alone = {
        name: prepare(
            load_config(None, [*common, f"data.name={name}", *(o.format(**dirs) for o in keys)])
        )
        for name, keys in ALONE.items()
    }
    return {
        "root": root,
        "common": common,
        "mix": mix,
        "manifest": manifest,
        "alone": alone,
        "dirs": dirs,
    }


def test_each_source_is_laid_out_as_it_would_be_alone(prepared):
    data = prepared["root"] / "data"
    manifest, alone = prepared["manifest"], prepared["alone"]
    assert list(manifest.sources) == ["code", "prose", "notes"]  # the config's order
    for split in ("train", "val"):
        listed = []
        for name, single in alone.items():
            entry = manifest.sources[name]
            files = [f"{name}/{info.file}" for info in single.splits[split]]
            assert entry["splits"][split] == files  # <data_dir>/<name>/train_000000.bin ...
            assert entry["documents"][split] == single.documents[split] > 0
            assert entry["tokens"][split] == single.tokens(split) > 0
            for info, own in zip(
                [i for i in manifest.splits[split] if i.file in files], single.splits[split]
            ):  # the very bytes of the lone data set
                assert (data / "mix" / info.file).read_bytes() == (
                    data / name / own.file
                ).read_bytes()
                assert (info.tokens, info.sha256) == (own.tokens, own.sha256)
            listed += files
        # splits holds every shard, source after source; no shard outside a source's directory
        assert [info.file for info in manifest.splits[split]] == listed
        assert manifest.documents[split] == sum(m.documents[split] for m in alone.values())
        assert not list((data / "mix").glob(f"{split}_*.bin"))
    assert len(alone["code"].splits["train"]) >= 2  # a source of several shards, in order
    assert load_manifest(data / "mix").sources == manifest.sources
    # The loader sees each source's windows as the lone data set's.
    windows, _ = mixed_train_windows(data / "mix", list(alone), [1, 1, 1], CTX, None, 0)
    for name, own in zip(alone, windows.sources):
        single = TokenWindows(data / name, "train", CTX)
        assert len(own) == len(single)
        assert torch.equal(own.batch(np.arange(len(own)))[0], single.batch(np.arange(len(own)))[0])


def test_weights_are_not_in_the_fingerprint_but_names_and_settings_are(prepared, tmp_path, capsys):
    shutil.copytree(prepared["root"] / "data" / "mix", tmp_path / "mix")
    common = [*prepared["common"], f"data.root={tmp_path}", "data.name=mix"]
    before = {
        p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.name != ".lock"
    }
    capsys.readouterr()
    reweighted = (
        prepared["mix"].replace("weight: 0.5", "weight: 7").replace("weight: 0.2", "weight: 1")
    )
    assert reweighted != prepared["mix"]
    prepare(load_config(None, [*common, reweighted]))
    assert "up to date" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in before} == before
    renamed = prepared["mix"].replace("name: prose", "name: story")
    with pytest.raises(
        PrepareError,
        match=r"(?s)already holds data prepared with other "
        r"settings: data.sources\[1\].name was 'prose', "
        r"now 'story'.*--force",
    ):
        prepare(load_config(None, [*common, renamed]))
    resized = prepared["mix"].replace("max_bytes: 40000", "max_bytes: 30000")
    with pytest.raises(PrepareError, match=r"(?s)other settings.*40000.*30000.*--force"):
        prepare(load_config(None, [*common, resized]))
    assert {p: p.read_bytes() for p in before} == before  # refused: nothing touched
    prepare(load_config(None, [*common, renamed]), force=True)
    assert sorted(p.name for p in (tmp_path / "mix").iterdir() if p.is_dir()) == [
        "code",
        "notes",
        "story",
    ]  # the old source's directory went with its shards
    assert (tmp_path / "mix" / "story" / "train_000000.bin").read_bytes() == (
        prepared["root"] / "data" / "prose" / "train_000000.bin"
    ).read_bytes()


# ----------------------------------------------------------------------------- the stream


# Synthetic sources whose tokens are one running counter (below the vocabulary), so a
# window's first token tells its source and its window. Train windows: a 97, b 41, c 33;
# val windows: a 5, b 11, c 3.
SIZES = {
    "a": {"train": [CTX * 60 + 1, CTX * 37 + 3], "val": [CTX * 5 + 1]},
    "b": {"train": [CTX * 41 + 1], "val": [CTX * 9 + 1, CTX * 2 + 7]},
    "c": {"train": [CTX * 23 + 5, CTX * 10 + 1], "val": [CTX * 3 + 1]},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A mixture data set laid out as prepare lays one out: shards in <name>/, listed
    source after source in the manifest's splits, per-source files and counts in its
    sources."""
    directory = tmp_path_factory.mktemp("synthetic")
    start, splits, sources = 0, {"train": [], "val": []}, {}
    for name, by_split in SIZES.items():
        sources[name] = {"splits": {}, "documents": {}, "tokens": {}}
        for split, sizes in by_split.items():
            files = []
            for k, n in enumerate(sizes):
                tokens = np.arange(start, start + n, dtype=np.uint16)
                start += n
                file = f"{name}/{shard_name(split, k)}"
                (directory / name).mkdir(exist_ok=True)
                splits[split].append(
                    ShardInfo(file, n, write_shard(directory / file, tokens, np.dtype("<u2")))
                )
                files.append(file)
            sources[name]["splits"][split] = files
            sources[name]["documents"][split] = 1
            sources[name]["tokens"][split] = sum(sizes)
    assert start < VOCAB
    Manifest(
        tokenizer="gpt2",
        vocab_size=VOCAB,
        dtype="uint16",
        eot_token=50256,
        splits=splits,
        documents={"train": 3, "val": 3},
        source={},
        settings={},
        sources=sources,
    ).save(directory)
    return directory


def mixed(directory, weights: dict[str, float], seed=5, **kwargs):
    windows, mixture = mixed_train_windows(
        directory, list(weights), list(weights.values()), CTX, None, seed
    )
    return TrainBatches(windows, kwargs.pop("micro", 4), seed, mixture=mixture, **kwargs)


def drain(batches, count):
    return [next(batches) for _ in range(count)]


def labels(batches: TrainBatches, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(source number, window number within the source) of each of the next `samples`
    samples, read back from the tokens."""
    lookup = {}
    for s, own in enumerate(batches.windows.sources):
        for i, t in enumerate(own.batch(np.arange(len(own)))[0][:, 0].tolist()):
            lookup[t] = (s, i)
    assert samples % batches.global_batch == 0
    firsts = [int(t) for x, _ in drain(batches, samples // batches.global_batch) for t in x[:, 0]]
    got = np.array([lookup[t] for t in firsts])
    return got[:, 0], got[:, 1]


WEIGHTS = [{"a": 3, "b": 1}, {"a": 0.5, "b": 0.3, "c": 0.2}, {"b": 2, "c": 1}]


@pytest.mark.parametrize("weights", WEIGHTS, ids=["3:1", "0.5/0.3/0.2", "2:1"])
def test_sources_are_drawn_in_the_weights_proportions(synthetic, weights):
    """Tolerance: over any L consecutive samples, each source's share is within
    1/Mixture.PERIOD + 1/L of its weight's share (the weights are rounded to whole slots
    per PERIOD positions; within that, one sample). Asserted for these weights: with
    three or more sources some short stretches can be off by more than one sample (equal
    weights 1:1:1 give 2 of 2 at the period boundary, 4/3 over)."""
    batches = mixed(synthetic, weights, micro=100)
    n = 2 * Mixture.PERIOD
    source, _ = labels(batches, n)
    share = np.array(list(weights.values())) / sum(weights.values())
    epoch = batches.epoch_samples
    assert epoch == sum(len(w) for w in batches.windows.sources)
    stretches = [
        (0, L)
        for L in (
            1,
            2,
            3,
            5,
            10,
            99,
            epoch,
            2 * epoch + 7,
            999,
            5000,
            Mixture.PERIOD,
            Mixture.PERIOD + 1,
            n,
        )
    ]
    stretches += [(k * epoch, epoch) for k in range(n // epoch)]  # every epoch, not only the first
    stretches += [(9990, 20), (Mixture.PERIOD - 1, 2), (12345, 6789)]  # across the period
    for s, w in enumerate(share):
        for start, L in stretches:
            got = np.count_nonzero(source[start : start + L] == s) / L
            assert abs(got - w) <= 1 / Mixture.PERIOD + 1 / L + 1e-12, (s, start, L, got, w)
        # every stretch at once: counts minus weight x length vary by at most one sample
        # plus the rounding of the weight to slots (none for 3:1 and 0.5/0.3/0.2)
        slots = batches.mixture.counts[s] / Mixture.PERIOD
        assert abs(slots - w) <= 1 / Mixture.PERIOD
        drift = np.concatenate([[0], np.cumsum(source == s)]) - np.arange(n + 1) * slots
        assert drift.max() - drift.min() <= 1 + 1e-9
    assert batches.tokens_by_source() == {
        name: int(np.count_nonzero(source == s)) * CTX for s, name in enumerate(weights)
    }
    assert sum(batches.tokens_by_source().values()) == n * CTX


def test_tokens_by_source_count_all_ranks_draws(synthetic):
    ranks = [mixed(synthetic, {"a": 3, "b": 1}, micro=3, rank=r, world_size=2) for r in range(2)]
    single = mixed(synthetic, {"a": 3, "b": 1}, micro=6)
    source, _ = labels(mixed(synthetic, {"a": 3, "b": 1}, micro=6), 6 * 23)
    for _ in range(23):
        for r in ranks:
            next(r)
        next(single)
    want = {
        "a": int(np.count_nonzero(source == 0)) * CTX,
        "b": int(np.count_nonzero(source == 1)) * CTX,
    }
    assert (
        ranks[0].tokens_by_source()
        == ranks[1].tokens_by_source()
        == single.tokens_by_source()
        == want
    )
    assert mixed(synthetic, {"a": 3, "b": 1}).tokens_by_source() == {"a": 0, "b": 0}


def test_each_sources_draws_walk_a_permutation_of_its_windows_epoch_after_epoch(synthetic):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    batches = mixed(synthetic, weights, micro=50)
    source, window = labels(batches, 2000)
    for s, own in enumerate(batches.windows.sources):
        n = len(own)
        drawn = window[source == s]
        assert len(drawn) >= 3 * n
        epochs = [drawn[k * n : (k + 1) * n].tolist() for k in range(3)]
        for e in epochs:  # over exactly n draws of the source, each of its windows once
            assert sorted(e) == list(range(n))
        assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    # Which source a position draws from is arithmetic: the seed moves only the windows.
    other_source, other_window = labels(mixed(synthetic, weights, seed=6, micro=50), 2000)
    assert np.array_equal(other_source, source) and not np.array_equal(other_window, window)
    assert np.array_equal(labels(mixed(synthetic, weights, micro=50), 2000)[1], window)


# ----------------------------------------------------------------------------- resume, ranks


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def joined(*batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_resume_continues_the_same_stream_on_any_process_count(synthetic):
    weights = {"a": 3, "b": 1}
    reference = drain(mixed(synthetic, weights, micro=4), 60)  # 240 samples: past b's epoch
    first = mixed(synthetic, weights, micro=4)
    drain(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert state["samples"] == 52 and state["mixture"] == [["a", 7500], ["b", 2500]]
    resumed = mixed(synthetic, weights, micro=4)
    resumed.load_state_dict(state)
    assert all(same(want, got) for want, got in zip(reference[13:], drain(resumed, 47)))
    assert (
        resumed.tokens_by_source()
        == mixed(synthetic, weights, micro=4, start_sample=240).tokens_by_source()
    )
    # Saved by 1 process of micro batch 4, continued by 2 ranks of micro batch 2.
    ranks = [mixed(synthetic, weights, micro=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(13, 60):
        assert same(joined(next(ranks[0]), next(ranks[1])), reference[step])
    # Weights that give the same slots are the same stream; other weights are refused.
    scaled = mixed(synthetic, {"a": 6, "b": 2}, micro=4)
    scaled.load_state_dict(state)
    assert same(next(scaled), reference[13])
    for other in ({"a": 1, "b": 1}, {"b": 1, "a": 3}):  # other slots; other source order
        with pytest.raises(
            PipelineError,
            match=r"made with mixture = \[\['a', 7500\], "
            r"\['b', 2500\]\].*data\.sources weights",
        ):
            mixed(synthetic, other, micro=4).load_state_dict(state)
    with pytest.raises(PipelineError, match="data.sources weights"):  # another source
        mixed(synthetic, {"a": 3, "c": 1}, micro=4).load_state_dict(state)
    # A mixture's position means nothing to one source over the same windows, and back.
    three = mixed(synthetic, {"a": 1, "b": 1, "c": 1}, micro=4)
    drain(three, 5)
    whole = TrainBatches(TokenWindows(synthetic, "train", CTX), 4, 5)
    assert len(whole.windows) == len(three.windows)
    with pytest.raises(PipelineError, match=r"mixture = \[\['a', 3334\]"):
        whole.load_state_dict(three.state_dict())
    drain(whole, 5)  # and a one-source position (no mixture key) into a mixture
    with pytest.raises(PipelineError, match=r"made with mixture = None"):
        mixed(synthetic, {"a": 1, "b": 1, "c": 1}, micro=4).load_state_dict(whole.state_dict())


@pytest.mark.parametrize("micro", [1, 3])
def test_one_process_equals_two_ranks_per_global_step(synthetic, micro):
    """The loader's half of "1 process equals 2 processes with accumulation": per global
    step, the samples of rank 0 then rank 1 (micro batch m each) are the single process's,
    whether it takes them as one micro batch of 2m or as 2 accumulated micro batches of m.
    Started just before the end of a period, so the steps cross it and the epochs."""
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    start = (Mixture.PERIOD // (2 * micro) - 10) * 2 * micro
    ranks = [
        mixed(synthetic, weights, micro=micro, rank=r, world_size=2, start_sample=start)
        for r in range(2)
    ]
    wide = mixed(synthetic, weights, micro=2 * micro, start_sample=start)
    accumulating = mixed(synthetic, weights, micro=micro, start_sample=start)
    for _ in range(10 + 200 // micro):
        mine = [next(r) for r in ranks]
        assert same(joined(*mine), next(wide))
        assert same(joined(*mine), joined(next(accumulating), next(accumulating)))
        assert ranks[0].samples == ranks[1].samples == wide.samples == accumulating.samples
    assert wide.samples > Mixture.PERIOD + 200


# ----------------------------------------------------------------------------- bad configs


def sources_config(*entries, extra=()):
    return load_config(None, ["data.sources=[" + ", ".join(entries) + "]", *extra])


FILES = "source: {kind: files, paths: [x.txt]}"


@pytest.mark.parametrize(
    "entries,extra,message",
    [
        (
            [f"{{name: a, {FILES}}}"],
            ["data.source.kind=files", "data.source.paths=[y.txt]"],
            "data.source and data.sources are both set",
        ),
        (
            [f"{{name: a, {FILES}}}"],
            ["data.source.max_bytes=5"],
            "data.source and data.sources are both set",
        ),
        (
            [f"{{name: a, {FILES}}}", f"{{name: b, {FILES}}}", f"{{name: a, {FILES}}}"],
            [],
            r"data.sources names=\['a', 'b', 'a'\] is not allowed: it must be distinct names",
        ),
        ([f"{{name: a, weight: 0, {FILES}}}"], [], r"data.sources\[0\].weight=0.0 is not allowed"),
        (
            [f"{{name: a, {FILES}}}", f"{{name: b, weight: -1, {FILES}}}"],
            [],
            r"data.sources\[1\].weight=-1.0 is not allowed: it must be a positive number",
        ),
        ([f"{{name: a, weight: .inf, {FILES}}}"], [], r"data.sources\[0\].weight=inf"),
        (
            [f"{{name: a/b, {FILES}}}"],
            [],
            r"data.sources\[0\].name='a/b' is not allowed: it must "
            r"be a short plain name",
        ),
        ([f"{{name: '..', {FILES}}}"], [], r"data.sources\[0\].name='..' is not allowed"),
        ([f"{{name: ../up, {FILES}}}"], [], r"data.sources\[0\].name='../up' is not allowed"),
        ([f"{{name: .hidden, {FILES}}}"], [], r"data.sources\[0\].name='.hidden' is not allowed"),
        ([f"{{{FILES}}}"], [], r"data.sources\[0\].name='' is not allowed"),
        (
            [f"{{name: a, {FILES}}}"],
            ["train.order=book"],
            "train.order='book' is not allowed: it must be shuffle with data.sources",
        ),
        (
            [f"{{name: a, {FILES}}}", "{name: b, source: {kind: files, paths: [x], max_bytes: 5}}"],
            [],
            r"data.sources\[1\].source.max_bytes does not apply to kind 'files'",
        ),
        (
            ["{name: a, source: {kind: python-stdlib, url: http://x}}"],
            [],
            r"data.sources\[0\].source.url does not apply to kind 'python-stdlib'",
        ),
        (["{name: a, source: {kind: files}}"], [], r"data.sources\[0\].source.paths is empty"),
    ],
    ids=[
        "both",
        "both-stdlib-key",
        "duplicate",
        "zero-weight",
        "negative-weight",
        "inf-weight",
        "slash",
        "dotdot",
        "dotdot-slash",
        "dot",
        "no-name",
        "book-order",
        "stray-key",
        "stray-key-stdlib",
        "empty-paths",
    ],
)
def test_bad_mixture_configs_name_the_key(entries, extra, message):
    with pytest.raises(ConfigError, match=message):
        sources_config(*entries, extra=extra)


def test_good_mixture_configs_load():
    config = sources_config(
        f"{{name: a, weight: 3, {FILES}}}", "{name: b-2_x, source: {}}", extra=["data.source=null"]
    )
    assert [(s.name, s.weight, s.source.kind) for s in config.data.sources] == [
        ("a", 3.0, "files"),
        ("b-2_x", 1.0, "python-stdlib"),
    ]


def test_a_weight_below_one_slot_per_period_is_refused():
    with pytest.raises(
        PipelineError,
        match=r"data.sources weight of tiny is below "
        r"1/10,000 of the total",
    ):
        Mixture(["big", "tiny"], [1.0, 0.4 / Mixture.PERIOD], [10, 10], seed=0)
    Mixture(["big", "small"], [1.0, 1 / Mixture.PERIOD], [10, 10], seed=0)  # one slot: fine


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_reports_each_sources_val_loss(synthetic, tmp_path):
    """eval.json's sources: each source's loss over its whole val split, as evaluating
    that source's windows alone gives it; the whole split's loss is their token-weighted
    mean. (On the synthetic mixture: every val window of a CPU model costs time.)"""
    from dataclasses import asdict

    from accelerate import Accelerator
    from safetensors.torch import save_file

    from pipeline.config import ModelConfig
    from pipeline.evaluate import evaluate, main
    from pipeline.model.gpt import GPTModel

    cfg = ModelConfig(context_length=CTX, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    ckpt = tmp_path / "step_000003"
    ckpt.mkdir()
    save_file(model.state_dict(), str(ckpt / "model.safetensors"))
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "tokens": 0, "model": asdict(cfg)}))
    record = main(
        [
            "--model",
            str(ckpt),
            "--data",
            str(synthetic),
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert json.loads((tmp_path / "eval.json").read_text()) == record
    assert list(record["sources"]) == ["a", "b", "c"]
    accelerator = Accelerator()
    total = 0.0
    for name, got in record["sources"].items():
        own = TokenWindows(synthetic, "val", CTX, source=name)
        alone = evaluate(model, own, 4, accelerator)
        assert got["loss"] == pytest.approx(alone["loss"], rel=1e-9)
        assert got["tokens"] == alone["tokens"] == CTX * len(own)
        assert got["perplexity"] == pytest.approx(np.exp(got["loss"]), rel=1e-9)
        total += got["loss"] * got["tokens"]
    assert [r["tokens"] for r in record["sources"].values()] == [CTX * 5, CTX * 11, CTX * 3]
    assert record["tokens"] == CTX * 19 and record["windows"] == 19
    assert record["loss"] == pytest.approx(total / record["tokens"], abs=1e-5)
    assert len({round(r["loss"], 6) for r in record["sources"].values()}) == 3
