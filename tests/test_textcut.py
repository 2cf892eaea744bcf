"""Safe cuts: at every cut textcut finds, the two parts tokenize to the whole's tokens (random
texts that stress the rules, and stdlib sources), cuts the rules exclude do change tokens,
and the first/last searches find the right cut or none."""

import random
import sysconfig
from pathlib import Path

import pytest

from pipeline.data.textcut import PRETOKENIZER_PATTERN, first_safe_cut, last_safe_cut, safe_cuts
from pipeline.data.tokenizer import get_tokenizer

FRAGMENTS = [
    s.encode() if isinstance(s, str) else s
    for s in (
        "a",
        "Z",
        "hello",
        "The",
        "x",
        "7",
        "2024",
        ".",
        ",",
        "!",
        "(",
        ")",
        "-",
        '"',
        "...",
        "$",
        "#",
        "'",
        "''",
        "'s",
        "'ll",
        "'re",
        "'t",
        "'ve",
        "'S",
        " ",
        " ",
        " ",
        "  ",
        "   ",
        "\n",
        "\n",
        "\r\n",
        "\n\n",
        "\t",
        "\x0b",
        "\x0c",
        "\x1f",
        "\x7f",
        "é",
        "ж",
        "中",
        "\u00a0",
        "\u0085",
        "\u2028",
        "🙂",
        b"\xff",
        b"\x80",
        b"\xc3",
        b"\xe4\xb8",
    )
]


def encode(data: bytes) -> list[int]:
    return get_tokenizer().encode_ordinary(data.decode("utf-8", "replace"))


def assert_cut_keeps_tokens(data: bytes, cut: int) -> None:
    assert encode(data) == encode(data[:cut]) + encode(data[cut:]), (data, cut)


def assert_cuts_keep_tokens(data: bytes, cuts: list[int]) -> None:
    """Cutting at all of them at once keeps the tokens too."""
    bounds = [0, *cuts, len(data)]
    parts = [encode(data[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert encode(data) == [t for part in parts for t in part], data


def random_text(rng: random.Random, fragments: int) -> bytes:
    return b"".join(rng.choice(FRAGMENTS) for _ in range(fragments))


def rule_of(data: bytes, i: int) -> str | None:
    """The rules spelled byte by byte, independently of textcut's regex."""

    def printable(j):
        return 0 <= j < len(data) and 0x21 <= data[j] <= 0x7E

    def kind(j):
        c = chr(data[j])
        return "letter" if c.isascii() and c.isalpha() else "digit" if c.isdigit() else "punct"

    if printable(i - 1) and data[i : i + 1] == b" ":
        return "a"
    if printable(i - 2) and data[i - 1 : i] == b"\n" and printable(i):
        return "b"
    if printable(i - 1) and printable(i) and data[i - 1] != ord("'") and kind(i - 1) != kind(i):
        return "c"
    return None


def test_rules_are_argued_for_the_pattern_tiktoken_uses():
    assert get_tokenizer()._pat_str == PRETOKENIZER_PATTERN


def test_every_cut_in_random_text_keeps_the_tokens():
    rng = random.Random(0)
    fired = {"a": 0, "b": 0, "c": 0}
    for _ in range(600):
        data = random_text(rng, rng.randint(1, 60))
        cuts = list(safe_cuts(data))
        assert cuts == [i for i in range(len(data)) if rule_of(data, i)]
        for cut in cuts:
            assert_cut_keeps_tokens(data, cut)
            fired[rule_of(data, cut)] += 1
        assert_cuts_keep_tokens(data, cuts)
    assert min(fired.values()) > 100, fired  # every rule was exercised


@pytest.mark.parametrize("name", ["textwrap.py", "difflib.py", "json/decoder.py"])
def test_cuts_in_stdlib_sources_keep_the_tokens(name):
    data = (Path(sysconfig.get_paths()["stdlib"]) / name).read_bytes()
    cuts = list(safe_cuts(data))
    assert len(cuts) > len(data) // 20
    assert_cuts_keep_tokens(data, cuts)
    for cut in random.Random(name).sample(cuts, 20):
        assert_cut_keeps_tokens(data, cut)


@pytest.mark.parametrize(
    "left, right",
    [
        (b"a\n\n", b"x"),  # a whitespace run before the "\n": left alone keeps it whole
        (b"a\n", b"\n\nx"),  # between two whitespace bytes
        (b"a ", b"x"),  # after a space: " x" is one piece in the whole
        (b"it'", b"s"),  # inside a contraction
        (b"hel", b"lo"),  # inside a letter run
        (b"a1", b"23"),  # inside a digit run
        (b"a..", b"."),  # inside a punctuation run
        (b"caf\xc3", b"\xa9"),  # inside a UTF-8 character
    ],
)
def test_excluded_cuts_do_change_the_tokens(left, right):
    # The negative control: the token check above can fail, and the rules skip these.
    data = left + right
    assert encode(data) != encode(left) + encode(right)
    assert len(left) not in safe_cuts(data)


@pytest.mark.parametrize(
    "data, cuts",
    [
        (b"ab cd", [2]),
        (b"a, b", [1, 2]),
        (b"x\ny", [2]),
        (b"abc123!!def", [3, 6, 8]),
        (b"it's", [2]),
        (b"don't stop", [3, 5]),
        (b"x\r\ny x \ny x\n\ny", [4, 6, 9]),
        (b"end. ", [3, 4]),
        (b"a" * 1000, []),
        (b"x \n y\t\tz  w", [1, 8]),
        (b" \n\t\r\n  \x0b", []),
        (b"", []),
        ("中文 é ж".encode() * 100, []),
    ],
)
def test_cuts_of_handmade_examples(data, cuts):
    assert list(safe_cuts(data)) == cuts
    assert first_safe_cut(data) == (cuts[0] if cuts else None)
    assert last_safe_cut(data) == (cuts[-1] if cuts else None)


def test_search_ranges_are_half_open_and_read_context_outside():
    data = b"abc123!!def"
    assert first_safe_cut(data, 4) == 6
    assert first_safe_cut(data, 6) == 6
    assert first_safe_cut(data, 9) is None
    assert last_safe_cut(data, 0, 8) == 6
    assert last_safe_cut(data, 0, 9) == 8
    assert last_safe_cut(data, 4, 6) is None
    assert list(safe_cuts(b"ab cd", 2, 3)) == [2]  # reads bytes 1 and 3 around the cut


def test_searches_accept_any_buffer():
    data = b"one two"
    for buffer in (bytearray(data), memoryview(data), memoryview(b"??" + data)[2:]):
        assert first_safe_cut(buffer) == last_safe_cut(buffer) == 3


def test_searches_over_long_stretches_without_a_cut():
    assert last_safe_cut(b"x y" + b"a" * (1 << 20)) == 1
    assert first_safe_cut(b"a" * 100_000 + b"1") == 100_000


def test_searches_agree_with_the_list_of_cuts_on_any_range():
    rng = random.Random(1)
    for _ in range(100):
        # Sparse cuts (one per ~300 bytes), so the backwards search needs several windows.
        data = b"".join(
            rng.choice([b"a" * rng.randint(1, 600), b"Z", b"\xc3\xa9", b" 1"]) for _ in range(40)
        )
        cuts = list(safe_cuts(data))
        start, stop = sorted(rng.randint(0, len(data)) for _ in range(2))
        inside = [c for c in cuts if start <= c < stop]
        assert first_safe_cut(data, start, stop) == (inside[0] if inside else None)
        assert last_safe_cut(data, start, stop) == (inside[-1] if inside else None)
        # A cut found in a block is a cut of the whole buffer.
        assert {start + c for c in safe_cuts(data[start:stop])} <= set(cuts)
