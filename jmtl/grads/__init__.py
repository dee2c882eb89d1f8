"""Per-task gradients of the shared parameters, computed only when a transform asks.

One step's inputs are a :class:`Context`; :func:`compute` sends it down the
cheapest route that serves its weighting (``docs/design.md``, "The gradient
engine"), one module each:

* **loss level** (:mod:`~jmtl.grads._loss_level`): the weighting reads the
  losses only; one forward and one backward with the weights as the VJP
  cotangent.
* **linear heads** (:mod:`~jmtl.grads._linear_heads`): representation level,
  every head one Dense layer on ``z``: the Gramian from two small Gramians.
* **separable** (:mod:`~jmtl.grads._separable`): the model exposes
  ``encode``/``head``. The trunk runs once, each head's loss and ``∂Lₖ/∂z``
  come from that head's own VJP (:mod:`~jmtl.grads._heads`), the Gramian at
  representation or parameter level (Dense-layer identity, or Jacobian rows
  of the trunk), then one trunk backward with ``Σₖ wₖ dzₖ``.
* **general** (:mod:`~jmtl.grads._general`): any ``apply``; one full VJP per
  task. Correct, and K times the backward cost. Also the route of a
  transform that requires ``"cross_gramian"`` (MoDo, SDMGrad): one VJP per
  task and half of the batch.

:func:`route` says which route (and which Gramian) a step takes, without
running it.

Data parallelism: with ``axis_name``, the Gramian is that of the *global*
batch gradients. At representation level the rows of ``dz`` concatenate over
devices, so summing local Gramians is exact. At parameter level it is not:
``cross_device="exact"`` (default) all-reduces the Jacobian, and
``"approximate"`` sums local Gramians (cheaper, and documented as such).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from jmtl.grads import _taps
from jmtl.grads._context import CHOICES
from jmtl.grads._context import Context
from jmtl.grads._context import GradientOptions
from jmtl.grads._context import StepGrads
from jmtl.grads._context import gradient_metrics
from jmtl.grads._general import general
from jmtl.grads._linear_heads import linear_heads
from jmtl.grads._loss_level import loss_level
from jmtl.grads._separable import dense_layers
from jmtl.grads._separable import needs_jacobian
from jmtl.grads._separable import separable

__all__ = [
  "CHOICES",
  "Context",
  "GradientOptions",
  "Route",
  "StepGrads",
  "compute",
  "gradient_metrics",
  "route",
]


class Route(NamedTuple):
  """Which route a step takes, and how it gets the Gramian."""

  name: str  # "loss_level", "linear_heads", "separable" or "general"
  detail: str  # one line for a person


def _check(ctx: Context) -> None:
  shared = ctx.params.get("shared", {}) if isinstance(ctx.params, dict) else {}
  if not jax.tree.leaves(shared):
    raise ValueError(
      f"a {ctx.transform.needs}-level weighting needs shared parameters, but params['shared'] is empty "
      "(soft-sharing models have none); use a loss-level weighting or a hard-sharing model"
    )
  separable_ok = ctx.model.encode is not None and ctx.model.head is not None
  if ctx.options.level == "representation" and not separable_ok:
    raise ValueError(
      "level='representation' needs a model with encode and head (one shared representation z; see "
      "jmtl.models.MultiTaskModel). This model has none -- cross-stitch, MMoE, CGC/PLE and DSelect-k mix shared "
      "parts differently per task -- so use level='parameter' (the general path serves every method)"
    )


def _linear_head_paths(ctx: Context):
  if ctx.options.level != "representation" or ctx.transform.needs != "gramian" or ctx.model.head is None:
    return None
  z = jax.eval_shape(lambda s: ctx.encode(s)[0], ctx.params["shared"])
  return _taps.linear_head_kernels(ctx, z)


def compute(ctx: Context) -> StepGrads:
  """Losses, weights and the weighted gradient by the cheapest route that serves ``ctx.transform``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> from jmtl import grads
    >>> tasks = [jmtl.Task("a", jmtl.losses.mse), jmtl.Task("b", jmtl.losses.mse)]
    >>> model = jmtl.models.as_model(lambda p, x: {"a": x * p["shared"], "b": -x * p["shared"]})
    >>> batch = {"inputs": jnp.ones(4), "labels": {"a": jnp.zeros(4), "b": -2 * jnp.ones(4)}}
    >>> t = jmtl.weighting.stateless(lambda losses, gramian, **_: jnp.ones(2), needs="gramian")
    >>> ctx = grads.Context(model, tasks, {"shared": 1.0, "tasks": {}}, batch, t, t.init(2))
    >>> grads.route(ctx).name
    'general'
    >>> grads.compute(ctx).extra["grad_cosine"].tolist()  # the two tasks pull in exactly opposite directions
    [[1.0, -1.0], [-1.0, 1.0]]
  """
  name, paths = _choose(ctx)
  if name == "loss_level":
    return loss_level(ctx)
  if name == "linear_heads":
    return linear_heads(ctx, paths)
  return separable(ctx) if name == "separable" else general(ctx)


def _choose(ctx: Context):
  """``(route name, linear-head kernel paths or None)``: the one decision :func:`compute` and :func:`route` share."""
  if ctx.transform.needs == "losses":
    return "loss_level", None
  _check(ctx)
  if "cross_gramian" in ctx.transform.requires:
    return "general", None
  paths = _linear_head_paths(ctx)
  if paths is not None:
    return "linear_heads", paths
  return ("separable" if ctx.model.encode is not None and ctx.model.head is not None else "general"), None


def route(ctx: Context) -> Route:
  """The route :func:`compute` takes for ``ctx``, without running it (traces shapes only).

  ``ctx.batch`` may hold arrays or :class:`jax.ShapeDtypeStruct`. A model
  built with flax.nnx or equinox (:func:`jmtl.models.from_nnx`,
  :func:`jmtl.models.from_equinox`) has ``encode``/``head`` and so takes the
  separable route; its trunk has no ``flax.linen.Dense`` layer, so the
  parameter-level Gramian comes from Jacobian rows of the trunk, and the
  detail says so.
  """
  found = []

  def probe(params, batch):
    found.append(_route(dataclasses.replace(ctx, params=params, batch=batch)))
    return 0

  jax.eval_shape(probe, ctx.params, ctx.batch)
  return found[0]


def _route(ctx: Context) -> Route:
  name, paths = _choose(dataclasses.replace(ctx, axis_name=None))  # shapes only: no axis to reduce over
  if name == "loss_level":
    return Route(name, "one forward and one backward; the weighting reads the losses")
  if name == "linear_heads":
    return Route(name, f"representation-level Gramian from {len(paths)} linear heads (no dz formed)")
  if name == "general" and "cross_gramian" in ctx.transform.requires:
    return Route(name, "the weighting needs the cross-Gramian of two half-batches: one full VJP per task and half")
  if name == "general":
    return Route(name, "the model has no encode/head: one full VJP per task (K backward passes)")
  return Route(name, "trunk once, heads per task; " + _gramian_source(ctx))


def _gramian_source(ctx: Context) -> str:
  """How the separable route gets the Gramian, in words."""
  t = ctx.transform
  if ctx.options.level == "representation":
    return "representation-level Gramian of dz"
  if needs_jacobian(ctx):
    why = "the weighting needs the Jacobian" if t.needs == "jacobian" else "cross_device='exact' across devices"
    return f"Jacobian rows of the trunk ({why})"
  layers = dense_layers(dataclasses.replace(ctx, axis_name=None))  # shapes only: no axis to reduce over
  selected = _taps.selected_paths(ctx.params["shared"], t.select)
  covered = {(*layer.path, leaf) for layer in layers for leaf in ("kernel", "bias")}
  rest = len(selected - covered)
  if not layers:
    return f"Jacobian rows of the trunk for {rest} parameter leaves (no flax.linen.Dense layer found in encode)"
  tail = f"; Jacobian rows for {rest} other leaves" if rest else ""
  return f"Dense-layer Gramian over {len(layers)} layers{tail}"
