"""What every route reads: one ``Context`` per step, and the result type ``StepGrads``.

The context holds the step's inputs (model, tasks, parameters, batch, the
weighting and its state and inputs, the options) and the operations that
every route shares: the model's forward pass, the masked loss means over the
global batch, the call of the weighting, the own-heads rule. A route is then
a function ``route(ctx) -> StepGrads``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl import groups as groups_lib
from jmtl import tasks as tasks_lib
from jmtl.models import MultiTaskModel
from jmtl.weighting import Direction
from jmtl.weighting import WeightingTransform
from jmtl.weighting import combine_jacobian
from jmtl.weighting import is_task_vector
from jmtl.weighting import only_present
from jmtl.weighting import power_of_two

Array = jax.Array


class GradientOptions(NamedTuple):
  """How the engine computes per-task gradients for Gramian/Jacobian transforms.

  Attributes:
    level: ``"parameter"`` (the Gramian of the shared-parameter gradients, the
      papers' definition) or ``"representation"`` (of ``∂Lₖ/∂z``, MGDA-UB;
      needs ``encode``/``head``).
    heads: ``"weighted"``: head k moves along ``wₖ ∇Lₖ`` (the gradient of
      ``Σ wₖLₖ``); ``"own"``: along its own ``∇Lₖ`` (torchjd's ``mtl_backward``).
    chunk_size: tasks per trunk VJP at parameter level; ``None`` for all at
      once. Bounds the memory of materialised Jacobian rows at
      ``chunk_size × P``; when smaller than K it also takes the Dense-layer
      Gramian one layer at a time (a trunk backward per layer, each only as
      deep as that layer). Benchmark MLP at K = 40, ``chunk_size=10``: XLA's peak
      memory estimate 40.7 MB instead of 68.9 MB, step time 1.4× (162
      against 116 ms for MGDA in one A/B run): the layers are taken one
      after the other, each in smaller products.
    cross_device: ``"exact"`` or ``"approximate"`` (see :mod:`jmtl.grads`).

  Examples:
    >>> from jmtl import grads
    >>> grads.GradientOptions(level="representation").check().level
    'representation'
  """

  level: str = "parameter"
  heads: str = "weighted"
  chunk_size: int | None = None
  cross_device: str = "exact"

  def check(self) -> GradientOptions:
    for field, allowed in CHOICES.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"gradient option {field}={getattr(self, field)!r} is not one of {allowed}")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"gradient option chunk_size must be a positive int or None, got {self.chunk_size!r}")
    return self


#: The allowed values of the string options of :class:`GradientOptions`.
CHOICES = {
  "level": ("parameter", "representation"),
  "heads": ("weighted", "own"),
  "cross_device": ("exact", "approximate"),
}


class StepGrads(NamedTuple):
  """What a route returns to the train step."""

  losses: Array  # (K,) global per-task losses
  weights: Array  # (K,)
  weighting_state: Any
  grads: Any  # like params
  extra: dict  # Gramian-derived metrics (gradient_metrics), or {}
  model_state: Any = None  # the model's new state (batch-norm statistics; {} for a stateless model)


class Forward(NamedTuple):
  """The model's forward pass to the per-task losses, with its VJP."""

  losses: Array  # (K,) masked means over the global batch
  denom: Array  # (K,) the global label counts (1 where a task has none)
  vjp: Any  # cotangent of the (K,) loss *sums* -> (grads like params,)
  model_state: Any
  dtype: Any  # of the loss sums
  present: Array | None = None  # (K,) bool: the tasks with a label in the global batch


@dataclasses.dataclass(frozen=True)
class Context:
  """One step's inputs to the gradient engine, and the operations the routes share.

  Built by :func:`jmtl.make_train_step` every step; build one by hand to call
  :func:`jmtl.grads.compute` or :func:`jmtl.grads.route` directly.
  """

  model: MultiTaskModel  # see jmtl.models.as_model for a plain apply function
  tasks: tuple[tasks_lib.Task, ...]
  params: Any
  batch: Mapping[str, Any]
  transform: WeightingTransform
  weighting_state: Any
  inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the weighting's other inputs: key, step, ...
  axis_name: str | None = None  # the pmap/shard_map axis to reduce over
  options: GradientOptions = dataclasses.field(default_factory=GradientOptions)
  model_state: Any = dataclasses.field(default_factory=dict)  # the model's state ({} when stateless)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.tasks)

  @property
  def k(self) -> int:
    return len(self.tasks)

  def psum(self, x):
    """``x`` summed over the data-parallel axis (unchanged without one)."""
    return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

  def mean_losses(self, sums: Array, counts: Array) -> tuple[Array, Array, Array]:
    """``(losses, denom, present)``: masked means over the *global* batch, from local sums and counts.

    ``denom`` is the global label count (a mask may be fractional), 1 where a
    task has none; ``present`` says which tasks have one (a task without
    labels has loss 0 and no gradient, and the weighting leaves it out).
    """
    total = self.psum(counts)
    present = total > 0
    denom = jnp.where(present, total, 1)
    return self.psum(sums / denom), denom, present

  def apply(self, params):
    """``(predictions, model_state)`` of the model in training mode."""
    return self.model.apply(params, self.batch["inputs"], self.model_state, train=True, axis_name=self.axis_name)

  def encode(self, shared):
    """``(z, model_state)`` of the model's trunk in training mode."""
    return self.model.encode(shared, self.batch["inputs"], self.model_state, train=True, axis_name=self.axis_name)

  def loss_terms(self, task: tasks_lib.Task, predictions) -> tuple[Array, Array]:
    return tasks_lib.loss_terms(task, predictions, self.batch)

  @property
  def grouped(self) -> bool:
    """Whether heads run in task groups (:mod:`jmtl.grads._groups`): a separable model that declares head kinds."""
    m = self.model
    return m.encode is not None and m.head is not None and m.head_kind is not None

  def loss_terms_of(self, p) -> tuple[Array, tuple[Array, Any]]:
    """``(sums, (counts, model_state))``: the local ``(K,)`` loss sums and label counts at parameters ``p``.

    A model whose heads form groups runs the trunk once and each group's heads
    and losses as one batched op; any other model runs ``apply``.
    """
    if self.grouped:
      z, model_state = self.encode(p["shared"])
      groups = groups_lib.task_groups(self.model, self.tasks, p["tasks"])
      out = []
      for g in groups:
        gb = groups_lib.group_batch(g, self.tasks, p["tasks"], self.batch)
        out.append(groups_lib.terms_fn(g)(groups_lib.head_fn(self.model, g)(gb.params, z), gb.labels, gb.masks))
      return groups_lib.in_task_order([s for s, _ in out], groups), (
        groups_lib.in_task_order([c for _, c in out], groups),
        model_state,
      )
    preds, model_state = self.apply(p)
    out = [self.loss_terms(t, preds) for t in self.tasks]
    return jnp.stack([s for s, _ in out]), (jnp.stack([c for _, c in out]), model_state)

  def forward(self) -> Forward:
    """The model's forward pass to the losses, with the VJP of the (local) loss sums."""
    sums, vjp, (counts, model_state) = jax.vjp(self.loss_terms_of, self.params, has_aux=True)
    losses, denom, present = self.mean_losses(sums, counts)
    return Forward(losses, denom, vjp, model_state, sums.dtype, present)

  def forward_halves(self) -> tuple[Forward, Array]:
    """``(forward, denom)``: the loss sums of each half of the global batch, ``(2, K)``, and the whole batch's counts.

    For a transform that requires ``"cross_gramian"``: one forward of the
    whole batch; example ``i`` of the global batch of ``n`` is in the first
    half when ``i < n/2`` (by its global index, so one device, ``pmap`` and a
    mesh split the same way). ``forward.denom`` holds the global label counts
    of each half ``(2, K)`` and ``denom`` those of the whole batch ``(K,)``
    (each at least 1); ``forward.losses`` are the whole batch's ``(K,)``.
    """
    m = jax.tree.leaves(self.batch["inputs"])[0].shape[0]
    devices = 1 if self.axis_name is None else jax.lax.axis_size(self.axis_name)
    if m * devices < 2:
      raise ValueError(
        f"{self.transform!r} needs the cross-Gramian of two halves of the batch: it needs at least 2 examples, "
        f"got {m * devices}"
      )
    first = 0 if self.axis_name is None else jax.lax.axis_index(self.axis_name) * m
    in_first = (first + jnp.arange(m)) < (m * devices) / 2
    halves = (in_first.astype(jnp.float32), 1 - in_first.astype(jnp.float32))
    labels = self.batch["labels"]

    def terms(p):
      preds, model_state = self.apply(p)
      sums, counts = [], []
      for half in halves:
        masks = {t.name: tasks_lib.task_mask(t, self.batch) * half for t in self.tasks}
        batch = {**self.batch, "labels": labels, "masks": masks}
        out = [tasks_lib.loss_terms(t, preds, batch) for t in self.tasks]
        sums.append(jnp.stack([s for s, _ in out]))
        counts.append(jnp.stack([c for _, c in out]))
      return jnp.stack(sums), (jnp.stack(counts), model_state)

    sums, vjp, (counts, model_state) = jax.vjp(terms, self.params, has_aux=True)
    losses, denom, present = self.mean_losses(sums.sum(0), counts.sum(0))
    halves = self.psum(counts)
    return Forward(losses, jnp.where(halves > 0, halves, 1), vjp, model_state, sums.dtype, present), denom

  def weigh(self, losses: Array, present: Array, **computed) -> tuple[Any, Any]:
    """``(weights, new weighting state)``: the weighting's update on the losses and every input.

    ``present`` (``(K,)`` bool, the tasks with a label in the global batch)
    is an input of the update, and the weights of the other tasks are set to
    0 (``docs/design.md``, "Tasks without labels"). ``computed`` holds the
    Gramian and/or Jacobian a route computed; the weights are constants of
    the update (``stop_gradient``).
    """
    if "validation" in self.transform.requires:
      computed["meta_gradient"] = self.meta_gradient
    w, state = self.transform.update(losses, self.weighting_state, present=present, **self.inputs, **computed)
    check_weights(self.transform, w, self.names, computed.get("jacobian"))
    return jax.lax.stop_gradient(only_present(w, present)), state

  def meta_gradient(self, weights: Array, lr, val_weights: Array | None = None) -> Array:
    """``∂/∂w Σₖ vₖ Lₖ^val(θ − lr ∇θ Σⱼ wⱼ Lⱼ(θ))``: how the validation losses after one virtual SGD step move with
    the task weights ``w`` (``v``: ``val_weights``, ones by default).

    The input ``meta_gradient`` of a transform that requires ``"validation"``
    (Auto-λ): the step's batch holds ``batch["validation"]``, a batch of the
    same tasks. The virtual step moves every parameter (shared and per task).
    Since ``θ'`` is linear in ``w``, the derivative is exactly
    ``−lr ∇θLₖ(θ) · ∇θ'L^val(θ')`` (the paper approximates it by a finite
    difference): one backward for ``θ'``, one for ``∇θ'L^val``, one JVP of
    the training losses along it. The model's state (batch-norm statistics)
    is not updated by it.
    """
    val = self.batch.get("validation") if isinstance(self.batch, Mapping) else None
    if val is None:
      raise ValueError(
        f"{self.transform!r} learns from validation data: the batch needs batch['validation'], a batch of the "
        "same tasks (the runner adds one when the weighting requires it)"
      )
    tasks_lib.check_batch(self.tasks, val)
    params = jax.lax.stop_gradient(self.params)
    weights = jnp.asarray(weights)
    v = jnp.ones((self.k,), weights.dtype) if val_weights is None else jnp.asarray(val_weights)
    # d/dwₖ = −lr ∇θLₖ(θ)·∇θ'L^val(θ') = −lr (J_sums g_val)ₖ / countₖ: one JVP of the training loss sums, summed
    # over devices. Written out, not by differentiating through the step: a psum's transpose would count the
    # devices' shares wrongly under pmap.
    train = self.forward()
    (g,) = train.vjp((weights / train.denom).astype(train.dtype))
    ahead = jax.tree.map(lambda p, d: p - (lr * d).astype(p.dtype), params, self.psum(g))
    val_fwd = dataclasses.replace(self, params=ahead, batch=val).forward()
    (g_val,) = val_fwd.vjp((v / val_fwd.denom).astype(val_fwd.dtype))
    g_val = self.psum(g_val)
    _, along = jax.jvp(
      lambda p: self.loss_terms_of(p)[0], (params,), (jax.tree.map(lambda x, p: x.astype(p.dtype), g_val, params),)
    )
    return (-lr * self.psum(along) / train.denom).astype(weights.dtype)

  @property
  def heads_rule(self) -> str:
    """How task parameters move: the transform's declared rule, else the options'."""
    return self.transform.heads or self.options.heads

  def head_weights(self, weights: Array) -> Array:
    """The weights of each task's own head parameters: ``w`` (``heads="weighted"``) or ones (``"own"``)."""
    return weights if self.heads_rule == "weighted" else jnp.ones_like(weights)

  def combine(self, weights, jac) -> tuple[Any, Array]:
    """``(shared-parameter update, weights to report)`` from the (global) Jacobian of the shared part.

    ``weights`` is a ``(K,)`` vector, element-wise weights shaped like
    ``jac`` or a :class:`~jmtl.weighting.Direction` (Jacobian-level
    transforms); element-wise weights are reported as ones, a direction's
    weights as given. Both need the Jacobian of all shared parameters.
    """
    if is_task_vector(weights):
      return combine_jacobian(weights, jac), weights
    if self.transform.select is not None:
      raise ValueError(
        f"{self.transform!r} returns element-wise weights or a Direction, which need the Jacobian of all shared "
        "parameters; it selects a subset (select is not None)"
      )
    if isinstance(weights, Direction):
      if jax.tree.structure(weights.shared) != jax.tree.structure(jac):
        raise ValueError(f"{self.transform!r} returned a Direction not shaped like the shared parameters")
      return jax.tree.map(lambda d, j: d.astype(j.dtype), weights.shared, jac), weights.weights
    return combine_jacobian(weights, jac), jnp.ones((self.k,), jax.tree.leaves(jac)[0].dtype)


def check_weights(transform: WeightingTransform, weights: Any, names: tuple[str, ...], jacobian: Any = None) -> None:
  """Raises a ``ValueError`` naming ``transform``, the expected ``(K,)`` and what it returned, unless the weights fit.

  A transform returns one weight per task, shape ``(K,)``; a ``"jacobian"``
  transform may also return element-wise weights shaped like the Jacobian, or
  a :class:`~jmtl.weighting.Direction` (with ``(K,)`` weights). Shapes are
  static, so this runs once, when the step is traced.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import weighting
    >>> bad = weighting.WeightingTransform(lambda k: (), lambda losses, state, **_: (jnp.ones((2, 2)), state))
    >>> check_weights(bad, jnp.ones((2, 2)), ("a", "b"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: weighting WeightingTransform(...) returned weights of shape (2, 2); expected (2,), one per task ...
  """
  k = len(names)
  if isinstance(weights, Direction):
    weights, what = weights.weights, "a Direction whose weights have"
  else:
    what = "weights of"
  leaves = jax.tree.leaves(weights)
  if is_task_vector(weights) and jnp.shape(weights) == (k,):
    return
  if transform.needs == "jacobian" and jacobian is not None and not is_task_vector(weights) and what == "weights of":
    got = jax.tree.map(jnp.shape, weights)
    if jax.tree.structure(weights) == jax.tree.structure(jacobian) and got == jax.tree.map(jnp.shape, jacobian):
      return  # element-wise weights
    expected = f"({k},) or element-wise weights shaped like the Jacobian {jax.tree.map(jnp.shape, jacobian)}"
  else:
    expected = f"({k},)"
  if len(leaves) == 1 and jax.tree_util.treedef_is_leaf(jax.tree.structure(weights)):
    shown = f"shape {tuple(jnp.shape(weights))}"
  else:
    shown = f"a {type(weights).__name__} of shapes {jax.tree.map(jnp.shape, weights)}"
  raise ValueError(
    f"weighting {transform!r} returned {what} {shown}; expected {expected}, one per task {list(names)} "
    "(update(losses, state, **inputs) -> (weights, state); losses has shape (K,))"
  )


def gradient_metrics(gramian: Array, exponent: Array | int = 0) -> dict[str, Array]:
  """``{"grad_norm": (K,) per-task gradient norms, "grad_cosine": (K, K)}`` from ``J Jᵀ = gramian · 2**exponent``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import grads
    >>> m = grads.gradient_metrics(jnp.array([[4.0, -2.0], [-2.0, 1.0]]))
    >>> m["grad_norm"].tolist(), m["grad_cosine"].tolist()
    ([2.0, 1.0], [[1.0, -1.0], [-1.0, 1.0]])
  """
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(gramian), 0))
  # A zero gradient has no direction: report cosine 0 against it, not NaN.
  safe = jnp.where(norms > 0, norms, 1)
  norms, scaled = norms * power_of_two(jnp.asarray(exponent, jnp.int32) // 2, norms.dtype), norms
  cos = gramian / (safe[:, None] * safe[None, :])
  cos = jnp.where((scaled[:, None] > 0) & (scaled[None, :] > 0), cos, 0)
  return {"grad_norm": norms, "grad_cosine": cos}


def map_rows(fn, rows, chunk_size):
  """``vmap(fn)(rows)``, or ``chunk_size`` rows at a time to bound memory."""
  if chunk_size is None or chunk_size >= jax.tree.leaves(rows)[0].shape[0]:
    return jax.vmap(fn)(rows)
  return jax.lax.map(fn, rows, batch_size=chunk_size)
