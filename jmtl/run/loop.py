"""Training one model: ``create_train_state``, ``train_and_evaluate``, resume and interruption.

The jitted step (with donated state) also sums the step metrics on device;
the host fetches and resets the sums every ``log_every`` steps only, so there
is no host sync per step. Everything the remaining steps depend on is in the
checkpoint (see :mod:`jmtl.run.checkpoints`), and batch ``s`` is a function of
``(seed, s)``, so a run killed and resumed ends with exactly the parameters
and metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

import jmtl
from jmtl.run import cotrain as run_cotrain
from jmtl.run import evaluation
from jmtl.run import inputs
from jmtl.run import registry
from jmtl.run import relations as run_relations
from jmtl.run import signals
from jmtl.run import trackers
from jmtl.run import workdir as workdir_lib
from jmtl.run.checkpoints import Checkpoints
from jmtl.run.config import ConfigError
from jmtl.run.config import task_subset
from jmtl.run.logs import MetricsLog
from jmtl.run.logs import Progress
from jmtl.run.signals import Interrupted


class TooManySkipped(RuntimeError):
  """Raised when more than ``max_skipped_fraction`` of the last ``skip_window`` steps were skipped.

  The checkpoint of the step is written first. ``step`` is that step.
  """

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def create_train_state(run: Run, example: dict) -> jmtl.TrainState:
  """The initial state of ``run``: parameters from ``key(seed)``, the step rng from a split of it.

  See :meth:`jmtl.TrainState.from_model`. A co-training run's state is an ensemble's or a distilled student's
  (:func:`jmtl.run.cotrain.create_state`).
  """
  if run.cotrain["members"]:
    return run_cotrain.create_state(run, example, None)
  state = jmtl.TrainState.from_model(
    run.model,
    example["inputs"],
    tx=run.optimizer,
    weighting=run.weighting,
    rng=jax.random.key(run.config.seed),
    relations=run.relations,
  )
  return run_cotrain.create_state(run, example, state)


def variables(state: jmtl.TrainState):
  """What evaluation and model selection need: ``params``, or ``(params, model_state)`` for a stateful model."""
  return (state.params, state.model_state) if jax.tree.leaves(state.model_state) else state.params


def _rest(state: jmtl.TrainState) -> jmtl.TrainState:
  """The state without what :func:`variables` holds (checkpointed as their own items)."""
  return state.replace(params=(), model_state={})


def data_mesh(config) -> jax.sharding.Mesh | None:
  """The data-parallel mesh of ``config.devices`` devices (0: all), or ``None`` for one device.

  Under ``jax.distributed`` the devices are those of every process, the same
  number from each (:func:`jmtl.parallel.make_mesh`): ``devices`` is 0 or a
  multiple of the process count.

  Raises:
    ConfigError: when the devices do not exist or do not split evenly over the processes.

  Examples:
    >>> data_mesh(ml_collections.ConfigDict({"devices": 1})) is None
    True
  """
  n = config.get("devices", 1)
  n = jax.device_count() if n == 0 else n
  if n == 1 and jax.process_count() == 1:
    return None
  try:
    return jmtl.parallel.make_mesh(n)
  except ValueError as e:
    raise ConfigError(f"config field 'devices' = {config.get('devices', 1)} (0: all): {e}") from e


def place(tree, mesh):
  """``tree`` replicated over ``mesh`` (without one, committed to the default device); under ``jax.distributed``, from
  each process's copy.

  Committed either way, as the step's outputs are: an uncommitted first carry would compile the step once more.
  """
  return jax.device_put(tree, jax.devices()[0]) if mesh is None else jmtl.parallel.put_replicated(tree, mesh)


def make_loop_step(config, model, tasks, mesh=None, teacher=None):
  """``step((state, sums), batch) -> (state, sums)``, jitted with the carry donated; ``sums`` add the metrics.

  The optimizer and the weighting are the state's. Also returns
  ``zero_sums(state, batch)``, the initial sums. With a ``mesh``
  (:func:`data_mesh`) the step is one global program over it: the carry
  replicated, every batch split along its leading axis, the gradient that of
  the global batch (:func:`jmtl.parallel.mesh_jit`).

  Examples:
    >>> import optax
    >>> from jmtl import models
    >>> c = ml_collections.ConfigDict({"seed": 0, "sharing": {"soft": 0.0, "weight_decay": 0.0},
    ...   "grad": {"level": "parameter", "heads": "weighted", "chunk_size": 0, "cross_device": "exact"}})
    >>> model = models.mlp({"a": 2}, hidden=(4,))
    >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy)]
    >>> batch = {"inputs": np.ones((2, 3), np.float32), "labels": {"a": np.array([0, 1])}}
    >>> step, zero_sums = make_loop_step(c, model, tasks)
    >>> state = jmtl.TrainState.create(params=model.init(jax.random.key(0), batch["inputs"]), tx=optax.sgd(0.1),
    ...                                num_tasks=1, rng=jax.random.key(1))
    >>> state, sums = step((state, zero_sums(state, batch)), batch)
    >>> state, sums = step((state, sums), batch)
    >>> int(state.step), float(sums["weight/a"])
    (2, 2.0)
  """
  g = config.grad
  kwargs = dict(
    penalty=registry.make_penalty(config),
    level=g.level,
    heads=g.heads,
    chunk_size=g.chunk_size or None,
    cross_device=g.cross_device,
  )
  # An ensemble's (vmapped) or a distilled student's step (jmtl.run.cotrain), else the one model's.
  step = run_cotrain.make_step(config, model, tasks, kwargs, teacher) or jmtl.make_train_step(model, tasks, **kwargs)

  def logged_step(carry, batch):
    state, sums = carry
    state, metrics = step(state, batch)
    metrics = metrics.without("num_skipped")  # cumulative already; the state keeps it
    return state, jax.tree.map(lambda s, m: s + m.astype(s.dtype), sums, metrics)

  def zero_sums(state, batch):
    shapes = jax.eval_shape(step, state, batch)[1].without("num_skipped")
    return place(jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)), mesh)

  if mesh is None:
    return jmtl.parallel.jit(logged_step), zero_sums
  on_mesh = jmtl.parallel.mesh_jit(logged_step, mesh)
  # A batch is this process's rows of the global batch (all of them on one process): put_batch makes it global.
  return (lambda carry, batch: on_mesh(carry, jmtl.parallel.put_batch(batch, mesh))), zero_sums


# One compiled program each (op by op, every leaf would compile its own copy or zeros kernel).
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _zeros(tree):
  """Zeros in place of ``tree`` (donated), on its leaves' devices: a jitted constant would land on one device only,
  which a multi-process run can neither checkpoint nor feed to the step."""
  shardings = jax.tree.map(lambda x: x.sharding, tree)
  return jax.jit(_zeros_like, donate_argnums=0, out_shardings=shardings)(tree)  # compiled once per shardings


def _stop_on_signals():
  """SIGINT/SIGTERM as a flag the loop checks once per step (:func:`jmtl.run.signals.deferred`).

  Inside the ``jmtl`` command this shares the command's flag, so a signal
  that came during start-up is seen by the loop too.
  """
  return signals.deferred()


def _checked_loop_step(train_step, num_classes: dict[str, int]):
  """``train_step`` with :mod:`jmtl.checks` around it: each batch checked before its step, the metric sums after.

  The step's program is unchanged. The sums are reset every ``log_every``
  steps and checked after every step, so the first step with a non-finite
  loss or weight is the one named. Two host syncs per step: slower.
  """

  def local(x):  # a replicated value's copy on this process's first device (all of it, on one process)
    return x.addressable_data(0) if isinstance(x, jax.Array) else x

  def step(carry, batch):
    state, sums = carry
    number = int(local(state.step)) + 1
    jmtl.checks.check_batch(batch, step=number, num_classes=num_classes)
    state, sums = train_step((state, sums), batch)
    jmtl.checks.check_metrics(jax.tree.map(local, sums), step=number)
    return state, sums

  return step


class Run:
  """The pieces of one run, built from its config."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None):
    self.config = config
    self.cotrain = run_cotrain.fields(config)  # checked before anything is built
    trackers.check(config)  # a tracker named and not installed
    self.data = inputs.load_data(config)
    if config.get("fold"):  # a fold run of --folds K: the training split without its held-out fold
      from jmtl.run import trials

      self.data = trials.fold_data(self.data, config.fold)
    self.names = task_subset(config, self.data.specs)
    inputs.check_data(self.data, self.names)  # labels in range, values finite, masks in [0, 1]: before training
    self.tasks = inputs.make_tasks(self.data, self.names)
    evaluation.check_selection(self.tasks, config.select_metric)
    self.model = registry.make_model(config, inputs.head_dims(self.data, self.names))
    self.optimizer = registry.make_optimizer(config)
    self.weighting = registry.make_weighting(config, len(self.tasks))
    self.relations = registry.make_relations(config, self.names)  # None unless config.relations.every
    self._check_shared()
    self.mesh = data_mesh(config)
    # A distilled student's teachers (frozen, in the state); they need the workdir (its baselines) to be found.
    teacher, self.teacher_variables = None, None
    if self.cotrain["teachers"] and workdir is not None:
      teacher, self.teacher_variables = run_cotrain.teacher_of(config, workdir, self)
    elif self.cotrain["teachers"]:
      teacher = lambda variables, inputs: {}  # evaluation only: the step is never run
    eval_step = run_cotrain.make_eval_step(config, self.model, self.tasks) or jmtl.make_eval_step(
      self.model, self.tasks
    )
    self.eval_step = _eval_step(eval_step, self.mesh)
    self.train_step, self.zero_sums = make_loop_step(config, self.model, self.tasks, self.mesh, teacher)
    if config.get("checks", False):
      dims = inputs.head_dims(self.data, self.names)
      classes = {n: dims[n] for n in self.names if self.data.specs[n].get("kind") == "classification"}
      self.train_step = _checked_loop_step(self.train_step, classes)

  def _check_shared(self) -> None:
    x = self.data.sources["train"][0]["inputs"]
    spec = jax.ShapeDtypeStruct((1, *x.shape), np.float32)
    try:
      params = jax.eval_shape(self.model.init, jax.random.key(0), spec)
    except ValueError as e:
      raise ConfigError(f"model {self.config.model.name!r} on inputs of shape {tuple(x.shape)}: {e}") from e
    if self.weighting.needs == "losses":
      return
    if not jax.tree.leaves(params["shared"]):
      raise ConfigError(
        f"weighting {self.config.weighting!r} needs per-task gradients of shared parameters, "
        f"and model {self.config.model.name!r} has none (use a loss-level method or a hard-sharing model)"
      )

  def evaluate(self, weights, split: str) -> dict[str, float]:
    """Metrics of ``split`` for :func:`variables` ``weights``."""
    size = min(self.config.eval_batch_size, len(self.data.sources[split]))
    if self.mesh is not None:  # a multiple of the device count (the last batch is padded to it)
      size = max(size - size % self.mesh.size, self.mesh.size)
    batches = inputs.eval_batches(self.data, split, self.names, size)
    params, model_state = weights if isinstance(weights, tuple) else (weights, {})
    if self.cotrain["members"]:  # the ensemble's metrics, then each member's and their mean (prefixed)
      return run_cotrain.flatten(
        jmtl.cotrain.evaluate_ensemble(self.eval_step, params, batches, self.tasks, model_state)
      )
    return jmtl.evaluate(self.eval_step, params, batches, self.tasks, model_state)


def _eval_step(eval_step, mesh):
  """``eval_step`` jitted; with a mesh, each batch split over it and the statistics summed globally."""
  if mesh is None:
    return jax.jit(eval_step)
  sharded = jax.jit(
    eval_step,
    in_shardings=(
      jmtl.parallel.replicated(mesh),
      jmtl.parallel.batch_sharding(mesh),
      jmtl.parallel.replicated(mesh),
    ),
    out_shardings=jmtl.parallel.replicated(mesh),  # every process reads the global sums
  )
  # Every process reads each evaluation batch whole (inputs.eval_batches) and puts its devices' rows.
  put = lambda batch: jmtl.parallel.put_batch(batch, mesh, global_batch=True)
  return lambda params, batch, model_state=None: sharded(params, put(batch), model_state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, desc: str = "train"):
  """Trains (or resumes) the run of ``config`` in ``workdir``; returns and writes its ``results.json``.

  The workdir is locked for the duration (:func:`jmtl.run.workdir.locked`). A
  resume restores the newest checkpoint that verifies
  (:meth:`Checkpoints.resume`).

  Raises:
    Interrupted: after SIGINT/SIGTERM, with the checkpoint written.
    ConfigError: on a wrong config or workdir, before the workdir is written; when another process holds the
      workdir; when the workdir has checkpoints and none verifies.

  Examples:
    >>> from jmtl.run import config as config_lib
    >>> results = train_and_evaluate(config_lib.load_config("configs/synthetic.py"), "/tmp/syn")  # doctest: +SKIP
    >>> results["test"]["task_0/acc"]  # doctest: +SKIP
    0.87
  """
  with workdir_lib.locked(workdir):
    return _train_and_evaluate(config, workdir, progress=progress, desc=desc)


def _train_and_evaluate(config, workdir: str, *, progress: bool, desc: str):
  workdir = workdir_lib.open_run(workdir, config, write=False)
  results_path = os.path.join(workdir, workdir_lib.RESULTS)
  if os.path.exists(results_path):  # finished: a re-run only prints the table again
    return evaluation.check_results(workdir_lib.read_json(results_path, f"workdir {workdir}"), results_path)
  run = Run(config, workdir)  # every config error surfaces here, before the workdir is written
  signals.check("while loading the data and building the model")  # a safe point of the jmtl command
  workdir_lib.open_run(workdir, config)
  batches = inputs.TrainBatches(run.data, run.names, config, validation="validation" in run.weighting.requires)
  example = batches.example()
  state = place(create_train_state(run, example), run.mesh)
  sums = run.zero_sums(state, example)
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  host = {"best_score": None, "best_step": 0, "seconds": 0.0, "timed_steps": 0}
  best = _copy(variables(state))
  restored = ckpt.resume(variables(state), (_rest(state), sums))  # the newest checkpoint that verifies, if any
  if restored is not None:
    now, best, (rest, sums), meta = restored
    params, model_state = now if isinstance(now, tuple) else (now, {})
    state = rest.replace(params=params, model_state=model_state)
    batches.set_state(meta["data"])
    host = meta["host"]
  log = MetricsLog(workdir, resume_step=int(state.step) if restored is not None else None, config=config)
  trained = False
  try:
    state, best = _Training(run, batches, ckpt, log, host).loop(state, sums, best, progress=progress, desc=desc)
    trained = True
  finally:
    log.close(trained)
    ckpt.close()
  return _finish(run, workdir, state, best, host)


#: Functions called after every validation of :class:`_Training` (see :func:`on_validation`).
_VALIDATION_HOOKS: list = []


@contextlib.contextmanager
def on_validation(hook):
  """Calls ``hook(step, values, tasks)`` after every validation of the runs trained within the block.

  ``values`` is the validation record (non-finite metrics ``None``), ``tasks``
  the run's :class:`jmtl.Task` list. An exception the hook raises (such as
  Optuna's ``TrialPruned``, :mod:`jmtl.run.tune`) stops the run there, as
  an error would: the checkpoints written so far stay.

  Examples:
    >>> seen = []
    >>> with on_validation(lambda step, values, tasks: seen.append(step)):
    ...   len(_VALIDATION_HOOKS)
    1
    >>> len(_VALIDATION_HOOKS)
    0
  """
  _VALIDATION_HOOKS.append(hook)
  try:
    yield hook
  finally:
    _VALIDATION_HOOKS.remove(hook)


class _Training:
  """The loop of one run and what it writes to: checkpoints, the metrics log, the host-side state."""

  def __init__(self, run: Run, batches, ckpt: Checkpoints, log: MetricsLog, host: dict):
    self.run, self.batches, self.ckpt, self.log, self.host = run, batches, ckpt, log, host
    self.skips = _SkipWatch(run.config)
    self.transfer = run_relations.TransferWatch(run.config, os.path.dirname(log.path), run.tasks)

  def loop(self, state, sums, best, *, progress: bool, desc: str):
    config = self.run.config
    step = int(state.step)
    last_log = step - step % config.log_every
    with _stop_on_signals() as caught:
      if caught:  # during start-up (restoring, compiling the state): stop before the first step
        raise Interrupted(caught["signum"], when="during start-up")
      bar = Progress(config.num_steps, step, desc, progress)
      tick, first = time.perf_counter(), True
      while step < config.num_steps:
        state, sums = self.run.train_step((state, sums), next(self.batches))
        step += 1
        end = step == config.num_steps
        record, stop = None, None
        if step % config.log_every == 0 or end:
          record, sums = self.log_train(state, sums, step=step, count=step - last_log, tick=tick, first=first)
          stop = self.skips.update(step, step - last_log, record)
          last_log, first = step, False
        if step % config.eval_every == 0 or end:
          best = self.validate(state, best, step=step)
        if step % config.checkpoint_every == 0 or end or caught or stop:
          self.ckpt.save(step, variables(state), best, (_rest(state), sums), _meta(self.batches, self.host))
        bar.update(step, record)
        if caught:
          bar.close()
          raise Interrupted(caught["signum"], step)
        if stop:
          bar.close()
          raise TooManySkipped(f"{stop}; checkpoint saved", step)
        if record is not None:  # eval_every and checkpoint_every are multiples of log_every
          tick = time.perf_counter()  # so the timed intervals hold steps only
    bar.close()
    return state, best

  def log_train(self, state, sums, *, step: int, count: int, tick: float, first: bool):
    host = self.host
    values = jax.device_get(sums)  # the one host sync of the interval
    elapsed = time.perf_counter() - tick
    if not first:  # the first interval after a (re)start includes compilation
      host["seconds"] += elapsed
      host["timed_steps"] += count
    record = {k: v / count for k, v in values.items() if k != "skipped"}
    record["skipped"] = int(values["skipped"])  # steps of the interval skipped (``num_skipped``: since step 0)
    record["num_skipped"] = int(state.num_skipped)
    record["examples_per_s"] = count * self.run.config.batch_size / max(elapsed, 1e-9)
    record.update(run_relations.train_record(state))  # running means since step 0: affinity, cosine, conflicts
    self.log.write(step, "train", record)
    return record, _zeros(sums)

  def validate(self, state, best, *, step: int):
    run, host = self.run, self.host
    values, _, empty = evaluation.mark_non_finite(run.evaluate(variables(state), "validation"), run.tasks)
    self.log.write(step, "validation", values)
    transfer = self.transfer.update(step, values)  # against the baselines' curves, when they have this step
    if transfer is not None:
      self.log.write(step, "transfer", transfer)
    score = evaluation.selection_score(values, run.tasks, run.config.select_metric, empty)
    for hook in list(_VALIDATION_HOOKS):
      hook(step, values, run.tasks)
    if run.config.select == "final":
      host["best_step"] = step
    elif host["best_score"] is None or score > host["best_score"]:
      host["best_score"], host["best_step"] = score, step
      best = _copy(variables(state))  # the state's buffers are donated to the next step
    return best


class _SkipWatch:
  """Skipped steps as they happen: a line on stderr at the first and whenever the count doubles; the stop rule.

  Read every ``log_every`` steps (the host syncs then only). The run stops
  when more than ``max_skipped_fraction`` x ``skip_window`` steps were
  skipped within the last ``skip_window`` steps (at least ``log_every``),
  counted since the run (re)started. ``max_skipped_fraction=1`` never stops.

  Examples:
    >>> watch = _SkipWatch(ml_collections.ConfigDict({"log_every": 10, "skip_window": 100,
    ...                                              "max_skipped_fraction": 0.1}), quiet=True)
    >>> watch.update(10, 10, {"skipped": 0, "num_skipped": 0}) is None
    True
    >>> watch.update(20, 10, {"skipped": 10, "num_skipped": 10, "loss/a": float("nan")}) is None
    True
    >>> print(watch.update(30, 10, {"skipped": 1, "num_skipped": 11, "loss/a": float("inf")}))
    11 of the last 100 steps were skipped at step 30 (non-finite loss: a; the limit is
    max_skipped_fraction=0.1 of skip_window=100 steps)
  """

  def __init__(self, config, *, quiet: bool = False):
    self.fraction = float(config.get("max_skipped_fraction", 0.1))
    self.window = max(int(config.get("skip_window", 100)), int(config.log_every))
    self.recent: list[tuple[int, int]] = []  # (last step of a logged interval, steps skipped in it)
    self.warned: int | None = None  # the total count at the last warning
    self.quiet = quiet

  def update(self, step: int, count: int, record: dict) -> str | None:
    """Takes the train record of the interval of ``count`` steps ending at ``step``; returns why to stop, or None."""
    skipped, total = int(record["skipped"]), int(record["num_skipped"])
    self.recent = [(s, n) for s, n in self.recent if s > step - self.window]
    if skipped:
      self.recent.append((step, skipped))
    cause = _cause(record)
    if skipped and (self.warned is None or total >= 2 * self.warned):
      self.warned = total
      self._say(
        f"jmtl: warning: step {step}: {skipped} of the last {count} steps skipped ({cause}); "
        f"{total} skipped since step 0"
      )
    in_window = sum(n for _, n in self.recent)
    if in_window > self.fraction * self.window:
      return (
        f"{in_window} of the last {self.window} steps were skipped at step {step} ({cause}; the limit is "
        f"max_skipped_fraction={self.fraction:g} of skip_window={self.window} steps)"
      )
    return None

  def _say(self, line: str) -> None:
    if not self.quiet and jmtl.parallel.is_primary():
      tqdm.tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it


def _cause(record: dict) -> str:
  """Which tasks' mean loss over the interval is not finite, else "a weight or the gradient was not finite"."""
  bad = [k[5:] for k, v in record.items() if k.startswith("loss/") and v is not None and not math.isfinite(v)]
  return f"non-finite loss: {', '.join(bad)}" if bad else "a weight or the gradient was not finite"


def _meta(batches, host) -> dict:
  return {"data": batches.get_state(), "host": dict(host)}


def _finish(run, workdir, state, best, host) -> dict[str, Any]:
  params = best if run.config.select == "best" else variables(state)
  results = {
    **evaluation.describe(run.tasks),
    "units": inputs.units(run.data, run.names),
    "weighting": run.config.weighting,
    "model": run.config.model.name,
    "num_steps": int(state.step),
    "select": run.config.select,
    "select_metric": run.config.select_metric,
    "selected_step": int(host["best_step"]),
    "num_skipped": int(state.num_skipped),
    "step_ms": 1e3 * host["seconds"] / host["timed_steps"] if host["timed_steps"] else None,
  }
  evaluation.evaluate_splits(results, run, params)
  if run_cotrain.active(run.config):
    results["cotrain"] = run_cotrain.describe(run.config, results)
  results["val_score"] = evaluation.selection_score(
    results["validation"], run.tasks, run.config.select_metric, results["no_examples"].get("validation", ())
  )
  workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS), results)
  return results
