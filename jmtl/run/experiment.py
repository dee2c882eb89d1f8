"""The commands behind the CLI: train (with baselines and Δm%), eval, baselines, report.

Each returns what it printed, so tests and notebooks can call them directly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

import jmtl.parallel
from jmtl.run import baselines as baselines_lib
from jmtl.run import cotrain as run_cotrain
from jmtl.run import evaluation
from jmtl.run import inputs
from jmtl.run import loop
from jmtl.run import plots
from jmtl.run import registry
from jmtl.run import relations as run_relations
from jmtl.run import report
from jmtl.run import trackers
from jmtl.run import workdir as workdir_lib
from jmtl.run.checkpoints import Checkpoints
from jmtl.run.config import ConfigError


def _say(text: str, quiet: bool) -> None:
  if not quiet and jmtl.parallel.is_primary():  # under jax.distributed, process 0 prints
    print(text, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, quiet: bool = False) -> dict:
  """Trains (or resumes) a run, then its single-task baselines if needed; writes results, plots; prints the table.

  Examples:
    >>> from jmtl import run
    >>> results = run.train(run.load_config("configs/multi_digits.py"), "/tmp/md")  # doctest: +SKIP
    >>> round(results["delta_m"], 2)  # doctest: +SKIP
    -3.22
  """
  registry.check(config)
  # One MLflow store for the run and the baselines it trains (a search's own store when within one).
  with workdir_lib.locked(workdir), trackers.store_root(workdir):  # the lock also over what follows training
    teacher_tasks = run_cotrain.baseline_names(config)  # a student distilled from the baselines: those first
    if teacher_tasks is not None and baselines_lib.directory(config, workdir) is not None:
      workdir_lib.open_run(workdir, config)  # the run's directory first: <workdir>/baselines goes inside it
      baselines_lib.ensure(config, baselines_lib.directory(config, workdir), teacher_tasks, progress=progress)
    results = loop.train_and_evaluate(config, workdir, progress=progress, desc=config.weighting)
    results = add_baselines(config, workdir, results, progress=progress, train_missing=True)
    results = run_relations.finish(config, workdir, results)  # relations and negative transfer during training
    if config.plots and jmtl.parallel.is_primary():
      plots.write_all(os.path.abspath(workdir), results["tasks"], results["metric"])
    trackers.finish(config, workdir, results)  # final metrics, table and plots to the run's trackers
    trackers.finish_held()  # and to those of the single-task baselines it trained
  _say(report.run_table(results), quiet)
  return results


def add_baselines(config, workdir: str, results: dict, *, progress: bool, train_missing: bool) -> dict:
  """Adds Δm% and negative-transfer flags to ``results`` (and its file) when baselines exist or may be trained.

  Examples:
    >>> add_baselines(ml_collections.ConfigDict({"baselines": ""}), "/tmp/x", {"tasks": ["a"]},
    ...               progress=False, train_missing=False)
    {'tasks': ['a']}
  """
  path = baselines_lib.directory(config, workdir)
  if path is None:
    return results
  if train_missing:
    base = baselines_lib.ensure(config, path, results["tasks"], progress=progress)
  else:
    stored = baselines_lib.read(path, config)
    if not all(t in stored for t in results["tasks"]):
      return results
    base = {t: stored[t]["test"] for t in results["tasks"]}
  results = run_cotrain.with_rows({**results, **evaluation.compare(results, base)}, base)
  workdir_lib.write_json(os.path.join(os.path.abspath(workdir), workdir_lib.RESULTS), results)
  return results


def train_baselines(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, quiet: bool = False):
  """``jmtl baselines``: trains the single-task baselines of every task into ``workdir`` and prints them.

  Examples:
    >>> from jmtl import run
    >>> run.train_baselines(run.load_config("configs/multi_digits.py"), "/tmp/bl")  # doctest: +SKIP
  """
  registry.check(config)
  run = loop.Run(config)
  path = workdir_lib.check_usable(workdir)
  store = os.path.join(path, baselines_lib.FILE)
  if os.listdir(path) and not os.path.exists(store):
    raise ConfigError(f"workdir {path} is not empty and holds no {baselines_lib.FILE}; use a new or empty directory")
  baselines_lib.ensure(config, path, run.names, progress=progress)
  entries = baselines_lib.read(path, config)
  _say(report.baselines_table({t: entries[t] for t in run.names}), quiet)
  return entries


def evaluate_workdir(workdir: str, *, out: str | None = None, quiet: bool = False) -> dict[str, Any]:
  """``jmtl eval``: validation and test metrics of a run's latest checkpoint (the kept model), with Δm% if stored.

  The checkpoint is the newest that verifies (:meth:`Checkpoints.restore_kept`;
  a skipped one is named on stderr). Writes them to ``<workdir>/eval.json``
  (``results.json`` stays the run's own), or ``<out>/eval.json``; a read-only
  (archived) workdir is read, printed and left as it is.

  Examples:
    >>> evaluate_workdir("/nonexistent")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: workdir /nonexistent does not exist
  """
  config = workdir_lib.load_run_config(workdir)
  path = workdir_lib.check_readable(workdir)
  ckpt = Checkpoints(os.path.join(path, "checkpoints"))
  if ckpt.latest_step() is None:
    raise ConfigError(f"workdir {path} has no checkpoint yet")
  run = loop.Run(config)
  example = inputs.TrainBatches(run.data, run.names, config).example()
  state = jax.eval_shape(lambda: loop.create_train_state(run, example))
  which = "best_params" if config.select == "best" else "params"
  try:
    step, params, meta = ckpt.restore_kept(loop.variables(state), which)
  finally:
    ckpt.close()
  params = loop.place(params, run.mesh)  # restored on one device; replicated over the run's mesh
  results = {
    **evaluation.describe(run.tasks),
    "units": inputs.units(run.data, run.names),
    "weighting": config.weighting,
    "select": config.select,
    "select_metric": config.select_metric,
    "checkpoint_step": step,
    "selected_step": int(meta["host"]["best_step"]) if config.select == "best" else step,
    "num_skipped": None,
    "step_ms": None,
  }
  evaluation.evaluate_splits(results, run, params)
  base_dir = baselines_lib.directory(config, path)
  stored = baselines_lib.read(base_dir, config) if base_dir else {}
  if all(t in stored for t in run.names):
    results.update(evaluation.compare(results, {t: stored[t]["test"] for t in run.names}))
  dest = workdir_lib.output_dir(path, out, "eval.json")
  if dest is not None:
    workdir_lib.write_json(os.path.join(dest, "eval.json"), results)
  _say(report.run_table(results), quiet)
  return results


def report_workdir(workdir: str, *, out: str | None = None, quiet: bool = False) -> str:
  """``jmtl report``: the table of a run (and its plots again), or of a sweep (and plots/sweep.png), from the files.

  The plots go to ``<workdir>/plots``, or ``<out>/plots``; a read-only
  (archived) workdir is read and left as it is.

  Examples:
    >>> report_workdir("/tmp/md")  # doctest: +SKIP
  """
  path = workdir_lib.check_readable(workdir)
  sweep_file = os.path.join(path, "sweep.json")
  if os.path.exists(sweep_file):
    data = workdir_lib.read_json(sweep_file, f"workdir {path}")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
      raise ConfigError(
        f"{sweep_file} is not a jmtl sweep file (no 'rows'); the runs under {os.path.join(path, 'runs')} are "
        "intact (jmtl report --workdir <run>)"
      )
    text = report.sweep_table(data["rows"])
    dest = workdir_lib.output_dir(path, out, "plots")
    if dest is not None:
      plots.sweep_plot(path, data["rows"], dest)
  else:
    results_file = os.path.join(path, workdir_lib.RESULTS)
    if not os.path.exists(results_file):
      raise ConfigError(f"workdir {path} has no {workdir_lib.RESULTS} (the run has not finished; try jmtl eval)")
    results = evaluation.check_results(workdir_lib.read_json(results_file, f"workdir {path}"), results_file)
    dest = workdir_lib.output_dir(path, out, "plots")
    if dest is not None:
      plots.write_all(path, results["tasks"], results["metric"], dest)
    text = report.run_table(results)
  _say(text, quiet)
  return text
