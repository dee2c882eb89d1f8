"""Single-task baselines: one model per task with the multi-task run's budget, stored for Δm%.

A baselines directory holds ``baselines.json`` and one run per task::

    baselines.json       {key: {"config": ..., "tasks": {task: {"metric", "validation", "test", "workdir"}}}}
    <key>/<task>/        the single-task run (a normal run workdir: resumable, with logs and plots)

``key`` (:func:`jmtl.run.config.baseline_key`) digests every config field
that changes a single-task model (dataset, model, optimizer, steps, batch,
seed, selection), and none that only the multi-task run has (method, tasks,
soft-sharing strength, logging), so every method of a sweep shares one set of
baselines and a changed budget never reuses stale ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections

from jmtl.run import config as config_lib
from jmtl.run import loop
from jmtl.run import workdir as workdir_lib

FILE = "baselines.json"


def directory(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Where the run's baselines live: ``<workdir>/baselines`` for ``"auto"``, the given path, or ``None`` for ``""``.

  Examples:
    >>> directory(ml_collections.ConfigDict({"baselines": "auto"}), "/tmp/run")
    '/tmp/run/baselines'
    >>> directory(ml_collections.ConfigDict({"baselines": ""}), "/tmp/run") is None
    True
  """
  if not config.baselines:
    return None
  if config.baselines == "auto":
    return os.path.join(os.path.abspath(workdir), "baselines")
  return os.path.abspath(os.path.expanduser(config.baselines))


def read(path: str, config: ml_collections.ConfigDict) -> dict[str, dict]:
  """The stored baselines of this config's setup: ``{task: {"metric", "validation", "test", ...}}``.

  Examples:
    >>> read("/nonexistent", ml_collections.ConfigDict({"num_steps": 1}))
    {}
  """
  store = os.path.join(path, FILE)
  if not os.path.exists(store):
    return {}
  data = workdir_lib.read_json(store, "baselines")
  return dict(data.get(config_lib.baseline_key(config), {}).get("tasks", {}))


def _record(path: str, config: ml_collections.ConfigDict, task: str, results: dict, run_dir: str) -> None:
  store = os.path.join(path, FILE)
  data = workdir_lib.read_json(store, "baselines") if os.path.exists(store) else {}
  key = config_lib.baseline_key(config)
  entry = data.setdefault(key, {"config": config_lib.to_dict(config_lib.baseline_config(config, "")), "tasks": {}})
  metric = results["metric"][task]
  entry["tasks"][task] = {
    "metric": metric,
    "validation": results["validation"][f"{task}/{metric}"],
    "test": results["test"][f"{task}/{metric}"],
    "step_ms": results.get("step_ms"),
    "workdir": os.path.relpath(run_dir, path),
  }
  workdir_lib.write_json(store, data)


def ensure(config: ml_collections.ConfigDict, path: str, tasks: Sequence[str], *, progress: bool = True):
  """Trains the baselines of ``tasks`` that ``path`` lacks; returns ``{task: test value of its primary metric}``.

  Examples:
    >>> ensure(config, "/tmp/baselines", ["left", "right"])  # doctest: +SKIP
    {'left': 0.95, 'right': 0.94}
  """
  path = workdir_lib.check_usable(path)
  have = read(path, config)
  key = config_lib.baseline_key(config)
  for task in tasks:
    if task in have:
      continue
    run_dir = os.path.join(path, key, task)
    results = loop.train_and_evaluate(
      config_lib.baseline_config(config, task), run_dir, progress=progress, desc=f"baseline {task}"
    )
    _record(path, config, task, results, run_dir)
  have = read(path, config)
  return {t: have[t]["test"] for t in tasks}
