"""Task relations in the runner: what the log records, negative transfer against the baselines, ``jmtl analyze``.

* Every ``log_every`` steps the train record holds the running means of the
  state's relations (:func:`train_record`): ``affinity`` (TAG's lookahead
  affinity, row: source, column: target), ``grad_cosine_mean`` and
  ``conflict_rate`` (the fraction of measured steps with a negative gradient
  cosine), over the tracked tasks, and ``affinity_steps``.
* At every validation, a run whose single-task baselines have logged that
  step writes a ``"transfer"`` record (:class:`TransferWatch`): per task the
  gap to its baseline (``gap/<task>``, percent, positive = behind), the
  threshold and whether the task is behind by the rule of
  :mod:`jmtl.relations._transfer` (``behind/<task>``). A run whose baselines are
  trained after it gets the same records when it ends (:func:`finish`),
  computed from the same curves up to each step.
* :func:`finish` adds ``relations`` and ``transfer`` to ``results.json``;
  :func:`analyze_workdir` (``jmtl analyze``) prints the matrices, the
  suggested grouping and the flags, and writes ``plots/relations.png``,
  ``plots/transfer.png`` and ``analysis.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import jmtl
from jmtl import relations as relations_lib
from jmtl.run import config as config_lib
from jmtl.run import registry
from jmtl.run import workdir as workdir_lib
from jmtl.run.config import ConfigError
from jmtl.run.logs import read_jsonl

METRICS = "metrics.jsonl"


def _listed(matrix) -> list:
  """A matrix as nested lists, ``None`` where it is NaN (never measured)."""
  return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(matrix, float).tolist()]


def train_record(state) -> dict[str, Any]:
  """The running means of ``state.relations_state`` for the train log (``{}`` without a tracker).

  Examples:
    >>> train_record(type("S", (), {"relations": None})())
    {}
  """
  if getattr(state, "relations", None) is None:
    return {}
  local = jax.device_get(state.relations_state)  # replicated: every process holds it
  return {
    "affinity": _listed(relations_lib.mean_affinity(local)),
    "affinity_steps": int(np.max(np.asarray(local.affinity_count))),
    "grad_cosine_mean": _listed(relations_lib.mean_cosine(local)),
    "conflict_rate": _listed(relations_lib.conflict_rate(local)),
  }


def tracked_names(config, names: Sequence[str]) -> list[str]:
  """The tasks the run's tracker measures, in the order of its matrices.

  Examples:
    >>> import ml_collections
    >>> tracked_names(ml_collections.ConfigDict({"relations": {"tasks": "c, a"}}), ["a", "b", "c"])
    ['c', 'a']
  """
  wanted = [t.strip() for t in str(registry.relations_fields(config)["tasks"]).split(",") if t.strip()]
  return wanted or list(names)


def _rule(config) -> dict[str, Any]:
  r = registry.relations_fields(config)
  return {
    "sigmas": float(r["transfer_sigmas"]),
    "min_gap": float(r["transfer_min_gap"]),
    "patience": int(r["transfer_patience"]),
  }


def _baseline_logs(config, workdir: str, names: Sequence[str]) -> dict[str, str]:
  """``{task: path of its single-task run's metrics.jsonl}`` for the tasks whose baseline run directory exists."""
  from jmtl.run import baselines as baselines_lib  # it imports the loop, which imports this module

  base = baselines_lib.directory(config, workdir)
  if base is None:
    return {}
  stored = baselines_lib.read(base, config)
  key = config_lib.baseline_key(config)
  out = {}
  for t in names:
    run_dir = os.path.join(base, stored[t]["workdir"]) if t in stored else os.path.join(base, key, t)
    path = os.path.join(run_dir, METRICS)
    if os.path.exists(path):
      out[t] = path
  return out


def _validation(records: Sequence[dict]) -> dict[int, dict]:
  return {r["step"]: r for r in records if r.get("kind") == "validation"}


class TransferWatch:
  """Writes a ``"transfer"`` record at every validation whose step the baselines have logged too.

  ``tasks`` are the run's :class:`jmtl.Task` s; the rule's parameters come
  from ``config.relations``. The multi-task history is read from the run's
  log when the watch starts (a resumed run continues its curves).
  """

  def __init__(self, config, workdir: str, tasks: Sequence[jmtl.Task]):
    from jmtl.run import baselines as baselines_lib
    from jmtl.run import evaluation

    self.names = [t.name for t in tasks]
    self.key = {t.name: f"{t.name}/{evaluation.primary_metric(t)}" for t in tasks}
    self.hib = {t.name: evaluation.higher_is_better(t, evaluation.primary_metric(t)) for t in tasks}
    self.rule = _rule(config)
    self.config, self.workdir = config, workdir
    self.enabled = len(tasks) > 1 and baselines_lib.directory(config, workdir) is not None
    self.history = _validation(read_jsonl(os.path.join(workdir, METRICS), quiet=True)) if self.enabled else {}

  def update(self, step: int, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The transfer record of the validation at ``step`` (``values``), or ``None`` when no baseline logged it."""
    if not self.enabled:
      return None
    self.history[step] = dict(values)
    logs = _baseline_logs(self.config, self.workdir, self.names)
    base = {t: _validation(read_jsonl(p, quiet=True)) for t, p in logs.items()}
    return transfer_record(step, self.history, base, key=self.key, hib=self.hib, rule=self.rule)


def transfer_record(step: int, mtl: Mapping[int, dict], base: Mapping[str, Mapping[int, dict]], *, key, hib, rule):
  """The ``"transfer"`` record of ``step`` from the validation records up to it (``None`` if no baseline has it).

  Examples:
    >>> mtl = {s: {"a/acc": v} for s, v in ((1, 0.5), (2, 0.6), (3, 0.6), (4, 0.6))}
    >>> base = {"a": {s: {"a/acc": v} for s, v in ((1, 0.6), (2, 0.7), (3, 0.7), (4, 0.7))}}
    >>> rule = {"sigmas": 2, "min_gap": 0.5, "patience": 2}
    >>> r = transfer_record(4, mtl, base, key={"a": "a/acc"}, hib={"a": True}, rule=rule)
    >>> round(r["gap/a"], 2), r["behind/a"]
    (14.29, 1)
  """
  record = {}
  for t, curve in base.items():
    if step not in curve or step not in mtl:
      continue
    steps = sorted(s for s in mtl if s <= step and s in curve)
    out = relations_lib.behind_baseline(
      steps, [mtl[s].get(key[t]) for s in steps], [curve[s].get(key[t]) for s in steps], hib[t], **rule
    )
    if out.steps and out.steps[-1] == step:
      record[f"gap/{t}"] = out.gap[-1]
      record[f"threshold/{t}"] = out.threshold[-1]
      record[f"behind/{t}"] = int(out.behind[-1])
  return record or None


def transfer_analysis(config, workdir: str, results: Mapping[str, Any]) -> dict[str, Any] | None:
  """Per task, the rule over the whole run, from the run's and its baselines' validation logs (``None`` without
  baselines): ``{"rule": ..., "tasks": {task: {"behind" (at the end), "first_step", and per common validation step
  "steps", "mtl", "baseline", "gap", "threshold", "flags" (the rule held)}}}``."""
  names = list(results["tasks"])
  logs = _baseline_logs(config, workdir, names)
  if len(names) < 2 or not logs:
    return None
  mtl = _validation(read_jsonl(os.path.join(workdir, METRICS), quiet=True))
  rule = _rule(config)
  out = {}
  for t in names:
    if t not in logs:
      continue
    key = f"{t}/{results['metric'][t]}"
    base = _validation(read_jsonl(logs[t], quiet=True))
    steps = sorted(s for s in mtl if s in base)
    m = [mtl[s].get(key) for s in steps]
    b = [base[s].get(key) for s in steps]
    r = relations_lib.behind_baseline(steps, m, b, bool(results["higher_is_better"][t]), **rule)
    kept = set(r.steps)
    out[t] = {
      "behind": r.at_end,
      "first_step": r.first_step,
      "first_ever": r.first_ever,
      "steps": r.steps,
      "mtl": [v for s, v in zip(steps, m) if s in kept],
      "baseline": [v for s, v in zip(steps, b) if s in kept],
      "gap": r.gap,
      "threshold": r.threshold,
      "flags": r.behind,
    }
  return {"rule": rule, "tasks": out}


def relations_analysis(config, records: Sequence[dict], names: Sequence[str], groups: int | None = None):
  """The last logged running means and the suggested grouping (``None`` if the run tracked nothing).

  ``groups`` caps the number of groups (default ``config.relations.groups``,
  0 for K). The grouping needs every pair measured; otherwise it is ``None``.
  """
  last = next((r for r in reversed(records) if r.get("kind") == "train" and r.get("affinity") is not None), None)
  if last is None:
    return None
  tracked = tracked_names(config, names)
  z = np.array([[np.nan if v is None else v for v in row] for row in last["affinity"]], float)
  cap = registry.relations_fields(config)["groups"] if groups is None else groups
  cap = min(cap or len(tracked), len(tracked))
  grouping = None
  off = ~np.eye(len(tracked), dtype=bool)
  if np.all(np.isfinite(z[off])):
    g = relations_lib.group_tasks(z, cap, tracked)
    grouping = {"groups": [list(x) for x in g.groups], "score": g.score, "exact": g.exact, "max_groups": cap}
  return {
    "tasks": tracked,
    "step": last["step"],
    "affinity_steps": last.get("affinity_steps"),
    "affinity": last["affinity"],
    "grad_cosine": last.get("grad_cosine_mean"),
    "conflict_rate": last.get("conflict_rate"),
    "grouping": grouping,
    "within_across": within_across(z, tracked, grouping["groups"]) if grouping else None,
  }


def within_across(affinity, names: Sequence[str], groups: Sequence[Sequence[str]]) -> dict[str, dict]:
  """Per task, the mean affinity it receives from the other tasks of its group and from the tasks of other groups.

  Examples:
    >>> z = [[0, 0.5, -0.1], [0.3, 0, 0.0], [0.1, 0.2, 0]]
    >>> within_across(z, ["a", "b", "c"], [["a", "b"], ["c"]])["a"]
    {'within': 0.3, 'across': 0.1}
  """
  z = np.asarray(affinity, float)
  index = {n: i for i, n in enumerate(names)}
  group_of = {n: gi for gi, g in enumerate(groups) for n in g}
  out = {}
  for j, n in enumerate(names):
    within = [z[index[m], j] for m in names if m != n and group_of[m] == group_of[n]]
    across = [z[index[m], j] for m in names if group_of[m] != group_of[n]]
    out[n] = {
      "within": float(np.mean(within)) if within else None,
      "across": float(np.mean(across)) if across else None,
    }
  return out


def analyze(config, workdir: str, results: Mapping[str, Any], groups: int | None = None) -> dict[str, Any]:
  """``{"relations": ..., "transfer": ...}`` of a run from its files (either may be ``None``)."""
  records = read_jsonl(os.path.join(workdir, METRICS), quiet=True)
  return {
    "relations": relations_analysis(config, records, results["tasks"], groups),
    "transfer": transfer_analysis(config, workdir, results),
  }


def finish(config, workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  """Adds ``relations`` and ``transfer`` to a finished run's results (and ``results.json``).

  When the baselines were trained after the run, the ``"transfer"`` records
  the run could not write while it trained are appended to its log now,
  each computed from the curves up to its step (what the run would have
  written); TensorBoard does not get them.
  """
  workdir = os.path.abspath(workdir)
  found = analyze(config, workdir, results)
  extra = {k: v for k, v in found.items() if v is not None}
  if not extra:
    return results
  if found["transfer"] is not None and jmtl.parallel.is_primary():
    _append_missing_transfer(workdir, found["transfer"]["tasks"], results)
  results = {**results, **extra}
  if jmtl.parallel.is_primary():
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS), results)
  return results


def _append_missing_transfer(workdir: str, transfer: Mapping[str, dict], results: Mapping[str, Any]) -> None:
  path = os.path.join(workdir, METRICS)
  records = read_jsonl(path, quiet=True)
  have = {r["step"] for r in records if r.get("kind") == "transfer"}
  steps = sorted({s for t in transfer.values() for s in t["steps"]} - have)
  if not steps:
    return
  lines = []
  for step in steps:
    record = {"step": step, "kind": "transfer"}
    for t, curve in transfer.items():
      if step in curve["steps"]:
        i = curve["steps"].index(step)
        record.update({f"gap/{t}": curve["gap"][i], f"threshold/{t}": curve["threshold"][i]})
        record[f"behind/{t}"] = int(curve["flags"][i])
    lines.append(json.dumps(record) + "\n")
  with open(path, "a") as f:
    f.writelines(lines)


def _table(matrix, names: Sequence[str], fmt: str = "{:+.3f}") -> list[str]:
  w = max(8, *(len(n) for n in names)) + 2
  lines = [" " * w + "".join(f"{n:>{w}}" for n in names)]
  for n, row in zip(names, matrix):
    lines.append(f"{n:<{w}}" + "".join(f"{'—' if v is None else fmt.format(v):>{w}}" for v in row))
  return lines


def report_text(analysis: Mapping[str, Any]) -> str:
  """The analysis as text: the three matrices, the suggested grouping with each task's within/across affinity, and
  the negative-transfer flags."""
  lines = []
  rel = analysis.get("relations")
  if rel is None:
    lines.append("relations: not tracked (set --config.relations.every=N, e.g. 10)")
  else:
    names = rel["tasks"]
    lines.append(
      f"affinity Z(i→j) = 1 − Lj after an SGD step on Li / Lj before (row: source i, column: target j), "
      f"mean of {rel['affinity_steps']} measurements to step {rel['step']}:"
    )
    lines += _table(rel["affinity"], names)
    if rel.get("grad_cosine") is not None:
      lines += ["", "gradient cosine (mean):", *_table(rel["grad_cosine"], names)]
    if rel.get("conflict_rate") is not None:
      lines += ["", "conflict rate (fraction of measured steps with a negative cosine):"]
      lines += _table(rel["conflict_rate"], names, "{:.2f}")
    g = rel.get("grouping")
    if g is not None:
      how = "exact search" if g["exact"] else "beam search"
      shown = "  ".join("{" + ", ".join(x) + "}" for x in g["groups"])
      lines += ["", f"suggested groups (at most {g['max_groups']}; {how}; score {g['score']:+.4f}): {shown}"]
      wa = rel["within_across"]
      lines.append(f"{'task':<12}{'within':>10}{'across':>10}")
      for n in names:
        w, a = wa[n]["within"], wa[n]["across"]
        lines.append(f"{n:<12}{'—' if w is None else f'{w:+.4f}':>10}{'—' if a is None else f'{a:+.4f}':>10}")
  tr = analysis.get("transfer")
  lines.append("")
  if tr is None:
    lines.append("negative transfer: no single-task baselines logged")
  else:
    r = tr["rule"]
    lines.append(
      f"negative transfer (behind when the gap to the single-task validation metric exceeds max({r['sigmas']:g} σ, "
      f"{r['min_gap']:g} %) at {r['patience']} validations in a row; flagged when behind at the end):"
    )
    for t, v in tr["tasks"].items():
      gap = f"gap at the end {v['gap'][-1]:+.2f} %" if v["gap"] else "no common validation step"
      if v["behind"]:
        state = f"FLAGGED: behind since step {v['first_step']}"
      elif v.get("first_ever") is not None:
        state = f"not behind at the end (behind from step {v['first_ever']} earlier, then caught up)"
      else:
        state = "never behind"
      lines.append(f"  {t}: {state}; {gap}")
  return "\n".join(lines)


def analyze_workdir(workdir: str, *, groups: int | None = None, quiet: bool = False) -> dict[str, Any]:
  """``jmtl analyze``: a run's relations and negative transfer from its files; writes plots and ``analysis.json``.

  Works on a finished run or one in progress (from its log and its
  baselines' logs).

  Examples:
    >>> analyze_workdir("/nonexistent")
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: workdir /nonexistent does not exist
  """
  from jmtl.run import evaluation
  from jmtl.run import inputs
  from jmtl.run import plots

  path = workdir_lib.check_usable(workdir, create=False)
  config = workdir_lib.load_run_config(path)
  if groups is not None and groups < 1:
    raise ConfigError(f"--groups must be at least 1, got {groups}")
  results_file = os.path.join(path, workdir_lib.RESULTS)
  if os.path.exists(results_file):
    results = evaluation.check_results(workdir_lib.read_json(results_file, f"workdir {path}"), results_file)
  else:
    data = inputs.load_data(config)
    names = config_lib.task_subset(config, data.specs)
    results = evaluation.describe(inputs.make_tasks(data, names))
  found = analyze(config, path, results, groups)
  if found["relations"] is None and found["transfer"] is None:
    raise ConfigError(
      f"workdir {path}: nothing to analyze: no relations in its log (train with --config.relations.every=N) and no "
      "single-task baselines"
    )
  workdir_lib.write_json(os.path.join(path, "analysis.json"), found)
  plots.relations_plots(path, found)
  text = report_text(found)
  if not quiet and jmtl.parallel.is_primary():
    print(text, flush=True)
  return found
