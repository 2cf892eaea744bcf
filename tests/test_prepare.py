"""The prepare stage: shards equal a direct tiktoken encode of the same documents, the
book's text split is the book's, reruns are no-ops, other settings are refused without
--force, a rebuild is swapped in only when whole, and bad input ends in one paragraph with
exit code 2. SIGKILL at random moments is test_faults.py's."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.streams import split_of
from pipeline.data.tokenizer import EOT_ID, get_tokenizer
from pipeline.prepare import PrepareError, main, prepare, worker_pool

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "every effort moves you toward the picture that Jack Gisburn painted at the "
    "Riviera, a cheap genius, though a good fellow enough; ünïcode & emoji 🙂 too"
).split()


def config(tmp_path, *overrides, name="d"):
    return load_config(
        None,
        [
            f"data.root={tmp_path / 'data'}",
            f"data.name={name}",
            "data.num_workers=1",
            "model.context_length=8",
            *overrides,
        ],
    )


def text_of(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"


def read_split(data_dir: Path, split: str) -> list[np.ndarray]:
    """Each shard of a split read with plain numpy, checking the llm.c header by hand."""
    out = []
    for path in sorted(data_dir.glob(f"{split}_*.bin")):
        header = np.fromfile(path, dtype="<i4", count=256)
        assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
        tokens = np.fromfile(path, dtype="<u2", offset=256 * 4)
        assert len(tokens) == header[2]
        out.append(tokens)
    return out


def snapshot(directory: Path) -> dict:
    """Every file's bytes and mtime (not the lock file, whose content is its last holder)."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != ".lock"
    }


def spec_is_val(doc: str, val_fraction: float) -> bool:
    # The documented rule, restated: blake2b-64 of the UTF-8 text as a fraction of 2**64.
    h = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


def test_shards_equal_a_direct_encode_with_eot_before_each_document(tmp_path):
    docs = [text_of(i, 5 + i % 17) for i in range(40)]
    (tmp_path / "src").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "src" / f"{i:03d}.txt").write_text(doc)
    cfg = config(
        tmp_path,
        "data.source.kind=files",
        f"data.source.paths=[{tmp_path / 'src'}]",
        "data.val_fraction=0.3",
        "data.shard_tokens=50",
    )
    manifest = prepare(cfg)
    enc = get_tokenizer()
    expected = {"train": [], "val": []}
    for doc in docs:
        expected["val" if spec_is_val(doc, 0.3) else "train"] += [EOT_ID, *enc.encode_ordinary(doc)]
    for split in ("train", "val"):
        shards = read_split(cfg.data_dir, split)
        assert np.concatenate(shards).tolist() == expected[split]
        assert [len(s) for s in shards[:-1]] == [50] * (len(shards) - 1) and len(shards[-1]) <= 50
        assert [s.tokens for s in manifest.splits[split]] == [len(s) for s in shards]
    assert manifest.documents == {
        s: sum(spec_is_val(d, 0.3) == (s == "val") for d in docs) for s in ("train", "val")
    }
    assert manifest.documents["val"] > 0 and manifest.dtype == "uint16"


def test_document_split_is_by_hash_and_close_to_val_fraction():
    docs = [f"document number {i}" for i in range(4000)]
    val = [d for d in docs if split_of(d, 0.1)]
    assert abs(len(val) / len(docs) - 0.1) < 0.02
    assert val == [d for d in reversed(docs) if split_of(d, 0.1)][::-1]  # order plays no part
    assert all(split_of(d, 0.1) == spec_is_val(d, 0.1) for d in docs[:200])


def test_text_split_is_the_books_split(tmp_path):
    # configs/verdict.yaml names the book's file by URL; a file:// URL takes the same path.
    book = tmp_path / "the-verdict.txt"
    book.write_text(text_of(7, 900))
    cfg = config(
        tmp_path,
        "data.source.kind=url",
        f"data.source.url={book.as_uri()}",
        "data.split_by=text",
        "data.val_fraction=0.1",
    )
    prepare(cfg)
    text, enc = book.read_text(), get_tokenizer()
    split_idx = int(0.90 * len(text))
    train = np.concatenate(read_split(cfg.data_dir, "train")).tolist()
    val = np.concatenate(read_split(cfg.data_dir, "val")).tolist()
    assert train == enc.encode_ordinary(text[:split_idx])
    assert val == enc.encode_ordinary(text[split_idx:])


def test_text_split_joins_documents_with_eot(tmp_path):
    (tmp_path / "src").mkdir()
    a, b = text_of(1, 200), text_of(2, 50)
    (tmp_path / "src" / "a.txt").write_text(a)
    (tmp_path / "src" / "b.txt").write_text(b)
    cfg = config(
        tmp_path,
        "data.source.kind=files",
        f"data.source.paths=[{tmp_path / 'src'}]",
        "data.split_by=text",
        "data.val_fraction=0.1",
    )
    prepare(cfg)
    cut, enc = int(0.9 * (len(a) + len(b))), get_tokenizer()
    assert cut > len(a)  # the cut falls inside the second document
    train = np.concatenate(read_split(cfg.data_dir, "train")).tolist()
    val = np.concatenate(read_split(cfg.data_dir, "val")).tolist()
    assert train == enc.encode_ordinary(a) + [EOT_ID] + enc.encode_ordinary(b[: cut - len(a)])
    assert val == enc.encode_ordinary(b[cut - len(a) :])


def stdlib_args(tmp_path, *extra):
    return [
        f"data.root={tmp_path / 'data'}",
        "data.name=std",
        "data.source.max_bytes=300000",
        "data.shard_tokens=20000",
        "data.num_workers=1",
        "model.context_length=64",
        *extra,
    ]


def test_rerun_is_a_no_op_and_says_so(tmp_path, capsys):
    main(stdlib_args(tmp_path))
    assert "prepared" in capsys.readouterr().out
    before = snapshot(tmp_path / "data" / "std")
    main(stdlib_args(tmp_path, "data.num_workers=2"))  # the worker count changes no byte
    assert "up to date" in capsys.readouterr().out
    assert snapshot(tmp_path / "data" / "std") == before


def sigterm_kills(_) -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_pool_workers_die_on_sigterm_whatever_the_caller_trapped():
    """Pool.terminate ends the workers with SIGTERM. A forked worker inherits the caller's
    handlers; one that only records the signal (as train's stop request does) left a
    worker waiting on the pool's queue, and prepare in terminate() for ever (seen in the
    suite when an earlier in-process `train --help` had left train's handlers behind)."""

    def too_long(signum, frame):
        raise TimeoutError("the worker pool did not end within 60 s")

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    alarm = signal.signal(signal.SIGALRM, too_long)
    try:
        pool = worker_pool(2)
        try:
            assert pool.map(sigterm_kills, range(8)) == [True] * 8
        finally:
            signal.alarm(60)
            pool.terminate()
            pool.join()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        signal.signal(signal.SIGTERM, previous)


def test_other_settings_are_refused_without_force(tmp_path, capsys):
    main(stdlib_args(tmp_path))
    before = snapshot(tmp_path / "data" / "std")
    with pytest.raises(SystemExit) as exit_:
        main(stdlib_args(tmp_path, "data.val_fraction=0.2"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "data.val_fraction was 0.1, now 0.2" in err and "--force" in err
    assert snapshot(tmp_path / "data" / "std") == before
    main(stdlib_args(tmp_path, "data.val_fraction=0.2", "--force"))
    assert "prepared" in capsys.readouterr().out
    manifest = (tmp_path / "data" / "std" / "manifest.json").read_text()
    assert '"val_fraction": 0.2' in manifest


def test_an_unfinished_build_is_dropped_and_redone(tmp_path, capsys):
    main(stdlib_args(tmp_path))
    data_dir = tmp_path / "data" / "std"
    good = snapshot_bytes(data_dir)
    staging = data_dir / ".staging"  # what a kill during a --force rebuild leaves
    staging.mkdir()
    (staging / "train_000000.bin").write_bytes(b"half a shard")
    main(stdlib_args(tmp_path))
    assert "up to date" in capsys.readouterr().out
    assert not staging.exists() and snapshot_bytes(data_dir) == good


def test_files_no_manifest_lists_are_refused_and_kept(tmp_path, capsys):
    data_dir = tmp_path / "data" / "std"
    data_dir.mkdir(parents=True)
    (data_dir / "train_000000.bin").write_bytes(b"someone's file")
    with pytest.raises(SystemExit):
        main(stdlib_args(tmp_path, "--force"))
    err = " ".join(capsys.readouterr().err.split())
    assert "1 shard-named file(s) that no manifest.json of this project lists" in err
    assert (data_dir / "train_000000.bin").read_bytes() == b"someone's file"
    assert not (data_dir / ".staging").exists()


def test_a_manifest_this_project_did_not_write_is_left_alone(tmp_path, capsys):
    data_dir = tmp_path / "data" / "std"
    data_dir.mkdir(parents=True)
    (data_dir / "manifest.json").write_text('{"name": "my web app"}')
    (data_dir / "bundle.bin").write_bytes(b"theirs")
    with pytest.raises(SystemExit):
        main(stdlib_args(tmp_path, "--force"))
    assert "is not a manifest this project wrote" in " ".join(capsys.readouterr().err.split())
    assert (data_dir / "manifest.json").read_text() == '{"name": "my web app"}'
    assert sorted(p.name for p in data_dir.iterdir()) == [".lock", "bundle.bin", "manifest.json"]


def test_a_flipped_shard_byte_is_found_and_the_shard_rebuilt(tmp_path, capsys):
    main(stdlib_args(tmp_path))
    data_dir = tmp_path / "data" / "std"
    good = snapshot_bytes(data_dir)
    shard = data_dir / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x10  # same size: only the sha256 sees it
    shard.write_bytes(bytes(data))
    main(stdlib_args(tmp_path))
    out = capsys.readouterr().out
    assert f"shard {shard} is damaged" in out and "preparing" in out
    assert snapshot_bytes(data_dir) == good


def test_a_failed_force_rebuild_leaves_the_old_data_set_usable(tmp_path, capsys):
    from pipeline.data.shards import open_split

    main(stdlib_args(tmp_path))
    data_dir = tmp_path / "data" / "std"
    good = snapshot_bytes(data_dir)
    with pytest.raises(SystemExit):  # a rebuild that fails half-way (here: too small a corpus)
        main(stdlib_args(tmp_path, "--force", "model.context_length=100000"))
    assert snapshot_bytes(data_dir) == good and not (data_dir / ".staging").exists()
    assert sum(len(a) for a in open_split(data_dir, "train")) > 0


def test_two_prepares_into_one_directory_are_refused(tmp_path, capsys):
    from pipeline.core.locking import exclusive

    with exclusive(tmp_path / "data" / "std", "prepare"):
        out = run_cli(*stdlib_args(tmp_path), cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is in use: process" in " ".join(out.stderr.split())
    assert not (tmp_path / "data" / "std" / "manifest.json").exists()
    main(stdlib_args(tmp_path))  # the lock went with its holder
    assert "prepared" in capsys.readouterr().out


def test_a_larger_context_is_checked_even_when_up_to_date(tmp_path):
    prepare(load_config(None, stdlib_args(tmp_path)))
    with pytest.raises(PrepareError, match="too small.*model.context_length"):
        prepare(load_config(None, stdlib_args(tmp_path, "model.context_length=100000")))


def test_shards_too_short_for_a_window_are_refused_by_prepare_not_later_by_train(tmp_path):
    """Plenty of tokens in all, but no shard holds context_length + 1 of them: the loader
    (windows never cross a shard) would refuse the data set, so prepare does."""
    from pipeline.data.loader import TokenWindows

    cfg = config(
        tmp_path,
        "data.source.kind=python-stdlib",
        "data.source.max_bytes=20000",
        "data.split_by=text",
        "data.shard_tokens=8",
    )
    with pytest.raises(PrepareError, match="inside one shard.*raise data.shard_tokens"):
        prepare(cfg)
    assert not (cfg.data_dir / "manifest.json").exists()
    ok = config(
        tmp_path,
        "data.source.kind=python-stdlib",
        "data.source.max_bytes=20000",
        "data.split_by=text",
        "data.shard_tokens=9",
        name="ok",
    )
    prepare(ok)  # 9 tokens per shard: exactly one window of 8 + 1 in each
    assert len(TokenWindows(ok.data_dir, "val", 8)) > 0


def test_undecodable_bytes_are_reported_during_prepare(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(text_of(3, 300))
    (tmp_path / "src" / "latin1.txt").write_bytes("na\xefve caf\xe9 ".encode("latin-1") * 40)
    cfg = config(
        tmp_path,
        "data.source.kind=files",
        f"data.source.paths=[{tmp_path / 'src'}]",
        "data.split_by=text",
    )
    prepare(cfg)
    err = capsys.readouterr().err
    assert "latin1.txt: 80 undecodable bytes (not utf-8-sig) replaced with U+FFFD" in err


def snapshot_bytes(directory: Path) -> dict:
    """The data set's bytes: manifest and shards (not the verification cache)."""
    return {n: b for n, (b, _) in snapshot(directory).items() if not n.startswith(".")}


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def run_in_process(capsys, *args) -> tuple[int, str]:
    """The stage's CLI in this process (cli_main's exit code and stderr): what a user sees,
    without a second interpreter's start-up. Give data.num_workers=1: a tokenizer pool
    forked from pytest's threaded process can deadlock."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code, capsys.readouterr().err


def test_empty_corpus_exits_2_without_traceback(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("")
    code, err = run_in_process(
        capsys,
        "data.source.kind=files",
        f"data.source.paths=[{tmp_path / 'src'}]",
        "data.name=e",
        f"data.root={tmp_path / 'data'}",
        "data.num_workers=1",
    )
    assert code == 2 and "error: the corpus is empty" in err and "Traceback" not in err


def test_too_small_corpus_exits_2_says_what_to_change_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "book.txt").write_text(text_of(5, 300))
    code, err = run_in_process(
        capsys,
        "data.source.kind=files",
        f"data.source.paths=[{tmp_path / 'book.txt'}]",
        "data.name=s",
        f"data.root={tmp_path / 'data'}",
        "data.split_by=text",
        "model.context_length=256",
        "data.num_workers=1",
    )
    assert code == 2 and "Traceback" not in err
    message = " ".join(err.split())
    assert "too small: its val split holds no window of model.context_length + 1 = 257" in message
    assert "raise data.val_fraction" in message and "lower model.context_length" in message
    assert list((tmp_path / "data" / "s").glob("*.bin")) == []
    assert not (tmp_path / "data" / "s" / "manifest.json").exists()


@pytest.mark.slow
def test_ctrl_c_during_prepare_exits_quietly_and_keeps_the_old_data_set(tmp_path):
    # 60 parts: Ctrl-C comes when the first is committed, with most still to build (with
    # one part, a fast CPU had finished the whole data set before the signal arrived)
    args = stdlib_args(
        tmp_path,
        "data.source.max_bytes=6000000",
        "data.shard_tokens=4000",
        "data.part_bytes=100000",
    )
    prepare(load_config(None, args))
    data_dir = tmp_path / "data" / "std"
    before = snapshot_bytes(data_dir)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.prepare",
            *args,
            "data.val_fraction=0.2",
            "data.num_workers=2",
            "--force",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from a shell: SIGINT handled, whatever this test process inherited (a
        # process started with SIGINT ignored keeps it ignored, and Python then too)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(data_dir.glob(".staging/parts/*.json")) and time.monotonic() < deadline:
        time.sleep(0.005)
    # Held still while the signal is sent, so that a slow poll on a loaded machine cannot
    # let the build run to its end first; it arrives the moment the group runs again.
    os.killpg(proc.pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the stage and its workers
    os.killpg(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted (Ctrl-C)" in stderr
    assert snapshot_bytes(data_dir) == before
    # The parts committed before Ctrl-C stay for the rerun, which goes on from them.
    kept = len(list(data_dir.glob(".staging/parts/*.json")))
    assert kept >= 1
    rerun = run_cli(*args, "data.val_fraction=0.2", "data.num_workers=2", "--force", cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{kept} of " in rerun.stdout and "were committed by an earlier run" in rerun.stdout
    assert not (data_dir / ".staging").exists()


def test_a_full_disk_during_a_rebuild_keeps_the_old_data_set(small_disk, capsys):
    import shutil

    args = [
        f"data.root={small_disk}",
        "data.name=std",
        "data.source.max_bytes=300000",
        "data.shard_tokens=20000",
        "data.num_workers=1",
        "model.context_length=64",
        "data.part_bytes=30000",
    ]
    main(args)
    data_dir = small_disk / "std"
    before = snapshot_bytes(data_dir)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 100_000))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "data.val_fraction=0.2", "--force"])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: No space left on device" in err and "Traceback" not in err
    assert "kept in" in err and ".staging" in err  # says where the committed parts are
    assert snapshot_bytes(data_dir) == before
    filler.unlink()  # space freed: the same command now succeeds
    main([*args, "data.val_fraction=0.2", "--force"])
    assert '"val_fraction": 0.2' in (data_dir / "manifest.json").read_text()


def test_a_data_directory_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "std").write_text("my notes")
    code, err = run_in_process(capsys, *stdlib_args(tmp_path))
    assert code == 2 and "Traceback" not in err
    assert "is a file, not a directory" in " ".join(err.split())
    assert (tmp_path / "data" / "std").read_text() == "my notes"


@pytest.mark.parametrize(
    "env, says",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT is not set"),
        (
            {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "RANK=2 is not below WORLD_SIZE=2",
        ),
        ({"WORLD_SIZE": "2", "RANK": "abc"}, "RANK='abc' is not a whole number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 and LOCAL_WORLD_SIZE=1 must be at least 1"),
    ],
)
def test_launcher_variables_that_cannot_work_are_one_paragraph(
    tmp_path, capsys, monkeypatch, env, says
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_:
        main(stdlib_args(tmp_path))
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and "Traceback" not in err and says in err
    assert not (tmp_path / "data" / "std" / "manifest.json").exists()
