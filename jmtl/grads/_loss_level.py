"""The loss-level route: the weighting reads the losses only (and the key, the step, ...).

One forward and one backward: ``∇ Σ wₖ Lₖ`` is the VJP of the loss sums with
cotangent ``wₖ / countₖ``. A transform that declares ``heads="own"`` (RGW)
moves the task parameters along the unweighted ``∇ Σ Lₖ``: a second VJP,
taken with the first (one batched backward of two cotangents).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmtl.grads._context import Context
from jmtl.grads._context import StepGrads


def loss_level(ctx: Context) -> StepGrads:
  """Losses, weights and ``∇θ Σₖ wₖ Lₖ`` from one forward and one backward."""
  fwd = ctx.forward()
  weights, wstate = ctx.weigh(fwd.losses, fwd.present)
  if ctx.transform.heads == "own":
    if not isinstance(ctx.params, dict) or "tasks" not in ctx.params:
      raise ValueError(f"{ctx.transform!r} moves task parameters on their own: params need a 'tasks' part")
    cot = jnp.stack([weights, jnp.ones_like(weights)]) / fwd.denom
    (both,) = jax.vmap(fwd.vjp)(cot.astype(fwd.dtype))
    grads = {**jax.tree.map(lambda g: g[0], both), "tasks": jax.tree.map(lambda g: g[1], both["tasks"])}
  else:
    (grads,) = fwd.vjp((weights / fwd.denom).astype(fwd.dtype))
  return StepGrads(fwd.losses, weights, wstate, ctx.psum(grads), {}, fwd.model_state)
