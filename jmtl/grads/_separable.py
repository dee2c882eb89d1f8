"""The separable route: the model has ``encode``/``head``; the trunk runs once, the heads per task.

* *representation level* (MGDA-UB, Sener & Koltun 2018): ``G = Σ_batch dz dzᵀ``
  with ``dzₖ = ∂Lₖ/∂z``;
* *parameter level*: for every ``flax.linen.Dense`` layer of the trunk, with
  inputs ``a`` and per-task output cotangents ``δₖ``,
  ``⟨aᵀδᵢ, aᵀδⱼ⟩ = Σ (a aᵀ) ⊙ (δᵢ δⱼᵀ)`` gives the Gramian without the
  K × P Jacobian (the idea behind torchjd's autogram; :mod:`jmtl.grads._taps`).
  Without ``chunk_size`` every layer's ``δ`` comes from one vmapped trunk
  VJP; with it, one layer at a time, ``chunk_size`` tasks per VJP. Parameters
  outside such layers get their Jacobian rows from the trunk's VJP.

The update direction is then one more trunk backward with ``Σₖ wₖ dzₖ``.
"""

from __future__ import annotations

import contextlib
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmtl.grads import _taps
from jmtl.grads._context import Context
from jmtl.grads._context import StepGrads
from jmtl.grads._context import gradient_metrics
from jmtl.grads._context import map_rows
from jmtl.grads._heads import Heads
from jmtl.weighting import gramian_of
from jmtl.weighting import is_task_vector
from jmtl.weighting import power_of_two_scale
from jmtl.weighting import times_power_of_two


class Trunk(NamedTuple):
  """The trunk's forward pass, tapped at its Dense layers."""

  z: Any
  vjp: Any  # (dz) -> (d shared, per-layer output cotangents δ)
  layers: list  # the tapped Dense layers ([] when untapped)
  acts: list  # each tapped layer's input rows
  model_state: Any


def needs_jacobian(ctx: Context) -> bool:
  """Whether the route materialises Jacobian rows (a Jacobian transform, or the exact cross-device Gramian)."""
  o = ctx.options
  return ctx.transform.needs == "jacobian" or (
    o.level == "parameter" and ctx.axis_name is not None and o.cross_device == "exact"
  )


def dense_layers(ctx: Context) -> list:
  """The trunk's Dense layers the parameter-level Gramian can use without Jacobian rows (``[]``: none)."""
  if ctx.options.level != "parameter" or needs_jacobian(ctx):
    return []
  return _taps.discover_layers(lambda s: ctx.encode(s)[0], ctx.params["shared"]) or []


def run_trunk(ctx: Context) -> Trunk:
  layers = dense_layers(ctx)

  def enc(shared, eps):
    record = []
    tap = nn.intercept_methods(_taps.dense_interceptor(eps, record)) if layers else contextlib.nullcontext()
    with tap:
      z, model_state = ctx.encode(shared)
    return z, ([x for _, x, _ in record], model_state)

  eps0 = [jnp.zeros(layer.out_shape, layer.out_dtype) for layer in layers]
  z, vjp, (acts, model_state) = jax.vjp(enc, ctx.params["shared"], eps0, has_aux=True)
  return Trunk(z, vjp, layers, acts, model_state)


def separable(ctx: Context) -> StepGrads:
  """Trunk once, heads per task, the Gramian at the requested level, then one weighted trunk backward."""
  trunk = run_trunk(ctx)
  heads = Heads(ctx, trunk.z)
  param_level = ctx.options.level == "parameter"
  jac = None
  if param_level:
    gramian, exponent, jac = parameter_gramian(ctx, trunk, heads)
  else:
    dz = heads.dz()
    k = power_of_two_scale(dz, ctx.axis_name)  # the same on every device, so the local Gramians add
    gramian, exponent = ctx.psum(gramian_of(times_power_of_two(dz, -k))), 2 * k
  computed = {"gramian": gramian, "gramian_exponent": exponent}
  if ctx.transform.needs == "jacobian":
    computed["jacobian"] = jac
  weights, wstate = ctx.weigh(heads.losses, heads.present, **computed)
  if is_task_vector(weights):
    if param_level:
      cot = heads.weighted_dz(weights)  # the stacked dz can be freed once the Gramian is done
    else:
      cot = jax.tree.map(lambda d: jnp.tensordot(weights.astype(d.dtype), d, 1), heads.dz())
    g_shared = ctx.psum(trunk.vjp(cot)[0])
  else:
    g_shared, weights = ctx.combine(weights, jac)  # jac is already the global Jacobian
  grads = {"shared": g_shared, "tasks": heads.task_grads(weights)}
  return StepGrads(heads.losses, weights, wstate, grads, gradient_metrics(gramian, exponent), trunk.model_state)


def parameter_gramian(ctx: Context, trunk: Trunk, heads: Heads):
  """``(G / 2**e, e, J)``: the Gramian of the (selected) shared-parameter gradients, its exponent (see
  :func:`jmtl.weighting.scaled_gramian`), and the Jacobian rows if formed.

  Dense layers contribute through the layer identity; every other selected
  leaf through its Jacobian rows. ``J`` is ``None`` when no rows were formed,
  and global (summed over devices) when the route needs it. The trunk
  cotangents are scaled by ``2**-s`` (``e = 2s``; ``s = 0`` unless ``dz`` is
  beyond ``2**±RANGE``), so the Gramian stays in float32's range whenever
  the gradients do; ``J`` is returned unscaled.
  """
  k, chunk_size, select = ctx.k, ctx.options.chunk_size, ctx.transform.select
  selected = _taps.selected_paths(ctx.params["shared"], select)
  dz = heads.dz()
  s = power_of_two_scale(dz, ctx.axis_name)
  gramian = jnp.zeros((k, k), heads.losses.dtype)
  # Per-task trunk cotangents: dz itself, or (linear heads) what dzₖ = δₖ Wₖᵀ is made of.
  task_xs, cot_of = (dz, lambda x: x) if chunk_size is None else _taps.task_cotangents(ctx, trunk.z, heads, dz)
  unscaled_cot_of = cot_of
  cot_of = lambda x: times_power_of_two(unscaled_cot_of(x), -s)
  chunked = bool(trunk.layers) and chunk_size is not None and chunk_size < k
  if chunked:
    # One layer at a time, its δ recomputed chunk by chunk: at most one
    # (K, rows, O) array is alive (with linear heads not even dz).
    chunk, xs = _taps.even_chunks(task_xs, k, chunk_size)
  elif trunk.layers:
    # Tasks next to the feature axis: every Gramian product is then a matmul.
    deltas = jax.vmap(lambda c: trunk.vjp(times_power_of_two(c, -s))[1], out_axes=-2)(dz)
  covered = set()
  for i, (layer, a) in enumerate(zip(trunk.layers, trunk.acts)):
    kpath, bpath = (*layer.path, "kernel"), (*layer.path, "bias")
    use_k, use_b = kpath in selected, bpath in selected
    covered |= {kpath, bpath}
    if not (use_k or use_b):
      continue
    if chunked:
      # The buffer's fill depends on the Gramian so far: this layer's δ is
      # only computed once the previous layer's is consumed.
      delta = _taps.chunk_loop(lambda x, i=i: trunk.vjp(cot_of(x))[1][i], xs, chunk, layer, 0 * gramian[0, 0])
      gramian = gramian + _taps.dense_gramian_chunked(a, delta, use_k, use_b, chunk)[:k, :k]
    else:
      gramian = gramian + _taps.dense_gramian(a, deltas[i], use_k, use_b)
  jac = None
  rest = selected - covered
  if rest:
    rows = map_rows(lambda x: trunk.vjp(cot_of(x))[0], task_xs, chunk_size)
    jac = ctx.psum(rows) if needs_jacobian(ctx) else rows
    if covered:
      sel_jac = [leaf for p, leaf in zip(_taps.leaf_paths(jac), jax.tree.leaves(jac)) if p in rest]
    else:
      sel_jac = jac if select is None else select(jac)
    gramian = gramian + gramian_of(sel_jac)
    if select is not None:
      jac = select(jac)
    jac = times_power_of_two(jac, s)
  if not needs_jacobian(ctx):
    gramian = ctx.psum(gramian)  # exact on one device; the documented approximation across devices
  return gramian, 2 * s, jac
