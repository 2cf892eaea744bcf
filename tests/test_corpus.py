"""Every source kind yields the documents it names, in a fixed order, and bad input is
reported (undecodable bytes) or refused (no files, no text) with a message saying what to do."""

import functools
import hashlib
import http.server
import json
import re
import sysconfig
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, SourceConfig, load_config
from pipeline.data.corpus import CorpusError, decode, describe, stdlib_files
from pipeline.data.parts import documents


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
    assert read(src, tmp_path) == [
        "ay",
        "bee",
        "sea",
        "named explicitly, so read whatever its extension",
    ]
    glob_src = SourceConfig(kind="files", paths=[str(tmp_path / "d" / "**" / "*.txt")])
    assert read(glob_src, tmp_path) == ["ay", "bee", "sea"]
    limited = SourceConfig(kind="files", paths=[str(tmp_path / "d")], max_documents=2)
    assert read(limited, tmp_path) == ["ay", "bee"]


def test_a_symlink_loop_under_a_glob_reads_each_file_once(tmp_path):
    from pipeline.data.corpus import resolve_files

    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("one book")
    (tmp_path / "books" / "again").symlink_to(tmp_path / "books")  # books/again/again/...
    for pattern in (f"{tmp_path}/books/**/*.txt", f"{tmp_path}/books"):
        assert resolve_files([pattern, f"{tmp_path}/books/a.txt"]) == [tmp_path / "books" / "a.txt"]


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
    pq.write_table(
        pa.table({"text": [f"row {i}" for i in range(5)]}), tmp_path / "ds" / "train.parquet"
    )
    src = SourceConfig(kind="hf", path=str(tmp_path / "ds"), split="train", max_documents=4)
    assert read(src, tmp_path) == ["row 0", "row 1", "row 2", "row 3"]


def test_missing_text_field_names_the_columns(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"content": "hi"}])
    src = SourceConfig(kind="files", paths=[str(tmp_path / "x.jsonl")])
    with pytest.raises(
        CorpusError,
        match=r"has a 'text' field \(the fields the rows have: "
        r"content\).*text_field",
    ):
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
    assert [f.relative_to(root).as_posix() for f in everything][: len(files)] == rel
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


# ----------------------------------------------------------------------------- rows without text


def test_rows_without_text_are_skipped_and_counted_in_one_warning_per_source(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl",
        [{"text": "one"}, {"body": "no text field"}, {"text": None}, {"text": 7}, {"text": "two"}],
    )
    (tmp_path / "b.txt").write_text("three")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "four", "id": 1}, {"id": 2}])
    src = SourceConfig(kind="files", paths=[str(tmp_path)])
    warnings = []
    assert read(src, tmp_path, warnings) == ["one", "two", "three", "four"]
    assert len(warnings) == 1  # one for the whole source, not one per file or row
    where = f"{tmp_path / 'a.jsonl'}, {tmp_path / 'c.jsonl'}"
    assert warnings[0] == (
        f"3 of 7 rows of {where} had no 'text' field (or a null one); "
        f"1 of 7 rows of {where} held int, not text, in 'text'; they were skipped"
    )
    # Stopped early by max_documents: the rows skipped until then are still reported.
    warnings.clear()
    src.max_documents = 2
    assert read(src, tmp_path, warnings) == ["one", "two"]
    assert warnings == [
        f"2 of 5 rows of {tmp_path / 'a.jsonl'} had no 'text' field (or a null "
        f"one); 1 of 5 rows of {tmp_path / 'a.jsonl'} held int, not text, in "
        f"'text'; they were skipped"
    ]


def test_no_row_with_text_is_an_error_naming_the_fields_the_rows_have(tmp_path):
    # The column exists (one row holds null), but no row has text in it.
    write_jsonl(tmp_path / "x.jsonl", [{"body": "a", "id": 1}, {"text": None, "body": "b"}])
    warnings = []
    src = SourceConfig(kind="files", paths=[str(tmp_path / "x.jsonl")])
    with pytest.raises(
        CorpusError,
        match=r"no row of .*x\.jsonl \(2 rows\) has a 'text' field "
        r"\(the fields the rows have: body, id\); set "
        r"data\.source\.text_field",
    ):
        read(src, tmp_path, warnings)
    assert warnings == []
    write_jsonl(tmp_path / "x.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(
        CorpusError,
        match=r"no row of .*x\.jsonl \(2 rows\) has text in 'text': "
        r"it holds int where it is not null",
    ):
        read(src, tmp_path, warnings)


def test_parquet_rows_with_null_text_are_counted(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, None, "b"]}), tmp_path / "t.parquet")
    warnings = []
    assert read(SourceConfig(kind="files", paths=[str(tmp_path)]), tmp_path, warnings) == ["a", "b"]
    assert warnings == [
        f"2 of 4 rows of {tmp_path / 't.parquet'} had no 'text' field "
        f"(or a null one); they were skipped"
    ]


# ----------------------------------------------------------------------------- hf revision


def test_hf_revision_reaches_load_dataset_and_the_fingerprint(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return [{"text": "pinned"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = SourceConfig(kind="hf", path="org/ds", revision="v1.2")
    assert read(src, tmp_path) == ["pinned"]
    assert calls and all(  # the plan opens it, then the reader of its one part
        c == ("org/ds", None, {"split": "train", "streaming": True, "revision": "v1.2"})
        for c in calls
    )
    assert describe(src)["revision"] == "v1.2"
    # Unpinned, the description is the one data sets were prepared with before the key.
    assert "revision" not in describe(SourceConfig(kind="hf", path="org/ds"))


# ----------------------------------------------------------------------------- url checks


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_url_describe_has_sha256_but_not_the_download_limit():
    url = "https://example.org/book.txt"
    assert describe(SourceConfig(kind="url", url=url)) == {"kind": "url", "url": url}
    pinned = describe(SourceConfig(kind="url", url=url, sha256="AB" * 32))
    assert pinned == {"kind": "url", "url": url, "sha256": "ab" * 32}
    assert (
        describe(SourceConfig(kind="url", url=url, sha256="ab" * 32, max_download_bytes=None))
        == pinned
    )


def test_url_download_is_checked_against_sha256(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(b"the right text")
    src = SourceConfig(kind="url", url=book.as_uri(), sha256=sha(b"the right text"))
    assert read(src, tmp_path) == ["the right text"]
    (cached,) = (tmp_path / "download").iterdir()

    # A damaged cached copy is noticed and downloaded again.
    cached.write_bytes(b"the right texT")
    warnings = []
    assert read(src, tmp_path, warnings) == ["the right text"]
    assert len(warnings) == 1 and f"has sha256 {sha(b'the right texT')}" in warnings[0]
    assert "downloading it again" in warnings[0]

    # The file at the URL changed: the new download is refused and deleted, and the copy
    # cached before stays as it was.
    book.write_bytes(b"another text")
    src.sha256 = sha(b"what we expect")
    cached.write_bytes(b"the old copy")
    with pytest.raises(CorpusError) as err:
        read(src, tmp_path, [])
    message = str(err.value)
    assert f"has sha256 {sha(b'another text')}" in message
    assert f"data.source.sha256 expects {sha(b'what we expect')}" in message
    assert list((tmp_path / "download").iterdir()) == [cached]
    assert cached.read_bytes() == b"the old copy"

    # Offline (the URL is gone) with a cached copy that does not match: refused.
    book.unlink()
    with pytest.raises(
        CorpusError,
        match=r"could not download .*; the cached .* has sha256 " + sha(b"the old copy"),
    ):
        read(src, tmp_path, [])
    assert cached.read_bytes() == b"the old copy"


def test_url_wrong_sha256_leaves_nothing(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(b"some text")
    src = SourceConfig(kind="url", url=book.as_uri(), sha256="0" * 64)
    with pytest.raises(
        CorpusError,
        match=f"has sha256 {sha(b'some text')}, but data.source.sha256 expects {'0' * 64}",
    ):
        read(src, tmp_path)
    assert list((tmp_path / "download").iterdir()) == []


def test_url_larger_than_its_announced_limit_is_refused(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes(b"x" * 100)
    src = SourceConfig(kind="url", url=book.as_uri(), max_download_bytes=99)
    with pytest.raises(
        CorpusError,
        match=r"larger than data\.source\.max_download_bytes "
        r"\(99 bytes\); the download was stopped and deleted",
    ):
        read(src, tmp_path)
    # Refused on the announced length, before the download directory is even made.
    assert not (tmp_path / "download").exists()
    src.max_download_bytes = 100
    assert read(src, tmp_path) == ["x" * 100]


class Endless(http.server.BaseHTTPRequestHandler):
    """Sends 3 MiB of text without a Content-Length, as a stream that never says its size."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(48):
                self.wfile.write(b"y" * 65536)
        except OSError:  # the client stopped reading
            pass

    def log_message(self, *args):
        pass


def test_url_stream_past_the_limit_is_stopped_and_its_temporary_file_deleted(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/stream.txt"
        src = SourceConfig(kind="url", url=url, max_download_bytes=1_500_000)
        with pytest.raises(CorpusError, match=r"max_download_bytes \(1,500,000 bytes\)"):
            read(src, tmp_path)
        assert list((tmp_path / "download").iterdir()) == []
        src.max_download_bytes = None
        assert read(src, tmp_path) == ["y" * 48 * 65536]
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.source.kind=url", "data.source.url=http://x", "data.source.sha256=abc"],
            "data.source.sha256='abc' is not allowed: it must be 64 hexadecimal digits",
        ),
        (
            ["data.source.kind=url", "data.source.url=http://x", "data.source.sha256=" + "g" * 64],
            "data.source.sha256='ggg",
        ),
        (
            [
                "data.source.kind=url",
                "data.source.url=http://x",
                "data.source.max_download_bytes=0",
            ],
            "data.source.max_download_bytes=0 is not allowed: it must be a positive number of bytes",
        ),
        (
            ["data.source.kind=hf", "data.source.path=a/b", "data.source.revision=' '"],
            "data.source.revision=' ' is not allowed: it must be a branch, tag or commit",
        ),
        (
            ["data.source.kind=hf", "data.source.path=a/b", "data.source.sha256=" + "a" * 64],
            "data.source.sha256 does not apply to kind 'hf'",
        ),
        (
            ["data.source.kind=url", "data.source.url=http://x", "data.source.revision=main"],
            "data.source.revision does not apply to kind 'url'",
        ),
    ],
)
def test_new_source_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_new_source_keys_accept_good_values():
    config = load_config(
        None,
        [
            "data.source.kind=url",
            "data.source.url=http://x",
            "data.source.sha256=" + "aB" * 32,
            "data.source.max_download_bytes=null",
        ],
    )
    assert config.data.source.max_download_bytes is None
    assert (
        load_config(
            None,
            [
                "data.source.kind=hf",
                "data.source.path=a/b",
                "data.source.revision=refs/convert/parquet",
            ],
        ).data.source.revision
        == "refs/convert/parquet"
    )
