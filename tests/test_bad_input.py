"""Bad input gets one clear paragraph before any work, and nothing is run or lost.

Each case is what a user can type: a config value out of range, a hostile name, shell
syntax in a make variable. Each asserts the message names the key, the value and what
is allowed, and, for the Makefile, that nothing the user typed ran and nothing was
deleted.
"""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

# (override, words the message must hold)
BAD_VALUES = [
    ("train.lr=0", ["train.lr=0.0", "positive"]),
    ("train.lr=.nan", ["train.lr=nan", "positive"]),
    ("train.min_lr=-1", ["train.min_lr=-1.0", "0 .. train.lr"]),
    ("train.min_lr=1", ["train.min_lr=1.0", "0 .. train.lr"]),
    ("train.grad_clip=-1", ["train.grad_clip=-1.0", "positive norm, or null"]),
    ("train.max_steps=-5", ["train.max_steps=-5", "positive"]),
    ("train.max_tokens=0", ["train.max_tokens=0", "positive"]),
    ("train.epochs=0", ["train.epochs=0.0", "positive"]),
    ("train.weight_decay=-0.5", ["train.weight_decay=-0.5", "0 or more"]),
    ("train.betas=[1.5,0.9]", ["train.betas=[1.5, 0.9]", "[0, 1)"]),
    ("train.warmup_steps=-1", ["train.warmup_steps=-1", "0 or more"]),
    ("train.log_every_steps=0", ["train.log_every_steps=0", "positive"]),
    ("train.micro_batch_size=0", ["train.micro_batch_size=0", "positive"]),
    ("train.peak_flops=-3", ["train.peak_flops=-3.0", "positive"]),
    ("eval.temperature=-1", ["eval.temperature=-1.0", "0 (greedy)"]),
    ("eval.temperature=.inf", ["eval.temperature=inf", "0 (greedy)"]),
    ("eval.top_k=0", ["eval.top_k=0", "1 .. model.vocab_size"]),
    ("eval.top_k=60000", ["eval.top_k=60000", "1 .. model.vocab_size (50257)"]),
    ("eval.batches=0", ["eval.batches=0", "positive"]),
    ("eval.max_new_tokens=0", ["eval.max_new_tokens=0", "positive"]),
    ("eval.first_step=0", ["eval.first_step=0", "positive"]),
    ("checkpoint.keep_last=-1", ["checkpoint.keep_last=-1", "0 (keep all)"]),
    ("checkpoint.resume=", ["checkpoint.resume=''", "auto, never"]),
    ("seed=1e23", ["seed=", "2**64 - 1"]),
    ("seed=-1", ["seed=-1", "2**64 - 1"]),
    ("data.num_workers=0", ["data.num_workers=0", "at least 1"]),
    ("data.shard_tokens=0", ["data.shard_tokens=0", "positive"]),
    ("data.part_bytes=0", ["data.part_bytes=0", "positive"]),
    ("data.segment_bytes=100", ["data.segment_bytes=100", "at least 4096"]),
    ("data.val_fraction=1", ["data.val_fraction=1.0", "between 0 and 1"]),
    ("data.source.max_bytes=0", ["data.source.max_bytes=0", "positive"]),
    ("model.drop_rate=1", ["model.drop_rate=1.0", "[0, 1)"]),
    ("model.n_layers=0", ["model.n_layers=0", "positive"]),
    ("model.init=xavier", ["model.init='xavier'", "gpt2, torch_default"]),
    ("train.order=random", ["train.order='random'", "shuffle, book"]),
    ("train.weight_decay_on=some", ["train.weight_decay_on='some'", "matrices, all"]),
    ("train.optimizer=sgd", ["train.optimizer='sgd'", "adamw, muon"]),
    ("train.tf32=maybe", ["train.tf32 must be bool", "'maybe'"]),
    ("train.activation_checkpointing=2", ["train.activation_checkpointing must be bool"]),
    (
        "train.collective_timeout_minutes=0",
        ["train.collective_timeout_minutes=0.0", "positive number of minutes"],
    ),
    ("tracking.log_with=[wandb,wandb]", ["tracking.log_with=['wandb', 'wandb']", "distinct"]),
    ("eval.tasks=[arc]", ["eval.tasks=['arc']", "hellaswag and mc"]),
    ("eval.tasks=[mc]", ["eval.task_file=None", "a jsonl file when eval.tasks has mc"]),
    ("eval.task_every_steps=0", ["eval.task_every_steps=0", "positive, or null"]),
    ("eval.task_examples=-2", ["eval.task_examples=-2", "positive, or null"]),
    ("train.schedule=linear", ["train.schedule='linear'", "cosine, wsd, constant"]),
    ("train.decay_fraction=0", ["train.decay_fraction=0.0", "in (0, 1]"]),
    ("spikes.skip_loss_z=-1", ["spikes.skip_loss_z=-1.0", "positive number of standard"]),
    ("spikes.window=5", ["spikes.window=5", "20 steps or more"]),
    ("spikes.max_rollbacks=0", ["spikes.max_rollbacks=0", "1 or more"]),
    ("train.decay_shape=sqrt", ["train.decay_shape='sqrt'", "linear, 1-sqrt"]),
    ("train.warmup_start_lr=1", ["train.warmup_start_lr=1.0", "0 .. train.lr"]),
    ("train.grad_clip_after_warmup=yes", ["train.grad_clip_after_warmup must be bool"]),
    ("eval.whole_split_at_end=2", ["eval.whole_split_at_end must be bool"]),
]

HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "/etc",
    "a/b",
    ".hidden",
    "x`touch m`",
    "$(id)",
    "a b",
    "x;rm -rf y",
    "-rf",
    "--help",
    "a\nb",
]


@pytest.mark.parametrize("override,words", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_key_value_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "configs/tiny.yaml", [override])
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("key", ["name", "data.name"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_names_that_are_not_plain_are_refused(key, name):
    with pytest.raises(ConfigError, match=f"{key}=.*plain name"):
        load_config(None, [f"{key}={name}"])


@pytest.mark.parametrize(
    "args",
    [
        "name=",  # once: rm -rf runs (every run)
        "name=x`touch {mark}`",  # once: ran in make's shell
        "name=x$$(touch {mark})",
        "name=../outside",
        "runs_root=/tmp name=x;touch${{IFS}}{mark}",
    ],
)
def test_make_clean_with_a_hostile_name_deletes_and_runs_nothing(tmp_path, stand_in_venv, args):
    runs = tmp_path / "runs"
    (runs / "keep").mkdir(parents=True)
    (runs / "keep" / "metrics.jsonl").write_text("{}\n")
    mark = tmp_path / "marker"
    venv = stand_in_venv
    out = subprocess.run(
        ["make", "clean", f"VENV={venv}", f"ARGS=runs_root={runs} " + args.format(mark=mark)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "error:" in out.stderr
    assert (runs / "keep" / "metrics.jsonl").is_file() and not mark.exists()


def test_make_passes_shell_syntax_in_prompt_and_args_as_text(tmp_path, stand_in_venv):
    mark = tmp_path / "marker"
    venv = stand_in_venv
    out = subprocess.run(
        [
            "make",
            "-n",
            "sample",
            f"VENV={venv}",
            f"PROMPT=it`touch {mark}`s $$(touch {mark})",
            "ARGS=eval.prompt=x`id`",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    # exactly as typed: make's own $$ escape is not applied either (the value is text)
    assert f"--prompt 'it`touch {mark}`s $$(touch {mark})'" in out.stdout
    assert not mark.exists()


def test_make_clean_deletes_a_run_and_data_set_and_nothing_it_did_not_write(
    tmp_path, stand_in_venv
):
    venv = stand_in_venv
    run, data = _run_dir(tmp_path / "runs" / "exp"), _data_dir(tmp_path / "data" / "set")
    mine = tmp_path / "mine" / "exp"  # the user's own directory, named like a run
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    make = ["make", "clean", f"VENV={venv}"]
    site = Path(sysconfig.get_paths()["purelib"])
    compiled = next(site.glob("torch/__pycache__/*.pyc"), None)
    refused = subprocess.run(
        make
        + [
            f"ARGS=runs_root={tmp_path / 'mine'} name=exp "
            f"data.root={tmp_path / 'data'} data.name=set"
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "leaves it alone" in refused.stderr
    assert (mine / "thesis.tex").is_file() and (data / "manifest.json").is_file()
    done = subprocess.run(
        make
        + [
            f"ARGS=runs_root={tmp_path / 'runs'} name=exp "
            f"data.root={tmp_path / 'data'} data.name=set"
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert not run.exists() and not data.exists() and (mine / "thesis.tex").is_file()
    # the bytecode make install compiled into the venv this suite runs in stays (its loss
    # made every later process of the suite import torch from source: 3.5 s, not 2 s)
    assert compiled is None or compiled.is_file()


@pytest.mark.parametrize(
    "args,words",
    [
        (["--temperature", "nan"], ["temperature", "nan"]),
        (["--temperature", "-1"], ["temperature", ">= 0"]),
        (["--top-p", "nan"], ["top_p", "(0, 1]"]),
        (["--top-k", "0"], ["top_k", "between 1"]),
        (["--seed", "100000000000000000000000"], ["--seed", "2**64"]),
        (["--device", "bogus"], ["--device 'bogus'", "cpu"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        (["--n-heads", "5"], ["emb_dim 768 is not divisible by 5 heads"]),
    ],
)
def test_generate_refuses_bad_arguments_in_one_paragraph(tiny_book_model, capsys, args, words):
    from pipeline.generate import main

    with pytest.raises(SystemExit) as exit:  # cli_main: the message, then exit 2
        main(["--model", str(tiny_book_model), "--n-heads", "12", *args])
    message = " ".join(capsys.readouterr().err.split())
    assert exit.value.code == 2 and message.startswith("error:")
    assert all(word in message for word in words), message


@pytest.mark.parametrize(
    "args,words",
    [
        (["--stride", "0"], ["--stride=0", "a positive count"]),
        (["--stride", "100"], ["--stride 100", "1 .. the context length (8)"]),
        (["--n-heads", "0"], ["--n-heads=0", "a positive count"]),
        (["--text", "no-such.txt"], ["'no-such.txt' matches no file"]),
        (["--task", "mc"], ["--task mc needs --task-file"]),
        (
            ["--task", "hellaswag", "--task-file", "no-such.jsonl"],
            ["--task-file no-such.jsonl does not exist"],
        ),
    ],
)
def test_evaluate_refuses_bad_task_and_text_arguments(
    tiny_book_model, tmp_path, capsys, args, words
):
    from pipeline.evaluate import main

    (tmp_path / "some.txt").write_text("Some text to score, long enough for one window or two.")
    text = [] if "--text" in args or "--task" in args else ["--text", str(tmp_path / "some.txt")]
    with pytest.raises(SystemExit) as exit:
        main(["--model", str(tiny_book_model), "--n-heads", "12", *text, *args])
    message = " ".join(capsys.readouterr().err.split())
    assert exit.value.code == 2 and "Traceback" not in message
    assert all(word in message for word in words), message


@pytest.mark.parametrize("flag", ["--batch-size", "--max-batches", "--context-length"])
def test_evaluate_refuses_non_positive_counts(tiny_book_model, capsys, flag):
    from pipeline.evaluate import main

    with pytest.raises(SystemExit) as exit:
        main(["--model", str(tiny_book_model), "--n-heads", "12", flag, "-1"])
    assert exit.value.code == 2
    assert f"{flag}=-1 is not allowed: it must be a positive count" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_book_model(tmp_path_factory) -> Path:
    """A small book-format model.pth at GPT-2's width, with GPT-2's 12 heads there."""
    import torch
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    cfg = dict(
        vocab_size=256,
        context_length=8,
        emb_dim=768,
        n_heads=12,
        n_layers=1,
        drop_rate=0.0,
        qkv_bias=False,
    )
    path = tmp_path_factory.mktemp("book") / "model.pth"
    torch.save(BookGPTModel(cfg).state_dict(), path)
    return path


# ------------------------------------------------- a file the project did not write survives

MAKE_TARGETS = [
    "help",
    "install",
    "data",
    "train",
    "eval",
    "export",
    "sample",
    "all",
    "book",
    "test",
    "faults",
    "bench",
    "clean",
    "distclean",
    "lock",
    "test-latest",
    "llama-cpp-check",
]
MAKE_SYNTAX = "x$(shell touch {m}-make)`touch {m}-tick`$$(touch {m}-dollar);touch {m}-semi"


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_no_make_variable_is_expanded_as_make_syntax_or_run_by_any_target(
    tmp_path, stand_in_venv, target
):
    """$(shell ...), backticks and $( ) in ARGS, CONFIG and PROMPT are text everywhere: in
    the recipes (make -n prints them without running them, but make itself expands every
    variable reference then) and in the makefile's own $(shell ...) calls."""
    mark = tmp_path / "ran"
    values = {v: MAKE_SYNTAX.format(m=f"{mark}-{v}") for v in ("ARGS", "CONFIG", "PROMPT")}
    dry = "-n" if target not in ("help", "clean") else "--no-print-directory"
    subprocess.run(
        ["make", dry, target, f"VENV={stand_in_venv}", *(f"{k}={v}" for k, v in values.items())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not list(tmp_path.glob("ran*")), sorted(p.name for p in tmp_path.glob("ran*"))


@pytest.mark.parametrize(
    "assignment,words",
    [
        ("NUM_PROCESSES=0", ["NUM_PROCESSES=0", "1 or more"]),
        ("NUM_PROCESSES=two", ["NUM_PROCESSES=two", "whole number"]),
        ("NUM_GPUS=-1", ["NUM_GPUS=-1", "whole number"]),
        ("ARGS=name=a\nname=b", ["ARGS holds a line break"]),
        ("VENV=x;touch y", ["VENV=x;touch y", "plain path"]),
    ],
)
def test_make_refuses_values_it_cannot_use_in_one_line(assignment, words):
    out = subprocess.run(["make", "help", assignment], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and all(w in out.stderr for w in words), out.stderr


def test_a_config_path_with_a_space_reaches_the_config_loader(tmp_path, stand_in_venv):
    out = subprocess.run(
        ["make", "-n", "train", f"VENV={stand_in_venv}", f"CONFIG={tmp_path}/my configs/x.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    message = " ".join(out.stderr.split())  # the paragraph is wrapped at 100 columns
    assert "No rule to make target" not in message
    assert f"config file {tmp_path}/my configs/x.yaml not found" in message


def _run_dir(path: Path) -> Path:
    """A run directory as the train stage leaves it: its config, metrics, a checkpoint."""
    from pipeline.config import save_config

    path.mkdir(parents=True)
    save_config(load_config(ROOT / "configs/tiny.yaml"), path / "config.yaml")
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 10.9}\n')
    (path / "checkpoints" / "step_000001").mkdir(parents=True)
    return path


def _data_dir(path: Path) -> Path:
    from helpers import write_data_set

    write_data_set(path, {"train": [[1, 2, 3] * 50], "val": [[4, 5, 6] * 50]})
    return path


# (what the directory holds, the user's file that must survive): none of these is ours
CLEAN_LOOK_ALIKES = {
    "a web app with its own config.yaml": lambda d: (
        d.mkdir(),
        (d / "config.yaml").write_text("server:\n  port: 8080\n"),
        (d / "checkpoints").mkdir(),
        d / "config.yaml",
    )[-1],
    "a run config and nothing of a run": lambda d: (
        _run_dir(d),
        (d / "metrics.jsonl").unlink(),
        __import__("shutil").rmtree(d / "checkpoints"),
        d / "config.yaml",
    )[-1],
    "a run holding the user's notes": lambda d: (
        _run_dir(d),
        (d / "notes.md").write_text("ideas"),
        d / "notes.md",
    )[-1],
    "a web app's manifest.json": lambda d: (
        d.mkdir(),
        (d / "manifest.json").write_text('{"name": "app", "icons": []}'),
        d / "manifest.json",
    )[-1],
    "a data set holding the user's file": lambda d: (
        _data_dir(d),
        (d / "corpus.txt").write_text("the source text"),
        d / "corpus.txt",
    )[-1],
}


@pytest.mark.parametrize("case", CLEAN_LOOK_ALIKES)
def test_clean_deletes_only_what_reads_back_as_the_projects_own(tmp_path, case):
    from pipeline.clean import clean
    from pipeline.core.errors import PipelineError

    is_data = "manifest" in case or "data set" in case
    target = tmp_path / "dir"
    survivor = CLEAN_LOOK_ALIKES[case](target)
    before = survivor.read_bytes()
    with pytest.raises(PipelineError, match="leaves it alone and deletes nothing") as refused:
        clean(tmp_path / "none", target) if is_data else clean(target, tmp_path / "none")
    assert survivor.read_bytes() == before
    if "user's" in case:
        assert survivor.name in str(refused.value)  # the paragraph names what is not ours


def test_clean_deletes_a_real_run_and_a_real_data_set(tmp_path):
    from pipeline.clean import clean

    run, data = _run_dir(tmp_path / "run"), _data_dir(tmp_path / "data")
    (run / "console.log").write_text("stderr went away\n")
    assert clean(run, data) == [run, data] and not run.exists() and not data.exists()


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory) -> Path:
    """A run with a checkpoint of a 2-layer model, the source of the export cases."""
    import torch
    from test_export import TINY, trained_model, write_checkpoint

    run = tmp_path_factory.mktemp("exp") / "run"
    write_checkpoint(run, trained_model(TINY), step=100)
    torch.manual_seed(0)
    return run


EXPORT_LOOK_ALIKES = {
    "a project with README.md and config.json": {
        "README.md": "# My project\n",
        "config.json": '{"debug": true}',
    },
    "a README.md that is not a model card": {
        "README.md": "---\ntags: [mine]\n---\n",
        "config.json": '{"model_type": "gpt2"}',
    },
    "an export with the user's file in it": {"notes.txt": "keep"},
}


@pytest.mark.parametrize("case", EXPORT_LOOK_ALIKES)
def test_export_replaces_only_an_earlier_export(exported_run, tmp_path, case):
    from pipeline.core.errors import PipelineError
    from pipeline.export import export

    out = tmp_path / "out"
    if "user's file" in case:
        export(exported_run, out)  # a real earlier export, then the user adds a file
    out.mkdir(exist_ok=True)
    for name, text in EXPORT_LOOK_ALIKES[case].items():
        (out / name).write_text(text)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PipelineError, match="is not an earlier export of this project"):
        export(exported_run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_into_the_directory_you_are_in_is_refused(exported_run, tmp_path, monkeypatch):
    from pipeline.core.errors import PipelineError
    from pipeline.export import export

    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# a project\n")
    for out in (".", str(tmp_path)):
        with pytest.raises(PipelineError, match="the directory you are in"):
            export(exported_run, out)
    assert (tmp_path / "README.md").read_text() == "# a project\n"


def test_an_earlier_export_is_replaced(exported_run, tmp_path):
    from pipeline.export import export

    out, _ = export(exported_run, tmp_path / "out")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    out, _ = export(exported_run, tmp_path / "out")
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp


# ------------------------------------------------- model files are checked before they are believed


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A one-layer GPT-2 saved by transformers itself, the base each hostile case edits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("hf") / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16)).save_pretrained(
        path
    )
    return path


def _edit_config(**changes):
    def edit(d: Path):
        import json

        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _header(length: int, body: bytes = b"") -> bytes:
    return length.to_bytes(8, "little") + body


HOSTILE_MODEL_DIRS = {
    "tie_word_embeddings is the string no": (
        _edit_config(tie_word_embeddings="no"),
        ["tie_embeddings must be bool", "'no'"],
    ),
    "100,000 layers claimed over one": (
        _edit_config(n_layer=100_000),
        ["says 100000 layers", "hold 1"],
    ),
    "heads that do not divide the width": (
        _edit_config(n_head=5),
        ["divisible by model.n_heads (5)"],
    ),
    "a negative vocabulary": (_edit_config(vocab_size=-3), ["model.vocab_size=-3"]),
    "a config without n_embd": (
        lambda d: (
            _edit_config()(d)
            or (d / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
        ),
        ["lacks", "n_embd"],
    ),
    "a config that is a JSON list": (
        lambda d: (d / "config.json").write_text("[1, 2]"),
        ["holds a JSON list"],
    ),
    "a config that is not UTF-8": (
        lambda d: (d / "config.json").write_bytes(b"\xff\xfe{"),
        ["cannot be read as JSON"],
    ),
    "weights that are a link to /etc/passwd": (
        lambda d: (
            (d / "model.safetensors").unlink(),
            (d / "model.safetensors").symlink_to("/etc/passwd"),
        ),
        ["model.safetensors (a link to /etc/passwd)", "not a readable safetensors"],
    ),
    "a header that is not JSON": (
        lambda d: (d / "model.safetensors").write_bytes(_header(8, b"notjson!")),
        ["model.safetensors", "not a readable safetensors"],
    ),
    "a header claiming 2**40 bytes": (
        lambda d: (d / "model.safetensors").write_bytes(_header(2**40, b"{}")),
        ["model.safetensors", "not a readable safetensors"],
    ),
    "a truncated file": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:5000]
        ),
        ["not a readable safetensors"],
    ),
    "a weight_map reaching outside the directory": (
        lambda d: (
            (d / "model.safetensors").rename(d / "part.safetensors"),
            (d / "model.safetensors.index.json").write_text(
                '{"weight_map": {"transformer.wte.weight": "../../../../etc/passwd"}}'
            ),
        ),
        ["names shard files outside its directory", "../../../../etc/passwd"],
    ),
}


@pytest.mark.parametrize("case", HOSTILE_MODEL_DIRS)
def test_a_hostile_model_directory_is_one_paragraph_naming_what_is_wrong(hf_dir, tmp_path, case):
    import shutil
    import time

    from pipeline.core.errors import PipelineError
    from pipeline.model.weights import load_state

    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    edit, words = HOSTILE_MODEL_DIRS[case]
    edit(model)
    started = time.monotonic()
    with pytest.raises(PipelineError) as refused:
        load_state(model)
    message = " ".join(str(refused.value).split())
    assert all(w in message for w in words), message
    assert time.monotonic() - started < 10  # checked by arithmetic, before anything is built


def test_a_checkpoint_meta_json_gets_the_config_checks(tmp_path):
    import json

    from test_export import TINY, trained_model, write_checkpoint

    from pipeline.core.errors import PipelineError
    from pipeline.model.weights import load_state

    run = tmp_path / "run"
    write_checkpoint(run, trained_model(TINY), step=100)
    meta_path = run / "checkpoints" / "step_000100" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["n_heads"] = "four"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="meta.json: model.n_heads must be int, got 'four'"):
        load_state(run / "checkpoints" / "step_000100")


# (manifest field, its value, words of the refusal)
BAD_MANIFESTS = [
    ("tokenizer", "cl100k_base", ["tokenizer is 'cl100k_base'", "'gpt2' only"]),
    ("vocab_size", "50257", ["vocab_size '50257'"]),
    ("dtype", "uint8", ["dtype 'uint8' does not hold a vocabulary of 50257"]),
    (
        "splits",
        {"train": [{"file": "../../etc/passwd", "tokens": 3, "sha256": "0" * 64}]},
        ["outside its directory", "../../etc/passwd"],
    ),
]


@pytest.mark.parametrize("key,value,words", BAD_MANIFESTS, ids=[k for k, _, _ in BAD_MANIFESTS])
def test_a_manifest_is_checked_before_its_data_is_read(tmp_path, key, value, words):
    import json

    from helpers import write_data_set

    from pipeline.data.shards import DataError, load_manifest

    write_data_set(tmp_path, {"train": [[1, 2, 3]], "val": [[4, 5, 6]]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, key: value}))
    with pytest.raises(DataError) as refused:
        load_manifest(tmp_path)
    assert all(w in str(refused.value) for w in words), refused.value


def test_a_model_vocabulary_smaller_than_the_data_or_the_prompt_is_refused(tmp_path):
    from helpers import write_data_set

    from pipeline.core.errors import PipelineError
    from pipeline.train import check_vocabulary

    write_data_set(tmp_path / "data" / "d", {"train": [[1, 2, 3]], "val": [[4, 5, 6]]})
    base = [f"data.root={tmp_path / 'data'}", "data.name=d"]
    with pytest.raises(
        PipelineError, match="vocabulary of 50257 tokens, and model.vocab_size is 256"
    ):
        check_vocabulary(load_config(None, base + ["model.vocab_size=256"]))
    with pytest.raises(PipelineError, match="model.vocab_size is 50304, more than the 50257"):
        check_vocabulary(load_config(None, base + ["model.vocab_size=50304"]))
    write_data_set(
        tmp_path / "data" / "small", {"train": [[1, 2, 3]], "val": [[4, 5, 6]]}, vocab_size=256
    )
    small = [f"data.root={tmp_path / 'data'}", "data.name=small", "model.vocab_size=256"]
    with pytest.raises(PipelineError, match="the prompt 'Every effort.* has token"):
        check_vocabulary(load_config(None, small))
    check_vocabulary(load_config(None, small + ["eval.prompt=a"]))  # 'a' is token 64


# (file, bytes written, how it is read, words of the refusal): one paragraph each
UNREADABLE_FILES = {
    "a config that is not UTF-8": ("c.yaml", b"train:\n  lr: \xff\n", "config", ["not valid YAML"]),
    "a config nested 100,000 deep": ("c.yaml", b"[" * 100_000, "config", ["nests deeper"]),
    "a task file that is not UTF-8": (
        "t.jsonl",
        b'{"context": "\xff"}\n',
        "task",
        ["line 1 is not a mc example"],
    ),
    "a task line nested 100,000 deep": (
        "t.jsonl",
        b"[" * 100_000 + b"\n",
        "task",
        ["line 1 is not a mc example (nested too deeply)"],
    ),
    "a metrics line that is not UTF-8": (
        "metrics.jsonl",
        b'{"step": 1}\n\xff\xfe\n{"step": 2}\n',
        "metrics",
        ["line 2 is not JSON"],
    ),
    "a metrics line that is a list": (
        "metrics.jsonl",
        b'[1]\n{"step": 2}\n',
        "metrics",
        ["line 1 is not JSON"],
    ),
    "a meta.json nested deeply": ("meta.json", b"[" * 100_000, "meta", ["is damaged"]),
}


@pytest.mark.parametrize("case", UNREADABLE_FILES)
def test_a_file_that_cannot_be_read_is_one_paragraph(tmp_path, case):
    from pipeline.core.errors import PipelineError
    from pipeline.training.checkpoint import read_meta
    from pipeline.training.tasks import read_examples
    from pipeline.training.tracking import MetricsLog

    name, data, kind, words = UNREADABLE_FILES[case]
    (tmp_path / name).write_bytes(data)
    read = {
        "config": lambda: load_config(tmp_path / name),
        "task": lambda: read_examples(tmp_path / name, "mc"),
        "metrics": lambda: MetricsLog(tmp_path).rows(),
        "meta": lambda: read_meta(tmp_path),
    }[kind]
    with pytest.raises(PipelineError) as refused:
        read()
    assert all(w in " ".join(str(refused.value).split()) for w in words), refused.value


def test_an_unresolvable_master_addr_is_one_paragraph_at_once(monkeypatch):
    import time

    from pipeline.data.team import Team, TeamError

    for key, value in {
        "WORLD_SIZE": "2",
        "RANK": "1",
        "MASTER_ADDR": "no-such-host.invalid",
        "MASTER_PORT": "29999",
    }.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(TeamError, match="MASTER_ADDR=no-such-host.invalid cannot be resolved"):
        Team().meet()  # prepare's group; train calls the same check before Accelerate
    assert time.monotonic() - started < 30  # was 30 minutes of retried lookups


@pytest.mark.parametrize("visible,gpus", [(None, 8), ("2,5", 2), ("", 0), ("3", 1)])
def test_make_counts_only_the_gpus_this_job_may_use(tmp_path, visible, gpus):
    """A shared 8-GPU node: CUDA_VISIBLE_DEVICES (or Slurm's allocation) says which are
    this job's; nvidia-smi -L lists them all."""
    import os

    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100"; done\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    out = subprocess.run(["make", "help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert f"NUM_GPUS={gpus} NUM_PROCESSES={max(gpus, 1)}" in out.stdout, out.stdout + out.stderr


def test_evaluate_out_never_replaces_a_file_it_did_not_write(tiny_book_model, tmp_path, capsys):
    from pipeline.evaluate import main

    mine = tmp_path / "notes.txt"
    mine.write_text("years of work")
    with pytest.raises(SystemExit) as exit:
        main(
            [
                "--model",
                str(tiny_book_model),
                "--n-heads",
                "12",
                "--text",
                str(mine),
                "--out",
                str(mine),
            ]
        )
    assert exit.value.code == 2 and mine.read_text() == "years of work"
    assert "is not an earlier evaluate result" in " ".join(capsys.readouterr().err.split())


def test_a_rollback_at_or_below_the_skip_threshold_and_one_in_the_books_order_are_refused():
    with pytest.raises(ConfigError, match="spikes.rollback_loss_z=4.0 .*above spikes.skip_loss_z"):
        load_config(None, ["spikes.skip_loss_z=5", "spikes.rollback_loss_z=4"])
    with pytest.raises(ConfigError, match="train.order='book' .*shuffle with a spikes"):
        load_config(None, ["train.order=book", "spikes.rollback_nonfinite=true"])
