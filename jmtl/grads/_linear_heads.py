"""The linear-heads route: representation level when every head is ``pred = z Wₖ + bₖ``.

With ``δₖ = ∂Lₖ/∂predₖ`` (rows × Cₖ), ``dzₖ = δₖ Wₖᵀ`` and
``⟨dzᵢ, dzⱼ⟩ = Σ (δᵢᵀδⱼ) ⊙ (WᵢᵀWⱼ)``: two small Gramians of the stacked
``[δ₁ … δ_K]`` and ``[W₁ … W_K]`` replace K products of size rows × D and the
stacked ``(K, rows, D)`` array (the identity of the trunk's Dense layers,
applied to the heads). Then ``Σ wₖ dzₖ`` is one matmul and one trunk backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmtl.grads import _taps
from jmtl.grads._context import Context
from jmtl.grads._context import StepGrads
from jmtl.grads._context import gradient_metrics
from jmtl.grads._heads import Heads
from jmtl.weighting import power_of_two_scale
from jmtl.weighting import times_power_of_two


def linear_heads(ctx: Context, paths) -> StepGrads:
  """G and ``Σwₖdzₖ`` without any ``dzₖ``; ``paths`` are the heads' kernel paths (:func:`_taps.linear_head_kernels`)."""
  z, enc_vjp, model_state = jax.vjp(ctx.encode, ctx.params["shared"], has_aux=True)
  heads = Heads(ctx, z)
  # Columns of [δ₁ … δ_K] and [W₁ … W_K] group by group (a group is one stacked array); `owner` maps
  # each column to its task, so the column order does not matter.
  ones = jnp.ones((ctx.k,), heads.losses.dtype)
  deltas, kernels, owners = [], [], []
  for p, d in zip(heads.passes, heads.dpreds(ones)):
    g, c = d.shape[0], d.shape[-1]
    deltas.append(jnp.moveaxis(d.reshape(g, -1, c), 0, 1).reshape(-1, g * c))  # (rows, G·C)
    w = _taps.node_at(p.params, paths[p.group.index[0]])["kernel"]  # the group's kernels, already stacked (G, D, C)
    kernels.append(jnp.moveaxis(w, 0, 1).reshape(w.shape[1], g * c))  # (D, G·C)
    owners.append(np.repeat(np.asarray(p.group.index), c))
  delta = jnp.concatenate(deltas, axis=1)  # (rows, ΣC)
  kernel = jnp.concatenate(kernels, axis=1).astype(delta.dtype)  # (D, ΣC)
  owner = np.concatenate(owners)
  member = jnp.asarray(owner[:, None] == np.arange(ctx.k)[None, :], delta.dtype)  # (ΣC, K)
  # δ and W scaled by powers of two (1 unless beyond 2**±RANGE), so that G / 2**e stays in float32's range.
  sd, sw = power_of_two_scale(delta, ctx.axis_name), power_of_two_scale(kernel)
  d, w = times_power_of_two(delta, -sd), times_power_of_two(kernel, -sw)
  gramian = member.T @ ((d.T @ d) * (w.T @ w)) @ member
  gramian = ctx.psum(gramian)  # rows concatenate over devices: exact
  exponent = 2 * (sd + sw)
  weights, wstate = ctx.weigh(heads.losses, heads.present, gramian=gramian, gramian_exponent=exponent)
  cot = (delta * (member @ weights.astype(delta.dtype))[None, :]) @ kernel.T
  g_shared = ctx.psum(enc_vjp(cot.reshape(z.shape).astype(z.dtype))[0])
  grads = {"shared": g_shared, "tasks": heads.task_grads(weights)}
  return StepGrads(heads.losses, weights, wstate, grads, gradient_metrics(gramian, exponent), model_state)
