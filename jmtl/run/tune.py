"""``jmtl tune``: hyper-parameter search with Optuna over any config field, optionally k-fold cross-validated.

Command::

  jmtl tune --config multi_digits --workdir DIR --trials 30 \\
    --space optimizer.learning_rate=loguniform(1e-4,1e-2) --space static_weights=simplex [--folds 5]

``--space FIELD=SPEC`` (repeatable), SPEC one of ``float(lo,hi)``,
``loguniform(lo,hi)``, ``int(lo,hi)``, ``logint(lo,hi)``, ``choice(a,b,...)``
(each value as on the command line, ``--config.FIELD=VALUE``), or
``static_weights=simplex``: K task weights drawn uniformly on the simplex
(a Dirichlet(1, ..., 1) point from K uniform suggestions ``u_i`` in [1e-6, 1]:
``w_i = K log(u_i) / sum_j log(u_j)``, normalised exponential spacings; a
deterministic function of the trial's parameters, scaled to sum to K as the
sweep's grid; ``weighting`` becomes ``static`` unless the config or the space
chains it).

Sampler and pruning: Optuna's TPE (Bergstra et al., "Algorithms for
hyper-parameter optimization", NeurIPS 2011), seeded by ``config.seed`` plus
the number of trials the study holds when the command starts (so a resumed
study does not draw its first trials again; with ``--storage`` the process id
is added too, so workers started together draw different trials); the median
rule (Golovin et al., "Google Vizier", KDD 2017, Optuna's ``MedianPruner``)
on the objective of every validation record (every ``eval_every`` steps; fold
``i`` of ``--folds`` reports at step ``i * num_steps + step``), after
``--prune_startup`` finished trials; never at the last validation of the last
fold, when the trial has trained all it would.

Objective (:class:`jmtl.run.trials.Objective`, ``--objective``): validation
Δm% against the single-task baselines of the base config (trained once into
``<workdir>/baselines``, or the ``config.baselines`` directory; one set per
fold with ``--folds``), the selection criterion ``score``, or a named
``TASK/METRIC``. The reference is the base config's baselines for every trial,
so trials that change the learning rate are compared with the same
single-task models.

Layout::

    tune.json                   the search (config, space, folds, objective) and, at the end, the best trial
    study.db                    the Optuna study (SQLite; ``--storage URL`` for any Optuna RDB instead)
    trials/<NNNN>/              trial NNNN: an ordinary run directory (or its folds: trials/<NNNN>/fold_<i>/)
    baselines/                  the reference single-task baselines (config.baselines="auto")
    final/                      with --folds: the best trial's config retrained on the whole training split
    best_config.py              the best trial's config: jmtl train --config DIR/best_config.py --workdir ...

Resuming: SIGINT/SIGTERM stops the current trial at a checkpoint; Optuna
records it as failed, marked ``interrupted``, and the same command again
enqueues its parameters in a new trial that trains on in the same directory
(from its checkpoint), then runs the trials still missing. Finished and pruned
trials are never run again. Many workers (on many machines) share one study:
give each the same ``--storage`` URL and ``--study`` name (and, to share the
reference baselines, the same ``--config.baselines`` directory); each runs its
own ``jmtl tune`` until the study holds ``--trials`` finished trials.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pprint
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from jmtl.run import baselines as baselines_lib
from jmtl.run import config as config_lib
from jmtl.run import evaluation
from jmtl.run import experiment
from jmtl.run import inputs
from jmtl.run import loop
from jmtl.run import registry
from jmtl.run import report
from jmtl.run import signals
from jmtl.run import sweeps
from jmtl.run import trackers
from jmtl.run import trials as trials_lib
from jmtl.run import workdir as workdir_lib
from jmtl.run.config import ConfigError

KINDS = ("float", "loguniform", "int", "logint", "choice")
FILE = "tune.json"


def parse_space(items: Sequence[str]) -> list[tuple[str, str, tuple]]:
  """``["optimizer.learning_rate=loguniform(1e-4,1e-2)"]`` -> ``[("optimizer.learning_rate", "loguniform", (...))]``.

  Examples:
    >>> parse_space(["optimizer.learning_rate=loguniform(1e-4, 1e-2)", "static_weights=simplex"])
    [('optimizer.learning_rate', 'loguniform', (0.0001, 0.01)), ('static_weights', 'simplex', ())]
    >>> parse_space(["weighting=choice(equal,famo)", "batch_size=logint(16,256)"])
    [('weighting', 'choice', ('equal', 'famo')), ('batch_size', 'logint', (16, 256))]
    >>> parse_space(["lr=uniform(0,1)"])
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: --space 'lr=uniform(0,1)': expected FIELD=KIND(...) with KIND one of float, \
loguniform, int, logint, choice (or static_weights=simplex)
  """
  out, seen = [], set()
  for item in items:
    field, sep, spec = item.partition("=")
    field, spec = field.strip(), spec.strip()
    if field in seen:
      raise ConfigError(f"--space {item!r}: field {field!r} is given twice")
    seen.add(field)
    if sep and field == "static_weights" and spec == "simplex":
      out.append((field, "simplex", ()))
      continue
    match = re.fullmatch(r"(\w+)\((.*)\)", spec, re.S)
    if not sep or not field or match is None or match.group(1) not in KINDS:
      raise ConfigError(
        f"--space {item!r}: expected FIELD=KIND(...) with KIND one of {', '.join(KINDS)} (or static_weights=simplex)"
      )
    kind, args = match.group(1), config_lib.split_top_level(match.group(2))
    if kind == "choice":
      if not args:
        raise ConfigError(f"--space {item!r}: choice() needs at least one value")
      out.append((field, kind, tuple(args)))
      continue
    number = int if kind in ("int", "logint") else float
    try:
      lo, hi = (number(a) for a in args)
    except ValueError:
      raise ConfigError(f"--space {item!r}: {kind}(lo,hi) needs two {number.__name__} bounds") from None
    if not lo <= hi or (kind in ("loguniform", "logint") and lo <= 0):
      raise ConfigError(f"--space {item!r}: needs lo <= hi{' and lo > 0' if kind.startswith('log') else ''}")
    out.append((field, kind, (lo, hi)))
  return out


def simplex_point(u: Sequence[float]) -> tuple[float, ...]:
  """K weights summing to K from K numbers in (0, 1]: ``K log(u_i) / sum_j log(u_j)``.

  For independent uniform ``u_i`` the normalised ``-log(u_i)`` (exponential
  spacings) are uniform on the simplex, Dirichlet(1, ..., 1) (Devroye,
  "Non-Uniform Random Variate Generation", 1986, ch. V.2); all ``u_i = 1``
  gives equal weights.

  Examples:
    >>> simplex_point([0.5, 0.25])  # -log: 0.693, 1.386
    (0.666667, 1.333333)
    >>> simplex_point([1.0, 1.0, 1.0])
    (1.0, 1.0, 1.0)
  """
  e = [-math.log(min(max(x, 1e-12), 1.0)) for x in u]
  total = sum(e)
  if total <= 0:
    return tuple(1.0 for _ in e)
  return tuple(round(len(e) * x / total, 6) for x in e)


def suggest(trial, axes, num_tasks: int, config: ml_collections.ConfigDict) -> dict[str, str]:
  """The overrides of ``trial`` (an ``optuna.Trial`` or ``FixedTrial``): one per field of the space.

  Examples:
    >>> import optuna
    >>> axes = parse_space(["optimizer.learning_rate=loguniform(1e-4,1e-2)", "static_weights=simplex"])
    >>> t = optuna.trial.FixedTrial({"optimizer.learning_rate": 0.001, "static_weights.0": 0.5,
    ...                              "static_weights.1": 0.25})
    >>> suggest(t, axes, 2, ml_collections.ConfigDict({"weighting": "equal"}))
    {'optimizer.learning_rate': '0.001', 'static_weights': '(0.666667, 1.333333)', 'weighting': 'static'}
  """
  point = {}
  for field, kind, args in axes:
    if kind == "simplex":
      u = [trial.suggest_float(f"{field}.{i}", 1e-6, 1.0) for i in range(num_tasks)]
      point[field] = str(simplex_point(u))
    elif kind == "choice":
      point[field] = str(trial.suggest_categorical(field, list(args)))
    elif kind in ("int", "logint"):
      point[field] = str(trial.suggest_int(field, args[0], args[1], log=kind == "logint"))
    else:
      point[field] = repr(trial.suggest_float(field, args[0], args[1], log=kind == "loguniform"))
  if "static_weights" in point and "weighting" not in point and "static" not in config.weighting.split("+"):
    point["weighting"] = "static"
  return point


def _corner(axes, num_tasks: int, config) -> dict[str, str]:
  """The point of every lower bound (every first choice): checks fields and types before anything trains."""
  fixed = {}
  for field, kind, args in axes:
    if kind == "simplex":
      fixed.update({f"{field}.{i}": 1.0 for i in range(num_tasks)})
    else:
      fixed[field] = args[0]
  import optuna

  return suggest(optuna.trial.FixedTrial(fixed), axes, num_tasks, config)


def _optuna():
  try:
    import optuna
  except ImportError:
    raise ConfigError("jmtl tune needs Optuna: pip install 'jmtl[tune]' (or optuna)") from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  return optuna


def _done(study) -> int:
  """Trials that count toward ``--trials``: finished, pruned, or failed other than by an interruption."""
  from optuna.trial import TrialState

  return sum(
    t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    for t in study.trials
  )


def _retry_interrupted(study) -> list[str]:
  """Enqueues the parameters of each interrupted trial whose directory no other trial has taken up; their names."""
  from optuna.trial import TrialState

  taken = {t.user_attrs.get("directory") for t in study.trials if t.state != TrialState.FAIL}
  again = []
  for t in study.trials:
    directory = t.user_attrs.get("directory")
    if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and directory not in taken:
      study.enqueue_trial(t.params, user_attrs={"directory": directory})
      taken.add(directory)
      again.append(directory)
  return again


def _open_tune(path: str, stored: dict) -> None:
  store = os.path.join(path, FILE)
  if os.path.exists(store):
    have = workdir_lib.read_json(store, "tune")
    diff = config_lib.differences({k: have.get(k) for k in stored}, stored)
    if diff:
      raise ConfigError(
        f"workdir {path} holds a tune with another config or space ({', '.join(diff[:4])}); use a new --workdir"
      )
    return
  if set(os.listdir(path)) - {"study.db"}:
    raise ConfigError(f"workdir {path} is not empty and holds no {FILE}; use a new or empty directory")
  workdir_lib.write_json(store, stored)


def _check_study(study, stored: dict) -> None:
  """A shared study holds one search: the same config (but the machine's paths: ``baselines``,
  ``dataset.data_dir``), space, folds and objective."""
  config = {k: v for k, v in stored["config"].items() if k != "baselines"}
  if isinstance(config.get("dataset"), dict):
    config["dataset"] = {k: v for k, v in config["dataset"].items() if k != "data_dir"}
  mine = {**stored, "config": config}
  have = study.user_attrs.get("jmtl")
  if have is None:
    study.set_user_attr("jmtl", mine)
    return
  diff = config_lib.differences(have, mine)
  if diff:
    raise ConfigError(
      f"study {study.study_name!r} holds a search with another config or space ({', '.join(diff[:4])}); "
      "use another --study name"
    )


@dataclasses.dataclass(frozen=True)
class Study:
  """Where the trials are recorded and how bad ones are stopped.

  Attributes:
    storage: an Optuna RDB URL (``postgresql://...``, ``mysql://...``, ``sqlite:///...``); ``None``:
      ``sqlite:///<workdir>/study.db``.
    name: the study's name in the storage.
    prune: stop trials by the median rule.
    prune_startup: finished trials before the median rule starts.
  """

  storage: str | None = None
  name: str = "jmtl"
  prune: bool = True
  prune_startup: int = 3


def tune(
  config: ml_collections.ConfigDict,
  workdir: str,
  space: Sequence[str],
  trials: int,
  *,
  folds: int = 0,
  objective: str = "delta_m",
  study: Study = Study(),
  progress: bool = True,
  quiet: bool = False,
) -> dict[str, Any]:
  """Runs (or resumes) the search until the study holds ``trials`` finished trials; returns the best trial's summary.

  Examples:
    >>> from jmtl.run.config import load_config
    >>> best = tune(load_config("synthetic"), "/tmp/tune", ["optimizer.learning_rate=loguniform(1e-4,1e-1)"],
    ...             trials=20, folds=5)  # doctest: +SKIP
  """
  optuna = _optuna()
  registry.check(config)
  trials_lib.check_folds(folds)
  if trials < 1:
    raise ConfigError(f"--trials {trials}: needs at least 1")
  axes = parse_space(space)
  data = inputs.load_data(config)
  names = config_lib.task_subset(config, data.specs)
  corner = config_lib.apply_overrides(config, _corner(axes, len(names), config))
  registry.check(corner)
  registry.make_weighting(corner, len(names))
  search = _Search(config, names, inputs.make_tasks(data, names), folds=folds, objective=objective, progress=progress)
  search.goal.check(search.tasks, bool(config.baselines))
  path = search.path = workdir_lib.check_usable(workdir)
  stored = {"config": config_lib.to_dict(config), "space": list(space), "folds": folds, "objective": objective}
  _open_tune(path, stored)
  search.base_dir = baselines_lib.directory(config, path)
  search.refs = trials_lib.reference_baselines(config, search.base_dir, names, folds, progress=progress)
  signals.check("while training the reference baselines")
  pruner = optuna.pruners.MedianPruner(n_startup_trials=study.prune_startup) if study.prune else None
  found = optuna.create_study(
    storage=study.storage or f"sqlite:///{os.path.join(path, 'study.db')}",
    study_name=study.name,
    direction=search.goal.direction,
    pruner=pruner or optuna.pruners.NopPruner(),
    load_if_exists=True,
  )
  _check_study(found, stored)
  _retry_interrupted(found)
  seed = int(config.seed) + len(found.trials) + (os.getpid() if study.storage else 0)
  found.sampler = optuna.samplers.TPESampler(seed=seed % 2**32, constant_liar=bool(study.storage))
  with trackers.store_root(path):
    while _done(found) < trials:
      signals.check("between trials")
      found.optimize(lambda t: search.run_trial(t, axes, study.prune), n_trials=1, catch=(loop.TooManySkipped,))
    best = search.finish(found)
  experiment._say(_table(found, search.goal, best), quiet)
  return best


class _Search:
  """One tune: the base config, its tasks, the objective and its reference baselines; runs and finishes trials."""

  def __init__(self, config, names, tasks, *, folds: int, objective: str, progress: bool):
    self.config, self.names, self.tasks, self.folds, self.progress = config, names, tasks, folds, progress
    self.goal = trials_lib.Objective(objective, config.select_metric)
    self.path, self.base_dir, self.refs = "", None, []

  def reference(self, fold: int) -> dict[str, float] | None:
    """Task -> the validation value of the reference baseline of ``fold`` (``None`` without baselines)."""
    ref = self.refs[fold]
    return {t: ref[t]["validation"] for t in ref} if ref else None

  def train(self, config, where: str) -> dict:
    return sweeps.train(config, where, progress=self.progress)

  def run_trial(self, trial, axes, prune: bool) -> float:
    """The objective of ``trial``: its runs trained (resumed), reported every validation, pruned by the study."""
    import optuna

    directory = trial.user_attrs.get("directory") or f"{trial.number:04d}"
    trial.set_user_attr("directory", directory)
    point = suggest(trial, axes, len(self.names), self.config)
    trial.set_user_attr("overrides", point)
    c = config_lib.apply_overrides(self.config, point)
    c.baselines = ""  # compared with the reference baselines, not trained anew per trial
    fold, goal = [0], self.goal
    worst = -1e300 if goal.direction == "maximize" else 1e300

    def report_validation(step, values, run_tasks):
      value = goal.value(values, run_tasks, self.reference(fold[0]))
      trial.report(worst if value is None else value, fold[0] * c.num_steps + step)
      last = step >= c.num_steps and fold[0] == max(self.folds, 1) - 1  # all trained: pruning saves nothing
      if prune and not last and trial.should_prune():
        raise optuna.TrialPruned(f"pruned at step {step}" + (f" of fold {fold[0]}" if self.folds else ""))

    try:
      with loop.on_validation(report_validation):
        where = os.path.join(self.path, "trials", directory)
        results = trials_lib.run_point(c, where, self.folds, train=self.train, on_fold=lambda i: fold.__setitem__(0, i))
    except signals.Interrupted:
      trial.set_user_attr("interrupted", True)
      raise
    except loop.TooManySkipped as e:
      trial.set_user_attr("error", str(e))
      raise
    values = [goal.value(r["validation"], self.tasks, self.reference(i)) for i, r in enumerate(results)]
    summary = trials_lib.spread(values)
    trial.set_user_attr("folds", values)
    trial.set_user_attr("std", summary["std"])
    if summary["mean"] is None:
      trial.set_user_attr("error", "a non-finite validation metric")
      return float("nan")
    return summary["mean"]

  def finish(self, study) -> dict[str, Any]:
    """The best trial: its config written as best_config.py, retrained on the whole training split with folds."""
    from optuna.trial import TrialState

    path = self.path
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
      raise ConfigError(f"no trial of study {study.study_name!r} finished (all pruned or failed); see {path}/trials")
    trial = study.best_trial
    overrides = trial.user_attrs["overrides"]
    best = config_lib.apply_overrides(self.config, overrides)
    _write_best_config(os.path.join(path, "best_config.py"), best, self.base_dir, trial, self.goal)
    final = ml_collections.ConfigDict(best.to_dict())
    final.baselines = ""
    trial_dir = os.path.join(path, "trials", trial.user_attrs["directory"])
    where = os.path.join(path, "final") if self.folds else trial_dir
    signals.check("before the final model")
    results = self.train(final, where)  # without folds, the best trial's run: read again
    if self.base_dir is not None:
      refs = trials_lib.reference_baselines(self.config, self.base_dir, self.names, 0, progress=self.progress)[0]
      results = {**results, **evaluation.compare(results, {t: refs[t]["test"] for t in self.names})}
      results["val_delta_m"] = evaluation.compare(
        {**results, "test": results["validation"]}, {t: refs[t]["validation"] for t in self.names}
      )["delta_m"]
    summary = {
      "trial": trial.number,
      "directory": os.path.relpath(trial_dir, path),
      "overrides": overrides,
      "objective": self.goal.name,
      "value": trial.value,
      "std": trial.user_attrs.get("std"),
      "folds": trial.user_attrs.get("folds"),
      "final": os.path.relpath(where, path),
      "results": results,
    }
    data = workdir_lib.read_json(os.path.join(path, FILE), "tune")
    workdir_lib.write_json(os.path.join(path, FILE), {**data, "best": summary})
    return summary


def _write_best_config(file: str, config, base_dir: str | None, trial, goal) -> None:
  data = config_lib.to_dict(config)
  if base_dir is not None:
    data["baselines"] = base_dir  # the tune's baselines directory: reused when the budget matches
  text = (
    f'"""The best trial ({trial.number}) of a jmtl tune: {goal.name} = {trial.value:.6g} on validation.\n\n'
    f"Overrides of the tuned config: {trial.user_attrs['overrides']}\n\n"
    f"Run it: jmtl train --config {file} --workdir DIR\n"
    '"""\n\nfrom jmtl.run.config import from_dict\n\n\ndef get_config():\n'
    f"  return from_dict(\n{_indent(pprint.pformat(data, width=110, sort_dicts=True), 4)}\n  )\n"
  )
  tmp = f"{file}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, file)


def _indent(text: str, n: int) -> str:
  return "\n".join(" " * n + line for line in text.splitlines())


def _table(study, goal, best: dict) -> str:
  """Every trial (number, state, value ± std over folds, overrides), then the best trial's final model."""
  lines = [f"{'trial':<7}{'state':<10}{goal.name:>22}   overrides"]
  for t in study.trials:
    value = "—" if t.value is None else f"{t.value:.4f}"
    if t.value is not None and t.user_attrs.get("std") is not None and len(t.user_attrs.get("folds") or ()) > 1:
      value += f" ± {t.user_attrs['std']:.4f}"
    shown = ", ".join(f"{k}={v}" for k, v in (t.user_attrs.get("overrides") or {}).items())
    lines.append(f"{t.number:<7}{t.state.name.lower():<10}{value:>22}   {shown}")
  lines += ["", f"best: trial {best['trial']} -> {best['final']}", report.run_table(best["results"])]
  if best["results"].get("val_delta_m") is not None:
    lines.append(f"validation Δm% = {best['results']['val_delta_m']:+.2f} (against the reference baselines)")
  return "\n".join(lines)
