"""Model selection on validation and the comparison with single-task baselines (Δm%, negative transfer).

Selection never looks at the test split: the runner evaluates validation
every ``eval_every`` steps, keeps the parameters with the best criterion, and
evaluates test once, at the end, for the kept parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jmtl
from jmtl.run.config import ConfigError


def primary_metric(task: jmtl.Task) -> str:
  """The metric a task is reported and compared by: its first one (``loss`` if it has none).

  Examples:
    >>> primary_metric(jmtl.Task("a", jmtl.losses.mse, {"mae": jmtl.metrics.mae()}))
    'mae'
  """
  return next(iter(task.metrics), "loss")


def higher_is_better(task: jmtl.Task, metric: str) -> bool:
  """The direction of ``metric`` (``loss`` is lower-is-better).

  Examples:
    >>> t = jmtl.Task("a", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()})
    >>> higher_is_better(t, "acc"), higher_is_better(t, "loss")
    (True, False)
  """
  return False if metric == "loss" else bool(task.metrics[metric].higher_is_better)


def check_selection(tasks: Sequence[jmtl.Task], metric: str) -> None:
  """Fails with the task's name when a task lacks the selection metric.

  Examples:
    >>> check_selection([jmtl.Task("y", jmtl.losses.mse, {"mae": jmtl.metrics.mae()})], "acc")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: config field 'select_metric' = 'acc' is not a metric of task 'y' (it has loss, mae)
  """
  for t in tasks:
    if metric != "loss" and metric not in t.metrics:
      have = ", ".join(["loss", *t.metrics])
      raise ConfigError(f"config field 'select_metric' = {metric!r} is not a metric of task {t.name!r} (it has {have})")


def selection_score(
  values: Mapping[str, float], tasks: Sequence[jmtl.Task], metric: str, skip: Sequence[str] = ()
) -> float:
  """The mean over tasks of ``metric``, signed so that higher is better.

  The tasks in ``skip`` (those without examples in the split: see
  :func:`mark_non_finite`) are left out of the mean.

  Examples:
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse, {"mae": jmtl.metrics.mae()})]
    >>> selection_score({"a/mae": 0.5, "a/loss": 0.3}, tasks, "mae")
    -0.5
  """
  total, count = 0.0, 0
  for t in tasks:
    v = values[f"{t.name}/{metric}"]
    if t.name in skip:
      continue
    if v is None:  # marked by mark_non_finite
      return -1e300
    v = float(v)
    total += v if higher_is_better(t, metric) else -v
    count += 1
  score = total / count if count else -1e300
  return score if math.isfinite(score) else -1e300  # a diverged model is never selected over a finite one


def mark_non_finite(
  values: Mapping[str, Any], tasks: Sequence[jmtl.Task]
) -> tuple[dict[str, Any], list[str], list[str]]:
  """``values`` with every metric of a task whose loss is not finite set to ``None``, the names of those tasks, and
  the names of the tasks without examples.

  A model whose loss on a task is NaN or inf still gives an accuracy (the
  argmax of NaN scores is some class): it is not a measurement, so it is
  not reported as one. Results files hold ``null`` for such metrics and list
  the tasks under ``"non_finite"``; the tables print "non-finite". A task
  without a labelled example in the split (``None`` from
  :func:`jmtl.compute_metrics`) is not marked non-finite but listed third;
  results files list them under ``"no_examples"`` and the tables print
  "no examples".

  Examples:
    >>> t = jmtl.Task("a", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()})
    >>> mark_non_finite({"a/loss": float("nan"), "a/acc": 0.25}, [t])
    ({'a/loss': None, 'a/acc': None}, ['a'], [])
    >>> mark_non_finite({"a/loss": None, "a/acc": None}, [t])
    ({'a/loss': None, 'a/acc': None}, [], ['a'])
  """
  out, marked, empty = dict(values), [], []
  for t in tasks:
    loss = values.get(f"{t.name}/loss", 0.0)
    if loss is None:
      empty.append(t.name)
      continue
    if math.isfinite(float(loss)):
      continue
    marked.append(t.name)
    for key in (f"{t.name}/loss", *(f"{t.name}/{m}" for m in t.metrics)):
      if key in out:
        out[key] = None
  return out, marked, empty


def evaluate_splits(results: dict[str, Any], run: Any, params: Any) -> None:
  """Fills ``results`` with the validation and test metrics of ``params`` (``run.evaluate``), marked.

  Adds ``"non_finite"`` and ``"no_examples"``: per split, the tasks whose
  loss was not finite (their metrics null) and those without a labelled
  example (null too).
  """
  marked, empty = {}, {}
  for split in ("validation", "test"):
    results[split], marked[split], empty[split] = mark_non_finite(run.evaluate(params, split), run.tasks)
  results["non_finite"] = {split: names for split, names in marked.items() if names}
  results["no_examples"] = {split: names for split, names in empty.items() if names}


def check_results(results: Any, path: str) -> dict[str, Any]:
  """``results`` (a ``results.json`` or ``eval.json`` read from ``path``) if it holds what the tables read.

  Raises:
    ConfigError: naming the file and what it lacks, and what to do.

  Examples:
    >>> check_results({}, "/tmp/run/results.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: /tmp/run/results.json is not a jmtl results file (no 'tasks', 'metric', 'test'); ...
  """
  missing = ["tasks", "metric", "test"] if not isinstance(results, Mapping) else []
  missing += [k for k in ("tasks", "metric", "test") if not missing and k not in results]
  if not missing:
    tasks, metric, test = results["tasks"], results["metric"], results["test"]
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
      missing.append("tasks (a list of names)")
    elif not isinstance(metric, Mapping) or any(t not in metric for t in tasks):
      missing.append("metric (one per task)")
    elif not isinstance(test, Mapping):
      missing.append("test (a mapping of metrics)")
  if missing:
    raise ConfigError(
      f"{path} is not a jmtl results file (no {', '.join(repr(m) if ' ' not in m else m for m in missing)}); "
      "delete it and run the same jmtl train command again, which evaluates the run's last checkpoint anew"
    )
  return dict(results)


def describe(tasks: Sequence[jmtl.Task]) -> dict[str, Any]:
  """What a results file needs to compare runs: each task's primary metric and its direction.

  Examples:
    >>> describe([jmtl.Task("y", jmtl.losses.mse, {"mae": jmtl.metrics.mae()})])
    {'tasks': ['y'], 'metric': {'y': 'mae'}, 'higher_is_better': {'y': False}}
  """
  metric = {t.name: primary_metric(t) for t in tasks}
  return {
    "tasks": [t.name for t in tasks],
    "metric": metric,
    "higher_is_better": {t.name: higher_is_better(t, metric[t.name]) for t in tasks},
  }


def compare(results: Mapping[str, Any], baselines: Mapping[str, float]) -> dict[str, Any]:
  """Δm% and per-task negative transfer of a run's test metrics against single-task test metrics.

  Args:
    results: a run's results (``tasks``, ``metric``, ``higher_is_better``, ``test``).
    baselines: ``{task: test value of its primary metric}`` of the single-task models.

  Returns:
    ``{"baselines": ..., "delta_m": float, "negative_transfer": {task: bool}}``.

  Examples:
    >>> r = {"tasks": ["a", "b"], "metric": {"a": "acc", "b": "acc"}, "higher_is_better": {"a": True, "b": True},
    ...      "test": {"a/acc": 0.9, "b/acc": 0.7}}
    >>> out = compare(r, {"a": 0.8, "b": 0.8})
    >>> round(out["delta_m"], 2), out["negative_transfer"]
    (0.0, {'a': False, 'b': True})
  """
  names = results["tasks"]
  key = {n: f"{n}/{results['metric'][n]}" for n in names}
  # A metric marked non-finite (None) on either side has no Δm% term and no transfer flag.
  known = [n for n in names if _finite(results["test"].get(key[n])) and _finite(baselines.get(n))]
  mt = {key[n]: results["test"][key[n]] for n in known}
  st = {key[n]: baselines[n] for n in known}
  hib = {key[n]: results["higher_is_better"][n] for n in known}
  neg = jmtl.metrics.negative_transfer(mt, st, hib)
  return {
    "baselines": {n: baselines[n] for n in names},
    "delta_m": jmtl.metrics.delta_m(mt, st, hib) if len(known) == len(names) else None,
    "negative_transfer": {n: bool(neg[key[n]]) if n in known else None for n in names},
  }


def _finite(value: Any) -> bool:
  return isinstance(value, int | float) and math.isfinite(value)
