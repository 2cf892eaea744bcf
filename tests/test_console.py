"""pipeline.core.console: a standard stream whose reader goes away never raises, and its text
goes on to the fallback file. In-process, on real pipes and /dev/full."""

from __future__ import annotations

import io
import os
import stat

import pytest

from pipeline.core import console


@pytest.fixture
def fallback(tmp_path):
    path = tmp_path / "console.log"
    console.fall_back_to(path)
    yield path
    console.fall_back_to(None)


def test_a_healthy_stream_passes_text_through(tmp_path, fallback):
    inner = io.StringIO()
    stream = console.ResilientStream(inner, "stdout")
    print("step 1", file=stream)
    stream.flush()
    assert inner.getvalue() == "step 1\n" and stream.lost is None and not fallback.exists()


def test_a_pipe_whose_reader_closed_is_diverted_to_devnull_and_the_fallback(fallback):
    read_end, write_end = os.pipe()
    inner = os.fdopen(write_end, "w", buffering=1)
    os.close(read_end)  # the launcher died
    stream = console.ResilientStream(inner, "stderr")
    stream.write("lost line\n")  # must not raise BrokenPipeError
    stream.write("next line\n")
    stream.flush()
    assert stream.lost == "Broken pipe"
    assert stat.S_ISCHR(os.fstat(write_end).st_mode)  # the descriptor is /dev/null now
    os.write(write_end, b"C code writing to the descriptor no longer fails\n")
    log = fallback.read_text()
    assert "stderr went away (Broken pipe)" in log and log.endswith("lost line\nnext line\n")
    inner.close()  # closing flushes into /dev/null: no error either


def test_a_full_disk_behind_stdout_is_diverted(fallback):
    inner = open("/dev/full", "w", buffering=1)
    stream = console.ResilientStream(inner, "stdout")
    print("a row of metrics", file=stream)  # buffered, then lost with the failing flush
    print("the next row", file=stream)
    stream.flush()
    assert stream.lost == "No space left on device"
    assert fallback.read_text().endswith("the next row\n")
    inner.close()


def test_without_a_fallback_the_text_is_dropped_quietly():
    read_end, write_end = os.pipe()
    inner = os.fdopen(write_end, "w")
    os.close(read_end)
    stream = console.ResilientStream(inner, "stdout")
    assert stream.write("x" * 100_000) == 100_000  # more than a pipe buffer, then flushed
    stream.flush()
    assert stream.lost == "Broken pipe"
    inner.close()


def test_wrapping_twice_keeps_one_layer(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    console.keep_going_without_console()
    first = __import__("sys").stdout
    console.keep_going_without_console()
    assert __import__("sys").stdout is first and isinstance(first, console.ResilientStream)


def test_the_log_speaks_once_per_job_above_any_progress_bar_and_hushes_on_request(
    monkeypatch, capsys
):
    """log.info/warn/note: the main process only (RANK 0 or no launcher), `everywhere`
    for a process's own news, lines above a progress bar, GPT_PIPELINE_QUIET=1 keeping
    only warnings."""
    from tqdm import tqdm

    from pipeline.core import log

    monkeypatch.delenv("GPT_PIPELINE_QUIET", raising=False)
    monkeypatch.setenv("RANK", "1")
    log.info("from rank 1")
    log.warn("rank 1's own disk", everywhere=True)
    monkeypatch.setenv("RANK", "0")
    log.info("result")
    log.note("advice")
    out = capsys.readouterr()
    assert out.out == "result\n"
    assert out.err == "warning: rank 1's own disk\nnote: advice\n"
    bar = tqdm(total=3, file=__import__("sys").stderr)
    with log.above(bar):
        log.info("above the bar")
    bar.close()
    assert "above the bar\n" in capsys.readouterr().out
    monkeypatch.setenv("GPT_PIPELINE_QUIET", "1")
    log.info("hushed")
    log.note("hushed too")
    log.warn("still said")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "warning: still said\n"
