"""prepare over parts: a mixed corpus (a big single-line text file cut into byte ranges
and read in segments, a BOM file with undecodable bytes, small files grouped, jsonl line
ranges, parquet row groups, an hf dataset's shards) gives exactly the documented token
streams, and the same bytes whatever data.num_workers, data.part_bytes,
data.segment_bytes or the number of machines.

The expected tokens are computed here from the spec alone (docs/ARCHITECTURE.md and
pipeline/prepare.py's docstring), never through pipeline.data.parts or pipeline.data.streams:
documents in corpus order (a directory's files sorted by path; a .txt file is one
document decoded as utf-8-sig with undecodable bytes replaced by U+FFFD; a jsonl or parquet
row with a string 'text' is one document; empty documents are skipped), each tokenized
with `encode_ordinary`, laid out per data.split_by.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import config, read_split, spec_is_val, text_of

from pipeline.config import save_config
from pipeline.data import parts
from pipeline.data.shards import load_manifest
from pipeline.data.tokenizer import EOT_ID, get_tokenizer
from pipeline.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PART_BYTES, SEGMENT_BYTES, SHARD_TOKENS, VAL_FRACTION = 20_000, 4096, 3000, 0.3
SIZES = [
    f"data.part_bytes={PART_BYTES}",
    f"data.segment_bytes={SEGMENT_BYTES}",
    f"data.shard_tokens={SHARD_TOKENS}",
    f"data.val_fraction={VAL_FRACTION}",
]
BIG = "10_big.txt"
BOM = b"\xef\xbb\xbf"


# ----------------------------------------------------------------------------- the corpus


def stdlib_prose(name: str, chars: int) -> str:
    """Python source of the standard library as one line (newlines made spaces): runs
    of spaces, punctuation and digits next to letters."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
    return text[:chars].replace("\n", " ")


def big_line() -> bytes:
    """~150 KB of one line, starting with a BOM: prose with non-ASCII letters and emoji,
    code, a 20 KB run of CJK (no token-safe byte for several segments), a run of one letter
    (one piece for GPT-2), and a few undecodable bytes."""
    pieces = []
    for i in range(16):
        pieces.append(text_of(100 + i, 1000).replace("\n", " "))
        pieces.append(
            stdlib_prose(["inspect.py", "textwrap.py", "argparse.py"][i % 3], 4000)[i * 300 :]
        )
        if i == 4:
            pieces.append("漢字かな交じり文テスト" * 600 + " ")  # ~20 KB with no safe cut
        if i == 7:
            pieces.append("x" * 3000 + " 12345678901234567890 ")
    text = " ".join(pieces).encode("utf-8")
    middle = len(text) // 2
    while text[middle] >= 0x80:  # keep the corruption between characters
        middle += 1
    return BOM + text[:middle] + b" \xff\xfe bad \xc3( " + text[middle:]


def bom_file() -> bytes:
    """A small multi-line file (but longer than a segment) with a BOM, Windows line
    ends, undecodable bytes, and a multi-byte character cut short at the very end."""
    lines = [text_of(200 + i, 40).rstrip("\n") for i in range(30)]
    body = "\r\n".join(lines).encode("utf-8")
    return (
        BOM
        + body[:3000]
        + b"\n\xff\xff tail \xed\xa0\x80 surrogate\n"
        + body[3000:]
        + b"\n\n  \t\n\xe2\x82"
    )


def jsonl_rows() -> list[dict]:
    rows = [{"id": i, "text": text_of(300 + i, 60 + (i * 37) % 90)} for i in range(100)]
    rows[5] = {"id": 5, "text": None}  # skipped with a warning
    rows[17] = {"id": 17}  # no field: skipped
    rows[23]["text"] = ""  # an empty document: skipped
    rows[40]["text"] = "line one\nline two 🙂\r\n\ttabbed ünïcode " * 200  # longer than a segment
    rows[41]["text"] = "x"
    return rows


def parquet_rows() -> list:
    rows = [text_of(500 + i, 150 + i % 7) for i in range(30)]
    rows[11] = None
    rows[12] = ""
    return rows


def make_corpus(directory: Path) -> Path:
    """The mixed corpus; file names give the order a directory is read in (by path)."""
    directory.mkdir(parents=True)
    (directory / "00_small.txt").write_text(text_of(1, 30))
    (directory / "01_small.txt").write_text("short 😀 ünï\n")
    (directory / "02_empty.txt").write_bytes(b"")
    (directory / BIG).write_bytes(big_line())
    (directory / "20_bom.txt").write_bytes(bom_file())
    with open(directory / "30_rows.jsonl", "w", encoding="utf-8") as f:
        for row in jsonl_rows():
            f.write(json.dumps(row, ensure_ascii=bool(row.get("id", 0) % 2)) + "\n")
    for i in range(4):
        (directory / f"40_small_{i}.txt").write_text(text_of(40 + i, 20 + 10 * i))
    (directory / "45_medium.txt").write_text(text_of(45, 1000))  # ~6 KB
    pq.write_table(
        pa.table({"text": parquet_rows(), "n": list(range(30))}),
        directory / "50_table.parquet",
        row_group_size=10,
    )
    (directory / "60_small.txt").write_text(text_of(60, 25))
    (directory / "sub").mkdir()
    (directory / "sub" / "70_small.txt").write_text(text_of(70, 25))
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "src")


# ----------------------------------------------------------------------------- the spec


def spec_documents(directory: Path) -> list[str]:
    """The corpus's documents as the spec defines them, read without pipeline code."""
    docs: list = []
    for path in sorted(
        (p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.as_posix()
    ):
        if path.suffix == ".txt":
            docs.append(path.read_bytes().decode("utf-8-sig", errors="replace"))
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                docs.append(json.loads(line).get("text"))
        elif path.suffix == ".parquet":
            docs += pq.read_table(path).column("text").to_pylist()
        else:
            raise AssertionError(f"unexpected file {path}")
    return [d for d in docs if isinstance(d, str) and d]


def by_document(docs: list[str], val_fraction: float) -> tuple[dict, dict]:
    """(tokens, documents) per split: EOT before each document, the split by its hash."""
    enc = get_tokenizer()
    tokens, counts = {"train": [], "val": []}, {"train": 0, "val": 0}
    for doc in docs:
        split = "val" if spec_is_val(doc, val_fraction) else "train"
        tokens[split] += [EOT_ID, *enc.encode_ordinary(doc)]
        counts[split] += 1
    return tokens, counts


def by_text(docs: list[str], val_fraction: float) -> tuple[dict, dict]:
    """(tokens, documents) per split: the documents joined (EOT between them, counting no
    characters) cut at character int((1 - val_fraction) * total), each side encoded on
    its own; the document the cut divides counts in both splits."""
    enc = get_tokenizer()
    cut = int((1 - val_fraction) * sum(map(len, docs)))
    sides: dict[str, list[str]] = {"train": [], "val": []}
    start = 0
    for doc in docs:
        end = start + len(doc)
        if start < cut:
            sides["train"].append(doc[: cut - start])
        if end > cut:
            sides["val"].append(doc[max(0, cut - start) :])
        start = end
    tokens = {}
    for split, texts in sides.items():
        tokens[split] = []
        for i, text in enumerate(texts):
            tokens[split] += ([EOT_ID] if i else []) + enc.encode_ordinary(text)
    return tokens, {s: len(texts) for s, texts in sides.items()}


def assert_data_set(data_dir: Path, manifest, expected: dict, documents: dict) -> None:
    for split in ("train", "val"):
        shards = read_split(data_dir, split)
        got = np.concatenate(shards).tolist() if shards else []
        assert len(got) == len(expected[split]), (split, len(got), len(expected[split]))
        first = next((i for i, (a, b) in enumerate(zip(got, expected[split])) if a != b), None)
        assert first is None, f"{split}: first differing token at {first}"
        sizes = [len(s) for s in shards]
        assert sizes[:-1] == [SHARD_TOKENS] * (len(sizes) - 1) and 0 < sizes[-1] <= SHARD_TOKENS
        assert [s.tokens for s in manifest.splits[split]] == sizes
        assert [s.file for s in manifest.splits[split]] == [
            f"{split}_{k:06d}.bin" for k in range(len(sizes))
        ]
    assert manifest.documents == documents


def files_config(tmp_path, corpus: Path, *overrides, name="d"):
    return config(
        tmp_path,
        "data.source.kind=files",
        f"data.source.paths=[{corpus}]",
        *SIZES,
        *overrides,
        name=name,
    )


# ----------------------------------------------------------------------------- fast tests


def test_the_corpus_is_cut_where_the_test_means_it_to_be(corpus, tmp_path):
    """The plan these tests run on: the big file over several byte ranges and longer than
    a segment, small files grouped, jsonl over line ranges, parquet row groups grouped;
    with part_bytes=3000, a file cut into ranges though shorter than a segment."""
    cfg = files_config(tmp_path, corpus)
    found = parts.plan(cfg.data.source, 0, tmp_path / "download", PART_BYTES, SEGMENT_BYTES)
    assert [p.index for p in found] == list(range(len(found)))
    big = [p for p in found for item in p.items if item["path"].endswith(BIG)]
    size = (corpus / BIG).stat().st_size
    assert len(big) >= 5 and size > 100_000 and SEGMENT_BYTES < size
    assert all(len(p.items) == 1 and p.kind == "text" for p in big)
    ranges = [(p.items[0]["start"], p.items[0]["stop"]) for p in big]
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no gap
    data = (corpus / BIG).read_bytes()
    assert all(data[start] < 0x80 and data[start - 1] < 0x80 for start, _ in ranges[1:])
    bom = [item for p in found for item in p.items if item["path"].endswith("20_bom.txt")]
    assert bom[0]["stop"] > SEGMENT_BYTES  # read in segments, its split by a digest
    assert parts.needs_digest(bom[0], SEGMENT_BYTES)
    jsonl = [p for p in found if p.kind == "jsonl"]
    assert len(jsonl) >= 3
    parquet = [p for p in found if p.kind == "parquet"]
    assert sorted(g for p in parquet for g in p.items[0]["row_groups"]) == [0, 1, 2]
    assert any(len(p.items) > 1 for p in found if p.kind == "text")  # small files grouped
    medium = (corpus / "45_medium.txt").stat().st_size
    assert 3_000 < medium <= 8_192
    small = parts.plan(cfg.data.source, 0, tmp_path / "download", 3_000, 8_192)
    assert len([p for p in small if p.items[0]["path"].endswith("45_medium.txt")]) >= 2


@pytest.mark.parametrize(
    "part_bytes,segment_bytes",
    [(PART_BYTES, SEGMENT_BYTES), (7_000, 5_000), (3_000, 8_192), (10**9, 10**9)],
    ids=["cut", "cut-finer", "parts-under-segments", "uncut"],
)
def test_split_by_document_equals_the_spec(corpus, tmp_path, part_bytes, segment_bytes, capsys):
    cfg = files_config(
        tmp_path, corpus, f"data.part_bytes={part_bytes}", f"data.segment_bytes={segment_bytes}"
    )
    manifest = prepare(cfg)
    docs = spec_documents(corpus)
    expected, documents = by_document(docs, VAL_FRACTION)
    assert documents["val"] >= 10 and documents["train"] >= 10
    assert_data_set(cfg.data_dir, manifest, expected, documents)
    err = " ".join(capsys.readouterr().err.split())
    assert "3 of 130 rows of" in err and "had no 'text' field (or a null one)" in err
    assert "20_bom.txt:" in err and "replaced with U+FFFD" in err
    assert f"{BIG}: 3 undecodable bytes" in err


@pytest.mark.parametrize(
    "part_bytes,segment_bytes",
    [(PART_BYTES, SEGMENT_BYTES), (7_000, 5_000)],
    ids=["cut", "cut-finer"],
)
def test_split_by_text_equals_the_spec(corpus, tmp_path, part_bytes, segment_bytes):
    cfg = files_config(
        tmp_path,
        corpus,
        "data.split_by=text",
        f"data.part_bytes={part_bytes}",
        f"data.segment_bytes={segment_bytes}",
    )
    manifest = prepare(cfg)
    expected, documents = by_text(spec_documents(corpus), VAL_FRACTION)
    assert_data_set(cfg.data_dir, manifest, expected, documents)


@pytest.mark.parametrize("n", [3, 4, 5, 40, 10_000])
def test_max_documents_takes_exactly_the_first_documents(corpus, tmp_path, n):
    """3: the big single-line file, cut over several parts, is the last document taken;
    4: the next one starts a new part; 40: the limit falls inside the jsonl."""
    docs = spec_documents(corpus)
    cfg = files_config(tmp_path, corpus, f"data.source.max_documents={n}", "data.val_fraction=0.5")
    manifest = prepare(cfg)
    expected, documents = by_document(docs[:n], 0.5)
    if n >= 3:
        assert docs[2] == (corpus / BIG).read_bytes().decode("utf-8-sig", errors="replace")
    assert_data_set(cfg.data_dir, manifest, expected, documents)


@pytest.mark.parametrize("n", [1, 2, 3, 40])
def test_max_documents_with_split_by_text(corpus, tmp_path, n):
    docs = spec_documents(corpus)
    cfg = files_config(tmp_path, corpus, f"data.source.max_documents={n}", "data.split_by=text")
    manifest = prepare(cfg)
    expected, documents = by_text(docs[:n], VAL_FRACTION)
    assert_data_set(cfg.data_dir, manifest, expected, documents)


def boundary_fraction(total: int, char: int) -> float:
    """A val_fraction whose cut, int((1 - it) * total), is `char`."""
    vf = 1 - (char + 0.5) / total
    assert int((1 - vf) * total) == char
    return vf


def corpus_offsets(corpus: Path, tmp_path) -> dict[str, int]:
    """Characters in the corpus where the text cut is worth aiming: a document boundary
    (after the big file), the start of the big file's second part, the end of one of its
    segments inside a part, and the middle of a jsonl row."""
    docs = spec_documents(corpus)
    starts = np.cumsum([0, *map(len, docs)]).tolist()
    cfg = files_config(tmp_path, corpus)
    found = parts.plan(cfg.data.source, 0, tmp_path, PART_BYTES, SEGMENT_BYTES)
    big = [p for p in found if p.items[0]["path"].endswith(BIG)]
    # Aiming only: the spec's documents give the characters, the plan says where cuts are.
    first = [len(s.text) for s in parts.read(big[0], cfg.data.source, SEGMENT_BYTES, parts.Notes())]
    assert len(first) >= 3
    return {
        "document-boundary": starts[3],
        "part-boundary": starts[2] + sum(first),
        "segment-boundary": starts[2] + first[0] + first[1],
        "inside-a-row": starts[10] + 7,
    }


@pytest.mark.parametrize(
    "where", ["document-boundary", "part-boundary", "segment-boundary", "inside-a-row"]
)
def test_split_by_text_cut_at_a_boundary(corpus, tmp_path, where):
    docs = spec_documents(corpus)
    vf = boundary_fraction(sum(map(len, docs)), corpus_offsets(corpus, tmp_path)[where])
    cfg = files_config(
        tmp_path, corpus, "data.split_by=text", f"data.val_fraction={vf!r}", name="t"
    )
    manifest = prepare(cfg)
    expected, documents = by_text(docs, vf)
    assert_data_set(cfg.data_dir, manifest, expected, documents)


# ----------------------------------------------------------------------------- hf


def hf_directory(directory: Path) -> list:
    """A local dataset directory of 3 parquet files (the train split); their rows in order."""
    directory.mkdir(parents=True)
    rows = []
    for k in range(3):
        texts = [text_of(700 + 10 * k + i, 40 + 15 * i) for i in range(6)]
        if k == 1:
            texts[2] = None
        pq.write_table(pa.table({"text": texts}), directory / f"train-{k:05d}-of-00003.parquet")
        rows += texts
    return [t for t in rows if t]


@pytest.mark.parametrize("split_by,limit", [("document", None), ("text", None), ("text", 9)])
def test_hf_dataset_shards_are_parts_and_give_its_rows_in_order(tmp_path, split_by, limit):
    """3 parquet files: 3 shards, so 3 parts; the 9th row with text is in the second file."""
    docs = hf_directory(tmp_path / "ds")[:limit]
    cfg = config(
        tmp_path,
        "data.source.kind=hf",
        f"data.source.path={tmp_path / 'ds'}",
        "data.source.split=train",
        f"data.split_by={split_by}",
        "data.val_fraction=0.4",
        "data.shard_tokens=300",
        "data.part_bytes=1000",
        f"data.source.max_documents={limit or 'null'}",
    )
    found = parts.plan(cfg.data.source, 0, tmp_path, 1000, SEGMENT_BYTES)
    assert [(p.kind, p.items) for p in found] == [("hf", [{"shard": k, "of": 3}]) for k in range(3)]
    manifest = prepare(cfg)
    expected, documents = (by_text if split_by == "text" else by_document)(docs, 0.4)
    for split in ("train", "val"):
        got = np.concatenate(read_split(cfg.data_dir, split)).tolist()
        assert got == expected[split]
    assert manifest.documents == documents


# ----------------------------------------------------------------------------- workers, machines


def launch_env(**extra: str) -> dict:
    """As tests/test_launch.py runs launch/multinode.sh: this venv's accelerate, CPU only."""
    e = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
        "ACCELERATE": str(BIN / "accelerate"),
        "PYTHON": sys.executable,
        **extra,
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            e.pop(key, None)
    return e


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, deadline: float) -> str:
    """Its output once it exits; past the deadline its whole process group is killed."""
    try:
        return proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{proc.args[:3]} did not finish in time:\n{proc.communicate()[0]}")


def data_set_bytes(data_dir: Path) -> dict[str, bytes]:
    """Every file of a data set but the hidden ones (.lock, .verified.json)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(data_dir.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.mark.slow
def test_bytes_are_the_same_for_any_number_of_workers_and_machines(corpus, tmp_path, free_port):
    cfg = files_config(tmp_path, corpus, name="mixed")
    config_file = tmp_path / "mixed.yaml"
    save_config(cfg, config_file)
    deadline = time.monotonic() + 240
    runs = {}
    for workers in (1, 2, 3):
        runs[f"{workers}-workers"] = start(
            [
                sys.executable,
                "-m",
                "pipeline.prepare",
                "--config",
                str(config_file),
                f"data.root={tmp_path / f'w{workers}'}",
                f"data.num_workers={workers}",
            ],
            launch_env(),
        )
    # The other layout and a document limit, on 3 workers too (checked against the spec).
    for name, extra in [("text", "data.split_by=text"), ("limit", "data.source.max_documents=40")]:
        runs[f"{name}-3-workers"] = start(
            [
                sys.executable,
                "-m",
                "pipeline.prepare",
                "--config",
                str(config_file),
                f"data.root={tmp_path / name}",
                "data.num_workers=3",
                extra,
            ],
            launch_env(),
        )
    port = str(free_port())
    for rank in (0, 1):
        runs[f"machine-{rank}"] = start(
            [
                str(ROOT / "launch" / "multinode.sh"),
                str(config_file),
                f"data.root={tmp_path / 'machines'}",
                "data.num_workers=2",
            ],
            launch_env(
                STAGE="prepare",
                NUM_NODES="2",
                NODE_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
    logs = {name: finish(proc, deadline) for name, proc in runs.items()}
    codes = {name: proc.returncode for name, proc in runs.items()}
    assert set(codes.values()) == {0}, "\n\n".join(
        f"== {n}: {codes[n]}\n{log[-3000:]}" for n, log in logs.items()
    )
    for rank in (0, 1):
        assert re.search(
            rf"prepare \(machine {rank} of 2\): built [1-9]\d* parts", logs[f"machine-{rank}"]
        ), logs[f"machine-{rank}"][-3000:]
    assert "prepared " in logs["machine-0"] and "prepared " not in logs["machine-1"]

    reference = data_set_bytes(tmp_path / "w1" / "mixed")
    assert "manifest.json" in reference and len(reference) >= 5
    for name, root in [("2-workers", "w2"), ("3-workers", "w3"), ("machines", "machines")]:
        other = data_set_bytes(tmp_path / root / "mixed")
        assert sorted(other) == sorted(reference), name
        assert [f for f in reference if other[f] != reference[f]] == [], name
    docs = spec_documents(corpus)
    for root, (expected, documents) in [
        ("w1", by_document(docs, VAL_FRACTION)),
        ("text", by_text(docs, VAL_FRACTION)),
        ("limit", by_document(docs[:40], VAL_FRACTION)),
    ]:
        data_dir = tmp_path / root / "mixed"
        assert_data_set(data_dir, load_manifest(data_dir), expected, documents)
