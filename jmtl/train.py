"""The multi-task train and eval steps.

``make_train_step`` returns a pure ``step(state, batch) -> (state, metrics)``
that the caller jits (or wraps with :mod:`jmtl.parallel`). One step is:

1. per-task losses ``L`` (masked means over the global batch);
2. weights ``w = weighting.update(L, ...)`` -- seeing the Gramian or Jacobian of
   the shared parameters when the transform asks for it;
3. the gradient of ``Σₖ stop_gradient(wₖ) Lₖ + penalty(θ)``, applied by optax;
4. if any loss, weight or gradient is not finite, nothing changes but the step
   counter, the rng and the count of skipped steps.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jmtl import grads as grads_lib
from jmtl import groups
from jmtl import metrics as metrics_lib
from jmtl import relations as relations_lib
from jmtl import sharing
from jmtl import tasks as tasks_lib
from jmtl import weighting as weighting_lib
from jmtl.models import as_model
from jmtl.weighting import WeightingTransform
from jmtl.weighting import equal
from jmtl.weighting import init_state

Array = jax.Array
Params = Any
Batch = Mapping[str, Any]


class TrainState(struct.PyTreeNode):
  """Everything a multi-task run carries from step to step.

  As flax's ``TrainState`` carries its ``tx``, this carries the optimizer and
  the weighting transform as static fields, so they are given once (to
  :meth:`create`) and the step reads them from the state. Subclass it to carry
  more.

  Attributes:
    step: int32 scalar, steps taken (skipped ones included).
    params: ``{"shared": ..., "tasks": {name: ...}}``.
    opt_state: the optax optimizer's state.
    weighting_state: the weighting transform's state.
    rng: PRNG key; split once per step for stochastic weightings.
    num_skipped: int32 scalar, steps skipped for a non-finite loss or gradient.
    model_state: the model's state (batch-norm statistics; see
      :attr:`jmtl.models.MultiTaskModel.init_state`), ``{}`` for a stateless
      model.
    tx: the optax optimizer (static).
    weighting: the :class:`~jmtl.weighting.WeightingTransform` (static).
    relations_state: the running sums of the task relations the step
      measures (:class:`jmtl.relations.RelationsState`), ``{}`` without a
      tracker.
    relations: what the step measures (:func:`jmtl.relations.tracker`:
      TAG's lookahead affinity every ``every`` steps and the gradient
      cosine), or ``None`` (static).
  """

  step: Array
  params: Params
  opt_state: optax.OptState
  weighting_state: Any
  rng: Array
  num_skipped: Array
  model_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  weighting: WeightingTransform = struct.field(pytree_node=False)
  relations_state: Any = struct.field(default_factory=dict)
  relations: relations_lib.Relations | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(
    cls,
    *,
    params: Params,
    tx: optax.GradientTransformation,
    weighting: WeightingTransform | None = None,
    num_tasks: int,
    rng: Array,
    model_state: Any = None,
    relations: relations_lib.Relations | None = None,
  ) -> TrainState:
    """The state before the first step (``weighting`` defaults to :func:`~jmtl.weighting.equal`).

    ``relations`` (:func:`jmtl.relations.tracker`) makes every train step
    measure how the tasks relate (``docs/design.md``, "Task relations").

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jmtl
      >>> s = jmtl.TrainState.create(params={"shared": {"w": jnp.zeros(2)}, "tasks": {}}, tx=optax.sgd(0.1),
      ...                            weighting=jmtl.weighting.upgrad(), num_tasks=2, rng=jax.random.key(0))
      >>> int(s.step), int(s.num_skipped), s.weighting
      (0, 0, upgrad(max_iter=None))
    """
    weighting = equal() if weighting is None else weighting
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      weighting_state=init_state(weighting, num_tasks, params.get("shared") if isinstance(params, dict) else None),
      rng=rng,
      num_skipped=jnp.zeros((), jnp.int32),
      model_state={} if model_state is None else model_state,
      tx=tx,
      weighting=weighting,
      relations_state=relations_lib.init(relations, num_tasks),
      relations=relations,
    )

  @classmethod
  def from_model(
    cls,
    model,
    inputs: Any,
    *,
    tx: optax.GradientTransformation,
    weighting: WeightingTransform | None = None,
    rng: Array,
    relations: relations_lib.Relations | None = None,
  ) -> TrainState:
    """The state before the first step of a :class:`~jmtl.models.MultiTaskModel`: its parameters and state too.

    ``rng`` is split into the initialisation key and the step key; only the
    shape of ``inputs`` past the batch axis matters. Built under one
    ``jax.jit``: op by op, every parameter and optimizer leaf would compile
    its own small kernel.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jmtl
      >>> model = jmtl.models.mlp({"a": 3, "b": 2}, hidden=(8,))
      >>> s = jmtl.TrainState.from_model(model, jnp.ones((4, 5)), tx=optax.adam(1e-3), rng=jax.random.key(0))
      >>> s.params["tasks"]["b"]["dense_0"]["kernel"].shape, s.model_state
      ((8, 2), {})
    """
    model = as_model(model)
    if model.init is None or not model.task_names:
      raise TypeError(
        "TrainState.from_model needs a model with init and task_names (a jmtl.models constructor's); "
        "for a plain apply function, use TrainState.create(params=..., num_tasks=...)"
      )

    def create(key, x):
      init_key, step_key = jax.random.split(key)
      return cls.create(
        params=model.init(init_key, x),
        tx=tx,
        weighting=weighting,
        num_tasks=len(model.task_names),
        rng=step_key,
        model_state=model.init_state(init_key, x),
        relations=relations,
      )

    return jax.jit(create)(rng, jax.tree.map(lambda a: a[:1], inputs))


@jax.tree_util.register_pytree_with_keys_class
class StepMetrics(Mapping):
  """A train step's metrics: per-task values kept as ``(K,)`` vectors, read by name.

  ``m["loss/<task>"]``, ``m["weight/<task>"]`` (and ``m["grad_norm/<task>"]``
  when a Gramian was computed) read one task's value; ``m["loss"]``,
  ``m["grad_norm"]``, ... the step's scalars; ``m.per_task["loss"]`` is the
  ``(K,)`` vector itself. The compiled step returns a few vectors rather than
  a few scalars per task (at K = 40, 120 scalar outputs made the ``equal``
  step ~12 % slower). It is a pytree, so metrics add, average and gather like
  any other; a leading axis (``pmap`` devices, steps, ensemble members) stays
  in front of the task axis, which is the last.

  Examples:
    >>> import jax.numpy as jnp
    >>> m = StepMetrics(("a", "b"), {"loss": jnp.array([1.0, 2.0])}, {"penalty": jnp.array(0.0)})
    >>> float(m["loss/b"]), sorted(m)
    (2.0, ['loss/a', 'loss/b', 'penalty'])
  """

  def __init__(self, names: tuple[str, ...], per_task: Mapping[str, Any], scalars: Mapping[str, Any]):
    self.names = tuple(names)
    self.per_task = dict(per_task)  # prefix -> (..., K)
    self.scalars = dict(scalars)
    self._index = {n: i for i, n in enumerate(self.names)}

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    return ((keys("per_task"), self.per_task), (keys("scalars"), self.scalars)), self.names

  @classmethod
  def tree_unflatten(cls, names, children):
    return cls(names, *children)

  def __getitem__(self, key: str):
    if key in self.scalars:
      return self.scalars[key]
    prefix, _, name = key.partition("/")
    if prefix not in self.per_task or name not in self._index:
      raise KeyError(key)
    return self.per_task[prefix][..., self._index[name]]

  def __iter__(self):
    yield from (f"{p}/{n}" for p in self.per_task for n in self.names)
    yield from self.scalars

  def __len__(self) -> int:
    return len(self.per_task) * len(self.names) + len(self.scalars)

  def without(self, *keys: str) -> StepMetrics:
    """These metrics without the scalars ``keys``."""
    return StepMetrics(self.names, self.per_task, {k: v for k, v in self.scalars.items() if k not in keys})

  def __repr__(self) -> str:
    return f"StepMetrics(tasks={list(self.names)}, per_task={list(self.per_task)}, scalars={list(self.scalars)})"


def make_train_step(
  model,
  tasks: Sequence[tasks_lib.Task],
  *,
  penalty: sharing.Penalty | Sequence[sharing.Penalty] | None = None,
  axis_name: str | None = None,
  options: grads_lib.GradientOptions | None = None,
  weighting_inputs: Callable[[TrainState, Batch], Mapping[str, Any]] | None = None,
  **option_fields,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
  """Builds the pure multi-task train step; the optimizer and the weighting come from the state.

  The update is ``∇θ [Σₖ stop_gradient(wₖ) Lₖ + penalty(θ)]``. For a
  loss-level weighting this costs one forward and one backward (a VJP with the
  weights as cotangent). A weighting that needs the Gramian or Jacobian of
  ``params["shared"]`` gets it by the cheapest route :mod:`jmtl.grads` knows
  for the model (:func:`jmtl.grads.route` says which).

  Data parallelism: with ``axis_name`` set, the step is meant for
  ``jax.pmap``/``shard_map``: label counts, losses and gradients are summed
  over the axis so that every loss is the mean over the *global* batch and
  every device applies the same update. Under ``jax.jit`` with a sharded batch
  leave it ``None``: the step is already global.

  Args:
    model: a :class:`jmtl.models.MultiTaskModel`, or a plain
      ``apply(params, inputs) -> {task: prediction}`` (wrapped by
      :func:`jmtl.models.as_model`).
    tasks: the tasks, in weight order.
    penalty: regularisers from :mod:`jmtl.sharing` (one or a sequence).
    axis_name: the pmap/shard_map axis to reduce over, or ``None``.
    options: how per-task gradients are computed for Gramian/Jacobian
      transforms (:class:`jmtl.grads.GradientOptions`); or give its fields
      (``level``, ``heads``, ``chunk_size``, ``cross_device``) as keywords.
    weighting_inputs: ``weighting_inputs(state, batch) -> {name: value}``:
      further inputs for the weighting's ``update`` (validation losses, a
      second batch's statistics, ...), passed beside ``key`` and ``step``.

  Returns:
    ``step(state, batch) -> (state, metrics)``; ``metrics`` (a
    :class:`StepMetrics`) holds ``loss/<task>``, ``weight/<task>``, ``loss``
    (the weighted objective), ``penalty``, ``grad_norm``, ``skipped`` and
    ``num_skipped``, and, when a Gramian was computed, ``grad_norm/<task>``
    and ``grad_cosine`` (K, K). A state created with ``relations=``
    (:func:`jmtl.relations.tracker`) also accumulates TAG's lookahead
    affinity (every ``every`` steps, under ``lax.cond``) and the gradient
    cosine in ``state.relations_state``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse), jmtl.Task("b", jmtl.losses.mse)]
    >>> def apply(p, x):
    ...   z = x @ p["shared"]["w"]
    ...   return {k: z * p["tasks"][k] for k in ("a", "b")}
    >>> params = {"shared": {"w": jnp.ones((3,))}, "tasks": {"a": 1.0, "b": -1.0}}
    >>> state = jmtl.TrainState.create(params=params, tx=optax.sgd(0.1), weighting=jmtl.weighting.mgda(),
    ...                                num_tasks=2, rng=jax.random.key(0))
    >>> step = jax.jit(jmtl.make_train_step(apply, tasks))
    >>> batch = {"inputs": jnp.ones((4, 3)), "labels": {"a": jnp.ones(4), "b": -jnp.ones(4)}}
    >>> state, m = step(state, batch)
    >>> sorted(k for k in m if k.startswith("loss/"))
    ['loss/a', 'loss/b']
  """
  tasks = tasks_lib.check_tasks(tasks)
  names = tuple(t.name for t in tasks)
  model = as_model(model)
  penalty_fn = sharing.as_penalty(penalty)
  if options is not None and option_fields:
    raise TypeError(f"make_train_step: give options= or its fields {sorted(option_fields)}, not both")
  opts = (options or grads_lib.GradientOptions(**option_fields)).check()

  def step(state: TrainState, batch: Batch):
    tasks_lib.check_batch(tasks, batch)
    rng, key = jax.random.split(state.rng)
    inputs = {"key": key, "step": state.step}
    if weighting_inputs is not None:
      inputs.update(weighting_inputs(state, batch))
    ctx = grads_lib.Context(
      model=model,
      tasks=tasks,
      params=state.params,
      batch=batch,
      transform=state.weighting,
      weighting_state=state.weighting_state,
      inputs=inputs,
      axis_name=axis_name,
      options=opts,
      model_state=state.model_state,
    )
    out = grads_lib.compute(ctx)
    losses, weights, grads = out.losses, out.weights, out.grads
    if penalty_fn is not None:
      pen, pgrads = jax.value_and_grad(penalty_fn)(state.params)
      grads = jax.tree.map(jnp.add, grads, pgrads)
    else:
      pen = jnp.zeros((), losses.dtype)
    grad_norm = _norm(grads)
    ok = jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(losses)) & jnp.all(jnp.isfinite(weights)) & jnp.isfinite(pen)

    def apply(_):
      updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state, out.weighting_state, out.model_state

    def keep(_):
      return state.params, state.opt_state, state.weighting_state, state.model_state

    # A branch, not a select: the update is computed only when it is applied.
    params, opt_state, wstate, model_state = jax.lax.cond(ok, apply, keep, None)
    skipped = jnp.logical_not(ok)
    relations_state = state.relations_state
    if state.relations is not None:  # TAG's affinity every n steps (lax.cond), the gradient cosine
      relations_state = relations_lib.update(
        state.relations, relations_state, ctx, step=state.step, extra=out.extra, ok=ok
      )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      weighting_state=wstate,
      rng=rng,
      num_skipped=state.num_skipped + skipped.astype(jnp.int32),
      model_state=model_state,
      relations_state=relations_state,
    )
    extra = dict(out.extra)
    per_task = {"loss": losses, "weight": weights}
    if "grad_norm" in extra:
      per_task["grad_norm"] = extra.pop("grad_norm")
    scalars = dict(
      loss=jnp.vdot(weights, losses) + pen,
      penalty=pen,
      grad_norm=grad_norm,
      skipped=skipped,
      num_skipped=new_state.num_skipped,
      **extra,
    )
    metrics = StepMetrics(names, per_task, scalars)
    return new_state, metrics

  return step


def _norm(tree) -> jax.Array:
  """``optax.tree.norm``, finite for every finite tree: the squares of gradients beyond 1e±19 leave float32, so a
  tree beyond ``2**±24`` is scaled by a power of two first (:func:`jmtl.weighting.power_of_two_scale`)."""
  k = weighting_lib.power_of_two_scale(tree)
  return optax.tree.norm(weighting_lib.times_power_of_two(tree, -k)) * weighting_lib.power_of_two(k)


def make_eval_step(model, tasks: Sequence[tasks_lib.Task], *, axis_name: str | None = None):
  """Builds ``eval_step(params, batch, model_state=None) -> stats``: summed metric statistics.

  The statistics add across batches (and, with ``axis_name``, across
  devices), so :func:`evaluate` gets exact metrics over a whole split.
  ``stats[task]`` is that task's statistics (``"loss"``: ``(sum, count)``, and
  each metric's). A model whose heads form task groups returns them stacked
  per group (:class:`jmtl.groups.GroupedStats`, a mapping like the dict of
  any other model). The model runs in inference mode (``train=False``) on
  ``model_state``, which a stateful model (batch norm) must be given.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse, {"mae": jmtl.metrics.mae()})]
    >>> ev = jmtl.make_eval_step(lambda p, x: {"a": x * p}, tasks)
    >>> stats = ev(2.0, {"inputs": jnp.ones(4), "labels": {"a": jnp.ones(4)}})
    >>> jmtl.compute_metrics(tasks, stats)
    {'a/loss': 1.0, 'a/mae': 1.0}
  """
  tasks = tasks_lib.check_tasks(tasks)
  model = as_model(model)

  def eval_step(params, batch, model_state=None):
    tasks_lib.check_batch(tasks, batch)
    state = {} if model_state is None else model_state
    if model.stateful and not jax.tree.leaves(state):
      raise ValueError("eval_step: the model has state (batch-norm statistics); pass model_state=state.model_state")
    if model.encode is not None and model.head is not None and model.head_kind is not None:
      stats = _grouped_stats(model, tasks, params, batch, state)
      return stats if axis_name is None else jax.lax.psum(stats, axis_name)
    preds, _ = model.apply(params, batch["inputs"], state, train=False, axis_name=None)
    stats = {}
    for t in tasks:
      loss_sum, count = tasks_lib.loss_terms(t, preds, batch)
      mask = tasks_lib.task_mask(t, batch)
      stats[t.name] = {
        "loss": (loss_sum, count),
        **metrics_lib.metric_stats(t.metrics, preds[t.name], batch["labels"][t.name], mask),
      }
    return stats if axis_name is None else jax.lax.psum(stats, axis_name)

  return eval_step


def _grouped_stats(model, tasks, params, batch, model_state):
  """Eval statistics of a separable model: trunk once, each task group's heads, losses and metrics batched."""
  z, _ = model.encode(params["shared"], batch["inputs"], model_state, train=False, axis_name=None)
  names, stacked = [], []
  for g in groups.task_groups(model, tasks, params["tasks"], with_metrics=True):
    gb = groups.group_batch(g, tasks, params["tasks"], batch)
    preds = groups.head_fn(model, g)(gb.params, z)
    loss = groups.terms_fn(g)(preds, gb.labels, gb.masks)
    names.append(g.names)
    stacked.append({"loss": loss, **groups.metric_stats_fn(g)(preds, gb.labels, gb.masks)})
  return groups.GroupedStats(tuple(names), tuple(stacked))


def compute_metrics(tasks: Sequence[tasks_lib.Task], stats) -> dict[str, float]:
  """Metric values ``{"<task>/<metric>": float}`` from summed statistics.

  A task without a single labelled example (its loss count is 0: a split,
  or a mixture, that never labels it) gets ``None`` for its loss and every
  metric, not the NaN of 0/0.
  """
  stats = jax.device_get(stats)  # one transfer per statistic, then slices on the host
  out = {}
  for t in tasks:
    s, c = stats[t.name]["loss"]
    if float(c) == 0:  # no labelled example in the split: no measurement, not a NaN
      out.update({f"{t.name}/{k}": None for k in ("loss", *t.metrics)})
      continue
    out[f"{t.name}/loss"] = float(s) / float(c)
    out.update({f"{t.name}/{k}": v for k, v in metrics_lib.compute_metrics(t.metrics, stats[t.name]).items()})
  return out


def evaluate(eval_step, params, batches, tasks: Sequence[tasks_lib.Task], model_state=None) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches`` and returns the metrics of the whole split.

  ``model_state`` is passed on for a stateful model (batch norm).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse, {"mae": jmtl.metrics.mae()})]
    >>> ev = jmtl.make_eval_step(lambda p, x: {"a": x * p}, tasks)
    >>> batches = [{"inputs": jnp.full(2, v), "labels": {"a": jnp.zeros(2)}} for v in (1.0, 3.0)]
    >>> jmtl.evaluate(ev, 1.0, batches, tasks)["a/mae"]
    2.0
  """
  total = None
  for batch in batches:
    stats = eval_step(params, batch, model_state)
    total = metrics_lib.add_stats(total, stats)
  if total is None:
    raise ValueError("evaluate: no batches")
  return compute_metrics(tasks, total)
