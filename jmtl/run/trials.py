"""One point of a search (``jmtl sweep``, ``jmtl tune``): a run, or K fold runs of k-fold cross-validation.

With ``--folds K`` the training split is cut into K folds drawn by the
config's seed: the examples are permuted by ``numpy.random.default_rng(seed)``
and the permutation is cut into K contiguous parts of sizes differing by at
most one (``numpy.array_split``). Fold run ``i`` trains on the other K-1
parts and holds out part ``i`` as both its validation and its test split, so
the real validation and test splits are never read by a fold run: its model
selection and its ``results.json`` are those of the held-out fold, and the
test split is evaluated once, by the final model retrained on the whole
training split. A fold run is an ordinary run directory whose config has a
``fold`` group (``index``, ``count``, ``seed``); :class:`jmtl.run.loop.Run`
reads it, so ``jmtl eval`` and ``jmtl report`` work on it as on any run, and
single-task baselines of a fold run are trained on the same fold (the group
is part of :func:`jmtl.run.config.baseline_key`).

A point's cross-validated score is the mean over folds of the objective on
the held-out folds, with the sample standard deviation (``ddof=1``) as its
spread (Kohavi, "A study of cross-validation and bootstrap for accuracy
estimation and model selection", IJCAI 1995). The input standardisation of
``dataset.standardize_inputs`` keeps the statistics of the whole training
split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

import jmtl
from jmtl import data as data_lib
from jmtl.run import config as config_lib
from jmtl.run.config import ConfigError


def fold_indices(n: int, count: int, index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The training and held-out example indices of fold ``index`` of ``count`` (both sorted).

  Examples:
    >>> train, held = fold_indices(10, 3, 0, seed=0)
    >>> len(train), len(held), sorted({*train, *held}) == list(range(10))
    (6, 4, True)
    >>> held_out = [fold_indices(10, 3, i, seed=0)[1] for i in range(3)]
    >>> sorted(np.concatenate(held_out).tolist()) == list(range(10))  # the held-out folds partition the split
    True
  """
  if not 2 <= count <= n:
    raise ConfigError(f"--folds {count}: needs 2 <= K <= the {n} training examples")
  if not 0 <= index < count:
    raise ConfigError(f"fold index {index} is outside 0..{count - 1}")
  parts = np.array_split(np.random.default_rng(seed).permutation(n), count)
  held = np.sort(parts[index])
  train = np.sort(np.concatenate([p for i, p in enumerate(parts) if i != index]))
  return train, held


def _subset(src: data_lib.ArraySource, idx: np.ndarray) -> data_lib.ArraySource:
  data = {
    "inputs": src.inputs[idx],
    "labels": {k: v[idx] for k, v in src.labels.items()},
    "masks": {k: v[idx] for k, v in src.masks.items()},
  }
  return data_lib.ArraySource(data, tasks=src.tasks)


def fold_data(data, fold: Mapping[str, Any]):
  """``data`` (:class:`jmtl.run.inputs.Data`) with fold ``fold`` of its training split held out as validation and test.

  Examples:
    >>> from jmtl.run import inputs
    >>> src = data_lib.ArraySource({"inputs": np.arange(10.0)[:, None], "labels": {"a": np.arange(10) % 2}})
    >>> d = fold_data(inputs.Data({"train": src}, dict(src.tasks), None, None), {"index": 1, "count": 5, "seed": 0})
    >>> len(d.sources["train"]), len(d.sources["validation"]), d.sources["validation"] is d.sources["test"]
    (8, 2, True)
  """
  src = data.sources["train"]
  if not isinstance(src, data_lib.ArraySource):
    raise ConfigError("--folds needs the training split in memory (config field 'dataset.in_memory' = True)")
  train, held = fold_indices(len(src), int(fold["count"]), int(fold["index"]), int(fold["seed"]))
  out = _subset(src, held)
  return data._replace(sources={"train": _subset(src, train), "validation": out, "test": out})


def fold_config(config: ml_collections.ConfigDict, index: int, count: int) -> ml_collections.ConfigDict:
  """A copy of ``config`` for fold ``index`` of ``count`` (the folds drawn by ``config.seed``).

  Examples:
    >>> fold_config(ml_collections.ConfigDict({"seed": 3}), 1, 5).fold.to_dict()
    {'count': 5, 'index': 1, 'seed': 3}
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.fold = ml_collections.ConfigDict({"count": int(count), "index": int(index), "seed": int(config.seed)})
  return c


def without_fold(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` without its ``fold`` group (the final model, on the whole training split)."""
  data = config_lib.to_dict(config)
  data.pop("fold", None)
  return config_lib.from_dict(data)


def check_folds(folds: int) -> None:
  """``--folds`` is 0 (no cross-validation) or at least 2."""
  if folds == 1 or folds < 0:
    raise ConfigError(f"--folds {folds}: use K >= 2 folds, or 0 for none")


class Objective:
  """What a search maximises or minimises, from a validation record: ``delta_m``, ``score`` or ``TASK/METRIC``.

  * ``delta_m`` -- Δm% of the validation metrics against the single-task
    baselines' validation metrics (:func:`jmtl.metrics.delta_m`), maximised;
  * ``score`` -- the selection criterion (``select_metric``, mean over tasks,
    signed so that higher is better: :func:`jmtl.run.evaluation.selection_score`), maximised;
  * ``TASK/METRIC`` -- one validation metric, maximised or minimised by its direction (``loss`` minimised).

  Examples:
    >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()}),
    ...          jmtl.Task("b", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()})]
    >>> values = {"a/acc": 0.9, "b/acc": 0.6, "a/loss": 0.3, "b/loss": 0.8}
    >>> Objective("delta_m", "acc").value(values, tasks, {"a": 0.8, "b": 0.8})  # (+12.5 - 25) / 2
    -6.25
    >>> Objective("score", "acc").value(values, tasks), Objective("b/loss", "acc").direction
    (0.75, 'minimize')
  """

  def __init__(self, name: str, select_metric: str):
    self.name, self.select_metric = name, select_metric
    self.direction = "maximize"
    if name not in ("delta_m", "score"):
      task, sep, metric = name.partition("/")
      if not sep or not task or not metric:
        raise ConfigError(f"--objective {name!r}: expected delta_m, score or TASK/METRIC (e.g. left/acc)")
      self.direction = "minimize" if metric in ("loss", "mae") else "maximize"

  def check(self, tasks: Sequence[jmtl.Task], baselines: bool) -> None:
    """Fails naming the task or metric that does not exist, or the missing baselines of ``delta_m``."""
    from jmtl.run import evaluation

    if self.name == "delta_m" and not baselines:
      raise ConfigError("--objective delta_m needs single-task baselines; set --config.baselines or --objective score")
    if self.name in ("delta_m", "score"):
      return
    task, _, metric = self.name.partition("/")
    found = {t.name: t for t in tasks}
    if task not in found:
      raise ConfigError(f"--objective {self.name!r}: no task {task!r} (tasks: {', '.join(found)})")
    if metric != "loss" and metric not in found[task].metrics:
      have = ", ".join(["loss", *found[task].metrics])
      raise ConfigError(f"--objective {self.name!r}: task {task!r} has no metric {metric!r} (it has {have})")
    self.direction = "maximize" if evaluation.higher_is_better(found[task], metric) else "minimize"

  def value(
    self, values: Mapping[str, Any], tasks: Sequence[jmtl.Task], baselines: Mapping[str, float] | None = None
  ) -> float | None:
    """The objective of a validation record (``None`` when it is not finite); ``baselines``: task -> validation."""
    from jmtl.run import evaluation

    if self.name == "score":
      out = evaluation.selection_score(values, tasks, self.select_metric)
      return None if out <= -1e300 else out
    if self.name == "delta_m":
      described = evaluation.describe(tasks)
      out = evaluation.compare({**described, "test": values}, baselines or {})["delta_m"]
    else:
      out = values.get(self.name)
    return float(out) if out is not None and math.isfinite(out) else None


def spread(values: Sequence[float | None]) -> dict[str, Any]:
  """Mean and sample standard deviation (``ddof=1``) of per-fold values; ``None`` when one is missing.

  Examples:
    >>> spread([1.0, 2.0, 3.0])
    {'mean': 2.0, 'std': 1.0, 'folds': [1.0, 2.0, 3.0]}
    >>> spread([1.0, None])["mean"] is None
    True
  """
  values = list(values)
  if not values or any(v is None for v in values):
    return {"mean": None, "std": None, "folds": values}
  a = np.asarray(values, np.float64)
  std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
  return {"mean": float(a.mean()), "std": std, "folds": values}


def reference_baselines(
  config: ml_collections.ConfigDict, path: str | None, names: Sequence[str], folds: int, *, progress: bool
) -> list[dict[str, dict]]:
  """The single-task baselines of ``config`` in ``path`` (trained if missing), per fold (one entry without folds).

  Each entry is ``{task: {"metric", "validation", "test", ...}}``
  (:func:`jmtl.run.baselines.read`); a fold's are trained on that fold.
  ``path`` ``None``: no baselines (empty entries).
  """
  from jmtl.run import baselines as baselines_lib

  configs = [fold_config(config, i, folds) for i in range(folds)] if folds else [config]
  out = []
  for c in configs:
    if path is None:
      out.append({})
      continue
    baselines_lib.ensure(c, path, names, progress=progress)
    out.append(baselines_lib.read(path, c))
  return out


def run_point(
  config: ml_collections.ConfigDict,
  directory: str,
  folds: int,
  *,
  train: Callable[[ml_collections.ConfigDict, str], dict],
  on_fold: Callable[[int], None] | None = None,
) -> list[dict]:
  """Trains (or resumes) ``config`` in ``directory``, or its ``folds`` fold runs in ``directory/fold_<i>``.

  ``train(config, workdir)`` trains one run and returns its results
  (:func:`jmtl.run.experiment.train`); ``on_fold(i)`` is called before fold
  ``i`` starts. Returns the results of every run (one without folds).
  """
  if not folds:
    return [train(config, directory)]
  out = []
  for i in range(folds):
    if on_fold is not None:
      on_fold(i)
    out.append(train(fold_config(config, i, folds), os.path.join(directory, f"fold_{i}")))
  return out


def fold_table(rows: Sequence[Mapping[str, Any]], what: str) -> str:
  """The cross-validated points: per point the mean ± std over folds of ``what`` and of Δm%; ``*`` the chosen.

  Examples:
    >>> rows = [{"label": "weighting=equal", "cv": {"mean": 0.8, "std": 0.01, "folds": [0.79, 0.81]},
    ...          "cv_delta_m": {"mean": -1.0, "std": 0.5, "folds": [-1.5, -0.5]}, "chosen": True}]
    >>> print(fold_table(rows, "val score"))
    run                  val score (2 folds)       Δm% (2 folds)
    weighting=equal         0.8000 ± 0.0100       -1.00 ± 0.50  * best on validation
  """
  if not rows:
    return "(no runs)"
  k = len(rows[0]["cv"]["folds"])
  lw = max(4, *(len(r["label"]) for r in rows)) + 3
  head1, head2 = f"{what} ({k} folds)", f"Δm% ({k} folds)"
  lines = [f"{'run':<{lw}}{head1:>22}{head2:>20}"]
  for row in rows:
    cv, dm = row["cv"], row.get("cv_delta_m") or {}
    cell = f"{cv['mean']:.4f} ± {cv['std']:.4f}" if cv["mean"] is not None else "—"
    dm_cell = f"{dm['mean']:+.2f} ± {dm['std']:.2f}" if dm.get("mean") is not None else "—"
    mark = "  * best on validation" if row.get("chosen") else ""
    lines.append(f"{row['label']:<{lw}}{cell:>22}{dm_cell:>19}{mark}")
  return "\n".join(lines)
