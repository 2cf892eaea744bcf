"""MLflow through its file store, offline: the run is named after `name`, a stopped and
resumed run stays one MLflow run that holds every step, and a store MLflow cannot use is
one paragraph before any step."""

from __future__ import annotations

import importlib.util

import pytest
from train_runs import train_args, train_here

from pipeline.config import load_config
from pipeline.core.errors import PipelineError


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """MLflow's file store under tmp_path (MLflow 3 refuses it unless allowed)."""
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(name, raising=False)
    return uri


def args(data_root, runs, *extra):
    return train_args(
        data_root,
        runs,
        "ml-run",
        "train.log_every_steps=1",
        "eval.every_steps=4",
        "tracking.log_with=[mlflow]",
        *extra,
    )


@pytest.mark.slow
def test_a_stopped_and_resumed_run_is_one_mlflow_run_named_after_name_with_every_step(
    stdlib_data, tmp_path, mlflow_store
):
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "runs"
    train_here(args(stdlib_data, runs, "train.max_steps=4"))
    first_id = (runs / "ml-run" / "mlflow_run_id").read_text()
    train_here(args(stdlib_data, runs, "train.max_steps=8"))  # resumes from step 4

    client = MlflowClient(mlflow_store)
    (experiment,) = client.search_experiments(filter_string="name = 'gpt-pipeline'")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == first_id == (runs / "ml-run" / "mlflow_run_id").read_text()
    assert run.info.run_name == "ml-run" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))  # every step once
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [4, 8]
    # the parameters are the ones the run started with; config.yaml has the new length
    assert run.data.params["train.max_steps"] == "4" and run.data.params["name"] == "ml-run"


def test_a_store_mlflow_cannot_use_is_one_paragraph_before_any_step(
    stdlib_data, tmp_path, monkeypatch, mlflow_store
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{blocker / 'mlruns'}")
    runs = tmp_path / "runs"
    with pytest.raises(PipelineError) as caught:
        train_here(args(stdlib_data, runs, "train.max_steps=2"))
    message = str(caught.value)
    assert "the tracker mlflow could not start (NotADirectoryError" in message
    assert "MLFLOW_TRACKING_URI" in message and "nothing was trained yet" in message
    assert "\n" not in message and caught.value.__suppress_context__  # no traceback
    assert not (runs / "ml-run" / "checkpoints").exists()
    assert not (runs / "ml-run" / "mlflow_run_id").exists()


def test_mlflow_not_installed_is_named_before_any_work(monkeypatch):
    from pipeline.training import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a)
    )
    with pytest.raises(PipelineError, match="names mlflow, which is not installed here"):
        tracking.trackers(load_config(None, ["tracking.log_with=[mlflow]"]))
