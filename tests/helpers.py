"""Helpers the test modules share (pytest puts this directory on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.shards import Manifest, ShardInfo, shard_name, token_dtype, write_shard


def write_data_set(
    directory: Path, splits: dict[str, list], vocab_size: int = 50257, **manifest_fields
) -> Manifest:
    """A prepared data set written through shards.py: for each split, one shard per array
    of token ids, and the manifest listing them (with their sha256)."""
    infos = {}
    for split, arrays in splits.items():
        infos[split] = []
        for i, tokens in enumerate(arrays):
            name = shard_name(split, i)
            sha = write_shard(Path(directory) / name, np.asarray(tokens), token_dtype(vocab_size))
            infos[split].append(ShardInfo(name, len(tokens), sha))
    fields = {
        "tokenizer": "gpt2",
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "eot_token": 50256,
        "documents": {split: 1 for split in splits},
        "source": {},
        "settings": {},
        **manifest_fields,
    }
    manifest = Manifest(splits=infos, **fields)
    manifest.save(directory)
    return manifest
