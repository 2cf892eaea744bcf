"""Training and validation windows over a split's shards, in a deterministic, distributed,
resumable order.

A *window* is the book's GPTDatasetV1 sample: `context_length` input tokens and the same
tokens shifted by one as targets, starting every `stride` tokens of a shard (never across
a shard boundary). Windows are numbered 0..N-1 in shard order and read from the memory
maps on demand, so memory stays flat in the corpus size.

The train stream is global: the concatenation over epochs of a permutation of 0..N-1 keyed
by (seed, epoch). It is cut into chunks of `micro_batch_size` samples and chunk k goes to
rank k % world_size. A position in it is a count of global samples, which is the same
number whatever the process count, so a run can resume on a different number of processes.

This module owns window numbering and sample order. It knows the shard layout only through
`pipeline.data.shards.open_split`, and nothing of models, devices or Accelerate: callers move the
CPU tensors it returns.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from pipeline.core.errors import PipelineError
from pipeline.data.shards import open_split, windows_per_shard

_MASK64 = (1 << 64) - 1
# Positions of one epoch whose window indices are computed together and cached: permute() costs
# ~0.2 us per index in bulk but ~0.3 ms per call on a micro batch (numpy call overhead).
ORDER_BLOCK = 1 << 15


class TokenWindows:
    """Windows of context_length input tokens + next-token targets over one split's shards."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        context_length: int,
        stride: int | None = None,
        source: str | None = None,
    ):
        if context_length <= 0:
            raise ValueError(f"context_length must be positive, got {context_length}")
        stride = context_length if stride is None else stride
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        self.split, self.context_length, self.stride = split, context_length, stride
        shards = open_split(data_dir, split, source)
        self.tokens = sum(len(s) for s in shards)
        counts = windows_per_shard([len(s) for s in shards], context_length, stride)
        # Only shards that hold a window take part; a window's shard is then found by bisection.
        self._shards = [s for s, c in zip(shards, counts) if c > 0]
        self._first = np.cumsum([0] + [c for c in counts if c > 0])  # first window of each
        if self._first[-1] == 0:
            largest = max((len(s) for s in shards), default=0)
            raise PipelineError(
                f"the {split} split{f' of source {source}' if source else ''} of {data_dir} is "
                f"too small for one window: it has "
                f"{self.tokens} tokens in {len(shards)} shard(s) (largest {largest}), and a "
                f"window needs context_length + 1 = {context_length + 1} tokens inside one "
                f"shard. Use a larger corpus, a larger data.val_fraction (for val) or "
                f"data.shard_tokens, or a smaller model.context_length."
            )

    def __len__(self) -> int:
        return int(self._first[-1])

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(shard number among the shards that hold windows, token offset) of each window."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self._first, idx, side="right") - 1
        return shard, (idx - self._first[shard]) * self.stride

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 tensors (len(indices), context_length): inputs and targets shifted by one."""
        shard, offset = self.locate(indices)
        n = self.context_length
        # Two slices per window into preallocated int64 arrays: a window is contiguous in its
        # shard, so this reads only its own pages. numpy does the copies (one thread) and
        # torch.from_numpy shares them, so the loader never wakes torch's intra-op threads,
        # which the training step is using.
        x = np.empty((len(offset), n), dtype=np.int64)
        y = np.empty((len(offset), n), dtype=np.int64)
        for k, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            tokens = self._shards[s]
            x[k] = tokens[o : o + n]
            y[k] = tokens[o + 1 : o + n + 1]
        return torch.from_numpy(x), torch.from_numpy(y)


# ----------------------------------------------------------------------------- the order


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective, well-avalanching scramble of uint64 values."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _round_keys(seed: int, epoch: int, rounds: int = 4) -> list[np.uint64]:
    keys = np.array(
        [
            (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + r) & _MASK64
            for r in range(1, rounds + 1)
        ],
        dtype=np.uint64,
    )
    return list(_mix64(_mix64(keys)))


def permute(positions, n: int, seed: int, epoch: int) -> np.ndarray:
    """Where the permutation of 0..n-1 for (seed, epoch) sends each of `positions`.

    A keyed bijection computed per index instead of a stored permutation, so the order
    costs constant memory and no start-up time in the corpus size, and any position of the
    stream can be computed directly (resume is a counter). It is a 4-round balanced Feistel
    network on the smallest even-bit domain 2^(2h) >= n with splitmix64 as round function
    (Luby-Rackoff: 4 rounds of a pseudorandom function give a pseudorandom permutation),
    restricted to 0..n-1 by cycle walking: a value that lands at or above n is encrypted
    again until it falls inside, which stays a bijection of 0..n-1. The domain is below 4n,
    so a walk takes under 4 steps on average.
    """
    x = np.asarray(positions, dtype=np.uint64).reshape(-1)
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = _round_keys(seed, epoch)

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & low
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & low)
        return (left << shift) | right

    out = encrypt(x)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def stream_indices(start: int, count: int, n: int, seed: int) -> np.ndarray:
    """Window indices of global stream positions start .. start+count-1 (epochs back to back)."""
    pos = np.arange(start, start + count, dtype=np.int64)
    epoch, within = np.divmod(pos, n)
    out = np.empty_like(pos)
    for e in np.unique(epoch).tolist():  # one or two epochs unless a batch outgrows an epoch
        here = epoch == e
        out[here] = permute(within[here], n, seed, e)
    return out


def dataloader_pass_draws(shuffle: bool) -> int | None:
    """Draw from torch's global generator what starting one pass over a
    `torch.utils.data.DataLoader(..., num_workers=0)` draws: the iterator's base seed
    (which only workers would use), then, when shuffling, the RandomSampler's seed, which
    is returned. The book's loop starts such a pass at every epoch and every evaluation,
    so its dropout masks depend on these draws too."""
    torch.empty((), dtype=torch.int64).random_()
    if not shuffle:
        return None
    return int(torch.empty((), dtype=torch.int64).random_().item())


def seeded_randperm(n: int, seed: int) -> np.ndarray:
    """The RandomSampler's order for a sampler seed: torch.randperm on its own generator."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


# ----------------------------------------------------------------------------- mixtures


class MixedWindows:
    """The windows of several sources numbered one after the other: source s holds ids
    offsets[s] .. offsets[s+1]-1."""

    def __init__(self, sources: list[TokenWindows]):
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(w) for w in sources])
        self.context_length, self.stride = sources[0].context_length, sources[0].stride

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        n = self.context_length
        x = torch.empty((len(idx), n), dtype=torch.int64)
        y = torch.empty((len(idx), n), dtype=torch.int64)
        for s in np.unique(which).tolist():
            here = np.flatnonzero(which == s)
            x[here], y[here] = self.sources[s].batch(idx[here] - self.offsets[s])
        return x, y


class Mixture:
    """Which source each position of the global train stream draws from, by the weights.

    The weights become whole counts per PERIOD positions (largest remainders), and each
    source's slots are spread evenly over the period (slot j of a source with c slots at
    (j + 1/2) / c of it). So the stream from its start holds each source within one sample
    of its share (plus the 1/PERIOD rounding of the weights), any stretch of it within two
    (measured: 1.56 samples at worst for weights 1:2:3:4:5), a position's source and its
    draw number within the source are arithmetic (resume and any process count work as for
    one source), and each source's draws walk its own keyed permutation, epoch after epoch
    (a source with a large weight and few windows repeats sooner).
    """

    PERIOD = 10_000

    def __init__(self, names: list[str], weights: list[float], sizes: list[int], seed: int):
        total = sum(weights)
        exact = [w / total * self.PERIOD for w in weights]
        counts = [int(e) for e in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[
            : self.PERIOD - sum(counts)
        ]:
            counts[i] += 1
        small = [n for n, c in zip(names, counts) if c == 0]
        if small:
            raise PipelineError(
                f"data.sources weight of {', '.join(small)} is below 1/{self.PERIOD:,} of the "
                f"total: raise it, or leave the source out"
            )
        slots = sorted(((j + 0.5) / c, s) for s, c in enumerate(counts) for j in range(c))
        self.names, self.counts, self.sizes = names, np.array(counts), sizes
        self.pattern = np.array([s for _, s in slots], dtype=np.int64)
        seen = np.zeros(len(counts), dtype=np.int64)
        self.draw_in_period = np.empty(self.PERIOD, dtype=np.int64)
        for i, s in enumerate(self.pattern.tolist()):
            self.draw_in_period[i], seen[s] = seen[s], seen[s] + 1
        self.offsets = np.cumsum([0] + list(sizes))
        self.seeds = [(seed + (s + 1) * 0x9E3779B97F4A7C15) & _MASK64 for s in range(len(names))]

    def draws(self, samples: int) -> np.ndarray:
        """How many of the first `samples` stream positions draw from each source."""
        cycles, rest = divmod(samples, self.PERIOD)
        return self.counts * cycles + np.bincount(self.pattern[:rest], minlength=len(self.counts))

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """MixedWindows ids of stream positions start .. start+count-1."""
        cycles, within = np.divmod(np.arange(start, start + count, dtype=np.int64), self.PERIOD)
        source = self.pattern[within]
        draw = cycles * self.counts[source] + self.draw_in_period[within]
        out = np.empty(count, dtype=np.int64)
        for s in np.unique(source).tolist():
            here = source == s  # a source's draws in a stretch of the stream are consecutive
            first = int(draw[here][0])
            out[here] = self.offsets[s] + stream_indices(
                first, int(here.sum()), self.sizes[s], self.seeds[s]
            )
        return out

    def state(self) -> list:
        return [[n, int(c)] for n, c in zip(self.names, self.counts)]


def mixed_train_windows(
    data_dir,
    names: list[str],
    weights: list[float],
    context_length: int,
    stride: int | None,
    seed: int,
) -> tuple[MixedWindows, Mixture]:
    windows = MixedWindows(
        [TokenWindows(data_dir, "train", context_length, stride, source=n) for n in names]
    )
    return windows, Mixture(names, weights, [len(w) for w in windows.sources], seed)


ORDERS = ("shuffle", "book")


class TrainBatches:
    """Endless, deterministic, distributed, resumable stream of train micro batches.

    Call __next__ in lockstep on every rank: each call returns this rank's chunk of the
    next micro_batch_size * world_size samples of the global stream and advances `samples`
    by that much on every rank.

    `order` "shuffle" is the keyed permutation above. "book" is the book's
    `DataLoader(shuffle=True, drop_last=True)` as `train_model_simple` iterates it: each
    epoch a torch.randperm whose seed is drawn from torch's global generator when the
    epoch's first batch is taken, the last incomplete batch dropped. It couples the order
    to every other use of that generator (dropout), which is what makes the book's run
    reproducible draw for draw, and why it needs a single process.
    """

    def __init__(
        self,
        windows: TokenWindows | MixedWindows,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_sample: int = 0,
        order: str = "shuffle",
        mixture: Mixture | None = None,
    ):
        if micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"need micro_batch_size > 0 and 0 <= rank < world_size, got "
                f"{micro_batch_size}, rank {rank}, world_size {world_size}"
            )
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if order == "book" and world_size > 1:
            raise PipelineError(
                f"train.order=book draws the order from the one process's torch generator, as "
                f"the book's single-process loop does; this run has {world_size} processes. "
                f"Use train.order=shuffle to train on several."
            )
        self.windows, self.micro_batch_size, self.seed = windows, micro_batch_size, seed
        self.rank, self.world_size, self.order = rank, world_size, order
        self.mixture = mixture  # with MixedWindows: which source each position draws from
        self._samples = 0
        self._skips: dict[int, int] = {}  # global sample ranges left out, start -> end
        self._block, self._block_ids = (-1, -1), np.empty(0, dtype=np.int64)  # one cached
        self._epoch_seed: int | None = None  # book: the sampler seed of the current epoch
        if order == "book" and self.epoch_samples == 0:
            raise PipelineError(
                f"train.order=book drops the last incomplete batch of each epoch, as the "
                f"book's drop_last=True, and the {len(windows)} train windows do not fill one "
                f"batch of {micro_batch_size}"
            )
        self._seek(start_sample)

    @property
    def global_batch(self) -> int:
        """Samples consumed by one lockstep call on all ranks."""
        return self.micro_batch_size * self.world_size

    @property
    def epoch_samples(self) -> int:
        """Global samples in one epoch: every window, or (book) every complete batch."""
        n = len(self.windows)
        return n - n % self.global_batch if self.order == "book" else n

    def _seek(self, samples: int) -> None:
        if samples < 0 or samples % self.global_batch:
            raise ValueError(
                f"cannot resume the train stream at sample {samples}: the position must be a "
                f"non-negative multiple of micro_batch_size * world_size = "
                f"{self.micro_batch_size} * {self.world_size} = {self.global_batch}; choose a "
                f"micro batch size and process count whose product divides it"
            )
        self._samples = int(samples)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while self._samples in self._skips:
            self._samples = self._skips[self._samples]
        first = self._samples + self.rank * self.micro_batch_size
        if self.order == "book":
            idx = self._book_ids(first, self.micro_batch_size)
        else:
            idx = self._window_ids(first, self.micro_batch_size)
        self._samples += self.global_batch
        return self.windows.batch(idx)

    def _window_ids(self, start: int, count: int) -> np.ndarray:
        """stream_indices(start, count, ...) through a cache of one block of ORDER_BLOCK
        positions inside one epoch (a whole epoch when the split has fewer windows)."""
        if self.mixture is not None:
            return self.mixture.window_ids(start, count)
        n, parts, pos, end = len(self.windows), [], start, start + count
        while pos < end:
            epoch, within = divmod(pos, n)
            block = within // ORDER_BLOCK
            lo, hi = block * ORDER_BLOCK, min((block + 1) * ORDER_BLOCK, n)
            if (epoch, block) != self._block:
                self._block_ids = permute(np.arange(lo, hi), n, self.seed, epoch)
                self._block = (epoch, block)
            stop = min(end, epoch * n + hi)
            parts.append(self._block_ids[within - lo : within - lo + stop - pos])
            pos = stop
        return np.concatenate(parts)

    def _book_ids(self, start: int, count: int) -> np.ndarray:
        """One batch of the book's order (a batch never straddles its drop_last epoch)."""
        within = start % self.epoch_samples
        if within == 0:  # the epoch's first batch: the DataLoader pass starts here
            self._epoch_seed = dataloader_pass_draws(shuffle=True)
        # The same one-entry cache as the shuffle order, keyed by the epoch's seed here.
        if self._block != (self._epoch_seed, -1):
            self._block_ids = seeded_randperm(len(self.windows), self._epoch_seed)
            self._block = (self._epoch_seed, -1)
        return self._block_ids[within : within + count]

    def evaluation_windows(self, batches: int) -> np.ndarray | None:
        """Train windows for an evaluation of `batches` micro batches (all processes
        together): windows spread evenly over the whole split (spread_windows); for the
        book's order, the first batches of a fresh
        shuffled pass, after the draws the book's evaluate_model makes (a pass over the
        train loader, then one over the val loader)."""
        if self.order != "book":
            wanted = batches * self.micro_batch_size * self.world_size
            return spread_windows(len(self.windows), wanted)
        seed = dataloader_pass_draws(shuffle=True)
        dataloader_pass_draws(shuffle=False)  # the val loader's pass, drawn in the same call
        return seeded_randperm(len(self.windows), seed)[: batches * self.micro_batch_size]

    @property
    def samples(self) -> int:
        """Global samples consumed so far (all ranks together)."""
        return self._samples

    def skip(self, start: int, end: int) -> None:
        """Leave out the global samples [start, end) when the stream gets there (a rollback
        skips what a bad step drew); kept in the loader's state, so in checkpoints."""
        if start < self._samples or start % self.global_batch or end % self.global_batch:
            raise ValueError(f"cannot skip samples [{start}, {end}) from sample {self._samples}")
        self._skips[start] = end

    @property
    def skips(self) -> dict[int, int]:
        """The ranges left out, start -> end (a copy)."""
        return dict(self._skips)

    def keep_skips(self, skips: dict[int, int]) -> None:
        """Add ranges left out earlier (a rollback reloads a loader state older than
        them, and the stream must still leave them out)."""
        self._skips.update(skips)

    @property
    def epoch(self) -> float:
        return self._samples / self.epoch_samples

    def state_dict(self) -> dict:
        # windows / context_length / stride / order are there to catch a resume on
        # different data; epoch_seed is the book order's current epoch.
        state = {
            "samples": self._samples,
            "seed": self.seed,
            "windows": len(self.windows),
            "context_length": self.windows.context_length,
            "stride": self.windows.stride,
            "order": self.order,
        }
        if self.order == "book":
            state["epoch_seed"] = self._epoch_seed
        if self.mixture is not None:
            state["mixture"] = self.mixture.state()
        if self._skips:  # [start, end) pairs; absent in runs that never skipped
            state["skips"] = sorted([start, end] for start, end in self._skips.items())
        return state

    def tokens_by_source(self) -> dict[str, int]:
        """Input tokens drawn so far from each source of a mixture (all ranks together)."""
        if self.mixture is None:
            return {}
        draws = self.mixture.draws(self._samples)
        return {n: int(d) * self.windows.context_length for n, d in zip(self.mixture.names, draws)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "windows", "context_length", "stride", "order", "mixture"):
            # Older files lack order (they were shuffle) and mixture (they were one source).
            default = {"order": "shuffle", "mixture": None}.get(key, mine.get(key))
            saved = state.get(key, default)
            if saved != mine.get(key):
                raise PipelineError(
                    f"the saved train loader position was made with {key} = {saved}, but "
                    f"this run has {key} = {mine.get(key)}: the same sample count would mean other "
                    f"samples. Resume with the data and settings of the saved run (same seed, "
                    f"data set, model.context_length, train.stride, train.order and "
                    f"data.sources weights), or start a new run."
                )
        self._seek(int(state["samples"]))
        self._skips = {int(start): int(end) for start, end in state.get("skips", [])}
        self._epoch_seed = state.get("epoch_seed")


def spread_windows(count: int, wanted: int) -> np.ndarray:
    """`wanted` window indices spread evenly over 0 .. count - 1 (all of them when there
    are fewer), the same at every call: an in-training estimate drawn from the whole split,
    not from its first documents, and comparable from one evaluation to the next."""
    if wanted >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, wanted).round().astype(np.int64))


def fixed_batches(
    windows: TokenWindows,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
    order: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro batches of the split in a fixed order (no shuffling): the
    windows 0..N-1, or the windows listed in `order`.

    Consecutive chunks of micro_batch_size windows go to the ranks in turn (chunk k to rank
    k % world_size), so all ranks together see every window exactly once; the last chunk may
    be smaller and ranks may get one batch more or less (or none): callers all-reduce sums of
    loss * tokens and tokens, not means. max_batches caps the batches per rank, so ranks
    together read the first max_batches * world_size chunks.
    """
    if micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"need micro_batch_size > 0 and 0 <= rank < world_size, got "
            f"{micro_batch_size}, rank {rank}, world_size {world_size}"
        )
    ids = np.arange(len(windows)) if order is None else np.asarray(order)
    n = len(ids)
    starts = range(rank * micro_batch_size, n, micro_batch_size * world_size)
    if max_batches is not None:
        starts = starts[: max(0, max_batches)]
    for start in starts:
        yield windows.batch(ids[start : start + micro_batch_size])
