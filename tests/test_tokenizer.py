"""The GPT-2 BPE resolves without a network and gives OpenAI's ids."""
import subprocess
import sys

from pipeline.tokenizer import EOT_ID, decode, encode, get_tokenizer


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
    code = ("from pipeline.tokenizer import encode; print(encode('Every effort moves you'))")
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[6109, 3626, 6100, 345]"
    assert len(list(tmp_path.iterdir())) == 2
