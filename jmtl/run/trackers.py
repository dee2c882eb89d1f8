"""Experiment trackers behind the runner's logging: TensorBoard, MLflow, Weights & Biases.

``config.trackers`` names them, comma separated (``--config.trackers=tensorboard,mlflow,wandb``; ``""`` for none;
default ``tensorboard``). Each is a :class:`Tracker`, a small writer:
``params(dict)`` (the config, flattened to dotted names, once per run),
``scalars(step, dict)`` (every record of ``metrics.jsonl``: ``train/...`` every
``log_every`` steps, ``validation/...`` every ``eval_every``),
``artifact(path)`` (a file: the plots, ``results.json``), ``table(name,
columns, rows)`` (the results table) and ``close(finished)``.

While a run trains, :class:`jmtl.run.logs.MetricsLog` writes every record to
each tracker; when it has finished (test metrics, Δm%, plots written),
:func:`finish` adds ``final/validation/...``, ``final/test/...``,
``final/delta_m``, the results table and the plots and ``results.json`` as
artifacts, and closes the tracker's run as finished.

* ``tensorboard`` -- tensorboardX event files in ``<workdir>/tensorboard`` (the
  config and the table as text; no artifacts);
* ``mlflow`` (``pip install 'jmtl[mlflow]'``) -- the run in the tracking URI
  ``$MLFLOW_TRACKING_URI``, else an SQLite store ``mlflow.db`` (artifacts in
  ``mlartifacts/``) in the run's workdir, or in the sweep's or tune's workdir
  for their runs (:func:`store_root`); experiment ``$MLFLOW_EXPERIMENT_NAME``
  or ``jmtl``; the run named by its workdir;
* ``wandb`` (``pip install 'jmtl[wandb]'``) -- offline unless ``$WANDB_MODE``
  says otherwise (``wandb sync <workdir>/wandb/offline-run-*`` uploads it
  later), project ``$WANDB_PROJECT`` or ``jmtl``, files in ``<workdir>/wandb``.

A resumed run continues its tracker runs (their ids are kept in
``<workdir>/trackers.json``); the records after the checkpoint it resumes
from are written again, which MLflow keeps as a second value at those steps
and W&B drops (its steps only increase). Only the process that writes the
run's files (process 0 under ``jax.distributed``) tracks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jmtl.run.config import ConfigError

NAMES = ("tensorboard", "mlflow", "wandb")
FILE = "trackers.json"
_ROOT: list[str] = []  # the store directory of the sweep or tune being run (store_root)
_HELD: dict[str, list] = {}  # workdir -> the trackers of a run that finished training, kept open for finish()


def names(config) -> list[str]:
  """The trackers ``config.trackers`` names (``tensorboard`` when the config has no such field).

  Examples:
    >>> import ml_collections
    >>> names(ml_collections.ConfigDict({"trackers": "tensorboard, mlflow"}))
    ['tensorboard', 'mlflow']
    >>> names(ml_collections.ConfigDict({"trackers": "neptune"}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: config field 'trackers': unknown tracker 'neptune' (available: tensorboard, ...)
  """
  value = config.get("trackers", "tensorboard") if config is not None else "tensorboard"
  if not isinstance(value, str):
    value = ",".join(value)
  out = [n.strip() for n in value.split(",") if n.strip()]
  for n in out:
    if n not in NAMES:
      raise ConfigError(f"config field 'trackers': unknown tracker {n!r} (available: {', '.join(NAMES)})")
  return list(dict.fromkeys(out))


def check(config) -> None:
  """Fails naming the tracker whose package is not installed (before a run starts)."""
  modules = {"mlflow": "mlflow", "wandb": "wandb"}
  for n in names(config):
    if n in modules:
      try:
        __import__(modules[n])
      except ImportError:
        raise ConfigError(f"config field 'trackers': {n} is not installed (pip install 'jmtl[{n}]')") from None


@contextlib.contextmanager
def store_root(path: str) -> Iterator[str]:
  """Runs trained within the block keep their MLflow records in ``<path>/mlflow.db`` (one store for a search).

  The outermost block wins: a run's own block within a search's keeps the search's store.
  """
  _ROOT.append(_ROOT[-1] if _ROOT else os.path.abspath(path))
  try:
    yield path
  finally:
    _ROOT.pop()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as dotted names.

  Examples:
    >>> flatten({"a": 1, "b": {"c": (1, 2), "d": {}}})
    {'a': 1, 'b.c': (1, 2)}
  """
  out = {}
  for k, v in data.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
  """The finite scalar values; a matrix (the gradient cosines) as one value per pair ``<key>/<i>_<j>``."""
  out = {}
  for k, v in values.items():
    if v is None or isinstance(v, bool | str):
      continue
    a = np.asarray(v, float)
    if a.ndim == 2:
      out.update({f"{k}/{i}_{j}": float(a[i, j]) for i in range(a.shape[0]) for j in range(i + 1, a.shape[1])})
    elif a.ndim == 0 and np.isfinite(a):
      out[k] = float(a)
  return out


class Tracker:
  """The writer interface; every method does nothing by default."""

  name = ""

  def params(self, values: Mapping[str, Any]) -> None:
    """The run's config (flattened), once per run."""

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Scalars at ``step`` (finite floats, names like ``train/loss/left``)."""

  def artifact(self, path: str, folder: str = "") -> None:
    """A file, stored under ``folder`` of the run's artifacts."""

  def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table (the results table)."""

  def flush(self) -> None:
    """Writes what is buffered."""

  def close(self, finished: bool = False) -> None:
    """Ends this writer; ``finished``: the run is complete (else it may be resumed)."""


def _summary_writer(logdir: str, purge_step: int | None):
  # tensorboardX imports torch when it is installed, only to accept torch
  # tensors (2 s, and torch in the process); jmtl passes numbers, so hide it.
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  # A file of its own per start: tensorboardX names files by the second and opens them with "wb", so a
  # restart within the same second would otherwise overwrite the previous start's file.
  return SummaryWriter(logdir, flush_secs=30, purge_step=purge_step, filename_suffix=f".{time.time_ns()}")


class TensorBoard(Tracker):
  """tensorboardX event files in ``<workdir>/tensorboard``; a new file per start, with a purge marker (see logs)."""

  name = "tensorboard"

  def __init__(self, workdir: str, purge_step: int | None):
    self.writer = _summary_writer(os.path.join(workdir, "tensorboard"), purge_step)

  def params(self, values):
    self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in values.items()), 0)

  def scalars(self, step, values):
    for k, v in values.items():
      self.writer.add_scalar(k, v, step)

  def table(self, name, columns, rows):
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    self.writer.add_text(name, "\n".join(lines), 0)

  def flush(self):
    self.writer.flush()

  def close(self, finished=False):
    self.writer.close()


def _state(workdir: str) -> dict:
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _save_state(workdir: str, state: dict) -> None:
  from jmtl.run import workdir as workdir_lib

  workdir_lib._write_json(os.path.join(workdir, FILE), state)  # this process writes the run's files already


class MLflow(Tracker):
  """One MLflow run per jmtl run, through ``MlflowClient`` (no global active run)."""

  name = "mlflow"

  def __init__(self, workdir: str, state: dict):
    for name in ("mlflow", "alembic"):  # schema migrations of a new store are logged at INFO
      logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    root = _ROOT[-1] if _ROOT else workdir
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(root, 'mlflow.db')}"
    self.client = MlflowClient(tracking_uri=uri)
    self.new = "mlflow" not in state
    if self.new:
      name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "jmtl")
      found = self.client.get_experiment_by_name(name)
      if found is None:
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else os.path.join(root, "mlartifacts")
        experiment = self.client.create_experiment(name, artifact_location=local)
      else:
        experiment = found.experiment_id
      label = os.path.relpath(workdir, root) if root != workdir else os.path.basename(workdir)
      run = self.client.create_run(experiment, run_name=label, tags={"jmtl.workdir": workdir})
      state["mlflow"] = {"uri": uri, "run_id": run.info.run_id}
    elif state["mlflow"]["uri"] != uri:
      self.client = MlflowClient(tracking_uri=state["mlflow"]["uri"])  # the store this run began in
    self.run_id = state["mlflow"]["run_id"]
    if not self.new:
      self.client.update_run(self.run_id, status="RUNNING")

  def params(self, values):
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in values.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
      self.client.log_batch(self.run_id, params=items[i : i + 100])

  def scalars(self, step, values):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    # MLflow metric names: alphanumerics, _ - . space / (the task names are identifiers).
    items = [Metric(k, v, now, int(step)) for k, v in values.items()]
    for i in range(0, len(items), 1000):
      self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

  def artifact(self, path, folder=""):
    self.client.log_artifact(self.run_id, path, folder or None)

  def table(self, name, columns, rows):
    self.client.log_dict(self.run_id, {"columns": list(columns), "data": [list(r) for r in rows]}, f"{name}.json")

  def close(self, finished=False):
    self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


class WandB(Tracker):
  """One W&B run per jmtl run, offline by default (``$WANDB_MODE``), resumed by its id."""

  name = "wandb"

  def __init__(self, workdir: str, state: dict, config: Mapping[str, Any] | None):
    import wandb

    self.new = "wandb" not in state
    if self.new:
      state["wandb"] = {"id": uuid.uuid4().hex[:12]}
    self.run = wandb.init(
      project=os.environ.get("WANDB_PROJECT", "jmtl"),
      name=os.path.basename(workdir),
      id=state["wandb"]["id"],
      resume="allow",
      dir=workdir,
      mode=os.environ.get("WANDB_MODE", "offline"),
      config=dict(config or {}),
      settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
      reinit="create_new",
    )
    self.workdir = workdir

  def scalars(self, step, values):
    self.run.log(dict(values), step=int(step))

  def artifact(self, path, folder=""):
    # A copy in the run's files directory (uploaded with the run; offline, by wandb sync).
    target = os.path.join(self.run.dir, folder)
    os.makedirs(target, exist_ok=True)
    copy = os.path.join(target, os.path.basename(path))
    shutil.copy(path, copy)
    self.run.save(copy, base_path=self.run.dir, policy="now")

  def table(self, name, columns, rows):
    import wandb

    self.run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

  def close(self, finished=False):
    self.run.finish(exit_code=0 if finished else 1)


def open_all(config, workdir: str, *, resume_step: int | None, tensorboard: bool = True) -> list[Tracker]:
  """The trackers of ``config`` for a run starting (``resume_step`` None) or resuming in ``workdir``.

  A new run (no stored tracker id) gets the config as parameters.
  """
  wanted = names(config) if config is not None else ["tensorboard"]
  if not tensorboard:
    wanted = [n for n in wanted if n != "tensorboard"]
  state = _state(workdir)
  if resume_step is None:  # trained from step 0: new tracker runs
    state = {}
  params = flatten(config.to_dict()) if config is not None else {}
  out: list[Tracker] = []
  for n in wanted:
    if n == "tensorboard":
      out.append(TensorBoard(workdir, 1 if resume_step is None else resume_step + 1))
      if resume_step is None and params:
        out[-1].params(params)
    elif n == "mlflow":
      out.append(MLflow(workdir, state))
      if out[-1].new:
        out[-1].params(params)
    else:
      out.append(WandB(workdir, state, params))
  if wanted:
    _save_state(workdir, {**state, "finished": False})
  return out


def scalars_of(kind: str, values: Mapping[str, Any]) -> dict[str, float]:
  """A ``metrics.jsonl`` record's values as tracker scalars: ``<kind>/<name>``.

  Examples:
    >>> scalars_of("train", {"loss/a": 0.5, "grad_cosine": [[1.0, -0.5], [-0.5, 1.0]], "x": None})
    {'train/loss/a': 0.5, 'train/grad_cosine/0_1': -0.5}
  """
  return _numbers({f"{kind}/{k}": v for k, v in values.items()})


def results_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """The results table as columns and rows: per task its metric, single-task, MTL value, negative transfer.

  Examples:
    >>> r = {"tasks": ["a"], "metric": {"a": "acc"}, "test": {"a/acc": 0.9}, "validation": {"a/acc": 0.8},
    ...      "baselines": {"a": 0.85}, "negative_transfer": {"a": False}}
    >>> columns, rows = results_table(r)
    >>> columns
    ['task', 'metric', 'single_task', 'mtl_validation', 'mtl_test', 'negative_transfer']
    >>> rows
    [['a', 'acc', 0.85, 0.8, 0.9, False]]
  """
  columns = ["task", "metric", "single_task", "mtl_validation", "mtl_test", "negative_transfer"]
  rows = []
  for t in results["tasks"]:
    key = f"{t}/{results['metric'][t]}"
    rows.append(
      [
        t,
        results["metric"][t],
        (results.get("baselines") or {}).get(t),
        results.get("validation", {}).get(key),
        results["test"].get(key),
        (results.get("negative_transfer") or {}).get(t),
      ]
    )
  return columns, rows


def hold(workdir: str, trackers: Sequence[Tracker]) -> None:
  """Keeps the trackers of a run that trained to its last step open (flushed) for :func:`finish`: its final metrics
  go to the same runs and TensorBoard file."""
  for t in trackers:
    t.flush()
  _HELD[os.path.abspath(workdir)] = list(trackers)


def finish_held() -> None:
  """:func:`finish` for every run whose trackers are held open (the single-task baselines a run trained after it),
  from the config and results in its workdir."""
  from jmtl.run import workdir as workdir_lib

  for workdir in list(_HELD):
    results = os.path.join(workdir, workdir_lib.RESULTS)
    if os.path.exists(results):
      finish(workdir_lib.load_run_config(workdir), workdir, workdir_lib.read_json(results, f"workdir {workdir}"))


def finish(config, workdir: str, results: Mapping[str, Any]) -> None:
  """Adds a finished run's results to its trackers (final metrics, Δm%, the table, plots and results.json as
  artifacts) and closes their runs as finished; once per run (``trackers.json`` records it).

  TensorBoard gets the final scalars and the table in an event file of their own. Does nothing without trackers,
  on processes other than the primary one, and for a run already finished.
  """
  import jmtl.parallel

  wanted = names(config)
  workdir = os.path.abspath(workdir)
  if not wanted or not jmtl.parallel.is_primary():
    return
  state = _state(workdir)
  if state.get("finished") or not all(n in state for n in wanted if n != "tensorboard"):
    return  # reported already, or the run was trained before its trackers were configured
  step = int(results.get("num_steps") or 0)
  final = {f"final/{split}/{k}": v for split in ("validation", "test") for k, v in (results.get(split) or {}).items()}
  final["final/delta_m"] = results.get("delta_m")
  final["final/val_score"] = results.get("val_score")
  columns, rows = results_table(results)
  plots_dir = os.path.join(workdir, "plots")
  plots = sorted(f for f in os.listdir(plots_dir) if f.endswith(".png")) if os.path.isdir(plots_dir) else []
  held = {t.name: t for t in _HELD.pop(workdir, ())}
  reopen = {"tensorboard": lambda: TensorBoard(workdir, None), "mlflow": lambda: MLflow(workdir, state)}
  for n in wanted:
    tracker = held.pop(n, None) or reopen.get(n, lambda: WandB(workdir, state, None))()
    try:
      tracker.scalars(step, _numbers(final))
      tracker.table("results_table", columns, rows)
      tracker.artifact(os.path.join(workdir, "results.json"))
      for p in plots:
        tracker.artifact(os.path.join(plots_dir, p), "plots")
    finally:
      tracker.close(finished=True)
  for tracker in held.values():  # configured when the run trained, not any more
    tracker.close(finished=True)
  _save_state(workdir, {**state, "finished": True})
