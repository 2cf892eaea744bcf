"""The GPT-2 BPE resolves without a network and gives OpenAI's ids."""

import hashlib
import os
import subprocess
import sys

from pipeline.data.tokenizer import (
    _BASE_URL,
    BPE_FILES,
    EOT_ID,
    _local_bpe_dir,
    decode,
    encode,
    get_tokenizer,
    seed_tiktoken_cache,
)


def test_book_sentence_ids():
    assert encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_endoftext_is_50256_and_text_roundtrips():
    enc = get_tokenizer()
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "Hello, world! ünïcödé\n\tdef f(x): return x"
    assert decode(encode(text)) == text


def test_resolves_offline_into_an_empty_cache(tmp_path):
    # A fresh cache directory and no network: the files come from the local copy.
    code = "from pipeline.data.tokenizer import encode; print(encode('Every effort moves you'))"
    env = {
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[6109, 3626, 6100, 345]"
    assert len(list(tmp_path.iterdir())) == 2


def test_seeding_replaces_planted_symlinks_and_never_writes_through_them(tmp_path, monkeypatch):
    # tiktoken's default cache is the shared /tmp/data-gym-cache: another user can plant
    # symlinks there under the names a seeding would write (the targets, and a temporary
    # name like '<target>.<pid>.tmp'), pointing at files of ours.
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    targets = [cache / hashlib.sha1((_BASE_URL + name).encode()).hexdigest() for name in BPE_FILES]
    planted = [targets[0], targets[1].with_name(f"{targets[1].name}.{os.getpid()}.tmp")]
    victims = [tmp_path / "precious-1.txt", tmp_path / "precious-2.txt"]
    for link, victim in zip(planted, victims):
        victim.write_text("my own file")
        link.symlink_to(victim)
    assert seed_tiktoken_cache()
    assert all(v.read_text() == "my own file" for v in victims)
    local = _local_bpe_dir()
    for name, target in zip(BPE_FILES, targets):
        assert not target.is_symlink()  # the link itself was replaced, not its target
        assert target.read_bytes() == (local / name).read_bytes()
    assert not list(cache.glob(".*.tmp"))  # no temporary file left behind
