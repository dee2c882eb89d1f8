"""Double-sampling methods: MoDo and SDMGrad, on the cross-Gramian of two half-batches.

The product ``J Jᵀ λ`` of one batch's gradients is a biased estimate of the
full-data ``∇F ∇Fᵀ λ`` (the same noise enters both factors). Both methods
take the two factors from independent samples: the engine splits the batch
into halves ``a`` and ``b`` and passes ``cross_gramian = J_a J_bᵀ``
(``requires=("cross_gramian",)``; one VJP per task and half, see
:mod:`jmtl.grads`). The weights they return apply to the whole batch's
gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import method
from jmtl.weighting._base import power_of_two
from jmtl.weighting._base import present_of
from jmtl.weighting._solvers import project_simplex
from jmtl.weighting._solvers import simplex_step_on_present

Array = jax.Array


class SimplexState(NamedTuple):
  """State of :func:`modo` and :func:`sdmgrad`: the task weights carried from step to step."""

  lam: Array  # (K,) on the simplex


def _cross(name: str, losses: Array, state: SimplexState, cross) -> Array:
  """The cross-Gramian, checked, without gradient, in the state's dtype (float32 at least)."""
  if cross is None:
    raise ValueError(
      f"{name} needs the cross-Gramian of two independent half-batches: pass cross_gramian=(K, K) to update "
      "(the train step computes it for a transform that requires it)"
    )
  k = losses.shape[0]
  if cross.shape != (k, k):
    raise ValueError(
      f"{name}: losses have shape {losses.shape}, so the cross_gramian must be ({k}, {k}); got {cross.shape}"
    )
  if state.lam.shape != (k,):
    raise ValueError(f"{name}: state is for {state.lam.shape[0]} tasks, got losses of shape {losses.shape}")
  return jax.lax.stop_gradient(cross).astype(state.lam.dtype)


def _simplex_init(num_tasks: int) -> SimplexState:
  return SimplexState(jnp.full((num_tasks,), 1 / num_tasks, jax.dtypes.canonicalize_dtype(float)))


@method()
def modo(gamma: float = 1e-3, rho: float = 0.1) -> WeightingTransform:
  """MoDo: multi-objective gradient with double sampling.

  Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective
  Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023
  (JMLR 2024), Algorithm 1. With ``J_a``, ``J_b`` the per-task gradients on
  two independent samples::

      λ ← Π_Δ(λ − γ (J_a J_bᵀ λ + ρ λ))
      d = Σₖ λₖ gₖ

  ``Π_Δ`` is the Euclidean projection onto the simplex; ``λ`` starts at
  ``1/K``. ``d`` is the gradient of the whole batch (both halves), as in
  the paper's two-sample form (its eq. 2.9b); the authors' three-sample
  variant draws a third batch for ``d``. Defaults are the authors' (as in
  LibMTL); ``γ`` depends on the gradients' scale.

  Args:
    gamma: ``γ > 0``, the step size of ``λ``.
    rho: ``ρ ≥ 0``, the ℓ2 regularisation of ``λ``.

  Returns:
    A :class:`WeightingTransform` that needs the Gramian and requires the
    cross-Gramian, with state :class:`SimplexState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> Ja, Jb = jnp.array([[1.0, 0.0], [0.0, 3.0]]), jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> t = jmtl.weighting.modo(gamma=0.1, rho=0.0)
    >>> w, _ = t.update(jnp.ones(2), t.init(2), cross_gramian=Ja @ Jb.T)
    >>> [round(x, 4) for x in w.tolist()]  # the task with the larger gradient loses weight
    [0.625, 0.375]
  """
  if is_concrete(gamma) and not gamma > 0:
    raise ValueError(f"modo: gamma must be > 0, got {gamma}")
  if is_concrete(rho) and not rho >= 0:
    raise ValueError(f"modo: rho must be ≥ 0, got {rho}")

  def update_fn(losses, state, **inputs):
    c = _cross("modo", losses, state, inputs.get("cross_gramian"))
    present = present_of(losses, inputs.get("present"))
    unit = power_of_two(inputs.get("gramian_exponent", 0), c.dtype)  # C = cross_gramian · 2**e

    def step(x):
      cx = c @ x
      # γ C λ in true units; beyond float32 it saturates (the projection then lands on a vertex).
      move = jnp.clip(gamma * jnp.where(cx == 0, 0, cx * unit), -1e30, 1e30)
      return project_simplex(x - move - gamma * rho * x, present)

    weights, lam = simplex_step_on_present(state.lam, present, step)
    return weights.astype(losses.dtype), SimplexState(lam)

  return WeightingTransform(_simplex_init, update_fn, "gramian", requires=("cross_gramian",))


@method(static=("n_iter",))
def sdmgrad(lam: float = 0.3, n_iter: int = 20, lr: float = 5.0, momentum: float = 0.5) -> WeightingTransform:
  """SDMGrad: stochastic direction-oriented multi-objective gradient descent.

  Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and
  Provable Stochastic Algorithms", NeurIPS 2023, Algorithm 1 with the
  average direction ``w̃ = 1/K``. The weights minimise
  ``½‖J w‖² + λ ⟨J w, J w̃⟩`` over the simplex by projected stochastic
  gradient steps, the two factors from independent samples ``a``, ``b``;
  the update leans towards the average gradient::

      C = J_a J_bᵀ / s²,   s = mean_k √max(Cₖₖ, 0)  (+1e-8)
      repeat n_iter:  m ← μ m + (C w + λ C w̃);  w ← Π_Δ(w − η m)
      d = Σₖ (wₖ + λ/K)/(1 + λ) gₖ

  ``w`` persists from step to step (starting at ``1/K``); the momentum
  ``m`` starts at 0 every step. The scaling by ``s²`` and the solver
  (``n_iter`` heavy-ball steps of rate ``η`` and momentum ``μ``) are the
  authors' (as in LibMTL). ``d`` is the whole batch's gradient; the paper
  draws a third sample for it.

  Args:
    lam: ``λ ≥ 0``, the pull towards the average gradient (0: stochastic MGDA).
    n_iter: projected steps per update (static).
    lr: ``η > 0``.
    momentum: ``μ`` in [0, 1).

  Returns:
    A :class:`WeightingTransform` that needs the Gramian and requires the
    cross-Gramian, with state :class:`SimplexState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> t = jmtl.weighting.sdmgrad()
    >>> w, _ = t.update(jnp.ones(2), t.init(2), cross_gramian=J @ J.T)
    >>> w.tolist()  # symmetric tasks: equal weights summing to 1
    [0.5, 0.5]
  """
  if is_concrete(lam) and not lam >= 0:
    raise ValueError(f"sdmgrad: lam must be ≥ 0, got {lam}")
  if int(n_iter) != n_iter or n_iter < 1:
    raise ValueError(f"sdmgrad: n_iter must be a positive integer, got {n_iter!r}")
  if is_concrete(lr) and not lr > 0:
    raise ValueError(f"sdmgrad: lr must be > 0, got {lr}")
  if is_concrete(momentum) and not 0 <= momentum < 1:
    raise ValueError(f"sdmgrad: momentum must be in [0, 1), got {momentum}")

  def update_fn(losses, state, **inputs):
    c = _cross("sdmgrad", losses, state, inputs.get("cross_gramian"))
    present = present_of(losses, inputs.get("present"))
    c = jnp.where(present[:, None] & present[None, :], c, 0)
    kp = jnp.maximum(jnp.sum(present), 1).astype(c.dtype)
    mean = present.astype(c.dtype) / kp  # w̃: 1/K on the present tasks
    scale = jnp.sum(jnp.sqrt(jnp.maximum(jnp.diagonal(c), 0))) / kp
    c = c / (scale**2 + 1e-8)
    pull = lam * jnp.sum(c, axis=1) / kp  # λ C w̃ (absent columns of C are 0)

    def solve(w0):
      def body(_, carry):
        w, m = carry
        m = momentum * m + (c @ w + pull)
        return project_simplex(w - lr * m, present), m

      return jax.lax.fori_loop(0, int(n_iter), body, (w0, jnp.zeros_like(w0)))[0]

    w, new_lam = simplex_step_on_present(state.lam, present, solve)
    weights = (w + lam * mean) / (1 + lam)
    return weights.astype(losses.dtype), SimplexState(new_lam)

  return WeightingTransform(_simplex_init, update_fn, "gramian", requires=("cross_gramian",))
