"""Project Gutenberg's books as documents (`data.source.clean: gutenberg`): where a book's
text begins and ends inside its file, and whether the file is English text.

Every Gutenberg `.txt` carries a licence header that ends in a line
`*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***` (older files: `***START OF`, `THIS
PROJECT GUTENBERG`) and a footer that begins with `*** END OF ...`. The book is the bytes
between the end of the START line and the beginning of the END line, taken as they are
(line endings and blank lines untouched). The bonus chapter this grows from
(LLMs-from-scratch ch05/03_bonus_pretraining_on_gutenberg, prepare_dataset.py) cuts with
the `strip_headers` of pgcorpus/gutenberg, which starts from the same two markers and
also knows about 80 older credit and licence lines ("Produced by ...", "*END*THE SMALL
PRINT"); those are not recognized here, and it collapses runs of blank lines, which this
does not do either (no byte of the book is changed).

- A file without a START line is read from its beginning, one without an END line to its
  end (as strip_headers does): such files are kept, and counted apart in the report, so a
  folder of other texts is noticed rather than silently cut.
- English: the bonus's test, on the whole file as read: more than 90% of its characters
  ASCII. Counted on the bytes: a character is a byte that is not a UTF-8 continuation
  byte (0x80-0xBF), so no file is read into memory whole.

The result is a byte range, so the rest of prepare (parts, segments, split hashes) reads
a book as it reads any file. Knows nothing of tokens or parts.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from pathlib import Path

START = re.compile(rb"^[ \t]*\*\*\* ?START OF .*$", re.MULTILINE)
END = re.compile(rb"^[ \t]*\*\*\* ?END OF ", re.MULTILINE)
ENGLISH_ASCII_SHARE = 0.9  # the bonus's is_english threshold (strictly more than this)

_NOT_ASCII = bytes(range(0x80, 0x100))
_CONTINUATION = bytes(range(0x80, 0xC0))
_BLOCK = 1 << 24


@dataclass(frozen=True)
class Book:
    """What one file holds: the book's bytes [start, stop), and what was found."""

    start: int
    stop: int
    ascii_share: float  # of the whole file's characters
    has_start: bool
    has_end: bool

    @property
    def english(self) -> bool:
        return self.ascii_share > ENGLISH_ASCII_SHARE

    @property
    def marked(self) -> bool:
        return self.has_start and self.has_end


def read_book(path: Path) -> Book:
    """Where the book in `path` begins and ends, and its share of ASCII characters."""
    size = path.stat().st_size
    if size == 0:
        return Book(0, 0, 1.0, False, False)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start_line = START.search(data)
        start = _after_line(data, start_line.end()) if start_line else 0
        end_line = END.search(data, start)
        stop = end_line.start() if end_line else size
        return Book(start, stop, _ascii_share(data), start_line is not None, end_line is not None)


def _after_line(data, at: int) -> int:
    """The offset after the line break that ends the line ending at `at`."""
    if data[at : at + 2] == b"\r\n":
        return at + 2
    return at + 1 if data[at : at + 1] in (b"\n", b"\r") else at


def _ascii_share(data) -> float:
    ascii_bytes = characters = 0
    for offset in range(0, len(data), _BLOCK):
        block = data[offset : offset + _BLOCK]
        ascii_bytes += len(block.translate(None, _NOT_ASCII))
        characters += len(block.translate(None, _CONTINUATION))
    return ascii_bytes / characters if characters else 1.0
