"""The shard format is llm.c's bytes (checked with plain numpy), and damaged data sets
are caught: a truncated shard, a wrong magic, a count that disagrees with the manifest,
a changed byte."""

import hashlib

import numpy as np
import pytest
from helpers import write_data_set

from pipeline.data.shards import (
    HEADER_BYTES,
    DataError,
    load_manifest,
    open_split,
    read_shard,
    token_dtype,
    verify,
    write_shard,
)


def test_write_shard_is_the_llmc_layout(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    sha = write_shard(tmp_path / "s.bin", tokens, token_dtype(50257))
    raw = (tmp_path / "s.bin").read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard(tmp_path / "s.bin").tolist() == tokens.tolist()


def test_vocabularies_over_65536_use_llm_c_uint32_files(tmp_path):
    assert token_dtype(50257) == np.dtype("<u2") and token_dtype(100_277) == np.dtype("<u4")
    write_shard(tmp_path / "s.bin", np.array([100_000, 3]), token_dtype(100_277))
    header = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=256)
    assert header[:3].tolist() == [20240801, 7, 2]  # llm.c's magic and version for uint32
    assert read_shard(tmp_path / "s.bin").tolist() == [100_000, 3]


def test_truncated_or_foreign_files_are_refused(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(100), token_dtype(50257))
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_shard(tmp_path / "s.bin")
    (tmp_path / "s.bin").write_bytes(b"\0" * len(data))
    with pytest.raises(DataError, match="bad magic"):
        read_shard(tmp_path / "s.bin")
    with pytest.raises(DataError, match="missing"):
        read_shard(tmp_path / "absent.bin")


def make_data_set(tmp_path):
    return write_data_set(
        tmp_path,
        {"train": [np.arange(10), np.arange(4)], "val": []},
        documents={"train": 2, "val": 0},
        source={"kind": "files"},
        settings={"split_by": "document"},
    )


def test_manifest_round_trips_and_opens_its_shards(tmp_path):
    manifest = make_data_set(tmp_path)
    assert load_manifest(tmp_path) == manifest and manifest.tokens("train") == 14
    assert [a.tolist() for a in open_split(tmp_path, "train")] == [list(range(10)), list(range(4))]
    assert verify(tmp_path) == []


def test_damage_is_detected(tmp_path):
    manifest = make_data_set(tmp_path)
    path = tmp_path / "train_000001.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, one bit changed: only the sha256 sees it
    path.write_bytes(bytes(data))
    assert verify(tmp_path) == ["train_000001.bin"]
    manifest.splits["train"][0].tokens = 11
    manifest.save(tmp_path)
    with pytest.raises(DataError, match="holds 10 tokens, the manifest says 11"):
        open_split(tmp_path, "train")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="no prepared data"):
        load_manifest(tmp_path)


def test_opening_a_split_checks_sha256_once_per_change_of_the_file(tmp_path, monkeypatch):
    import pipeline.data.shards as shards

    make_data_set(tmp_path)
    scans = []
    real_scan = shards.scan_shard
    monkeypatch.setattr(
        shards, "scan_shard", lambda path: scans.append(path.name) or real_scan(path)
    )
    open_split(tmp_path, "train")
    assert scans == ["train_000000.bin", "train_000001.bin"]
    open_split(tmp_path, "train")  # unchanged since: remembered by size + mtime
    assert len(scans) == 2
    path = tmp_path / "train_000001.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_000001.bin is damaged.*rerun the prepare stage"):
        open_split(tmp_path, "train")
    with pytest.raises(DataError, match="damaged"):  # and not remembered as good
        open_split(tmp_path, "train")


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    write_data_set(tmp_path, {"train": [[1, 50257, 2]]})
    with pytest.raises(DataError, match="holds token id 50257, outside the vocabulary of 50257"):
        open_split(tmp_path, "train")
