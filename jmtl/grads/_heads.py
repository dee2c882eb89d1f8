"""The heads of a separable model, run once on the trunk's output ``z``: losses and their VJPs.

Each task's head runs on ``z`` with its own VJP, never a full-model VJP per
task (which would do K² head work). Shared by the separable and linear-head
routes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jmtl.grads._context import Context

Array = jax.Array


class Heads:
  """The K heads' forward pass on ``z`` and their VJPs.

  Attributes:
    losses: ``(K,)`` masked means over the global batch.
    denom: ``(K,)`` global label counts.
    preds: each head's prediction.
  """

  def __init__(self, ctx: Context, z: Any):
    self.ctx = ctx
    sums, counts, self.preds, self._head_vjps, self._loss_vjps = [], [], [], [], []
    for t in ctx.tasks:
      pred, head_vjp = jax.vjp(lambda tp, zz, t=t: ctx.model.head(t.name, tp, zz), ctx.params["tasks"][t.name], z)
      s, loss_vjp, c = jax.vjp(lambda y, t=t: ctx.loss_terms(t, {t.name: y}), pred, has_aux=True)
      sums.append(s)
      counts.append(c)
      self.preds.append(pred)
      self._head_vjps.append(head_vjp)
      self._loss_vjps.append(loss_vjp)
    sums = jnp.stack(sums)
    self._dtype = sums.dtype
    self.losses, self.denom = ctx.mean_losses(sums, jnp.stack(counts))
    self._unit = None

  def dpred(self, i: int, weight) -> Array:
    """``∂(w Lᵢ)/∂predᵢ``: the cotangent of head ``i``'s output for loss weight ``weight``."""
    return self._loss_vjps[i]((weight / self.denom[i]).astype(self._dtype))[0]

  def unit(self) -> list[tuple[Any, Any]]:
    """``[(∂Lᵢ/∂θᵢ, ∂Lᵢ/∂z)]`` for every task (computed once)."""
    if self._unit is None:
      self._unit = [self._head_vjps[i](self.dpred(i, 1.0)) for i in range(self.ctx.k)]
    return self._unit

  def dz(self):
    """``∂Lₖ/∂z`` stacked on a leading task axis, per leaf of ``z``."""
    return jax.tree.map(lambda *x: jnp.stack(x), *[d for _, d in self.unit()])

  def weighted_dz(self, weights: Array):
    """``Σₖ wₖ ∂Lₖ/∂z``, from the heads' VJPs again (K small products), not from a stacked ``dz``."""
    parts = [self._head_vjps[i](self.dpred(i, weights[i]))[1] for i in range(self.ctx.k)]
    return jax.tree.map(lambda *x: sum(x), *parts)

  def task_grads(self, weights: Array) -> dict[str, Any]:
    """Each head's parameter gradient under the own-heads rule (:meth:`Context.head_weights`), globally summed."""
    head_w = self.ctx.head_weights(weights)
    grads = {
      t.name: jax.tree.map(lambda g, i=i: g * head_w[i].astype(g.dtype), self.unit()[i][0])
      for i, t in enumerate(self.ctx.tasks)
    }
    return self.ctx.psum(grads)
