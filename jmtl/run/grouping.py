"""``jmtl group``: train all tasks together, group them by affinity, train one model per group, compare.

Steps, each resumable (a re-run with the same arguments continues where it
stopped):

1. the single-task baselines (``<workdir>/baselines`` for ``"auto"``, or the
   config's ``baselines`` directory; none for ``""``), first, so that every
   run below flags negative transfer while it trains;
2. the all-tasks run with the relations tracker on (``<workdir>/all``;
   ``relations.every`` 10 when the config leaves it at 0);
3. the partition of the tasks into at most G groups with the highest total
   affinity (:func:`jmtl.relations.group_tasks`: exact up to 14 tasks);
4. one run per group of two or more tasks (``<workdir>/groups/<tasks>``), with
   the run's config restricted to the group's tasks; a task alone is served by
   its single-task baseline (the same budget and config), or trained alone
   when there are no baselines;
5. the table: per task, single-task, all together and grouped, and Δm% of both
   against single-task; written to ``<workdir>/group.json``.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

import jmtl
from jmtl import relations as relations_lib
from jmtl.run import baselines as baselines_lib
from jmtl.run import config as config_lib
from jmtl.run import experiment
from jmtl.run import inputs
from jmtl.run import registry
from jmtl.run import workdir as workdir_lib
from jmtl.run.config import ConfigError

FILE = "group.json"
#: ``relations.every`` of the all-tasks run when the config leaves it at 0.
DEFAULT_EVERY = 10


def _open(path: str, config: ml_collections.ConfigDict, num_groups: int) -> None:
  store = os.path.join(path, FILE)
  wanted = {"config": config_lib.to_dict(config), "num_groups": num_groups}
  if os.path.exists(store):
    have = workdir_lib.read_json(store, "group")
    diff = config_lib.differences({"config": have.get("config"), "num_groups": have.get("num_groups")}, wanted)
    if diff:
      raise ConfigError(
        f"workdir {path} holds a grouping with another config or budget ({', '.join(diff[:4])}); use a new --workdir"
      )
    return
  if os.listdir(path):
    raise ConfigError(f"workdir {path} is not empty and holds no {FILE}; use a new or empty directory")
  workdir_lib.write_json(store, {**wanted, "stage": "started"})


def group_label(names) -> str:
  """A group's directory name: its tasks joined by ``+``.

  Examples:
    >>> group_label(("task_0", "task_2"))
    'task_0+task_2'
  """
  return "+".join(names)


def group(
  config: ml_collections.ConfigDict, workdir: str, num_groups: int, *, progress: bool = True, quiet: bool = False
) -> dict[str, Any]:
  """Runs the steps of this module and prints the table; returns what ``group.json`` holds.

  Examples:
    >>> from jmtl import run
    >>> out = run.group(run.load_config("configs/planted.py"), "/tmp/grp", 3)  # doctest: +SKIP
    >>> out["groups"]  # doctest: +SKIP
    [['task_0', 'task_1', 'task_2'], ['task_3', 'task_4', 'task_5'], ['task_6', 'task_7']]
  """
  registry.check(config)
  names = config_lib.task_subset(config, inputs.load_data(config).specs)
  if len(names) < 2:
    raise ConfigError(f"jmtl group needs at least 2 tasks, the config selects {names}")
  if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= len(names):
    raise ConfigError(f"--groups must be an int from 1 to the number of tasks ({len(names)}), got {num_groups!r}")
  if registry.relations_fields(config)["tasks"]:
    raise ConfigError("jmtl group groups every task: leave config field 'relations.tasks' empty")
  path = workdir_lib.check_usable(workdir)
  _open(path, config, num_groups)
  base = ml_collections.ConfigDict(config.to_dict())
  if base.baselines == "auto":  # shared by every run below
    base.baselines = os.path.join(path, "baselines")
  everything = ml_collections.ConfigDict(base.to_dict())
  everything.relations = ml_collections.ConfigDict(registry.relations_fields(base))
  everything.relations.every = everything.relations.every or DEFAULT_EVERY
  everything.relations.groups = num_groups

  store = baselines_lib.directory(base, path)
  single = baselines_lib.ensure(base, store, names, progress=progress) if store else dict.fromkeys(names)
  together = experiment.train(everything, os.path.join(path, "all"), progress=progress, quiet=True)
  rel = together.get("relations")
  if not rel or rel.get("grouping") is None:
    raise ConfigError(
      f"the all-tasks run in {os.path.join(path, 'all')} measured no affinity for every pair of tasks "
      "(too few steps for relations.every?)"
    )
  z = [[float("nan") if v is None else v for v in row] for row in rel["affinity"]]
  chosen = relations_lib.group_tasks(z, num_groups, rel["tasks"])
  groups = [[n for n in names if n in g] for g in chosen.groups]

  grouped: dict[str, float | None] = {}
  runs = {}
  for g in groups:
    if len(g) == 1 and single[g[0]] is not None:  # a task alone: its single-task model is that group's model
      grouped[g[0]] = single[g[0]]
      runs[g[0]] = "baseline"
      continue
    c = ml_collections.ConfigDict(base.to_dict())
    c.tasks = ",".join(g)
    run_dir = os.path.join(path, "groups", group_label(g))
    results = experiment.train(c, run_dir, progress=progress, quiet=True)
    for n in g:
      grouped[n] = results["test"].get(f"{n}/{results['metric'][n]}")
      runs[n] = os.path.relpath(run_dir, path)
  out = _summary(together, single, grouped, groups=groups, chosen=chosen, runs=runs, num_groups=num_groups)
  stored = workdir_lib.read_json(os.path.join(path, FILE), "group")
  workdir_lib.write_json(os.path.join(path, FILE), {**stored, **out, "stage": "done"})
  experiment._say(group_table(out), quiet)
  return out


def _summary(together, single, grouped, *, groups, chosen, runs, num_groups) -> dict[str, Any]:
  names = together["tasks"]
  keys = {n: f"{n}/{together['metric'][n]}" for n in names}
  hib = {keys[n]: together["higher_is_better"][n] for n in names}
  st = {keys[n]: single[n] for n in names}
  together_values = {n: together["test"].get(keys[n]) for n in names}

  def delta(values):
    if any(v is None for v in values.values()) or any(single[n] is None for n in names):
      return None
    return jmtl.metrics.delta_m({keys[n]: values[n] for n in names}, st, hib)

  return {
    "tasks": names,
    "metric": together["metric"],
    "higher_is_better": together["higher_is_better"],
    "num_groups": num_groups,
    "groups": groups,
    "score": chosen.score,
    "exact": chosen.exact,
    "affinity": together["relations"]["affinity"],
    "within_across": together["relations"].get("within_across"),
    "runs": runs,
    "single": {n: single[n] for n in names},
    "together": together_values,
    "grouped": grouped,
    "delta_m": {"together": delta(together_values), "grouped": delta(grouped)},
  }


def group_table(out: dict[str, Any]) -> str:
  """The table ``jmtl group`` prints.

  Examples:
    >>> out = {"tasks": ["a", "b"], "metric": {"a": "acc", "b": "acc"}, "groups": [["a"], ["b"]], "num_groups": 2,
    ...        "exact": True, "score": 0.0, "single": {"a": 0.8, "b": 0.7}, "together": {"a": 0.81, "b": 0.6},
    ...        "grouped": {"a": 0.8, "b": 0.7}, "delta_m": {"together": -6.52, "grouped": 0.0}}
    >>> print(group_table(out))
    groups (at most 2; exact search on the all-tasks run's affinity): {a}  {b}
    <BLANKLINE>
    task   metric   group   single-task   all together     grouped
    a      acc          1        0.8000        0.8100      0.8000
    b      acc          2        0.7000        0.6000      0.7000
    <BLANKLINE>
    Δm% against single-task (test split): all together -6.52, grouped +0.00
  """
  names = out["tasks"]
  index = {n: i + 1 for i, g in enumerate(out["groups"]) for n in g}
  how = "exact search" if out["exact"] else "beam search"
  shown = "  ".join("{" + ", ".join(g) + "}" for g in out["groups"])
  tw = max(4, *(len(n) for n in names)) + 3
  lines = [f"groups (at most {out['num_groups']}; {how} on the all-tasks run's affinity): {shown}", ""]
  lines.append(f"{'task':<{tw}}{'metric':<9}{'group':>5}{'single-task':>14}{'all together':>14}{'grouped':>12}")
  fmt = lambda v, w: f"{'—':>{w}}" if v is None else f"{v:>{w}.4f}"
  for n in names:
    lines.append(
      f"{n:<{tw}}{out['metric'][n]:<9}{index[n]:>5}{fmt(out['single'][n], 14)}{fmt(out['together'][n], 14)}"
      f"{fmt(out['grouped'][n], 12)}"
    )
  dm = out["delta_m"]
  show = lambda v: "n/a" if v is None else f"{v:+.2f}"
  both = f"all together {show(dm['together'])}, grouped {show(dm['grouped'])}"
  lines += ["", f"Δm% against single-task (test split): {both}"]
  return "\n".join(lines)
