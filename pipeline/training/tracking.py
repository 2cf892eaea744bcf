"""Where a run's numbers go: metrics.jsonl, the book's loss plot, and the trackers.

`metrics.jsonl` holds one JSON object per logged step (always `step` and `tokens`);
`loss.png` is the book's figure, train and val loss against tokens seen; the trackers of
`tracking.log_with` (W&B, TensorBoard, ... : Accelerate's) get the same metrics, and W&B
the samples as a table; W&B and MLflow continue their run of before on a resume (its id
kept in the run directory). Only the main process writes anything. Knows nothing about
models or data.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import uuid
from pathlib import Path

from pipeline.config import Config, WandbConfig, to_dict
from pipeline.core import log
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_open, atomic_write_text

METRICS = "metrics.jsonl"
PLOT = "loss.png"
WANDB_ID = "wandb_run_id"
MLFLOW_ID = "mlflow_run_id"


def wandb_mode(cfg: WandbConfig) -> str:
    """WANDB_MODE wins; else the config; else online when an API key is configured.
    Online needs a key (else one paragraph) and a reachable server: on a compute node
    without a network it is offline, said once, instead of wandb's ~90 s of retries and
    a traceback while the other processes wait."""
    mode = _requested_wandb_mode(cfg)
    if mode != "online":
        return mode
    if not _wandb_key_configured():
        raise PipelineError(
            "W&B is set to log online (WANDB_MODE or tracking.wandb.mode), and no W&B API key "
            "is configured here. Run `wandb login` (or set WANDB_API_KEY), or log offline "
            "(tracking.wandb.mode=offline, uploaded later with `wandb sync`), or "
            "tracking.wandb.mode=disabled."
        )
    host = _wandb_host()
    if not _reachable(host):
        _say_once(
            f"W&B: {host} cannot be reached from this machine; logging offline into "
            f"the run directory instead (upload it later with `wandb sync "
            f"runs/<name>/wandb/offline-run-*`)."
        )
        return "offline"
    return "online"


def _requested_wandb_mode(cfg: WandbConfig) -> str:
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if cfg.mode:
        return cfg.mode
    return "online" if _wandb_key_configured() else "offline"


def _wandb_host() -> str:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return f"{url.hostname or 'api.wandb.ai'}:{url.port or (80 if url.scheme == 'http' else 443)}"


_reachability: dict[str, bool] = {}


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` (asked once per host)."""
    import socket

    if host not in _reachability:
        name, port = host.rsplit(":", 1)
        try:
            socket.create_connection((name, int(port)), timeout=timeout).close()
            _reachability[host] = True
        except OSError:
            _reachability[host] = False
    return _reachability[host]


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warn(message)


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_project(cfg: WandbConfig) -> str:
    return cfg.project or os.environ.get("WANDB_PROJECT") or "gpt-pipeline"


def wandb_init_kwargs(config: Config, run_dir: Path, mode: str) -> dict:
    """init_kwargs for Accelerator.init_trackers: a resumed run continues its W&B run;
    entity and group from the config, else from W&B's own environment variables."""
    id_file = run_dir / WANDB_ID
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # W&B's own id format: 8 lowercase alphanumerics
        atomic_write_text(id_file, run_id)
    w = config.tracking.wandb
    return {
        "name": config.name,
        "id": run_id,
        "resume": "allow",
        "mode": mode,
        "entity": w.entity or os.environ.get("WANDB_ENTITY"),
        "group": w.group or os.environ.get("WANDB_RUN_GROUP"),
        "tags": w.tags,
        "dir": str(run_dir),
    }


def mlflow_init_kwargs(config: Config, run_dir: Path) -> dict:
    """init_kwargs for MLflow: the run is named `name`, and a resumed run continues the
    MLflow run whose id keep_mlflow_run_id wrote (MLflow makes its ids itself, so unlike
    W&B's the id is known only once the run has started)."""
    id_file = run_dir / MLFLOW_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    return {"run_name": config.name, "run_id": run_id or None}


def keep_mlflow_run_id(accelerator, run_dir: Path) -> None:
    run = accelerator.get_tracker("mlflow", unwrap=True)
    atomic_write_text(run_dir / MLFLOW_ID, run.info.run_id)


def mlflow_params(values: dict, run) -> dict:
    """The config values an MLflow run can take as parameters: MLflow refuses to change
    one, so a resumed run keeps the values it started with (config.yaml has the new
    ones), and the changed keys are named."""
    logged = run.data.params
    changed = [k for k, v in values.items() if k in logged and logged[k] != str(v)]
    if changed:
        log.info(
            f"MLflow keeps the parameters its run started with; changed since and not "
            f"updated there (config.yaml has them): {', '.join(changed)}"
        )
    return {k: v for k, v in values.items() if k not in changed}


def trackers(config: Config) -> list[str]:
    """The trackers this run logs to: tracking.log_with, less W&B when its mode is
    disabled; PipelineError naming the package when one is not installed."""
    from pipeline.training.config import TRACKERS

    chosen = [
        t
        for t in config.tracking.log_with
        if not (t == "wandb" and wandb_mode(config.tracking.wandb) == "disabled")
    ]
    missing = [t for t in chosen if importlib.util.find_spec(TRACKERS[t]) is None]
    if missing:
        raise PipelineError(
            f"tracking.log_with names {', '.join(missing)}, which is not installed here: "
            f"pip install {' '.join(TRACKERS[t] for t in missing)} (for tensorboard: pip "
            f"install 'gpt-pipeline[tensorboard]'), or take it out of tracking.log_with."
        )
    return chosen


def flat_config(config: Config) -> dict:
    """The config as one level of dotted keys with scalar values: every tracker stores
    that (TensorBoard's hparams take nothing nested)."""

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", str(value) if isinstance(value, list) else value

    return dict(walk(to_dict(config), ""))


class SampleTable:
    """The samples printed at each evaluation, as a W&B table (step, prompt, text) that
    grows with the run; other trackers get the text as part of the metrics row."""

    def __init__(self, accelerator, prompt: str):
        self.accelerator, self.prompt, self.table = accelerator, prompt, None
        if accelerator.is_main_process and any(t.name == "wandb" for t in accelerator.trackers):
            import wandb

            self.table = wandb.Table(columns=["step", "prompt", "text"], log_mode="INCREMENTAL")

    def add(self, step: int, text: str) -> None:
        if self.table is None:
            return
        self.table.add_data(step, self.prompt, text)
        self.accelerator.get_tracker("wandb", unwrap=True).log({"samples": self.table}, step=step)


class MetricsLog:
    """Appends rows to metrics.jsonl and redraws loss.png."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS
        self.plot_path = run_dir / PLOT

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a resumed run logs those steps again."""
        rows = [r for r in self.rows() if r["step"] <= step]
        with atomic_open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def rows(self) -> list[dict]:
        """The logged rows. A last line cut short (a kill during the append) is dropped
        with a warning, and the next truncate_after rewrites the file without it; a bad
        line anywhere else means the file was damaged otherwise, and is an error."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_bytes().splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:  # bytes: a line that is not UTF-8 is as damaged as one that is not JSON
                row = json.loads(line.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append(row)
            except (ValueError, RecursionError):
                if number < len(lines):
                    raise PipelineError(
                        f"{self.path} line {number} is not JSON: the file is damaged. Move it "
                        f"aside to start the log afresh (the checkpoints are unaffected)."
                    ) from None
                log.warn(
                    f"{self.path}: dropping its last line, cut short (a kill during "
                    f"the write?): {line[:60]!r}"
                )
        return rows

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        """The book's figure: train and val loss against tokens seen."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
        tasks = sorted({k for r in rows for k in r if k.endswith("_acc_norm")})
        fig, axes = plt.subplots(
            1, 2 if tasks else 1, figsize=(11 if tasks else 6, 4), squeeze=False
        )
        ax = axes[0][0]
        if train:
            ax.plot(*zip(*train), label="Training loss", alpha=0.8)
        if val:
            ax.plot(*zip(*val), linestyle="-.", marker="o", markersize=3, label="Validation loss")
        ax.set_xlabel("Tokens seen")
        ax.set_ylabel("Loss")
        ax.legend(loc="upper right")
        if tasks:  # a second panel, as build-nanogpt's plots have: task accuracy over tokens
            right = axes[0][1]
            for key in tasks:
                right.plot(
                    *zip(*[(r["tokens"], r[key]) for r in rows if key in r]),
                    marker="o",
                    markersize=3,
                    label=key,
                )
            right.set_xlabel("Tokens seen")
            right.set_ylabel("Accuracy (normalized)")
            right.legend(loc="lower right")
        fig.tight_layout()
        with atomic_open(self.plot_path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


def start_trackers(accelerator, config: Config, run_dir: Path, mode: str) -> None:
    """Initialise the trackers the Accelerator was made with (none: a no-op), each
    continuing its run of before on a resume where it can (W&B, MLflow)."""
    if not accelerator.log_with:
        return
    init_kwargs = {}
    names = [getattr(t, "value", t) for t in accelerator.log_with]  # LoggerType is a str enum
    main_mlflow = accelerator.is_main_process and "mlflow" in names
    if accelerator.is_main_process and "wandb" in names:
        init_kwargs["wandb"] = wandb_init_kwargs(config, run_dir, mode)
    if main_mlflow:
        init_kwargs["mlflow"] = mlflow_init_kwargs(config, run_dir)
    values = flat_config(config)
    try:
        accelerator.init_trackers(wandb_project(config.tracking.wandb), init_kwargs=init_kwargs)
        if main_mlflow:  # kept before anything else can fail, so a retry continues this run
            keep_mlflow_run_id(accelerator, run_dir)
        # the config goes to each tracker here, not through init_trackers: a resumed
        # MLflow run takes only the parameters it has not got (see mlflow_params)
        for tracker in accelerator.trackers:
            if tracker.name == "mlflow" and accelerator.is_main_process:
                tracker.store_init_configuration(mlflow_params(values, tracker.active_run))
            else:
                tracker.store_init_configuration(values)
    except Exception as e:  # each tracker's own errors: a store, a server, a login
        raise tracker_failed(e, names, run_dir) from None


# What to check when a tracker does not start, for those whose setup lives outside the config.
TRACKER_SETUP = {
    "mlflow": "MLflow writes where MLFLOW_TRACKING_URI says: a server's http(s):// address, "
    "or file:<directory> with MLFLOW_ALLOW_FILE_STORE=true (unset, it is sqlite:///mlflow.db, "
    "which needs the full mlflow package, not mlflow-skinny).",
}


def tracker_failed(error: Exception, names: list[str], run_dir: Path) -> PipelineError:
    """One paragraph for a tracker that did not start: which one, why, what to do."""
    name = raised_by(error) or ", ".join(names)
    cause = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
    advice = [TRACKER_SETUP[name]] if name in TRACKER_SETUP else []
    if name == "mlflow" and (run_dir / MLFLOW_ID).is_file():
        advice.append(
            f"This run continues the MLflow run named in {run_dir / MLFLOW_ID}: if the store "
            f"is right but lacks that run, delete the file to start a new one."
        )
    return PipelineError(
        f"the tracker{'s' if ',' in name else ''} {name} could not start "
        f"({type(error).__name__}: {cause}). {' '.join(advice + [''])}Fix that tracker's "
        f"setup, or take it out of tracking.log_with; nothing was trained yet."
    )


def raised_by(error: Exception) -> str | None:
    """The name of the Accelerate tracker whose code raised `error` (the innermost one
    in its traceback): init_trackers starts them all in one call, and does not say."""
    from accelerate.tracking import GeneralTracker

    name, frame = None, error.__traceback__
    while frame is not None:
        me = frame.tb_frame.f_locals.get("self")
        if isinstance(me, GeneralTracker):
            name = me.name
        frame = frame.tb_next
    return name
