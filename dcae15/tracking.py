"""Experiment tracking beside ``metrics.jsonl``: TensorBoard (built in), Weights & Biases or MLflow (extras).

``metrics.jsonl`` stays the record the project reads back; a tracker mirrors it to the tool a lab already watches.
Only rank 0 opens one (the trainers call ``open_tracker`` there and pass the same rows they append to
``metrics.jsonl``), and evaluation logs its result rows and sample grids beside it, so one dashboard shows
loss, grad norm, lr, c', throughput, FID and the samples against the training step: TensorBoard and MLflow write
them into the training run; W&B gives each evaluation its own run (``<run id>-eval-<step>-<evaluation>``, ``job_type``
``eval``) in the training run's group (the run id): ``wandb sync`` of several offline runs under one id keeps one of them
(wandb issues #3841, #5865), so evaluations written by other processes would be lost on upload.

Where it writes (``TrackingConfig.dir``, default ``<run dir>/tracking`` for a local run directory, else
``./tracking/<run_id>`` — TensorBoard and W&B offline write local files): ``tensorboard/`` (event files),
``wandb/`` (W&B's run directory; ``offline: true`` needs no network: ``wandb sync`` uploads it later), or an MLflow
tracking URI (default ``sqlite:///<dir>/mlflow.db`` with artifacts in ``<dir>/mlartifacts``; MLflow 3 refuses new
file stores). A tracker that fails to start raises at the start of
the run, naming the backend and what to install; it never fails a run midway silently.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "EVAL_PREFIX", "EVAL_STEP", "Tracker", "TrackingConfig", "eval_wandb_id", "log_evaluation",
           "open_tracker", "tracking_dir"]

BACKENDS = ("none", "tensorboard", "wandb", "mlflow")
_EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


@dataclass(kw_only=True)
class TrackingConfig:
    """Where training and evaluation numbers are mirrored (an operational setting: never part of a run's identity)."""

    backend: str = "none"
    """``none``, ``tensorboard`` (works out of the box), ``wandb`` or ``mlflow`` (``pip install dcae15[tracking]``)."""
    project: str = "dcae15"
    """W&B project / MLflow experiment name (TensorBoard: unused)."""
    run_name: str | None = None
    """Display name; default the run id."""
    offline: bool = True
    """W&B: ``mode=offline`` (sync later with ``wandb sync``); MLflow: a local SQLite store unless ``uri`` is set."""
    dir: str | None = None
    """Local folder for the tracker's files; default ``<run dir>/tracking`` (local runs) or ``./tracking/<run_id>``."""
    uri: str | None = None
    """MLflow tracking URI (e.g. ``http://mlflow:5000``); default ``sqlite:///<dir>/mlflow.db``."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"logging.backend={self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if not self.project:
            raise ValueError("logging.project must be a non-empty name")


def tracking_dir(cfg: TrackingConfig, run_url: str, run_id: str) -> str:
    """The local folder a tracker writes to (see the module docstring)."""
    from storage.urls import is_local, local_path

    if cfg.dir:
        return os.path.join(cfg.dir, run_id)
    if is_local(run_url):
        return os.path.join(local_path(run_url), "tracking")
    return os.path.join("tracking", run_id)


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a row (``step``/``time`` and strings left out)."""
    out = {}
    for k, v in row.items():
        if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _image_array(image: Any) -> np.ndarray:
    """uint8 HWC RGB from PNG bytes or an array."""
    if isinstance(image, (bytes, bytearray)):
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"images must be PNG bytes or uint8 [H,W,3], got {arr.dtype} {arr.shape}")
    return arr


class Tracker:
    """The ``none`` backend, and the interface of the others: ``log_metrics``, ``log_image``, ``close``."""

    backend = "none"

    def log_metrics(self, row: dict[str, Any], step: int, prefix: str = "") -> None:
        """Log the numbers of ``row`` at training step ``step`` (names ``<prefix><key>``)."""

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """Log an image (PNG bytes or uint8 [H,W,3]) at ``step``."""

    def close(self) -> None:
        """Flush and close."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TensorBoard(Tracker):
    backend = "tensorboard"

    def __init__(self, folder: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(folder, "tensorboard"))
        self.writer.add_text("config", "```\n" + _yaml(config) + "\n```", 0)

    def log_metrics(self, row, step, prefix=""):
        for k, v in _scalars(row).items():
            self.writer.add_scalar(f"{prefix}{k}", v, int(step))

    def log_image(self, tag, image, step):
        self.writer.add_image(tag, _image_array(image), int(step), dataformats="HWC")

    def close(self):
        self.writer.flush()
        self.writer.close()


class _Wandb(Tracker):
    backend = "wandb"

    def __init__(self, cfg: TrackingConfig, folder: str, run_id: str, config: dict[str, Any],
                 evaluation: tuple[int, str] | None = None):
        import wandb

        os.makedirs(folder, exist_ok=True)
        self.wandb = wandb
        if evaluation is None:  # the training run: our run id, so a resumed run continues its W&B run; its group
            # (the run id) holds it and its evaluations
            kwargs = {"id": _wandb_id(run_id), "name": cfg.run_name or run_id, "resume": "allow",
                      "group": _wandb_id(run_id), "job_type": "train"}
        else:
            # An evaluation is its own W&B run, grouped under the training run: evaluations come from other
            # processes, and ``wandb sync`` of several offline runs sharing one id keeps only one of them (wandb
            # issues #3841, #5865). Its id is deterministic (a retried evaluation replaces its own run, never
            # another's) and names the checkpoint step and the evaluation (a score row, a sample grid).
            step, label = evaluation
            config = {**config, "run_id": run_id, "checkpoint_step": int(step), "evaluation": label}
            kwargs = {"id": eval_wandb_id(run_id, step, label), "group": _wandb_id(run_id), "job_type": "eval",
                      "name": f"{cfg.run_name or run_id} eval step {int(step)} ({label})"}
        self.run = wandb.init(project=cfg.project, dir=folder, config=config,
                              mode="offline" if cfg.offline else "online",
                              settings=wandb.Settings(silent=True, console="off"), **kwargs)
        # Evaluations are logged after training has moved on, and out of order (a sweep scores an older checkpoint
        # after an event scored a newer one); W&B drops a row logged with a step lower than the run's current one.
        # So ``eval/*`` is plotted against its own step metric, ``eval/step`` (the checkpoint's training step), and
        # logged without ``step=``: W&B appends it at its next internal step.
        self.run.define_metric(EVAL_STEP)
        self.run.define_metric(f"{EVAL_PREFIX}*", step_metric=EVAL_STEP)

    def _log(self, data, step):
        if not data:
            return
        if all(k.startswith(EVAL_PREFIX) for k in data):
            self.run.log({**data, EVAL_STEP: int(step)})
        else:
            self.run.log(data, step=int(step))

    def log_metrics(self, row, step, prefix=""):
        self._log({f"{prefix}{k}": v for k, v in _scalars(row).items()}, step)

    def log_image(self, tag, image, step):
        self._log({tag: self.wandb.Image(_image_array(image))}, step)

    def close(self):
        self.run.finish()
        # finish() returns before W&B's service process has written the offline file; teardown waits for it
        self.wandb.teardown()


EVAL_PREFIX = "eval/"
"""Evaluation numbers and images are logged under this prefix (``log_evaluation``)."""
EVAL_STEP = "eval/step"
"""W&B's step metric of ``eval/*``: the evaluated checkpoint's training step."""


def _wandb_id(run_id: str, limit: int = 64) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)[:limit]


def eval_wandb_id(run_id: str, step: int, label: str) -> str:
    """The W&B run id of one evaluation of ``run_id``'s checkpoint ``step``: ``<run id>-eval-<step>-<label>``
    (the run id shortened, never the suffix, to W&B's 64 characters; a long label becomes its short hash)."""
    from storage.fingerprint import short_id

    tag = _wandb_id(label)
    if len(tag) > 24 or tag != label:
        tag = short_id("wandb-eval", label)
    suffix = f"-eval-{int(step)}-{tag}"
    return _wandb_id(run_id, 64 - len(suffix)) + suffix


class _Mlflow(Tracker):
    backend = "mlflow"

    def __init__(self, cfg: TrackingConfig, folder: str, run_id: str, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        local = os.path.abspath(folder)
        os.makedirs(local, exist_ok=True)
        mlflow.set_tracking_uri(cfg.uri or "sqlite:///" + os.path.join(local, "mlflow.db"))
        if cfg.uri is None and mlflow.get_experiment_by_name(cfg.project) is None:
            # a local store keeps its artifacts beside it (MLflow's default is ./mlruns under the working directory)
            mlflow.create_experiment(cfg.project, artifact_location=pathlib.Path(local, "mlartifacts").as_uri())
        mlflow.set_experiment(cfg.project)
        found = mlflow.search_runs(filter_string=f"tags.dcae15_run_id = '{run_id}'", output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id if found else None,
                                    run_name=cfg.run_name or run_id, tags={"dcae15_run_id": run_id})
        if not found:
            mlflow.log_dict(config, "config.json")

    def log_metrics(self, row, step, prefix=""):
        self.mlflow.log_metrics({f"{prefix}{k}": v for k, v in _scalars(row).items()}, step=int(step))

    def log_image(self, tag, image, step):
        self.mlflow.log_image(_image_array(image), artifact_file=f"{tag}/step-{int(step):07d}.png")

    def close(self):
        self.mlflow.end_run()


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def open_tracker(cfg: TrackingConfig | dict | None, *, run_url: str, run_id: str, config: dict[str, Any] | None = None,
                 rank: int = 0, evaluation: tuple[int, str] | None = None) -> Tracker:
    """The tracker of a run (the ``none`` tracker on ranks other than 0 or when ``backend: none``).

    ``evaluation=(checkpoint step, label)`` opens the tracker of one evaluation of that run: TensorBoard and MLflow
    write into the training run; W&B opens the evaluation's own run (``eval_wandb_id``, grouped by ``run_id``).

    Raises:
        ImportError: the backend's package is not installed (names the pip package).
    """
    if isinstance(cfg, dict) or cfg is None:
        cfg = TrackingConfig(**(cfg or {}))
    if rank != 0 or cfg.backend == "none":
        return Tracker()
    folder = tracking_dir(cfg, run_url, run_id)
    config = dict(config or {})
    try:
        if cfg.backend == "tensorboard":
            return _TensorBoard(folder, config)
        if cfg.backend == "wandb":
            return _Wandb(cfg, folder, run_id, config, evaluation)
        return _Mlflow(cfg, folder, run_id, config)
    except ImportError as err:
        raise ImportError(f"logging.backend={cfg.backend} needs the {_EXTRA[cfg.backend]!r} package "
                          f"(pip install {_EXTRA[cfg.backend]}, or dcae15[tracking]): {err}") from err


def config_of(obj: Any) -> dict[str, Any]:
    """A JSON/YAML-able dict of a (dataclass) config, for the tracker's config panel."""
    import json

    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    return json.loads(json.dumps(d, default=str))


def log_evaluation(run_url: str, step: int, *, values: dict[str, Any] | None = None,
                   images: dict[str, Any] | None = None, storage_options: dict | None = None,
                   label: str | None = None) -> str:
    """Log an evaluation of a diffusion run's checkpoint ``step`` (result values and images such as the sample grid,
    all under ``eval/``) to the tracker its training used (``train.logging`` in its ``config.yaml``).

    Evaluations arrive from other processes and out of step order: TensorBoard keeps every (tag, step) of separate
    writers (its event files are version 2: nothing is purged without a restart marker); W&B writes each evaluation
    as its own run (id ``<run id>-eval-<step>-<label>``, ``group`` the training run id, ``job_type`` ``eval``,
    ``eval/*`` plotted against ``eval/step``), so no evaluation is dropped for a lower step nor replaced on
    ``wandb sync``. ``label`` names the evaluation (a result row's id, ``grid``); default the logged names, so two
    evaluations of one step that log the same names need distinct labels.

    Returns:
        The backend written to (``none`` when the run tracks nothing).
    """
    from dcae15.diffusion.checkpoint import read_run_config

    conf = read_run_config(run_url, storage_options)
    cfg = (conf.get("train") or {}).get("logging") or {}
    if label is None:
        label = "+".join(sorted([*(values or {}), *(images or {})])) or "eval"
    with open_tracker(cfg, run_url=run_url, run_id=conf["run_id"], evaluation=(int(step), label)) as tracker:
        if values:
            tracker.log_metrics(values, step, prefix=EVAL_PREFIX)
        for tag, image in (images or {}).items():
            tracker.log_image(f"{EVAL_PREFIX}{tag}", image, step)
        return tracker.backend
