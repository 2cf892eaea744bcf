"""data.source.clean: gutenberg (configs/gutenberg.yaml): the prepared tokens of a folder of
Project Gutenberg-style files are exactly the books between the START and END lines; a
file that is not English text is dropped and named, one without markers is kept whole and
named."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.core.schema import ConfigError
from pipeline.data import gutenberg
from pipeline.data.tokenizer import EOT_ID, get_tokenizer
from pipeline.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "The Project Gutenberg eBook of {title}\n\nThis ebook is for the use of anyone anywhere "
    "in the United States and most other parts of the world at no cost.\n\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK {title} ***\n"
)
FOOTER = (
    "*** END OF THE PROJECT GUTENBERG EBOOK {title} ***\n\n"
    "Updated editions will replace the previous one--the old editions will be renamed.\n"
)


def book(title: str, body: str, newline: str = "\n") -> bytes:
    text = HEADER.format(title=title) + body + FOOTER.format(title=title)
    return text.replace("\n", newline).encode("utf-8")


def write_books(folder: Path) -> dict[str, str]:
    """Gutenberg-style files; returns the text each kept file should give."""
    folder.mkdir()
    sentence = "It was a dark and stormy night; the rain fell in torrents, café and all.\n"
    long_body = "\n\n".join(f"Chapter {i}\n\n" + sentence * 40 for i in range(8))  # ~24 KB
    short_body = "\nI had always thought Jack Gisburn rather a cheap genius.\n\n"
    crlf_body = "Call me Ishmael.\nSome years ago\n\n".replace("\n", "\r\n")
    (folder / "pg1.txt").write_bytes(book("A LONG BOOK", long_body))
    (folder / "pg2.txt").write_bytes(book("THE VERDICT", short_body))
    (folder / "pg3.txt").write_bytes(
        book("MOBY DICK", "Call me Ishmael.\nSome years ago\n\n", "\r\n")
    )
    russian = "Все счастливые семьи похожи друг на друга.\n" * 20
    (folder / "pg4.txt").write_bytes(book("ANNA KARENINA", russian))
    plain = "A text that is not from Project Gutenberg at all.\n"
    (folder / "notes.txt").write_text(plain)
    return {"pg1": long_body, "pg2": short_body, "pg3": crlf_body, "notes": plain}


def documents(data_dir: Path) -> list[str]:
    """Every document of both splits, decoded from the shards (each follows an EOT)."""
    docs = []
    for path in sorted(data_dir.glob("*_*.bin")):
        tokens = np.fromfile(path, dtype="<u2", offset=256 * 4).tolist()
        starts = [i for i, t in enumerate(tokens) if t == EOT_ID] + [len(tokens)]
        docs += [get_tokenizer().decode(tokens[a + 1 : b]) for a, b in zip(starts, starts[1:])]
    return docs


def test_prepare_keeps_exactly_the_books_and_names_what_it_dropped(tmp_path, capsys):
    want = write_books(tmp_path / "gutenberg")
    config = load_config(
        ROOT / "configs" / "gutenberg.yaml",
        [
            f"data.root={tmp_path / 'data'}",
            f"data.source.paths=[{tmp_path / 'gutenberg'}]",
            "data.num_workers=1",
            "data.part_bytes=5000",  # the long book is cut into byte ranges
            "data.segment_bytes=4096",  # and read in segments
            "model.context_length=8",
        ],
    )
    prepare(config)
    assert sorted(documents(config.data_dir)) == sorted(want.values())
    err = capsys.readouterr().err
    assert "dropped 1 of 5 files" in err and "pg4.txt" in err
    assert "1 of 5 files lack Project Gutenberg's" in err and "notes.txt" in err


def test_the_book_is_the_bytes_between_the_marker_lines(tmp_path):
    path = tmp_path / "pg.txt"
    path.write_bytes(book("X", "body\n", "\r\n"))
    found = gutenberg.read_book(path)
    assert path.read_bytes()[found.start : found.stop] == b"body\r\n"
    assert found.marked and found.english


def test_english_is_more_than_90_percent_ascii_characters(tmp_path):
    path = tmp_path / "pg.txt"
    path.write_text("a" * 90 + "é" * 10)  # 90%: the bonus's test is strictly more
    assert not gutenberg.read_book(path).english
    path.write_text("a" * 91 + "é" * 9)
    assert gutenberg.read_book(path).english


def test_clean_accepts_gutenberg_for_files_only():
    with pytest.raises(ConfigError, match="data.source.clean"):
        load_config(
            None, ["data.source.kind=files", "data.source.paths=[x]", "data.source.clean=html"]
        )
    with pytest.raises(ConfigError, match="does not apply to kind 'python-stdlib'"):
        load_config(None, ["data.source.clean=gutenberg"])
