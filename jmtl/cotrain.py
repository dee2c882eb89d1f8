"""Co-training: ensembles of M members in one vmapped step, knowledge distillation, mutual learning.

Everything here is a pure function around the existing step (``docs/design.md``, "Co-training"):

* **Ensembles.** A :class:`jmtl.TrainState` with a leading *member* axis (made
  by ``jax.vmap`` of the state's constructor over the members' keys) is
  trained by ``jax.vmap`` of the step of :func:`jmtl.make_train_step`, so any
  model, weighting and gradient route works, and M members are one program.
  Members differ by their initialisation key and, optionally, by the batches
  they see. The ensemble predicts per task the mean of the members'
  probabilities (classification; majority vote as an option) or the mean
  prediction (regression).
* **Distillation** (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
  Neural Network", 2015; Clark et al., "BAM! Born-Again Multi-Task Networks
  for Natural Language Understanding", ACL 2019): a student trained on
  ``(1 − λ)·task loss + λ·distillation loss`` per task, the teacher's
  predictions computed inside the jitted step from frozen parameters carried
  in the state (:class:`DistillState`).
* **Mutual learning** (Zhang et al., "Deep Mutual Learning", CVPR 2018; Anil
  et al., "Large scale distributed neural network training through online
  distillation", ICLR 2018): members in one vmapped step, each also pulled
  toward the others' stop-gradient predictions with weight β.

The soft terms enter the step as a task loss: the targets and the two weights
are packed into the task's labels (per example, so the gradient engine splits
them with the batch on every route), and the loss unpacks them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jmtl import losses as losses_lib
from jmtl import metrics as metrics_lib
from jmtl import tasks as tasks_lib
from jmtl import train as train_lib
from jmtl.models import as_model

Array = jax.Array

#: How the members' predictions of a task combine: ``softmax`` (logits over the last axis: mean probability),
#: ``sigmoid`` (independent logits: mean probability per label), ``mean`` (regression: mean prediction).
KINDS = ("softmax", "sigmoid", "mean")


def prediction_kind(task: tasks_lib.Task) -> str:
  """The kind (:data:`KINDS`) of a task's predictions, read from its loss.

  Softmax and pixel cross-entropy give ``"softmax"``, sigmoid cross-entropy
  ``"sigmoid"``, any other loss ``"mean"``; pass ``kinds={task: kind}`` to
  the functions here to say otherwise.

  Examples:
    >>> import jmtl
    >>> [prediction_kind(jmtl.Task("d", loss)) for loss in (jmtl.losses.softmax_cross_entropy, jmtl.losses.mse)]
    ['softmax', 'mean']
  """
  loss = task.loss
  while isinstance(loss, functools.partial):
    loss = loss.func
  if loss is losses_lib.softmax_cross_entropy or loss is losses_lib.pixel_cross_entropy:
    return "softmax"
  if loss is losses_lib.sigmoid_binary_cross_entropy:
    return "sigmoid"
  return "mean"


def _kinds(tasks: Sequence[tasks_lib.Task], kinds: Mapping[str, str] | None) -> dict[str, str]:
  kinds = dict(kinds or {})
  names = [t.name for t in tasks]
  unknown = sorted(set(kinds) - set(names))
  if unknown:
    raise ValueError(f"kinds: no task named {unknown} (tasks: {names})")
  for name, kind in kinds.items():
    if kind not in KINDS:
      raise ValueError(f"kinds: task {name!r} has kind {kind!r}; expected one of {KINDS}")
  return {t.name: kinds.get(t.name, prediction_kind(t)) for t in tasks}


# ---------------------------------------------------------------------------------------------------------------------
# Ensembles


def ensemble_state(
  model, inputs: Any, *, seeds: Sequence[int], tx, weighting=None, relations=None
) -> train_lib.TrainState:
  """The initial state of an ensemble: member ``i`` is ``TrainState.from_model(..., rng=jax.random.key(seeds[i]))``.

  Built by ``jax.vmap`` over the members' keys, so every leaf (parameters,
  optimizer and weighting state, rng, step) has a leading member axis of
  ``len(seeds)``; the optimizer and the weighting stay static fields.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 3}, hidden=(4,))
    >>> s = ensemble_state(model, jnp.ones((2, 5)), seeds=[0, 1, 2], tx=optax.sgd(0.1))
    >>> s.params["shared"]["dense_0"]["kernel"].shape, s.step.shape
    ((3, 5, 4), (3,))
  """
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("ensemble_state: seeds is empty; an ensemble needs at least one member")
  keys = jnp.stack([jax.random.key(s) for s in seeds])
  create = lambda key: train_lib.TrainState.from_model(
    model, inputs, tx=tx, weighting=weighting, rng=key, relations=relations
  )
  return jax.vmap(create)(keys)


def stack_members(states: Sequence[Any]) -> Any:
  """Identically structured states (or parameters) stacked on a new leading member axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> stack_members([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])["w"].shape
    (2, 2)
  """
  if not states:
    raise ValueError("stack_members: no states given")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def member(tree: Any, i: int) -> Any:
  """Member ``i`` of a tree with a leading member axis (a state, parameters, metrics).

  Examples:
    >>> import jax.numpy as jnp
    >>> member({"w": jnp.arange(6).reshape(3, 2)}, 1)["w"].tolist()
    [2, 3]
  """
  return jax.tree.map(lambda a: a[i], tree)


def num_members(tree: Any) -> int:
  """The length of the leading member axis of ``tree``.

  Examples:
    >>> import jax.numpy as jnp
    >>> num_members({"w": jnp.zeros((4, 3))})
    4
  """
  leaves = jax.tree.leaves(tree)
  if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
    raise ValueError("num_members: the tree has no leaves with a leading member axis")
  sizes = {x.shape[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f"num_members: leaves disagree on the member axis: sizes {sorted(sizes)}")
  return sizes.pop()


LOOPS = ("vmap", "unroll")


def map_members(fn: Callable, *, loop: str = "vmap", in_axes: tuple = (0,)) -> Callable:
  """``fn`` mapped over the leading member axis of its arguments, by ``jax.vmap`` or unrolled.

  ``in_axes`` is ``jax.vmap``'s (``0`` or ``None`` per argument). With
  ``loop="unroll"`` the members' calls are written one after the other
  into the same program and their outputs stacked: the same values as
  ``vmap`` (float tolerance), different kernels. On XLA:CPU vmap turns a
  convolution with one kernel per member into a grouped convolution,
  which runs several times slower than the members' own convolutions
  (``benchmarks/ensemble.py``); matrix products batch well either way.

  Examples:
    >>> import jax.numpy as jnp
    >>> f = map_members(lambda w, x: w * x, loop="unroll", in_axes=(0, None))
    >>> f(jnp.array([1.0, 2.0]), 3.0).tolist()
    [3.0, 6.0]
  """
  if loop not in LOOPS:
    raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
  if loop == "vmap":
    return jax.vmap(fn, in_axes=in_axes)

  def unrolled(*args):
    m = num_members([a for a, ax in zip(args, in_axes) if ax is not None])
    pick = lambda i: [member(a, i) if ax is not None else a for a, ax in zip(args, in_axes)]
    return stack_members([fn(*pick(i)) for i in range(m)])

  return unrolled


def make_ensemble_step(step: Callable, *, member_batches: bool = False, loop: str = "vmap") -> Callable:
  """``jax.vmap`` of a train step over the members: ``ensemble_step(state, batch) -> (state, metrics)``.

  ``step`` is any ``step(state, batch)`` (:func:`jmtl.make_train_step`,
  with any model, weighting and gradient route); ``state`` has a leading
  member axis (:func:`ensemble_state`) and so has every metric. With
  ``member_batches=False`` every member sees the same batch; with ``True``
  every leaf of ``batch`` has a leading member axis (member ``i`` sees
  ``batch[i]``: another data order per member). Jit it, or wrap it with
  :mod:`jmtl.parallel` (``pmap``/``mesh_jit``: the step's ``axis_name`` is
  the data axis, the member axis is vmapped inside). ``loop="unroll"``:
  the members one after the other in the same program (:func:`map_members`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy)]
    >>> batch = {"inputs": jnp.ones((8, 3)), "labels": {"a": jnp.zeros(8, jnp.int32)}}
    >>> state = ensemble_state(model, batch["inputs"], seeds=[0, 1], tx=optax.sgd(0.1))
    >>> step = jax.jit(make_ensemble_step(jmtl.make_train_step(model, tasks)))
    >>> state, m = step(state, batch)
    >>> m["loss/a"].shape, state.step.tolist()
    ((2,), [1, 1])
  """
  try:
    return map_members(step, loop=loop, in_axes=(0, 0 if member_batches else None))
  except ValueError as e:
    raise ValueError(f"make_ensemble_step: {e}") from None


def member_predictions(model, params: Any, inputs: Any, model_state: Any = None) -> dict[str, Array]:
  """Every member's predictions in inference mode: ``{task: (M, B, ...)}``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 3}, hidden=(4,))
    >>> s = ensemble_state(model, jnp.ones((2, 5)), seeds=[0, 1], tx=optax.sgd(0.1))
    >>> member_predictions(model, s.params, jnp.ones((7, 5)))["a"].shape
    (2, 7, 3)
  """
  model = as_model(model)
  state = {} if model_state is None else model_state
  return jax.vmap(lambda p, s: model.apply(p, inputs, s, train=False, axis_name=None)[0])(params, state)


def combine(kind: str, preds: Array, *, vote: bool = False) -> Array:
  """One task's ensemble prediction from the members' ``(M, B, ...)`` predictions.

  * ``"softmax"``: ``log p̄`` with ``p̄ = mean_i softmax(x_i)`` (so a
    cross-entropy of it is the ensemble's, and its argmax the ensemble's
    class). With ``vote=True``, ``log q`` with ``q = (M·v + p̄) / (M + 1)``
    and ``v`` the members' vote fractions: its argmax is the majority vote,
    ties broken by the mean probability, and its loss stays finite.
  * ``"sigmoid"``: ``logit p̄`` per label with ``p̄ = mean_i σ(x_i)``; with
    ``vote=True``, ``logit q`` as above with ``v`` the fraction of members
    whose logit is positive.
  * ``"mean"``: the mean prediction.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.log(jnp.array([[[0.6, 0.4]], [[0.2, 0.8]], [[0.7, 0.3]]]))  # 3 members, 1 example
    >>> jnp.exp(combine("softmax", x)).round(4).tolist(), jnp.exp(combine("softmax", x, vote=True)).argmax(-1).tolist()
    ([[0.5, 0.5]], [0])
    >>> combine("mean", jnp.array([[1.0], [3.0]])).tolist()
    [2.0]
  """
  if kind not in KINDS:
    raise ValueError(f"combine: kind {kind!r}; expected one of {KINDS}")
  preds = jnp.asarray(preds)
  x = preds.astype(jnp.promote_types(preds.dtype, jnp.float32))
  m = x.shape[0]
  if kind == "mean":
    return jnp.mean(x, axis=0)
  if kind == "softmax":
    log_mean = jax.scipy.special.logsumexp(jax.nn.log_softmax(x, axis=-1), axis=0) - math.log(m)
    if not vote:
      return log_mean
    votes = jnp.mean(jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=x.dtype), axis=0)
    return jnp.log((m * votes + jnp.exp(log_mean)) / (m + 1))
  log_p = jax.scipy.special.logsumexp(jax.nn.log_sigmoid(x), axis=0) - math.log(m)
  log_not_p = jax.scipy.special.logsumexp(jax.nn.log_sigmoid(-x), axis=0) - math.log(m)
  if not vote:
    return log_p - log_not_p
  q = (m * jnp.mean((x > 0).astype(x.dtype), axis=0) + jnp.exp(log_p)) / (m + 1)
  return jnp.log(q) - jnp.log1p(-q)


def ensemble_predictions(
  tasks: Sequence[tasks_lib.Task],
  preds: Mapping[str, Array],
  *,
  vote: bool = False,
  kinds: Mapping[str, str] | None = None,
) -> dict[str, Array]:
  """The ensemble's prediction of every task (:func:`combine`) from ``{task: (M, B, ...)}`` member predictions.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> tasks = [jmtl.Task("r", jmtl.losses.mse)]
    >>> ensemble_predictions(tasks, {"r": jnp.array([[0.0, 2.0], [2.0, 4.0]])})["r"].tolist()
    [1.0, 3.0]
  """
  tasks = tasks_lib.check_tasks(tasks)
  kinds = _kinds(tasks, kinds)
  missing = [t.name for t in tasks if t.name not in preds]
  if missing:
    raise ValueError(f"ensemble_predictions: no member predictions for task(s) {missing} (given: {sorted(preds)})")
  return {t.name: combine(kinds[t.name], preds[t.name], vote=vote) for t in tasks}


def make_ensemble_eval_step(
  model,
  tasks: Sequence[tasks_lib.Task],
  *,
  vote: bool = False,
  kinds: Mapping[str, str] | None = None,
  axis_name: str | None = None,
):
  """``eval_step(params, batch, model_state=None) -> {"members": stats, "ensemble": stats}`` for stacked members.

  ``members`` are the statistics of :func:`jmtl.make_eval_step` for every
  member (a leading member axis); ``ensemble`` those of the ensemble's
  predictions (:func:`ensemble_predictions`). Both add across batches
  (:func:`jmtl.metrics.add_stats`), so :func:`ensemble_metrics` of the sums
  is exact over a split: the ensemble's accuracy is that of its averaged
  probabilities on every example, not an average of batch accuracies.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()})]
    >>> s = ensemble_state(model, jnp.ones((2, 3)), seeds=[0, 1], tx=optax.sgd(0.1))
    >>> ev = make_ensemble_eval_step(model, tasks)
    >>> out = ensemble_metrics(tasks, ev(s.params, {"inputs": jnp.ones((4, 3)), "labels": {"a": jnp.zeros(4, int)}}))
    >>> len(out["members"]), sorted(out["ensemble"])
    (2, ['a/acc', 'a/loss'])
  """
  tasks = tasks_lib.check_tasks(tasks)
  model = as_model(model)
  kinds = _kinds(tasks, kinds)
  single = train_lib.make_eval_step(model, tasks)

  def eval_step(params, batch, model_state=None):
    tasks_lib.check_batch(tasks, batch)
    state = {} if model_state is None else model_state
    if model.stateful and not jax.tree.leaves(state):
      raise ValueError("ensemble eval_step: the model has state (batch-norm statistics); pass model_state")
    members = jax.vmap(single, in_axes=(0, None, 0))(params, batch, state)
    combined = ensemble_predictions(tasks, member_predictions(model, params, batch["inputs"], state), vote=vote,
                                    kinds=kinds)  # fmt: skip
    stats = {}
    for t in tasks:
      mask = tasks_lib.task_mask(t, batch)
      stats[t.name] = {
        "loss": tasks_lib.loss_terms(t, combined, batch),
        **metrics_lib.metric_stats(t.metrics, combined[t.name], batch["labels"][t.name], mask),
      }
    out = {"members": members, "ensemble": stats}
    return out if axis_name is None else jax.lax.psum(out, axis_name)

  return eval_step


def ensemble_metrics(tasks: Sequence[tasks_lib.Task], stats: Mapping[str, Any]) -> dict[str, Any]:
  """Metrics from summed ensemble statistics: ``{"members": [per member], "member_mean": ..., "ensemble": ...}``.

  ``member_mean`` is the mean over the members of each metric (``None``
  where a member has none). Each dict is ``{"<task>/<metric>": float}`` as
  from :func:`jmtl.compute_metrics`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse)]
    >>> stats = {"members": {"a": {"loss": (jnp.array([1.0, 3.0]), jnp.array([1.0, 1.0]))}},
    ...          "ensemble": {"a": {"loss": (jnp.array(1.5), jnp.array(1.0))}}}
    >>> ensemble_metrics(tasks, stats)
    {'members': [{'a/loss': 1.0}, {'a/loss': 3.0}], 'member_mean': {'a/loss': 2.0}, 'ensemble': {'a/loss': 1.5}}
  """
  stats = jax.device_get(stats)
  m = num_members(stats["members"])
  members = [train_lib.compute_metrics(tasks, member(stats["members"], i)) for i in range(m)]
  mean = {}
  for key in members[0]:
    values = [r[key] for r in members]
    mean[key] = None if any(v is None for v in values) else float(np.mean(values))
  return {"members": members, "member_mean": mean, "ensemble": train_lib.compute_metrics(tasks, stats["ensemble"])}


def evaluate_ensemble(eval_step, params, batches, tasks: Sequence[tasks_lib.Task], model_state=None) -> dict[str, Any]:
  """Runs an ensemble ``eval_step`` (:func:`make_ensemble_eval_step`) over ``batches``; :func:`ensemble_metrics`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()})]
    >>> s = ensemble_state(model, jnp.ones((2, 3)), seeds=[0, 1, 2], tx=optax.sgd(0.1))
    >>> batches = [{"inputs": jnp.ones((4, 3)), "labels": {"a": jnp.zeros(4, int)}}] * 2
    >>> len(evaluate_ensemble(jax.jit(make_ensemble_eval_step(model, tasks)), s.params, batches, tasks)["members"])
    3
  """
  total = None
  for batch in batches:
    total = metrics_lib.add_stats(total, eval_step(params, batch, model_state))
  if total is None:
    raise ValueError("evaluate_ensemble: no batches")
  return ensemble_metrics(tasks, total)


# ---------------------------------------------------------------------------------------------------------------------
# Distillation


def distillation_loss(student: Array, teacher: Array, *, kind: str = "softmax", temperature: float = 1.0) -> Array:
  """Per-example distillation loss of ``student`` toward ``teacher`` (no gradient reaches the teacher).

  * ``"softmax"``: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the last
    axis (Hinton et al. 2015: the ``T²`` keeps the soft gradients' scale
    as ``T`` changes), averaged over any axes between batch and classes
    (pixels).
  * ``"sigmoid"``: ``T²`` times the binary KL of ``σ(t/T)`` and ``σ(s/T)``,
    averaged over the labels.
  * ``"mean"``: ``mean_j (s_j − t_j)²``, the MSE to the teacher's outputs
    (``temperature`` does not apply).

  Args:
    student: ``(B, ...)`` student predictions (logits, or regression outputs).
    teacher: the teacher's, of the same shape.
    kind: one of :data:`KINDS`.
    temperature: ``T > 0``.

  Returns:
    ``(B,)`` losses.

  Examples:
    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 0.0]]), jnp.log(jnp.array([[0.75, 0.25]]))
    >>> round(float(distillation_loss(s, t)[0]), 4)  # 0.75 log 1.5 + 0.25 log 0.5
    0.1308
    >>> distillation_loss(jnp.array([[1.0, 3.0]]), jnp.zeros((1, 2)), kind="mean").tolist()
    [5.0]
  """
  if kind not in KINDS:
    raise ValueError(f"distillation_loss: kind {kind!r}; expected one of {KINDS}")
  if not temperature > 0:
    raise ValueError(f"distillation_loss: temperature must be positive, got {temperature}")
  student, teacher = jnp.asarray(student), jnp.asarray(teacher)
  if student.shape != teacher.shape or student.ndim == 0:
    raise ValueError(
      f"distillation_loss: student predictions {tuple(student.shape)} and teacher predictions "
      f"{tuple(teacher.shape)} must have the same shape, with a leading batch axis"
    )
  dtype = jnp.promote_types(student.dtype, jnp.float32)
  s = student.astype(dtype)
  t = jax.lax.stop_gradient(teacher).astype(dtype)
  rest = tuple(range(1, s.ndim))
  if kind == "mean":
    return jnp.mean(jnp.square(s - t), axis=rest)
  scale = temperature**2
  if kind == "softmax":
    if s.ndim < 2:
      raise ValueError(f"distillation_loss: softmax predictions need a class axis, got shape {tuple(s.shape)}")
    log_q, log_p = jax.nn.log_softmax(t / temperature, axis=-1), jax.nn.log_softmax(s / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    return scale * jnp.mean(kl.reshape(kl.shape[0], -1), axis=1)
  log_q, log_1q = jax.nn.log_sigmoid(t / temperature), jax.nn.log_sigmoid(-t / temperature)
  log_p, log_1p = jax.nn.log_sigmoid(s / temperature), jax.nn.log_sigmoid(-s / temperature)
  kl = jnp.exp(log_q) * (log_q - log_p) + jnp.exp(log_1q) * (log_1q - log_1p)
  return scale * (jnp.mean(kl, axis=rest) if rest else kl)


def teacher_annealing(weight: float, num_steps: int) -> Callable[[Array], Array]:
  """BAM's teacher annealing (Clark et al., ACL 2019): the distillation weight at ``step``.

  BAM trains on the target ``λ·y + (1 − λ)·f_teacher`` with ``λ`` raised
  linearly from 0 to 1 over training, so the student starts from the
  teacher alone and ends on the gold labels. For a cross-entropy that is
  ``λ·CE(y) + (1 − λ)·CE(teacher)``, so here the distillation weight is
  ``weight · (1 − min(step / num_steps, 1))`` and the task loss gets one
  minus it (``weight = 1`` is BAM).

  Examples:
    >>> import jax.numpy as jnp
    >>> schedule = teacher_annealing(1.0, 100)
    >>> [float(schedule(jnp.array(s))) for s in (0, 25, 100, 150)]
    [1.0, 0.75, 0.0, 0.0]
  """
  if num_steps < 1:
    raise ValueError(f"teacher_annealing: num_steps must be at least 1, got {num_steps}")
  _check_weight("teacher_annealing", weight)

  def schedule(step):
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / num_steps, 1.0)
    return weight * (1.0 - frac)

  return schedule


def _check_weight(fn: str, weight: float) -> None:
  if not 0.0 <= float(weight) <= 1.0:
    raise ValueError(f"{fn}: the distillation weight must be in [0, 1], got {weight}")


class DistillState(train_lib.TrainState):
  """A :class:`jmtl.TrainState` that also carries the teacher's frozen variables (``teacher``).

  The step of :func:`make_distill_step` reads the teacher from the state, so
  its predictions are computed inside the jitted step (no host round trip),
  and a checkpoint of the state holds everything a resumed run needs. The
  optimizer never sees the teacher: it is not in ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> s = DistillState.from_model(model, jnp.ones((1, 3)), tx=optax.sgd(0.1), rng=jax.random.key(0))
    >>> s.replace(teacher={"w": jnp.ones(2)}).teacher["w"].shape
    (2,)
  """

  teacher: Any = struct.field(default_factory=dict)


def model_teacher(model) -> Callable[[Any, Any], dict[str, Array]]:
  """A teacher from any multi-task model: ``teacher(variables, inputs) -> {task: prediction}`` in inference mode.

  ``variables`` are the model's parameters, or ``(params, model_state)``
  for a stateful model (a checkpoint's :func:`jmtl.run.loop.variables`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> model_teacher(model)(params, jnp.ones((5, 3)))["a"].shape
    (5, 2)
  """
  model = as_model(model)

  def teacher(variables, inputs):
    params, state = variables if isinstance(variables, tuple) else (variables, {})
    return model.apply(params, inputs, state, train=False, axis_name=None)[0]

  return teacher


def task_teachers(models: Mapping[str, Any]) -> Callable[[Mapping[str, Any], Any], dict[str, Array]]:
  """Single-task teachers, one model per task (``jmtl baselines``): ``teacher({task: variables}, inputs)``.

  Task ``k``'s prediction is the prediction for ``k`` of ``models[k]``
  (Born-Again Multi-Task Networks distil these into one multi-task student).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> models = {k: jmtl.models.mlp({k: 2}, hidden=(4,)) for k in ("a", "b")}
    >>> variables = {k: m.init(jax.random.key(0), jnp.ones((1, 3))) for k, m in models.items()}
    >>> sorted(task_teachers(models)(variables, jnp.ones((5, 3))))
    ['a', 'b']
  """
  teachers = {k: model_teacher(m) for k, m in models.items()}

  def teacher(variables, inputs):
    missing = sorted(set(teachers) - set(variables))
    if missing:
      raise ValueError(f"task_teachers: no teacher variables for task(s) {missing} (given: {sorted(variables)})")
    return {k: fn(variables[k], inputs)[k] for k, fn in teachers.items()}

  return teacher


def ensemble_teacher(model, tasks: Sequence[tasks_lib.Task], *, vote: bool = False, kinds=None):
  """An ensemble as teacher: ``teacher(stacked variables, inputs)`` is :func:`ensemble_predictions` of the members.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> s = ensemble_state(model, jnp.ones((1, 3)), seeds=[0, 1], tx=optax.sgd(0.1))
    >>> teacher = ensemble_teacher(model, [jmtl.Task("a", jmtl.losses.softmax_cross_entropy)])
    >>> teacher(s.params, jnp.ones((5, 3)))["a"].shape
    (5, 2)
  """
  tasks = tasks_lib.check_tasks(tasks)

  def teacher(variables, inputs):
    params, state = variables if isinstance(variables, tuple) else (variables, None)
    return ensemble_predictions(tasks, member_predictions(model, params, inputs, state), vote=vote, kinds=kinds)

  return teacher


def _soft_task(task: tasks_lib.Task, label: Any, pred: Any, n: int, *, kind: str, temperature: float) -> tasks_lib.Task:
  """``task`` whose labels are packed rows ``[w_task, w_soft, label, n targets]``: ``w_task·loss + w_soft·soft``."""
  label_rest, label_dtype = tuple(label.shape[1:]), label.dtype
  pred_rest = tuple(pred.shape[1:])
  dy = int(np.prod(label_rest, dtype=int))

  def loss(prediction, packed):
    y = packed[:, 2 : 2 + dy].reshape((-1, *label_rest)).astype(label_dtype)
    out = task.loss(prediction, y)
    if isinstance(out, tuple):
      raise ValueError(
        f"task {task.name!r}: co-training needs a per-example loss; its loss returns (sums, counts) pairs"
      )
    targets = packed[:, 2 + dy :].reshape((-1, n, *pred_rest))
    soft = jax.vmap(lambda t: distillation_loss(prediction, t, kind=kind, temperature=temperature), in_axes=1)
    return packed[:, 0] * out + packed[:, 1] * jnp.mean(soft(targets), axis=0)

  loss.__name__ = f"cotrain_{getattr(task.loss, '__name__', 'loss')}"
  return tasks_lib.Task(task.name, loss, task.metrics)


def _pack(label: Array, targets: Array, w_task: Array, w_soft: Array) -> Array:
  """Rows ``[w_task, w_soft, label (flat), targets (n, ...) flat]`` of one task, float32."""
  b = label.shape[0]
  if targets.shape[1] != b:
    raise ValueError(
      f"co-training targets of shape {tuple(targets.shape[1:])} do not match labels of shape {tuple(label.shape)}"
    )
  targets = jax.lax.stop_gradient(jnp.moveaxis(targets, 0, 1)).reshape(b, -1).astype(jnp.float32)
  weights = jnp.broadcast_to(jnp.stack([jnp.asarray(w_task, jnp.float32), jnp.asarray(w_soft, jnp.float32)]), (b, 2))
  return jnp.concatenate([weights, label.reshape(b, -1).astype(jnp.float32), targets], axis=1)


def _soft_step(model, tasks, kinds, temperature, train_kwargs):
  """``step(state, batch, targets, w_task, w_soft)``: the train step on the tasks made soft (:func:`_soft_task`)."""

  def step(state, batch, targets, w_task, w_soft):
    tasks_lib.check_batch(tasks, batch)
    labels = batch["labels"]
    soft_tasks = [
      _soft_task(
        t, labels[t.name], targets[t.name][0], targets[t.name].shape[0], kind=kinds[t.name], temperature=temperature
      )
      for t in tasks
    ]
    packed = {t.name: _pack(labels[t.name], targets[t.name], w_task, w_soft) for t in tasks}
    inner = train_lib.make_train_step(model, soft_tasks, **train_kwargs)
    return inner(state, {**batch, "labels": {**labels, **packed}})

  return step


def make_distill_step(
  model,
  tasks: Sequence[tasks_lib.Task],
  teacher: Callable[[Any, Any], Mapping[str, Array]],
  *,
  weight: float | Callable[[Array], Array] = 1.0,
  temperature: float = 1.0,
  kinds: Mapping[str, str] | None = None,
  **train_kwargs,
) -> Callable:
  """The train step of a student distilled from a teacher: ``step(state, batch) -> (state, metrics)``.

  Task ``k``'s loss is ``(1 − λ)·Lₖ + λ·Dₖ`` with ``Dₖ`` the
  :func:`distillation_loss` of the student's prediction toward the
  teacher's (Hinton et al. 2015: soft targets at temperature ``T``, scaled
  by ``T²``; the MSE to the teacher's outputs for regression). The teacher's
  predictions are ``teacher(state.teacher, batch["inputs"])`` under
  ``stop_gradient``, inside the step (``state`` is a
  :class:`DistillState`). ``weight`` is ``λ`` or a schedule ``λ(step)``
  (:func:`teacher_annealing`: BAM, Clark et al., ACL 2019, distils
  single-task teachers, :func:`task_teachers`, into a multi-task student).
  The per-task losses then go through the weighting as in
  :func:`jmtl.make_train_step` (whose keywords ``train_kwargs`` are); the
  step's ``loss/<task>`` is the mixed loss.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy)]
    >>> x = jnp.ones((8, 3))
    >>> teacher_params = model.init(jax.random.key(1), x)
    >>> s = DistillState.from_model(model, x, tx=optax.sgd(0.1), rng=jax.random.key(0)).replace(teacher=teacher_params)
    >>> step = jax.jit(make_distill_step(model, tasks, model_teacher(model), weight=teacher_annealing(1.0, 100)))
    >>> s, m = step(s, {"inputs": x, "labels": {"a": jnp.zeros(8, jnp.int32)}})
    >>> int(s.step), m["loss/a"].shape
    (1, ())
  """
  tasks = tasks_lib.check_tasks(tasks)
  kinds = _kinds(tasks, kinds)
  if not callable(weight):
    _check_weight("make_distill_step", weight)
  soft = _soft_step(model, tasks, kinds, temperature, train_kwargs)

  def step(state, batch):
    if not isinstance(state, DistillState):
      raise TypeError(f"make_distill_step: the state must be a jmtl.cotrain.DistillState, got {type(state).__name__}")
    preds = teacher(state.teacher, batch["inputs"])
    missing = [t.name for t in tasks if t.name not in preds]
    if missing:
      raise ValueError(f"make_distill_step: the teacher gives no prediction for task(s) {missing}")
    lam = weight(state.step) if callable(weight) else jnp.asarray(weight, jnp.float32)
    targets = {t.name: jax.lax.stop_gradient(preds[t.name])[None] for t in tasks}
    return soft(state, batch, targets, 1.0 - lam, lam)

  return step


# ---------------------------------------------------------------------------------------------------------------------
# Mutual learning


def make_mutual_step(
  model,
  tasks: Sequence[tasks_lib.Task],
  *,
  beta: float,
  temperature: float = 1.0,
  kinds: Mapping[str, str] | None = None,
  axis_name: str | None = None,
  loop: str = "vmap",
  **train_kwargs,
) -> Callable:
  """Deep mutual learning: ``step(state, batch)`` on an ensemble state, every member pulled toward the others.

  Member ``i``'s loss of task ``k`` is ``Lᵢₖ + β · mean_{j≠i} Dₖ(sg(p_j) ‖ p_i)``
  with ``D`` the :func:`distillation_loss` at temperature ``T`` and ``sg``
  ``stop_gradient`` (Zhang et al., "Deep Mutual Learning", CVPR 2018;
  Anil et al., "Large scale distributed neural network training through
  online distillation", ICLR 2018, codistillation). The peers' predictions
  come from one vmapped forward pass of all members in training mode (batch
  statistics of this batch) at the step's start; then the members' steps run
  as one vmapped step (:func:`make_ensemble_step`) on the same batch. Costs
  one forward per member more than the plain ensemble. ``loop``: as in
  :func:`make_ensemble_step`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 2}, hidden=(4,))
    >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy)]
    >>> x = jnp.ones((8, 3))
    >>> s = ensemble_state(model, x, seeds=[0, 1], tx=optax.sgd(0.1))
    >>> s, m = jax.jit(make_mutual_step(model, tasks, beta=0.5))(s, {"inputs": x, "labels": {"a": jnp.zeros(8, int)}})
    >>> m["loss/a"].shape
    (2,)
  """
  tasks = tasks_lib.check_tasks(tasks)
  kinds = _kinds(tasks, kinds)
  model = as_model(model)
  if not float(beta) >= 0:
    raise ValueError(f"make_mutual_step: beta must be non-negative, got {beta}")
  if loop not in LOOPS:
    raise ValueError(f"make_mutual_step: loop must be one of {LOOPS}, got {loop!r}")
  soft = _soft_step(model, tasks, kinds, temperature, {**train_kwargs, "axis_name": axis_name})

  def step(state, batch):
    m = num_members(state.step)
    if m < 2:
      raise ValueError(f"make_mutual_step: mutual learning needs at least 2 members, the state has {m}")
    apply = lambda p, s: model.apply(p, batch["inputs"], s, train=True, axis_name=axis_name)[0]
    preds = jax.lax.stop_gradient(map_members(apply, loop=loop, in_axes=(0, 0))(state.params, state.model_state))
    peers = np.array([[j for j in range(m) if j != i] for i in range(m)])  # (M, M-1)
    targets = {t.name: preds[t.name][peers] for t in tasks}  # (M, M-1, B, ...)
    return map_members(lambda s, tg: soft(s, batch, tg, 1.0, beta), loop=loop, in_axes=(0, 0))(state, targets)

  return step
