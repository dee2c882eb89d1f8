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

from jmtl.grads import _taps
from jmtl.grads._context import Context
from jmtl.grads._context import StepGrads
from jmtl.grads._context import gradient_metrics
from jmtl.grads._heads import Heads


def linear_heads(ctx: Context, paths) -> StepGrads:
  """G and ``Σwₖdzₖ`` without any ``dzₖ``; ``paths`` are the heads' kernel paths (:func:`_taps.linear_head_kernels`)."""
  z, enc_vjp, model_state = jax.vjp(ctx.encode, ctx.params["shared"], has_aux=True)
  heads = Heads(ctx, z)
  kernels = [_taps.kernel_at(ctx.params["tasks"][t.name], p) for t, p in zip(ctx.tasks, paths)]
  deltas = [heads.dpred(i, 1.0) for i in range(ctx.k)]
  widths = [w.shape[1] for w in kernels]
  delta = jnp.concatenate([d.reshape(-1, d.shape[-1]) for d in deltas], axis=1)  # (rows, ΣC)
  kernel = jnp.concatenate(kernels, axis=1).astype(delta.dtype)  # (D, ΣC)
  owner = jnp.repeat(jnp.arange(ctx.k), jnp.asarray(widths), total_repeat_length=sum(widths))
  member = (owner[:, None] == jnp.arange(ctx.k)[None, :]).astype(delta.dtype)  # (ΣC, K)
  gramian = member.T @ ((delta.T @ delta) * (kernel.T @ kernel)) @ member
  gramian = ctx.psum(gramian)  # rows concatenate over devices: exact
  weights, wstate = ctx.weigh(heads.losses, gramian=gramian)
  cot = (delta * (member @ weights.astype(delta.dtype))[None, :]) @ kernel.T
  g_shared = ctx.psum(enc_vjp(cot.reshape(z.shape).astype(z.dtype))[0])
  grads = {"shared": g_shared, "tasks": heads.task_grads(weights)}
  return StepGrads(heads.losses, weights, wstate, grads, gradient_metrics(gramian, ctx.names), model_state)
