"""The general route: any ``apply``; one full VJP per task.

Correct for every model (cross-stitch, mixtures of experts, soft towers with
a shared part) and K times the backward cost: the Jacobian of all parameters
is materialised, ``chunk_size`` tasks at a time.
"""

from __future__ import annotations

import jax.numpy as jnp

from jmtl.grads._context import Context
from jmtl.grads._context import StepGrads
from jmtl.grads._context import gradient_metrics
from jmtl.grads._context import map_rows
from jmtl.weighting import combine_jacobian
from jmtl.weighting import gramian_of


def general(ctx: Context) -> StepGrads:
  """Every task's gradient of all parameters, then the weighting on the shared part's Gramian (or Jacobian)."""
  fwd = ctx.forward()
  rows = jnp.diag(1.0 / fwd.denom).astype(fwd.dtype)
  (jac,) = map_rows(fwd.vjp, rows, ctx.options.chunk_size)
  jac = ctx.psum(jac)
  select = ctx.transform.select
  shared_jac = jac["shared"] if select is None else select(jac["shared"])
  gramian = gramian_of(shared_jac)
  computed = {"gramian": gramian}
  if ctx.transform.needs == "jacobian":
    computed["jacobian"] = shared_jac
  weights, wstate = ctx.weigh(fwd.losses, **computed)
  # The direction is over all shared parameters, whatever subset the Gramian was over.
  g_shared, weights = ctx.combine(weights, jac["shared"])
  g_tasks = combine_jacobian(ctx.head_weights(weights), jac["tasks"])
  grads = {"shared": g_shared, "tasks": g_tasks}
  return StepGrads(fwd.losses, weights, wstate, grads, gradient_metrics(gramian), fwd.model_state)
