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
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import jmtl
from jmtl.run import evaluation
from jmtl.run import inputs
from jmtl.run import registry
from jmtl.run import workdir as workdir_lib
from jmtl.run.checkpoints import Checkpoints
from jmtl.run.config import ConfigError
from jmtl.run.config import task_subset
from jmtl.run.logs import MetricsLog
from jmtl.run.logs import Progress


class Interrupted(Exception):
  """Raised after SIGINT/SIGTERM, once the checkpoint of the current step is written."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved")
    self.signum, self.step = signum, step


def create_train_state(run: Run, example: dict) -> jmtl.TrainState:
  """The initial state of ``run``: parameters from ``key(seed)``, the step rng from a split of it.

  See :meth:`jmtl.TrainState.from_model`.
  """
  return jmtl.TrainState.from_model(
    run.model, example["inputs"], tx=run.optimizer, weighting=run.weighting, rng=jax.random.key(run.config.seed)
  )


def variables(state: jmtl.TrainState):
  """What evaluation and model selection need: ``params``, or ``(params, model_state)`` for a stateful model."""
  return (state.params, state.model_state) if jax.tree.leaves(state.model_state) else state.params


def _rest(state: jmtl.TrainState) -> jmtl.TrainState:
  """The state without what :func:`variables` holds (checkpointed as their own items)."""
  return state.replace(params=(), model_state={})


def data_mesh(config) -> jax.sharding.Mesh | None:
  """The data-parallel mesh of ``config.devices`` devices (0: all), or ``None`` for one device.

  Examples:
    >>> data_mesh(ml_collections.ConfigDict({"devices": 1})) is None
    True
  """
  n = config.get("devices", 1)
  n = jax.device_count() if n == 0 else n
  return None if n == 1 else jmtl.parallel.make_mesh(n)


def place(tree, mesh):
  """``tree`` replicated over ``mesh`` (unchanged without one)."""
  return tree if mesh is None else jax.device_put(tree, jmtl.parallel.replicated(mesh))


def make_loop_step(config, model, tasks, mesh=None):
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
  step = jmtl.make_train_step(
    model,
    tasks,
    penalty=registry.make_penalty(config),
    level=g.level,
    heads=g.heads,
    chunk_size=g.chunk_size or None,
    cross_device=g.cross_device,
  )

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
  return jmtl.parallel.mesh_jit(logged_step, mesh), zero_sums


# One compiled program each (op by op, every leaf would compile its own copy or zeros kernel).
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
_zeros = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree), donate_argnums=0)


@contextlib.contextmanager
def _stop_on_signals():
  """Turns SIGINT/SIGTERM into a flag the loop checks once per step (a second SIGINT stops at once)."""
  caught: dict[str, int] = {}
  if threading.current_thread() is not threading.main_thread():
    yield caught
    return

  def handler(signum, frame):
    if caught and signum == signal.SIGINT:
      raise KeyboardInterrupt
    caught["signum"] = signum

  old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield caught
  finally:
    for s, h in old.items():
      signal.signal(s, h)


class Run:
  """The pieces of one run, built from its config."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.data = inputs.load_data(config)
    self.names = task_subset(config, self.data.specs)
    self.tasks = inputs.make_tasks(self.data, self.names)
    evaluation.check_selection(self.tasks, config.select_metric)
    self.model = registry.make_model(config, inputs.head_dims(self.data, self.names))
    self.optimizer = registry.make_optimizer(config)
    self.weighting = registry.make_weighting(config, len(self.tasks))
    self._check_shared()
    self.mesh = data_mesh(config)
    self.eval_step = _eval_step(jmtl.make_eval_step(self.model, self.tasks), self.mesh)
    self.train_step, self.zero_sums = make_loop_step(config, self.model, self.tasks, self.mesh)

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
  )
  return lambda params, batch, model_state=None: sharded(params, batch, model_state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, desc: str = "train"):
  """Trains (or resumes) the run of ``config`` in ``workdir``; returns and writes its ``results.json``.

  Raises:
    Interrupted: after SIGINT/SIGTERM, with the checkpoint written.
    ConfigError: on a wrong config or workdir, before the workdir is written.

  Examples:
    >>> from jmtl.run import config as config_lib
    >>> results = train_and_evaluate(config_lib.load_config("configs/synthetic.py"), "/tmp/syn")  # doctest: +SKIP
    >>> results["test"]["task_0/acc"]  # doctest: +SKIP
    0.87
  """
  workdir = workdir_lib.open_run(workdir, config, write=False)
  results_path = os.path.join(workdir, workdir_lib.RESULTS)
  if os.path.exists(results_path):  # finished: a re-run only prints the table again
    return workdir_lib.read_json(results_path, f"workdir {workdir}")
  run = Run(config)  # every config error surfaces here, before the workdir is written
  workdir_lib.open_run(workdir, config)
  batches = inputs.TrainBatches(run.data, run.names, config, validation="validation" in run.weighting.requires)
  example = batches.example()
  state = place(create_train_state(run, example), run.mesh)
  sums = run.zero_sums(state, example)
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  host = {"best_score": None, "best_step": 0, "seconds": 0.0, "timed_steps": 0}
  best = _copy(variables(state))
  if ckpt.latest_step() is not None:
    now, best, (rest, sums), meta = ckpt.restore(variables(state), (_rest(state), sums))
    params, model_state = now if isinstance(now, tuple) else (now, {})
    state = rest.replace(params=params, model_state=model_state)
    batches.set_state(meta["data"])
    host = meta["host"]
  log = MetricsLog(workdir, resume_step=int(state.step) if ckpt.latest_step() is not None else None)
  try:
    state, best = _Training(run, batches, ckpt, log, host).loop(state, sums, best, progress=progress, desc=desc)
  finally:
    log.close()
    ckpt.close()
  return _finish(run, workdir, state, best, host)


class _Training:
  """The loop of one run and what it writes to: checkpoints, the metrics log, the host-side state."""

  def __init__(self, run: Run, batches, ckpt: Checkpoints, log: MetricsLog, host: dict):
    self.run, self.batches, self.ckpt, self.log, self.host = run, batches, ckpt, log, host

  def loop(self, state, sums, best, *, progress: bool, desc: str):
    config = self.run.config
    step = int(state.step)
    last_log = step - step % config.log_every
    bar = Progress(config.num_steps, step, desc, progress)
    tick, first = time.perf_counter(), True
    with _stop_on_signals() as caught:
      while step < config.num_steps:
        state, sums = self.run.train_step((state, sums), next(self.batches))
        step += 1
        end = step == config.num_steps
        record = None
        if step % config.log_every == 0 or end:
          record, sums = self.log_train(state, sums, step=step, count=step - last_log, tick=tick, first=first)
          last_log, first = step, False
        if step % config.eval_every == 0 or end:
          best = self.validate(state, best, step=step)
        if step % config.checkpoint_every == 0 or end or caught:
          self.ckpt.save(step, variables(state), best, (_rest(state), sums), _meta(self.batches, self.host))
        bar.update(step, record)
        if caught:
          bar.close()
          raise Interrupted(caught["signum"], step)
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
    record["skipped"] = values["skipped"]
    record["num_skipped"] = int(state.num_skipped)
    record["examples_per_s"] = count * self.run.config.batch_size / max(elapsed, 1e-9)
    self.log.write(step, "train", record)
    return record, _zeros(sums)

  def validate(self, state, best, *, step: int):
    run, host = self.run, self.host
    values = run.evaluate(variables(state), "validation")
    self.log.write(step, "validation", values)
    score = evaluation.selection_score(values, run.tasks, run.config.select_metric)
    if run.config.select == "final":
      host["best_step"] = step
    elif host["best_score"] is None or score > host["best_score"]:
      host["best_score"], host["best_step"] = score, step
      best = _copy(variables(state))  # the state's buffers are donated to the next step
    return best


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
    "validation": run.evaluate(params, "validation"),
    "test": run.evaluate(params, "test"),
  }
  results["val_score"] = evaluation.selection_score(results["validation"], run.tasks, run.config.select_metric)
  workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS), results)
  return results
