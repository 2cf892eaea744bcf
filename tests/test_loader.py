"""Windows equal slices of the raw tokens; the train order is a seeded permutation per epoch,
split disjointly over ranks and resumable by sample count; validation is fixed and complete."""

import json

import numpy as np
import pytest
import torch
from helpers import write_data_set

from pipeline.core.errors import PipelineError
from pipeline.data import loader
from pipeline.data.loader import TokenWindows, TrainBatches, fixed_batches, permute

VOCAB = 50257


def make_data(root, train_sizes, val_sizes=(300,), offset=0):
    """A data set whose tokens are a running counter mod the vocabulary: each window is
    recognisable, and different shards never share a window. Returns the raw arrays."""
    raw, start = {}, offset
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        raw[split] = []
        for n in sizes:
            raw[split].append((np.arange(start, start + n) % VOCAB).astype(np.uint16))
            start += n
    write_data_set(root, raw, VOCAB)
    return raw


def book_windows(shards, context_length, stride):
    """The book's GPTDatasetV1 loop, shard by shard: the reference for window numbering."""
    out = []
    for tokens in shards:
        for i in range(0, len(tokens) - context_length, stride):
            out.append((tokens[i : i + context_length], tokens[i + 1 : i + context_length + 1]))
    return out


def drain(batches, count):
    return [next(batches) for _ in range(count)]


def first_column_ids(xs, windows):
    """Window index of each row, recovered from its first token (unique in make_data sets)."""
    lookup = {int(windows.batch([i])[0][0, 0]): i for i in range(len(windows))}
    return [lookup[int(t)] for x in xs for t in x[:, 0]]


@pytest.mark.parametrize("context_length,stride", [(16, None), (16, 5), (16, 16), (7, 20)])
def test_windows_equal_the_books_slices_per_shard(tmp_path, context_length, stride):
    raw = make_data(tmp_path, [100, 17, 16, 250])  # 16 tokens: too short for a window of 16
    w = TokenWindows(tmp_path, "train", context_length, stride)
    expected = book_windows(raw["train"], context_length, stride or context_length)
    assert len(w) == len(expected)
    x, y = w.batch(np.arange(len(w)))
    assert x.dtype == y.dtype == torch.int64 and x.shape == (len(w), context_length)
    assert torch.equal(x, torch.tensor(np.array([e[0] for e in expected]), dtype=torch.int64))
    assert torch.equal(y, torch.tensor(np.array([e[1] for e in expected]), dtype=torch.int64))
    # Any order and repeats work too.
    order = [len(w) - 1, 0, 3, 3]
    xo, _ = w.batch(order)
    assert torch.equal(xo, x[order])


def test_window_count_matches_the_book_and_out_of_range_fails(tmp_path):
    make_data(tmp_path, [1000])
    assert len(TokenWindows(tmp_path, "train", 256)) == len(range(0, 1000 - 256, 256)) == 3
    assert len(TokenWindows(tmp_path, "train", 4, 1)) == 996
    with pytest.raises(IndexError):
        TokenWindows(tmp_path, "train", 256).batch([3])


def test_too_small_split_says_what_to_change(tmp_path):
    make_data(tmp_path, [500], val_sizes=(40, 64))
    with pytest.raises(
        PipelineError,
        match=r"val split .* too small.*104 tokens.*65.*"
        r"context_length",
    ):
        TokenWindows(tmp_path, "val", 64)
    TokenWindows(tmp_path, "val", 63)  # 64 tokens give exactly one window of 63


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 1000, 4099])
def test_permute_is_a_bijection(n):
    p = permute(np.arange(n), n, seed=1337, epoch=4)
    assert sorted(p.tolist()) == list(range(n))


def test_order_is_seeded_and_differs_by_epoch(tmp_path):
    make_data(tmp_path, [8 * 40 + 1])  # 40 windows of 8
    w = TokenWindows(tmp_path, "train", 8)

    def epochs(seed, count=2):
        xs = drain(TrainBatches(w, 4, seed), count * len(w) // 4)
        ids = first_column_ids([x for x, _ in xs], w)
        return [ids[e * len(w) : (e + 1) * len(w)] for e in range(count)]

    e0, e1 = epochs(seed=1)
    assert sorted(e0) == sorted(e1) == list(range(len(w)))  # each epoch: every window once
    assert e0 != e1 and e0 != list(range(len(w)))
    assert epochs(seed=1) == [e0, e1]  # same seed, same order
    assert epochs(seed=2)[0] != e0


def test_two_ranks_cover_an_epoch_once_and_interleave_into_the_single_stream(tmp_path):
    make_data(tmp_path, [8 * 30 + 3, 8 * 13 + 1])  # 30 + 13 windows over two shards
    w = TokenWindows(tmp_path, "train", 8)
    b, steps = 3, 20  # 2 ranks * 3 * 20 = 120 samples: almost three epochs, crossing inside
    single = drain(TrainBatches(w, b, seed=7), 2 * steps)
    ranks = [TrainBatches(w, b, seed=7, rank=r, world_size=2) for r in range(2)]
    for step in range(steps):
        got = [next(r) for r in ranks]
        for r in range(2):  # rank r's step-th batch is chunk 2*step + r of the single stream
            assert torch.equal(got[r][0], single[2 * step + r][0])
            assert torch.equal(got[r][1], single[2 * step + r][1])
        if (step + 1) * 2 * b <= len(w):  # within the first epoch, ranks never share a window
            assert set(first_column_ids([got[0][0]], w)).isdisjoint(
                first_column_ids([got[1][0]], w)
            )
        assert ranks[0].samples == ranks[1].samples == 2 * b * (step + 1)
    ids = first_column_ids([x for x, _ in single], w)
    n = len(w)
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n : 2 * n]) == list(range(n))
    assert ranks[0].epoch == pytest.approx(120 / n)


def test_resume_from_state_dict_continues_the_same_order(tmp_path):
    make_data(tmp_path, [8 * 25 + 1])
    w = TokenWindows(tmp_path, "train", 8)
    reference = drain(TrainBatches(w, 4, seed=3), 20)
    first = TrainBatches(w, 4, seed=3)
    drain(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert state["samples"] == 28 and state["seed"] == 3
    resumed = TrainBatches(w, 4, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(reference[7:], drain(resumed, 13)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    started = TrainBatches(w, 4, seed=3, start_sample=28)
    assert torch.equal(next(started)[0], reference[7][0])


def test_resume_on_two_ranks_continues_the_single_process_stream(tmp_path):
    make_data(tmp_path, [8 * 25 + 1])
    w = TokenWindows(tmp_path, "train", 8)
    reference = drain(TrainBatches(w, 4, seed=9), 30)
    one = TrainBatches(w, 4, seed=9)
    drain(one, 6)  # 24 samples, a multiple of 4 * 2
    ranks = [TrainBatches(w, 4, seed=9, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    for step in range(12):
        for r in range(2):
            assert torch.equal(next(ranks[r])[0], reference[6 + 2 * step + r][0])


def test_resume_rejects_a_position_between_global_batches_and_other_data(tmp_path):
    make_data(tmp_path, [8 * 25 + 1])
    w = TokenWindows(tmp_path, "train", 8)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        TrainBatches(w, 4, seed=0, world_size=2, start_sample=12)
    loader = TrainBatches(w, 4, seed=0)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        loader.load_state_dict({"samples": 6, "seed": 0})
    with pytest.raises(PipelineError, match="seed"):
        loader.load_state_dict({"samples": 8, "seed": 1})
    with pytest.raises(PipelineError, match="windows"):
        loader.load_state_dict({"samples": 8, "seed": 0, "windows": 99})


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_fixed_batches_are_fixed_disjoint_and_complete(tmp_path, world_size):
    make_data(tmp_path, [100], val_sizes=(8 * 11 + 1, 8 * 6 + 5))  # 17 val windows
    w = TokenWindows(tmp_path, "val", 8)
    per_rank = [list(fixed_batches(w, 4, rank=r, world_size=world_size)) for r in range(world_size)]
    ids = [first_column_ids([x for x, _ in batches], w) for batches in per_rank]
    assert sorted(sum(ids, [])) == list(range(17))  # every window once over all ranks
    chunks = [
        sorted(ids[k % world_size][4 * (k // world_size) : 4 * (k // world_size) + 4])
        for k in range(5)
    ]
    assert chunks == [list(range(4 * k, min(4 * k + 4, 17))) for k in range(5)]  # fixed order
    again = list(fixed_batches(w, 4, rank=0, world_size=world_size))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, per_rank[0])
    )
    x, y = per_rank[0][0]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_fixed_batches_honour_max_batches(tmp_path):
    make_data(tmp_path, [100], val_sizes=(8 * 40 + 1,))
    w = TokenWindows(tmp_path, "val", 8)
    capped = [list(fixed_batches(w, 4, rank=r, world_size=2, max_batches=3)) for r in range(2)]
    assert [len(c) for c in capped] == [3, 3]
    ids = sorted(first_column_ids([x for c in capped for x, _ in c], w))
    assert ids == list(range(24))  # the first 3 * 2 chunks, as 1 rank with max_batches=6
    assert len(list(fixed_batches(w, 4, max_batches=0))) == 0


def test_cached_order_blocks_do_not_change_the_stream(tmp_path, monkeypatch):
    make_data(tmp_path, [8 * 13 + 1])  # 13 windows; batches of 3 cross blocks and epochs
    w = TokenWindows(tmp_path, "train", 8)
    monkeypatch.setattr(loader, "ORDER_BLOCK", 5)
    xs = drain(TrainBatches(w, 3, seed=11, rank=1, world_size=2), 10)
    want = [loader.stream_indices(6 * j + 3, 3, len(w), 11) for j in range(10)]
    assert first_column_ids([x for x, _ in xs], w) == np.concatenate(want).tolist()


def test_estimates_draw_windows_spread_over_the_whole_split_the_same_every_time():
    from pipeline.data.loader import spread_windows

    picked = spread_windows(330, 40)
    assert len(picked) == 40 and picked[0] == 0 and picked[-1] == 329
    assert np.all(np.diff(picked) >= 8)  # evenly apart, not the first 40 windows
    assert np.array_equal(picked, spread_windows(330, 40))
    assert np.array_equal(spread_windows(5, 40), np.arange(5))  # fewer than wanted: all
