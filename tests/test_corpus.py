"""Every source kind yields the documents it names, in a fixed order, and bad input is
reported (undecodable bytes) or refused (no files, no text) with a message saying what to do."""
import functools
import http.server
import json
import sysconfig
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.corpus import CorpusError, decode, describe, documents, stdlib_files


def read(source: SourceConfig, tmp_path: Path, warnings: list | None = None) -> list[str]:
    sink = warnings.append if warnings is not None else print
    return list(documents(source, tmp_path / "download", warn=sink))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_txt_files_directory_and_glob_are_sorted_one_document_per_file(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "a.txt").write_text("ay")
    (tmp_path / "d" / "sub" / "c.txt").write_text("sea")
    (tmp_path / "d" / "notes.md").write_text("not read: directories take known extensions")
    (tmp_path / "d" / "empty.txt").write_text("")
    (tmp_path / "single").write_text("named explicitly, so read whatever its extension")
    src = SourceConfig(kind="files", paths=[str(tmp_path / "d"), str(tmp_path / "single")])
    assert read(src, tmp_path) == ["ay", "bee", "sea", "named explicitly, so read whatever its extension"]
    glob_src = SourceConfig(kind="files", paths=[str(tmp_path / "d" / "**" / "*.txt")])
    assert read(glob_src, tmp_path) == ["ay", "bee", "sea"]
    limited = SourceConfig(kind="files", paths=[str(tmp_path / "d")], max_documents=2)
    assert read(limited, tmp_path) == ["ay", "bee"]


def test_jsonl_and_parquet_stream_through_datasets_in_order(tmp_path):
    write_jsonl(tmp_path / "1.jsonl", [{"body": "one", "id": 1}, {"body": "two", "id": 2}])
    pq.write_table(pa.table({"body": ["three", "", "four"]}), tmp_path / "2.parquet")
    write_jsonl(tmp_path / "3.jsonl", [{"body": "five"}])
    (tmp_path / "4.txt").write_text("six")
    src = SourceConfig(kind="files", paths=[str(tmp_path)], text_field="body")
    assert read(src, tmp_path) == ["one", "two", "three", "four", "five", "six"]
    src.max_documents = 3
    assert read(src, tmp_path) == ["one", "two", "three"]


def test_hf_kind_streams_a_dataset_directory_offline(tmp_path):
    # The Hub is unreachable here; a local dataset directory goes through the same call,
    # datasets.load_dataset(path, name, split=..., streaming=True).
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(5)]}), tmp_path / "ds" / "train.parquet")
    src = SourceConfig(kind="hf", path=str(tmp_path / "ds"), split="train", max_documents=4)
    assert read(src, tmp_path) == ["row 0", "row 1", "row 2", "row 3"]


def test_missing_text_field_names_the_columns(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"content": "hi"}])
    src = SourceConfig(kind="files", paths=[str(tmp_path / "x.jsonl")])
    with pytest.raises(CorpusError, match=r"no column 'text' \(its columns: content\).*text_field"):
        read(src, tmp_path)


def test_no_matching_files_names_the_pattern(tmp_path):
    src = SourceConfig(kind="files", paths=[str(tmp_path / "nothing*.txt")])
    with pytest.raises(CorpusError, match=r"nothing\*\.txt' matches no file"):
        read(src, tmp_path)
    (tmp_path / "only.md").write_text("x")
    with pytest.raises(CorpusError, match="matches no file"):
        read(SourceConfig(kind="files", paths=[str(tmp_path)]), tmp_path)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    write_jsonl(tmp_path / "b.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(CorpusError, match="the corpus is empty"):
        read(SourceConfig(kind="files", paths=[str(tmp_path)]), tmp_path)


def test_undecodable_bytes_are_replaced_and_reported_per_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine ünïcode")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe!")
    warnings = []
    docs = read(SourceConfig(kind="files", paths=[str(tmp_path)]), tmp_path, warnings)
    assert docs == ["caf\ufffd and \ufffd\ufffd!", "fine ünïcode"]
    assert len(warnings) == 1
    assert "bad.txt" in warnings[0] and "3 undecodable bytes" in warnings[0]


def test_decode_counts_every_invalid_byte():
    assert decode(b"ok") == ("ok", 0)
    assert decode("é".encode("utf-8")[:1] + b"x") == ("\ufffdx", 1)
    assert decode(b"\x80\x80\x80") == ("\ufffd\ufffd\ufffd", 3)


def test_stdlib_is_sorted_capped_and_skips_site_packages(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(200_000)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    sizes = sum(f.stat().st_size for f in files)
    assert 0 < sizes <= 200_000
    everything = stdlib_files()
    assert not any("site-packages" in f.parts for f in everything)
    assert [f.relative_to(root).as_posix() for f in everything][:len(files)] == rel
    # The next file would have crossed the cap.
    assert sizes + everything[len(files)].stat().st_size > 200_000
    docs = read(SourceConfig(kind="python-stdlib", max_bytes=200_000), tmp_path)
    assert docs == [f.read_text(encoding="utf-8") for f in files if f.stat().st_size]
    assert describe(SourceConfig(max_bytes=5))["python"].count(".") == 2


def test_stdlib_cap_below_the_first_file_says_what_to_raise(tmp_path):
    with pytest.raises(CorpusError, match="max_bytes=1 is smaller"):
        read(SourceConfig(kind="python-stdlib", max_bytes=1), tmp_path)


def test_url_file_scheme_is_downloaded_once(tmp_path):
    book = tmp_path / "the-verdict.txt"
    book.write_text("I HAD always thought Jack Gisburn rather a cheap genius")
    src = SourceConfig(kind="url", url=book.as_uri())
    assert read(src, tmp_path) == [book.read_text()]
    saved = list((tmp_path / "download").iterdir())
    assert len(saved) == 1 and saved[0].name.endswith("-the-verdict.txt")
    book.unlink()  # the second read uses the download, not the URL
    assert read(src, tmp_path) == ["I HAD always thought Jack Gisburn rather a cheap genius"]


def test_url_over_http(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "t.txt").write_text("served over http")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/t.txt"
        assert read(SourceConfig(kind="url", url=url), tmp_path) == ["served over http"]
        with pytest.raises(CorpusError, match="could not download.*missing.txt"):
            read(SourceConfig(kind="url", url=url.replace("t.txt", "missing.txt")), tmp_path)
    finally:
        server.shutdown()
        server.server_close()
