"""``jmtl sweep``: one run per point of a grid of config overrides, one table.

``--over weighting=equal,uncertainty,static`` gives one run per value (several
``--over`` make the product). ``static`` without ``static_weights`` (or
``--over static_weights=grid``) expands
into the grid search of the seed papers: every weight vector on the simplex
with ``static_grid`` steps per task (all weights positive, scaled to sum to K,
so the centre is equal weighting), and the table marks the one with the best
validation criterion -- chosen on validation, never on test. The runs share
one set of single-task baselines and the loaded dataset.

Layout: ``<workdir>/sweep.json`` (the grid and the table's rows),
``<workdir>/runs/<label>/`` (one normal run workdir per point) and
``<workdir>/baselines/``.

With ``folds=K`` (``--folds K``, :mod:`jmtl.run.trials`) every point is
cross-validated instead: ``runs/<label>/fold_<i>/`` holds its K fold runs
(trained on the other folds of the training split, selected and evaluated on
the held-out one, with Δm% against single-task baselines of the same fold);
the point with the best mean validation criterion over the folds is retrained
on the whole training split into ``<workdir>/final/``, the one run that reads
the test split. ``sweep.json`` keeps the points' fold scores under ``"cv"``
and the final run as its one row.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence

import ml_collections

import jmtl.parallel
from jmtl.run import config as config_lib
from jmtl.run import experiment
from jmtl.run import inputs
from jmtl.run import plots
from jmtl.run import registry
from jmtl.run import report
from jmtl.run import trackers
from jmtl.run import trials as trials_lib
from jmtl.run import workdir as workdir_lib
from jmtl.run.config import ConfigError

MAX_RUNS = 64


def parse_over(over: Sequence[str]) -> list[tuple[str, list[str]]]:
  """``["weighting=equal,famo"]`` -> ``[("weighting", ["equal", "famo"])]``.

  Examples:
    >>> parse_over(["weighting=equal,famo", "static_weights=(1,3),(3,1)"])
    [('weighting', ['equal', 'famo']), ('static_weights', ['(1,3)', '(3,1)'])]
  """
  out = []
  for item in over:
    field, sep, values = item.partition("=")
    if not sep or not field.strip() or not values.strip():
      raise ConfigError(f"--over {item!r}: expected FIELD=VALUE1,VALUE2,...")
    out.append((field.strip(), config_lib.split_top_level(values)))
  return out


def simplex_grid(num_tasks: int, steps: int) -> list[tuple[float, ...]]:
  """Weight vectors with entries in ``{1/steps, ..., (steps-1)/steps}`` summing to 1, scaled to sum to ``num_tasks``.

  Examples:
    >>> simplex_grid(2, 4)
    [(0.5, 1.5), (1.0, 1.0), (1.5, 0.5)]
  """
  if num_tasks <= 1:
    return [(1.0,)] * num_tasks
  grid = []
  for parts in itertools.product(range(1, steps), repeat=num_tasks - 1):
    last = steps - sum(parts)
    if last >= 1:
      grid.append(tuple(round(num_tasks * p / steps, 6) for p in (*parts, last)))
  return grid


def points(config: ml_collections.ConfigDict, over: Sequence[str], num_tasks: int | None) -> list[dict[str, str]]:
  """The overrides of every run; ``weighting=static`` becomes the static grid (unless ``num_tasks`` is None).

  Examples:
    >>> c = ml_collections.ConfigDict({"weighting": "equal", "static_weights": (), "static_grid": 4})
    >>> points(c, ["weighting=equal,static"], 2)  # doctest: +NORMALIZE_WHITESPACE
    [{'weighting': 'equal'}, {'weighting': 'static', 'static_weights': '(0.5, 1.5)'},
     {'weighting': 'static', 'static_weights': '(1.0, 1.0)'}, {'weighting': 'static', 'static_weights': '(1.5, 0.5)'}]
  """
  axes = parse_over(over)
  out = []
  for combo in itertools.product(*[[(f, v) for v in values] for f, values in axes]):
    point = dict(combo)
    static = point.get("weighting", config.weighting) == "static"
    if num_tasks is None:
      out.append({k: v for k, v in point.items() if not (k == "static_weights" and v == "grid")})
    elif point.get("static_weights") == "grid" or (
      static and "static_weights" not in point and not config.static_weights
    ):
      point = {"weighting": "static", **{k: v for k, v in point.items() if k != "static_weights"}}
      out += [{**point, "static_weights": str(w)} for w in simplex_grid(num_tasks, config.static_grid)]
    else:
      out.append(point)
  if len(out) > MAX_RUNS:
    raise ConfigError(
      f"the sweep has {len(out)} runs (more than {MAX_RUNS}); use fewer values or a coarser static_grid"
    )
  return out


def label(point: dict[str, str]) -> str:
  """A run's name and directory name: ``weighting=static,static_weights=0.5_1.5``.

  Examples:
    >>> label({"weighting": "static", "static_weights": "(0.5, 1.5)"})
    'weighting=static,static_weights=0.5_1.5'
  """
  clean = lambda v: re.sub(r"[^\w.+=-]+", "_", v).strip("_")
  return ",".join(f"{k}={clean(v)}" for k, v in point.items())


def _mark_static_winners(rows: list[dict]) -> None:
  """Marks, per group of static-grid runs that differ only in their weights, the best on validation."""
  groups: dict[str, list[dict]] = {}
  for row in rows:
    point = row["point"]
    if "static_weights" in point and point.get("weighting", row["weighting"]) == "static":
      key = label({k: v for k, v in point.items() if k != "static_weights"})
      groups.setdefault(key, []).append(row)
  for group in groups.values():
    if len(group) > 1:
      max(group, key=lambda r: r["results"]["val_score"])["chosen"] = True


def sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  over: Sequence[str],
  *,
  folds: int = 0,
  progress: bool = True,
  quiet: bool = False,
):
  """Runs every point (resuming finished or interrupted ones) and prints the table; returns its rows.

  With ``folds`` K >= 2 every point is cross-validated and the best one retrained (see the module's docstring);
  the rows are then the points' (``"cv"``: the mean, std and per-fold values of ``val_score``; ``"cv_delta_m"``:
  of the held-out Δm%), followed by the final run's.

  Examples:
    >>> from jmtl import run
    >>> config = run.load_config("configs/multi_digits.py")
    >>> rows = run.sweep(config, "/tmp/sw", ["weighting=equal,famo"])  # doctest: +SKIP
  """
  registry.check(config)
  trials_lib.check_folds(folds)
  for combo in points(config, over, None):  # every method and field checked before any data is read
    registry.check(config_lib.apply_overrides(config, combo))
  path = workdir_lib.check_usable(workdir)
  names = config_lib.task_subset(config, inputs.load_data(config).specs)
  grid = points(config, over, len(names))
  configs = [config_lib.apply_overrides(config, p) for p in grid]
  for c in configs:  # static weights and method arguments, before the first run starts
    registry.make_weighting(c, len(config_lib.task_subset(c, names)))
  _open_sweep(path, config, list(over), folds)
  with trackers.store_root(path):
    return _run_points(path, grid, configs, folds=folds, progress=progress, quiet=quiet)


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """One run of a search: :func:`jmtl.run.experiment.train`, quiet (its trackers finished there too).

  Examples:
    >>> results = train(config, "/tmp/sw/runs/weighting=equal")  # doctest: +SKIP
  """
  return experiment.train(config, workdir, progress=progress, quiet=True)


def _run_points(path: str, grid, configs, *, folds: int, progress: bool, quiet: bool):
  run = lambda c, where: train(c, where, progress=progress)
  rows = []
  for point, c in zip(grid, configs):
    if c.baselines == "auto":
      c.baselines = os.path.join(path, "baselines")
    runs = trials_lib.run_point(c, os.path.join(path, "runs", label(point)), folds, train=run)
    row = {"label": label(point), "point": point, "weighting": c.weighting, "chosen": False}
    if folds:
      row["cv"] = trials_lib.spread([r["val_score"] for r in runs])
      row["cv_delta_m"] = trials_lib.spread([r.get("delta_m") for r in runs])
    else:
      row["results"] = runs[0]
    rows.append(row)
  if folds:
    return _finish_folds(path, rows, configs, run, quiet)
  _mark_static_winners(rows)
  data = workdir_lib.read_json(os.path.join(path, "sweep.json"), "sweep")
  workdir_lib.write_json(os.path.join(path, "sweep.json"), {**data, "rows": rows})
  if configs[0].plots and jmtl.parallel.is_primary():
    plots.sweep_plot(path, rows)  # plots/sweep.png: the runs side by side
  experiment._say(report.sweep_table(rows), quiet)
  return rows


def _finish_folds(path: str, rows: list[dict], configs, train, quiet: bool) -> list[dict]:
  """Retrains the point with the best mean fold score on the whole training split; writes and prints both tables."""
  scored = [i for i, r in enumerate(rows) if r["cv"]["mean"] is not None]
  if not scored:
    raise ConfigError(f"every point of the sweep in {path} has a non-finite validation score on some fold")
  best = max(scored, key=lambda i: rows[i]["cv"]["mean"])
  rows[best]["chosen"] = True
  results = train(configs[best], os.path.join(path, "final"))
  final = {"label": f"final: {rows[best]['label']}", "point": rows[best]["point"], "results": results}
  final.update(weighting=configs[best].weighting, chosen=True)
  data = workdir_lib.read_json(os.path.join(path, "sweep.json"), "sweep")
  workdir_lib.write_json(os.path.join(path, "sweep.json"), {**data, "cv": rows, "rows": [final]})
  experiment._say(trials_lib.fold_table(rows, "val score") + "\n\n" + report.sweep_table([final]), quiet)
  return [*rows, final]


def _open_sweep(path: str, config: ml_collections.ConfigDict, over: list[str], folds: int = 0) -> None:
  store = os.path.join(path, "sweep.json")
  wanted = {"config": config_lib.to_dict(config), "over": over, **({"folds": folds} if folds else {})}
  if os.path.exists(store):
    have = workdir_lib.read_json(store, "sweep")
    diff = config_lib.differences(
      {k: have.get(k) for k in ("config", "over", "folds") if k in have or k in wanted}, wanted
    )
    if diff:
      raise ConfigError(
        f"workdir {path} holds a sweep with another config or grid ({', '.join(diff[:4])}); use a new --workdir"
      )
    return
  if os.listdir(path):
    raise ConfigError(f"workdir {path} is not empty and holds no sweep; use a new or empty directory")
  workdir_lib.write_json(store, {**wanted, "rows": []})
