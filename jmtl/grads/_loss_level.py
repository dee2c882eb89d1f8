"""The loss-level route: the weighting reads the losses only (and the key, the step, ...).

One forward and one backward: ``∇ Σ wₖ Lₖ`` is the VJP of the loss sums with
cotangent ``wₖ / countₖ``.
"""

from __future__ import annotations

from jmtl.grads._context import Context
from jmtl.grads._context import StepGrads


def loss_level(ctx: Context) -> StepGrads:
  """Losses, weights and ``∇θ Σₖ wₖ Lₖ`` from one forward and one backward."""
  fwd = ctx.forward()
  weights, wstate = ctx.weigh(fwd.losses)
  (grads,) = fwd.vjp((weights / fwd.denom).astype(fwd.dtype))
  return StepGrads(fwd.losses, weights, wstate, ctx.psum(grads), {}, fwd.model_state)
