"""Co-training in the runner (config group ``cotrain``): ensembles, mutual learning, distillation into the run.

Fields (a config without the group trains one model)::

  cotrain.members      M >= 2: an ensemble of M members (seeds seed, seed+1, ...) in one vmapped step; 0: off
  cotrain.vote         the ensemble predicts by majority vote (classification) instead of the mean probability
  cotrain.beta         mutual learning (> 0): each member also pulled toward the others' predictions
  cotrain.temperature  T of the soft targets (mutual learning and distillation)
  cotrain.teachers     "baselines": the run's single-task baselines; a run workdir; "": no distillation
  cotrain.weight       λ: the distillation loss's weight (1 − λ for the task loss)
  cotrain.anneal       BAM's teacher annealing: λ·(1 − step/num_steps)
  cotrain.loop         the members' step: "vmap", "unroll" (one after the other in one program), or "auto": unroll on
                       CPU (vmapped convolutions run slowly on XLA:CPU), vmap on accelerators

On CPU an ensemble run also turns off XLA:CPU's concurrency-optimized scheduler
(:func:`sequential_cpu_scheduler`), which runs the members' independent
kernels at once and so makes M members in one program cost 1.4-1.8x M
members' steps (``benchmarks/ensemble.py``).

An ensemble run's results hold per split the ensemble's metrics (what the
run selects and reports), and ``cotrain.rows``: each member, the member
mean and the ensemble, with Δm% against the baselines when they exist.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

import jmtl
from jmtl import cotrain
from jmtl.run.config import ConfigError

#: The ``cotrain`` group's fields and their defaults (a config without the group trains one model).
DEFAULTS = dict(members=0, vote=False, beta=0.0, temperature=1.0, teachers="", weight=1.0, anneal=False, loop="auto")
#: The XLA flag :func:`sequential_cpu_scheduler` sets.
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ``cotrain`` fields of ``config``, checked, with :data:`DEFAULTS` where absent.

  Examples:
    >>> fields(ml_collections.ConfigDict({"cotrain": {"members": 4}}))["members"]
    4
    >>> fields(ml_collections.ConfigDict({"cotrain": {"members": 1}}))
    Traceback (most recent call last):
    jmtl.run.config.ConfigError: config field 'cotrain.members' must be 0 (off) or at least 2, got 1
  """
  group = config.get("cotrain")
  f = {**DEFAULTS, **(group.to_dict() if group is not None else {})}
  unknown = sorted(set(f) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"unknown config fields {[f'cotrain.{u}' for u in unknown]} (see configs/multi_digits.py)")
  m = f["members"]
  if not isinstance(m, int) or isinstance(m, bool) or m < 0 or m == 1:
    raise ConfigError(f"config field 'cotrain.members' must be 0 (off) or at least 2, got {m!r}")
  if not isinstance(f["beta"], int | float) or f["beta"] < 0:
    raise ConfigError(f"config field 'cotrain.beta' must be a number of at least 0, got {f['beta']!r}")
  if f["beta"] and not m:
    raise ConfigError("config field 'cotrain.beta' > 0 (mutual learning) needs cotrain.members >= 2")
  if not isinstance(f["temperature"], int | float) or not f["temperature"] > 0:
    raise ConfigError(f"config field 'cotrain.temperature' must be positive, got {f['temperature']!r}")
  if not isinstance(f["weight"], int | float) or not 0 <= f["weight"] <= 1:
    raise ConfigError(f"config field 'cotrain.weight' must be in [0, 1], got {f['weight']!r}")
  if f["teachers"] and m:
    raise ConfigError("config fields 'cotrain.teachers' and 'cotrain.members': distil into one student, not both")
  if f["loop"] not in ("auto", *cotrain.LOOPS):
    raise ConfigError(f"config field 'cotrain.loop' must be one of {('auto', *cotrain.LOOPS)}, got {f['loop']!r}")
  return f


def loop_of(f: dict[str, Any]) -> str:
  """The members' loop of the ``cotrain`` fields ``f``: ``"auto"`` is ``"unroll"`` on CPU, ``"vmap"`` elsewhere."""
  if f["loop"] != "auto":
    return f["loop"]
  return "unroll" if jax.default_backend() == "cpu" else "vmap"


def sequential_cpu_scheduler(config: ml_collections.ConfigDict, environ=os.environ) -> bool:
  """Before JAX starts its backends: for an ensemble, turns off XLA:CPU's concurrency-optimized scheduler.

  That scheduler runs independent kernels at once; the M members of one
  program are independent, and at once they cost 1.4-1.8x as much as one
  after the other on 2 CPU cores (and take M times the temporary memory):
  ``benchmarks/ensemble.py`` with and without the flag. Sets
  :data:`SCHEDULER_FLAG` in ``XLA_FLAGS`` unless the user set that flag;
  a flag of the CPU compiler only, so accelerators are unaffected. Takes
  effect only if no JAX computation ran yet in the process (the command
  line calls it first). Returns whether it set the flag.

  Examples:
    >>> env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    >>> sequential_cpu_scheduler(ml_collections.ConfigDict({"cotrain": {"members": 4}}), env), env["XLA_FLAGS"]
    (True, '--xla_force_host_platform_device_count=4 --xla_cpu_enable_concurrency_optimized_scheduler=false')
    >>> sequential_cpu_scheduler(ml_collections.ConfigDict({"cotrain": {"members": 0}}), {})
    False
  """
  flags = environ.get("XLA_FLAGS", "")
  if not fields(config)["members"] or SCHEDULER_FLAG.split("=", maxsplit=1)[0] in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}".strip()
  return True


def active(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` co-trains (an ensemble or a distilled student).

  Examples:
    >>> active(ml_collections.ConfigDict({"seed": 0}))
    False
  """
  f = fields(config)
  return bool(f["members"] or f["teachers"])


class EnsembleState(struct.PyTreeNode):
  """The runner's state of an ensemble: the members' :class:`jmtl.TrainState` stacked, and the loop's counters.

  ``step`` is the step count (the members', all equal) and ``num_skipped``
  the member-steps skipped in all; ``params`` and ``model_state`` read (and
  :meth:`replace` writes) the members', so the loop checkpoints and
  restores an ensemble as it does one model.
  """

  members: jmtl.TrainState
  step: jax.Array
  num_skipped: jax.Array
  relations = None

  @property
  def params(self):
    return self.members.params

  @property
  def model_state(self):
    return self.members.model_state


def _replace(self: EnsembleState, **updates) -> EnsembleState:
  """As ``dataclasses.replace``; ``params`` and ``model_state`` go to the members."""
  inner = {k: updates.pop(k) for k in ("params", "model_state") if k in updates}
  members = self.members.replace(**inner) if inner else self.members
  return dataclasses.replace(self, members=members, **updates)


EnsembleState.replace = _replace  # flax's dataclass decorator sets its own replace on the class: set after it


def create_state(run, example: dict, base_state: jmtl.TrainState) -> Any:
  """The run's initial state: an :class:`EnsembleState` of ``members`` seeds, or a :class:`jmtl.cotrain.DistillState`
  with the teachers' variables; ``base_state`` (the one model's state) otherwise."""
  f = fields(run.config)
  if f["members"]:
    seeds = [run.config.seed + i for i in range(f["members"])]
    members = cotrain.ensemble_state(
      run.model, example["inputs"], seeds=seeds, tx=run.optimizer, weighting=run.weighting
    )
    # two arrays, not one twice: the jitted step donates every buffer of its state
    return EnsembleState(members=members, step=jnp.zeros((), jnp.int32), num_skipped=jnp.zeros((), jnp.int32))
  if f["teachers"]:
    fieldset = {k: getattr(base_state, k) for k in base_state.__dataclass_fields__}
    return cotrain.DistillState(**fieldset, teacher=run.teacher_variables)
  return base_state


def make_step(run_config, model, tasks, step_kwargs: dict, teacher=None):
  """The co-training step ``step(state, batch) -> (state, metrics)`` of the config, or ``None`` when it trains one
  model. An ensemble's metrics are the member mean (``skipped``: member-steps), with each member's task losses."""
  f = fields(run_config)
  names = tuple(t.name for t in tasks)
  if f["teachers"]:
    weight = cotrain.teacher_annealing(f["weight"], run_config.num_steps) if f["anneal"] else f["weight"]
    return cotrain.make_distill_step(model, tasks, teacher, weight=weight, temperature=f["temperature"], **step_kwargs)
  if not f["members"]:
    return None
  if f["beta"]:
    inner = cotrain.make_mutual_step(
      model, tasks, beta=f["beta"], temperature=f["temperature"], loop=loop_of(f), **step_kwargs
    )
  else:
    inner = cotrain.make_ensemble_step(jmtl.make_train_step(model, tasks, **step_kwargs), loop=loop_of(f))

  def step(state: EnsembleState, batch):
    members, metrics = inner(state.members, batch)
    skipped = jnp.sum(metrics["skipped"].astype(jnp.int32))
    per_task = {k: jnp.mean(v, axis=0) for k, v in metrics.per_task.items()}
    scalars = {k: jnp.mean(v, axis=0) for k, v in metrics.scalars.items() if k not in ("skipped", "num_skipped")}
    losses = metrics.per_task["loss"]
    for i in range(losses.shape[0]):
      scalars.update({f"member{i}/loss/{n}": losses[i, k] for k, n in enumerate(names)})
    num_skipped = state.num_skipped + skipped
    scalars.update(skipped=skipped, num_skipped=num_skipped)
    new = EnsembleState(members=members, step=state.step + 1, num_skipped=num_skipped)
    return new, jmtl.StepMetrics(names, per_task, scalars)

  return step


def make_eval_step(config, model, tasks):
  """The ensemble's eval step (:func:`jmtl.cotrain.make_ensemble_eval_step`), or ``None`` for one model."""
  f = fields(config)
  return cotrain.make_ensemble_eval_step(model, tasks, vote=f["vote"]) if f["members"] else None


def flatten(metrics: dict) -> dict[str, Any]:
  """:func:`jmtl.cotrain.ensemble_metrics` as one record: the ensemble's under the plain names, the others prefixed.

  Examples:
    >>> flatten({"members": [{"a/acc": 0.5}], "member_mean": {"a/acc": 0.5}, "ensemble": {"a/acc": 0.6}})
    {'a/acc': 0.6, 'member_mean/a/acc': 0.5, 'member0/a/acc': 0.5}
  """
  out = dict(metrics["ensemble"])
  out.update({f"member_mean/{k}": v for k, v in metrics["member_mean"].items()})
  for i, m in enumerate(metrics["members"]):
    out.update({f"member{i}/{k}": v for k, v in m.items()})
  return out


def rows(results: dict, baselines: dict | None) -> dict[str, dict]:
  """The rows of an ensemble run's table: ``{"member i" | "member mean" | "ensemble": {"test": ..., "delta_m": ...}}``.

  Examples:
    >>> r = {"tasks": ["a"], "metric": {"a": "acc"}, "higher_is_better": {"a": True},
    ...      "test": {"a/acc": 0.9, "member0/a/acc": 0.8, "member1/a/acc": 0.7, "member_mean/a/acc": 0.75}}
    >>> {k: v["delta_m"] for k, v in rows(r, {"a": 0.8}).items()}
    {'member 0': 0.0, 'member 1': -12.5, 'member mean': -6.25, 'ensemble': 12.5}
  """
  from jmtl.run import evaluation  # the runner's comparison (Δm%, negative transfer)

  prefixes = sorted({k.split("/", 1)[0] for k in results["test"] if k.startswith("member") and k[6:7].isdigit()})
  prefixes.sort(key=lambda p: int(p[6:]))
  out = {}
  for label, prefix in [
    *((f"member {p[6:]}", p + "/") for p in prefixes),
    ("member mean", "member_mean/"),
    ("ensemble", ""),
  ]:
    test = {
      k[len(prefix) :]: v
      for k, v in results["test"].items()
      if k.startswith(prefix) and k.count("/") == prefix.count("/") + 1
    }
    row = {"test": test}
    if baselines:
      row["delta_m"] = evaluation.compare({**results, "test": test}, baselines)["delta_m"]
    out[label] = row
  return out


def table(results: dict) -> str:
  """The co-training rows of a run (members, member mean, ensemble), or ``""``.

  Examples:
    >>> print(table({"tasks": ["a"], "metric": {"a": "acc"}, "cotrain": {"rows": {"ensemble": {"test": {"a/acc": 0.9},
    ...                                                                                  "delta_m": 1.0}}}}))
    model             a (acc)       Δm%
    ensemble           0.9000     +1.00
  """
  rows_ = (results.get("cotrain") or {}).get("rows")
  if not rows_:
    return ""
  names = results["tasks"]
  heads = [f"{n} ({results['metric'][n]})" for n in names]
  w = [max(10, len(h) + 2) for h in heads]
  lines = [f"{'model':<14}" + "".join(f"{h:>{wi}}" for h, wi in zip(heads, w, strict=True)) + f"{'Δm%':>10}"]
  order = lambda label: (label == "ensemble", label == "member mean", int(label[7:]) if label[7:].isdigit() else 0)
  for label, row in sorted(rows_.items(), key=lambda item: order(item[0])):  # a results file holds them sorted
    cells = ""
    for n, wi in zip(names, w, strict=True):
      v = row["test"].get(f"{n}/{results['metric'][n]}")
      cells += f"{'—':>{wi}}" if v is None else f"{v:>{wi}.4f}"
    dm = row.get("delta_m")
    lines.append(f"{label:<14}{cells}{'—' if dm is None else f'{dm:+.2f}':>10}")
  return "\n".join(lines)


def teacher_of(config: ml_collections.ConfigDict, workdir: str, run) -> tuple[Any, Any]:
  """The teacher function and its frozen variables for ``cotrain.teachers`` (``"baselines"`` or a run workdir).

  The baselines must have been trained (:func:`jmtl.run.baselines.ensure`);
  each task's teacher is its baseline's kept model (the selected step). A
  workdir's kept model teaches likewise: one multi-task model, or an
  ensemble's combined prediction (:func:`jmtl.cotrain.ensemble_teacher`).
  """
  from jmtl.run import baselines as baselines_lib
  from jmtl.run import config as config_lib
  from jmtl.run import inputs
  from jmtl.run import registry
  from jmtl.run import workdir as workdir_lib
  from jmtl.run.checkpoints import Checkpoints

  f = fields(config)
  x = jax.ShapeDtypeStruct((1, *run.data.sources["train"][0]["inputs"].shape), np.float32)
  dims = inputs.head_dims(run.data, run.names)

  def kept(run_dir, model, cfg, members=0):
    init, init_state = model.init, model.init_state
    if members:  # an ensemble's checkpoint: every leaf with a leading member axis
      init, init_state = jax.vmap(init, (0, None)), jax.vmap(init_state, (0, None))
    key = jax.random.split(jax.random.key(0), members) if members else jax.random.key(0)
    params = jax.eval_shape(init, key, x)
    state = jax.eval_shape(init_state, key, x)
    template = (params, state) if jax.tree.leaves(state) else params
    ckpt = Checkpoints(os.path.join(run_dir, "checkpoints"))
    try:
      if ckpt.latest_step() is None:
        raise ConfigError(f"config field 'cotrain.teachers': {run_dir} has no checkpoint")
      _, variables, _ = ckpt.restore_kept(template, "best_params" if cfg.select == "best" else "params")
    finally:
      ckpt.close()
    return variables

  if f["teachers"] == "baselines":
    path = baselines_lib.directory(config, workdir)
    if path is None:
      raise ConfigError("config field 'cotrain.teachers' = 'baselines' needs baselines (config field 'baselines')")
    stored = baselines_lib.read(path, config)
    missing = [t for t in run.names if t not in stored]
    if missing:
      raise ConfigError(f"config field 'cotrain.teachers': no baseline of task(s) {missing} in {path}")
    models, variables = {}, {}
    for t in run.names:
      cfg = config_lib.baseline_config(config, t)
      models[t] = registry.make_model(cfg, {t: dims[t]})
      variables[t] = kept(os.path.join(path, stored[t]["workdir"]), models[t], cfg)
    return cotrain.task_teachers(models), variables
  source = os.path.abspath(os.path.expanduser(f["teachers"]))
  cfg = workdir_lib.load_run_config(source)
  model = registry.make_model(cfg, dims)
  members = fields(cfg)["members"]
  if members:  # an ensemble teaches with its combined prediction (mean probability, or its vote)
    teacher = cotrain.ensemble_teacher(model, run.tasks, vote=fields(cfg)["vote"])
    return teacher, kept(source, model, cfg, members)
  return cotrain.model_teacher(model), kept(source, model, cfg)


def describe(config: ml_collections.ConfigDict, results: dict) -> dict[str, Any]:
  """What a co-training run's results file records: its ``cotrain`` fields and, for an ensemble, its rows.

  Examples:
    >>> describe(ml_collections.ConfigDict({"cotrain": {"teachers": "baselines"}}), {})["fields"]["teachers"]
    'baselines'
  """
  f = fields(config)
  out = {"fields": f}
  if f["members"]:
    out["rows"] = rows(results, None)
  return out


def with_rows(results: dict, baselines: dict) -> dict:
  """``results`` with the ensemble rows' Δm% against ``baselines`` (``{task: test value}``); unchanged otherwise.

  Examples:
    >>> with_rows({"tasks": ["a"]}, {"a": 0.5})
    {'tasks': ['a']}
  """
  if not (results.get("cotrain") or {}).get("rows"):
    return results
  return {**results, "cotrain": {**results["cotrain"], "rows": rows(results, baselines)}}


def baseline_names(config: ml_collections.ConfigDict) -> list[str] | None:
  """The tasks whose single-task baselines a distilled student needs first (``cotrain.teachers = "baselines"``),
  else ``None``."""
  if fields(config)["teachers"] != "baselines":
    return None
  from jmtl.run import config as config_lib
  from jmtl.run import inputs

  return config_lib.task_subset(config, inputs.load_data(config).specs)
