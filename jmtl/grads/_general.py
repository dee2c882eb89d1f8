"""The general route: any ``apply``; one full VJP per task.

Correct for every model (cross-stitch, mixtures of experts, soft towers with
a shared part) and K times the backward cost: the Jacobian of all parameters
is materialised, ``chunk_size`` tasks at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl.grads._context import Context
from jmtl.grads._context import StepGrads
from jmtl.grads._context import gradient_metrics
from jmtl.grads._context import map_rows
from jmtl.weighting import combine_jacobian
from jmtl.weighting import power_of_two_scale
from jmtl.weighting import scaled_gramian
from jmtl.weighting import times_power_of_two


def general(ctx: Context) -> StepGrads:
  """Every task's gradient of all parameters, then the weighting on the shared part's Gramian (or Jacobian)."""
  select = ctx.transform.select
  computed = {}
  k = None
  if "cross_gramian" in ctx.transform.requires:
    fwd, jac, halves = _halves(ctx)
    part = lambda j: j["shared"] if select is None else select(j["shared"])
    a, b = part(halves[0]), part(halves[1])
    k = power_of_two_scale((a, b))  # both products in float32's range, by the same factor 2**2k
    computed["cross_gramian"] = cross_gramian(times_power_of_two(a, -k), times_power_of_two(b, -k))
  else:
    fwd = ctx.forward()
    rows = jnp.diag(1.0 / fwd.denom).astype(fwd.dtype)
    (jac,) = map_rows(fwd.vjp, rows, ctx.options.chunk_size)
    jac = ctx.psum(jac)
  shared_jac = jac["shared"] if select is None else select(jac["shared"])
  gramian, exponent = scaled_gramian(shared_jac, k)
  computed["gramian"], computed["gramian_exponent"] = gramian, exponent
  if ctx.transform.needs == "jacobian":
    computed["jacobian"] = shared_jac
  weights, wstate = ctx.weigh(fwd.losses, fwd.present, **computed)
  # The direction is over all shared parameters, whatever subset the Gramian was over.
  g_shared, weights = ctx.combine(weights, jac["shared"])
  g_tasks = combine_jacobian(ctx.head_weights(weights), jac["tasks"])
  grads = {"shared": g_shared, "tasks": g_tasks}
  return StepGrads(fwd.losses, weights, wstate, grads, gradient_metrics(gramian, exponent), fwd.model_state)


def _halves(ctx: Context):
  """``(forward, J, (J_a, J_b))``: the per-task Jacobians of the whole batch and of its two halves (2K VJPs).

  ``J_h`` is the gradient of task k's masked mean over half h; the whole
  batch's is their count-weighted mean, so it costs no further VJP.
  """
  fwd, total = ctx.forward_halves()
  k = ctx.k
  rows = jnp.zeros((2, k, 2, k), fwd.dtype)
  rows = rows.at[0, :, 0].set(jnp.diag(1.0 / fwd.denom[0])).at[1, :, 1].set(jnp.diag(1.0 / fwd.denom[1]))
  (jac2,) = map_rows(fwd.vjp, rows.reshape(2 * k, 2, k), ctx.options.chunk_size)
  jac2 = ctx.psum(jac2)
  halves = tuple(jax.tree.map(lambda j, h=h: j[h * k : (h + 1) * k], jac2) for h in (0, 1))
  # A half without labels has J_h = 0, whatever its (clipped) count.
  share = [(fwd.denom[h] / total).astype(fwd.dtype) for h in (0, 1)]
  jac = jax.tree.map(
    lambda a, b: a * share[0].reshape((-1,) + (1,) * (a.ndim - 1)) + b * share[1].reshape((-1,) + (1,) * (b.ndim - 1)),
    *halves,
  )
  return fwd._replace(denom=total), jac, halves


def cross_gramian(a, b):
  """``J_a J_bᵀ`` of two stacked Jacobians (arrays or pytrees of ``(K, ...)`` leaves)."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  k = leaves_a[0].shape[0]
  return sum(x.reshape(k, -1) @ y.reshape(k, -1).T for x, y in zip(leaves_a, leaves_b))
