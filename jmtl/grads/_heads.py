"""The heads of a separable model, run once on the trunk's output ``z``: losses and their VJPs.

Each task's head runs on ``z`` with its own VJP, never a full-model VJP per
task (which would do K² head work). Heads run in task groups
(:mod:`jmtl.grads._groups`): a group's heads, losses and per-task VJPs are one
batched op each. Shared by the separable and linear-head routes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jmtl import groups as groups_lib
from jmtl.grads._context import Context

Array = jax.Array


class _GroupPass:
  """One group's heads and losses on ``z``, with their VJPs."""

  def __init__(self, ctx: Context, group: groups_lib.Group, z: Any):
    self.group = group
    gb = groups_lib.group_batch(group, ctx.tasks, ctx.params["tasks"], ctx.batch)
    heads = groups_lib.head_fn(ctx.model, group)
    name = group.names[0]
    self.params = gb.params
    self.preds, self.vjp = jax.vjp(heads, gb.params, z)  # the VJP sums over the group (Σₖ wₖ dzₖ)
    terms = groups_lib.terms_fn(group)
    self.sums, self.loss_vjp, self.counts = jax.vjp(lambda p: terms(p, gb.labels, gb.masks), self.preds, has_aux=True)
    # Per task: (∂/∂θₖ, ∂/∂z) of head k alone, batched over the group.
    self.own_vjp = jax.vmap(lambda tp, d: jax.vjp(lambda t, zz: ctx.model.head(name, t, zz), tp, z)[1](d))


class Heads:
  """The K heads' forward pass on ``z`` and their VJPs.

  Attributes:
    losses: ``(K,)`` masked means over the global batch.
    denom: ``(K,)`` global label counts (1 where a task has none).
    present: ``(K,)`` bool, the tasks with a label in the global batch.
    groups: the task groups, each a batched pass.
  """

  def __init__(self, ctx: Context, z: Any):
    self.ctx = ctx
    groups = groups_lib.task_groups(ctx.model, ctx.tasks, ctx.params["tasks"])
    self.passes = [_GroupPass(ctx, g, z) for g in groups]
    self.groups = groups
    sums = groups_lib.in_task_order([p.sums for p in self.passes], groups)
    counts = groups_lib.in_task_order([p.counts for p in self.passes], groups)
    self._dtype = sums.dtype
    self.losses, self.denom, self.present = ctx.mean_losses(sums, counts)
    self._unit = None

  def _in_order(self, values):
    return jax.tree.map(lambda *v: groups_lib.in_task_order(v, self.groups), *values)

  def _group_weights(self, p, weights):
    """The loss cotangent of a group for task weights ``weights`` ``(K,)``: ``wₖ / countₖ``."""
    idx = jnp.asarray(p.group.index)
    return (weights[idx] / self.denom[idx]).astype(self._dtype)

  def dpreds(self, weights) -> list[Array]:
    """Per group, ``∂(Σ wₖ Lₖ)/∂predₖ`` stacked ``(G, B, ...)``."""
    return [p.loss_vjp(self._group_weights(p, weights))[0] for p in self.passes]

  def dpred_stack(self, weights) -> Array:
    """``∂(wₖ Lₖ)/∂predₖ`` for every task, stacked ``(K, B, C)`` in task order, zero-padded to the widest head."""
    parts = self.dpreds(weights)
    width = max(d.shape[-1] for d in parts)
    pad = lambda d: jnp.pad(d, [(0, 0)] * (d.ndim - 1) + [(0, width - d.shape[-1])])
    return groups_lib.in_task_order([pad(d) for d in parts], self.groups)

  def unit(self):
    """``(∂Lₖ/∂θₖ, ∂Lₖ/∂z)`` per group, stacked over the group (computed once)."""
    if self._unit is None:
      ones = jnp.ones((self.ctx.k,), self._dtype)
      self._unit = [p.own_vjp(p.params, d) for p, d in zip(self.passes, self.dpreds(ones))]
    return self._unit

  def dz(self):
    """``∂Lₖ/∂z`` stacked on a leading task axis (task order), per leaf of ``z``."""
    return self._in_order([dz for _, dz in self.unit()])

  def weighted_dz(self, weights: Array):
    """``Σₖ wₖ ∂Lₖ/∂z``: one VJP per group (it sums over the group), not from a stacked ``dz``."""
    parts = [p.vjp(d)[1] for p, d in zip(self.passes, self.dpreds(weights))]
    return jax.tree.map(lambda *x: sum(x), *parts)

  def task_grads(self, weights: Array) -> dict[str, Any]:
    """Each head's parameter gradient under the own-heads rule (:meth:`Context.head_weights`), globally summed."""
    head_w = self.ctx.head_weights(weights)
    grads = {}
    for p, (g, _) in zip(self.passes, self.unit()):
      w = head_w[jnp.asarray(p.group.index)]
      scaled = jax.tree.map(lambda x, w=w: x * w.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), g)
      grads.update(groups_lib.unstack(scaled, p.group.names))
    return self.ctx.psum(grads)
