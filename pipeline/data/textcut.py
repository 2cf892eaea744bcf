"""Where a document's bytes may be cut so that its parts tokenize to the whole's tokens.

Owns the cut rules and the search for cuts in a byte buffer; must not know about files,
shards, or token ids. The prepare stage reads a huge document (a 200 MB single line) in
blocks and tokenizes each segment apart; at a safe cut i, for any bytes around it,

    encode(decode(data)) == encode(decode(data[:i])) + encode(decode(data[i:]))

with decode = UTF-8 with errors replaced, encode = GPT-2's `encode_ordinary`.

How we know. tiktoken splits text into pieces with the pre-tokenizer regex below (scanning
left to right, first alternative that matches wins) and merges BPE inside a piece only, so
equal pieces give equal tokens. A cut of text T into L + R keeps the pieces when
  1. T's pieces have a boundary at the cut: then R's pieces are T's from there on, as the
     pattern never looks behind where a match starts; and
  2. L alone splits as T does: the pattern sees L and T alike except at L's end, where a
     class run (`\\p{L}++` ...) stops and a contraction fails in both, but `\\s++$` and
     `\\s+(?!\\S)` can take a whitespace run reaching L's end that they leave in T. So L
     must end in non-whitespace, or in a run that both split into the same piece.
ASCII letters are \\p{L}, digits \\p{N}, and the rest of 0x21-0x7E ("punctuation" here) is
neither and not \\s. With x, y such printable non-space bytes, the rules:
  (a) "x| ": no piece holds a space after its first character, so x ends a piece (1);
      L ends in x (2). Whatever follows the space: R's pieces are T's by (1).
  (b) "x\\n|y": the "\\n" starts a piece; in T, `\\s++$` and `\\s+(?!\\S)` fail there (y
      follows) and `\\s` takes "\\n" alone (1); in L, `\\s++$` takes the same "\\n" (2).
      Not so for " \\n|y" or "\\n\\n|y": L's `\\s++$` would take the run as one piece.
  (c) "x|y" of different classes (letter, digit, punctuation), x not "'": a ` ?class++`
      piece holds one class, so only a contraction ("'" + letters) could span the cut,
      and it spans only "'|s"-like cuts (x is "'") or "l|l"-like ones (one class) (1);
      L ends in x (2).
Bytes: both neighbours of every cut are ASCII, and an ASCII byte is a whole UTF-8 character
and never part of an invalid sequence (those are bytes >= 0x80), so L and R decode, even
with errors replaced, to the whole's text split at the same character. Other bytes (non-
ASCII, tabs, control bytes) never border a cut; text with none of the patterns above (a
block of Chinese, say) has no cut, and the caller must take a longer segment.
Each rule reads bytes i-2 .. i only, and never across another cut (a cut's right
neighbour is a space or printable, never the "\\n" rule (b) needs), so all cuts found in a
buffer are safe together, and a cut found in a block is one in the file around it.
tests/test_textcut.py checks all of this against tiktoken, and that excluded cuts fail.

Speed (best of several runs, on a 2-core machine shared with other work): the last cut of a
1 MiB block of English or code ~0.05 ms (it looks back in growing windows), the first cut
after an offset ~0.005 ms. A range with no cut costs a full scan: ~10 ms per MiB of
non-ASCII text or whitespace, ~110-180 ms per MiB of one long run of ASCII letters or
digits (which GPT-2 makes one piece, so no cut exists there). Listing every cut of 1 MiB
of English with `safe_cuts` ~180-220 ms.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

Buffer = bytes | bytearray | memoryview

# GPT-2's pre-tokenizer as tiktoken spells it (`get_tokenizer()._pat_str`); the rules are
# argued for this pattern, and the tests check that tiktoken still uses it.
PRETOKENIZER_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
    r"""|\s++$|\s+(?!\S)|\s"""
)

# Each match ends at a cut: it consumes the byte left of the cut (and the "\n" for rule
# (b)), which a leading class lets re skip to fast; the cuts' matches never overlap (see
# above), so finditer yields every cut.
_PUNCT = rb"!-/:-@\[-`{-~"  # ASCII punctuation: 0x21-0x7E less letters, digits
_PUNCT_NOT_APOS = rb"!-&(-/:-@\[-`{-~"  # the same without "'" (0x27)
_CUT = re.compile(
    rb"[!-~](?:"
    rb"(?= )"  # (a) "x| "
    rb"|\n(?=[!-~])"  # (b) x\n|y
    rb"|(?<=[A-Za-z])(?=[0-9" + _PUNCT + rb"])"  # (c) letter|digit or punctuation
    rb"|(?<=[0-9])(?=[A-Za-z" + _PUNCT + rb"])"  #     digit|letter or punctuation
    rb"|(?<=[" + _PUNCT_NOT_APOS + rb"])(?=[A-Za-z0-9]))"
)  # punctuation but '|letter, digit

_FIRST_WINDOW = 256  # last_safe_cut's first look back; English has a cut every few bytes


def safe_cuts(data: Buffer, start: int = 0, stop: int | None = None) -> Iterator[int]:
    """Every safe cut i with start <= i < stop, ascending (stop defaults to len(data)).

    Bytes outside [start, stop) are read as context, never reported as cuts."""
    start, stop = _bounds(data, start, stop)
    # A cut's match starts at most 2 bytes left of it and looks at the byte right of it,
    # so with endpos=stop every match ends before stop.
    for m in _CUT.finditer(data, max(0, start - 2), stop):
        if m.end() >= start:
            yield m.end()


def first_safe_cut(data: Buffer, start: int = 0, stop: int | None = None) -> int | None:
    """The smallest safe cut i with start <= i < stop, or None; costs the bytes it scans."""
    return next(safe_cuts(data, start, stop), None)


def last_safe_cut(data: Buffer, start: int = 0, stop: int | None = None) -> int | None:
    """The largest safe cut i with start <= i < stop, or None.

    Looks back from stop in windows growing 16-fold, so it costs about the bytes between
    the cut and stop (the whole range, once, when there is no cut)."""
    start, stop = _bounds(data, start, stop)
    width, hi = _FIRST_WINDOW, stop
    while hi > start:
        lo = max(start, hi - width)
        cut = None
        for cut in safe_cuts(data, lo, hi):
            pass
        if cut is not None:
            return cut
        width, hi = width * 16, lo
    return None


def _bounds(data: Buffer, start: int, stop: int | None) -> tuple[int, int]:
    stop = len(data) if stop is None else min(stop, len(data))
    return max(0, start), stop
