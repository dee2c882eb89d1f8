"""Gramian-level weightings that share the step among the tasks by a stated rule: FairGrad and PCD.

FairGrad gives every task a share of the first-order progress set by
α-fairness (the nonlinear system ``G w = w^{-1/α}``); PCD follows a primary
task as closely as a guaranteed share of progress for the others allows (a
small QP). Both see only ``G = J Jᵀ`` and return weights ``w`` with direction
``Jᵀw = Σₖ wₖ gₖ``. Their solvers are exact on the K×K problem, jittable and
finite on degenerate ``G`` (zero, duplicated or opposite gradients); see
:mod:`jmtl.weighting._solvers` for the conventions they share (normalised
Gramian, a relative ridge of ``16·K·eps``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_gramian
from jmtl.weighting._base import decoupled
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import method
from jmtl.weighting._base import power_of_two
from jmtl.weighting._base import present_of
from jmtl.weighting._base import stateless
from jmtl.weighting._solvers import _ridge_coef
from jmtl.weighting._solvers import _spd_solve
from jmtl.weighting._solvers import nonneg_qp
from jmtl.weighting._solvers import normalise_gramian

Array = jax.Array

# The candidates of FairGrad's line search, tried at once: 2^m, ..., 2, 1, 1/2, ..., 2^-(n-1).
_EXTRAPOLATION_STEPS = 8
_LINE_SEARCH_STEPS = 40
_ARMIJO = 1e-4


def alpha_fair_weights(gramian: Array, alpha, *, max_iter: int = 100, present: Array | None = None) -> Array:
  """``w > 0`` with ``G w = w^{-1/α}`` (element-wise): FairGrad's weights.

  Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024,
  eq. 4. The system is the stationarity condition of the strictly convex

      φ(w) = ½ wᵀGw − Σₖ hₐ(wₖ),   hₐ(w) = (w^p − 1)/p,   p = 1 − 1/α   (log w at α = 1)

  so it has one solution (for a non-singular ``G``), which Newton's method
  finds: the Newton system ``∇²φ Δ = ∇φ`` is positive definite. Two changes
  of variable make it well posed at any scale: ``G`` is divided by its mean
  diagonal ``σ`` (then ``w = w_σ · σ^{-α/(α+1)}``), and ``w = w⁰ ⊙ γ`` with
  ``w⁰ₖ = Gₖₖ^{-α/(α+1)}``, the solution for orthogonal gradients, so that
  ``γ = 1`` is the start and the system reads ``A γ = diag(A) ⊙ γ^{-1/α}``
  with ``A = W⁰ G W⁰``. The steps are multiplicative, ``γ ← γ ⊙ exp(−tΔ/γ)``
  (the Newton step to first order; positive by construction, and able to
  move a weight by orders of magnitude), with ``t`` chosen among
  ``2⁸, …, 1, …, 2⁻³⁹`` (all tried at once): the one that most decreases φ,
  subject to Armijo's condition (φ's decrease is computed with
  ``expm1``, without cancellation); when rounding hides φ's decrease (φ
  weighs task ``k`` by ``Aₖₖ``, which can span many orders of magnitude),
  the one that most decreases the residual relative to the scale of each
  equation's terms, ``Σₖ ((Aγ − diag(A)γ^{-1/α})ₖ / (|A|γ +
  diag(A)γ^{-1/α})ₖ)²``.

  Stopping rule: the loop ends when every equation holds to ``4·K·eps`` of
  the scale of its terms; or after a full Newton step of relative size at
  most ``eps^{2/3}`` in every weight (Newton converges quadratically: the
  next step would be at rounding level); or, once that relative residual is
  below ``√eps``, when no step quarters it (rounding noise); or when no step
  decreases φ or the residual; or after ``max_iter`` steps. Typically 3 to
  10 steps; up to 30 on a degenerate ``G`` (below), whose near-singular
  directions may take all ``max_iter``. The backward error
  ``maxₖ |(Gw)ₖ − wₖ^{-1/α}| / ((|G|w)ₖ + wₖ^{-1/α})`` is then about 1e-14 in
  float64 and 6e-6 in float32, for α from 0.05 to 50 and gradient norms
  spanning four orders of magnitude (``tests/test_weighting_more.py``).

  Degenerate ``G``: a task with a zero gradient (or a non-negative null
  combination, such as two opposite gradients) has no solution
  (``wₖ → ∞``). As in :func:`~jmtl.weighting._solvers.nash_bargaining`, the
  cosine matrix gets a ridge ``δ = 16·K·eps`` and norms are floored at
  ``δ·√σ``: such weights come out large but finite, and their part of
  ``Jᵀw`` stays bounded.

  Args:
    gramian: ``(K, K)`` PSD matrix ``J Jᵀ``.
    alpha: ``α ≥ 0`` (``α = 0``: the limit ``w = 1``).
    max_iter: cap on Newton steps.

  Returns:
    ``w`` of shape ``(K,)``, in the Gramian's dtype (capped at its largest
    finite value; a weight below its range, possible at large ``α``, is 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._allocation import alpha_fair_weights
    >>> w = alpha_fair_weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]), 2.0)
    >>> [round(float(x), 5) for x in w]  # orthogonal: wₖ = Gₖₖ^(−α/(α+1))
    [1.0, 0.39685]
  """
  return alpha_fair_solve(gramian, alpha, max_iter=max_iter, present=present)[0]


@functools.partial(jax.jit, static_argnames=("max_iter",))
def alpha_fair_solve(
  gramian: Array, alpha, *, max_iter: int = 100, present: Array | None = None
) -> tuple[Array, Array]:
  """:func:`alpha_fair_weights` and the number of Newton steps it took (``present``: the tasks to solve among)."""
  gn, sigma = normalise_gramian(gramian)
  k = gn.shape[0]
  dtype = gn.dtype
  finfo = jnp.finfo(dtype)
  delta = _ridge_coef(k, dtype)
  alpha = jnp.asarray(alpha, dtype)
  positive = alpha > 0
  a_ = jnp.where(positive, alpha, 1)
  inv = 1 / a_  # 1/α
  p = 1 - inv
  p_safe = jnp.where(p == 0, 1, p)
  expo = a_ / (a_ + 1)  # α/(α+1)

  # The regularised Gramian N·cos·N: norms floored at δ, cosines with 1 + δ on the diagonal.
  norms = jnp.maximum(jnp.sqrt(jnp.maximum(jnp.diagonal(gn), 0)), delta)
  cos = jnp.clip(gn / jnp.outer(norms, norms), -1, 1)
  cos = cos.at[jnp.diag_indices(k)].set(1 + delta)
  if present is not None:
    cos = decoupled(cos, present)  # the equations separate: the present tasks' system is solved exactly
  log_diag = 2 * jnp.log(norms) + jnp.log1p(delta)  # log Gₖₖ (normalised, regularised)
  # A = W⁰ G W⁰: Aₖⱼ = cosₖⱼ sₖ sⱼ with sₖ = nₖ w⁰ₖ.
  s = jnp.exp(jnp.log(norms) - expo * log_diag)
  a_mat = cos * jnp.outer(s, s)
  a_diag = jnp.diagonal(a_mat)
  abs_a = jnp.abs(a_mat)
  ts = 2.0 ** jnp.arange(_EXTRAPOLATION_STEPS, -_LINE_SEARCH_STEPS, -1, dtype=dtype)

  def residual(gamma):
    """The equations ``Aγ − diag(A)γ^{-1/α}``, the scale of their terms ``|A|γ + diag(A)γ^{-1/α}``, and
    ``diag(A)γ^{-1/α}``."""
    u = a_diag * jnp.exp(-inv * jnp.log(gamma))
    return gamma @ a_mat - u, gamma @ abs_a + u, u

  def body(st):
    it, gamma, _, _ = st
    grad, scale, u = residual(gamma)
    rel = jnp.sum(jnp.square(grad / scale))
    # Converged when every equation holds to rounding, at the scale of its terms.
    done = jnp.all(jnp.abs(grad) <= 4 * k * finfo.eps * scale)
    hess = a_mat + jnp.diag(inv * u / gamma)
    sc = 1 / jnp.sqrt(jnp.diagonal(hess))
    step = sc * _spd_solve(hess * jnp.outer(sc, sc), sc * grad)
    lam2 = jnp.maximum(grad @ step, 0)
    # Multiplicative steps γ ← γ ⊙ exp(−t Δ/γ): the Newton step to first order, always positive, and able to
    # move a weight by orders of magnitude at once; every candidate t is tried.
    z = ts[:, None] * (step / gamma)[None, :]
    moved = gamma * jnp.exp(-z)
    rel_moved = jnp.sum(jnp.square(residual(moved)[0] / scale), axis=1)
    # φ(moved) − φ(γ), without cancellation in the h-part.
    dg = gamma * jnp.expm1(-z)
    e = jnp.where(p == 0, -z, jnp.expm1(-p * z) / p_safe)
    dec = dg @ (gamma @ a_mat) + 0.5 * jnp.sum((dg @ a_mat) * dg, axis=1) - e @ (u * gamma)
    armijo = _ARMIJO * jnp.minimum(ts, 1)
    finite = jnp.isfinite(dec) & jnp.isfinite(rel_moved)
    # The step that most decreases φ (sufficiently); when rounding hides φ's decrease (φ weighs task k by Aₖₖ,
    # which can span many orders of magnitude), the one that most decreases the scaled residual.
    by_phi = finite & (dec <= -armijo * lam2)
    by_rel = finite & (rel_moved <= (1 - 2 * armijo) * rel)
    best = jnp.where(
      jnp.any(by_phi), jnp.argmin(jnp.where(by_phi, dec, jnp.inf)), jnp.argmin(jnp.where(by_rel, rel_moved, jnp.inf))
    )
    moves = jnp.any(by_phi) | jnp.any(by_rel)
    # Once the residual is at √eps, Newton steps square it: a step that does not quarter it is rounding noise.
    stagnant = (rel <= finfo.eps) & (jnp.min(jnp.where(finite, rel_moved, jnp.inf)) > rel / 4)
    finished = done | ~moves | stagnant
    new = jnp.where(finished, gamma, jnp.clip(moved[best], finfo.tiny, finfo.max))
    # A full Newton step's size relative to each weight: the distance to the solution, task by task.
    full = jnp.where(ts[best] == 1, jnp.max(jnp.abs(step / gamma)), jnp.inf)
    return it + 1, new, full, finished

  def cond(st):
    it, _, full, finished = st
    return (it < max_iter) & (full > tol) & ~finished

  tol = finfo.eps ** (2 / 3)
  st = (jnp.int32(0), jnp.ones((k,), dtype), jnp.asarray(jnp.inf, dtype), jnp.asarray(False))
  steps, gamma, _, _ = jax.lax.while_loop(cond, body, st)
  log_w = jnp.log(gamma) - expo * (log_diag + jnp.log(sigma))
  w = jnp.minimum(jnp.exp(jnp.minimum(log_w, jnp.log(finfo.max))), finfo.max)
  w = jnp.where(positive, w, jnp.ones_like(w))
  return (w if present is None else jnp.where(present, w, 0)), steps


@method(static=("max_iter",))
def fairgrad(alpha: float = 1.0, *, max_iter: int = 100) -> WeightingTransform:
  """FairGrad: the step that shares first-order progress among the tasks by α-fairness.

  Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
  Task ``k``'s utility of a direction ``d`` is its loss decrease ``gₖᵀd``; the
  direction maximises ``Σₖ (gₖᵀd)^{1−α}/(1−α)`` (``Σₖ log gₖᵀd`` at ``α = 1``)
  in a ball, and the optimality condition (the paper's eq. 4) is::

      d = Σₖ wₖ gₖ,      G w = w^{−1/α}   (element-wise; wₖ > 0)

  so every task gets ``gₖᵀd = wₖ^{−1/α} > 0``: the direction conflicts with
  no task. ``α`` sets the fairness: ``α → 0`` is the sum of the gradients
  (``w = 1``, the limit of the equation; ``α = 0`` returns it), ``α = 1``
  proportional fairness (the Nash bargaining solution ``G w = 1/w``, the
  weights of :func:`nash_mtl` without ``max_norm``), ``α = 2`` minimum
  potential delay, ``α → ∞`` max-min fairness.

  Solver (:func:`~jmtl.weighting._allocation.alpha_fair_weights`): Newton's
  method on the system (the gradient of a strictly convex potential), with
  multiplicative steps and a line search on the potential (or, where
  rounding hides its decrease, on the scaled residual), from the solution
  for orthogonal gradients; it stops when every equation holds to
  rounding or Newton's steps reach it (3–10 steps as a rule, at most
  ``max_iter``). Tolerance: ``|(Gw)ₖ − wₖ^{−1/α}| ≤ tol·((|G|w)ₖ +
  wₖ^{−1/α})`` for every ``k``, with ``tol`` about 1e-14 in float64 and 6e-6
  in float32, measured by ``tests/test_weighting_more.py`` (α from 0.05 to
  50, gradient norms spanning four orders of magnitude). A weight beyond the
  dtype's range is capped at its largest value, or is 0 below it (at large
  ``α`` a dominated task's weight can be below 1e-300).

  Float32 accuracy (``jax_enable_x64`` off, α = 2; Gramians of condition 1,
  10³, 10⁶; measured by ``tests/test_weighting_more.py``): step length within
  1e-5, 5e-4, 5e-2 (relative), direction within 0.5° at 10⁶. With
  ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-6 at 10⁶.

  The reference code (the authors', LibMTL's and torchjd's ``FairGrad``)
  solves the same system with ``scipy.optimize.least_squares`` from ``1/K``
  with its default tolerances, on the host; jmtl differs in three places: the
  system is solved to rounding level under jit; ``α = 0`` returns ``w = 1``
  (torchjd returns ``1/K``); and a degenerate ``G`` (a zero gradient, two
  opposite gradients: no solution, ``wₖ → ∞``) gets the solvers' ridge, so
  the affected weights are large but finite (as in :func:`nash_mtl`).

  Scale: for ``G → c·G`` the weights scale by ``c^{−α/(α+1)}`` (applied to
  the scaled Gramian's weights as ``2**(−e·α/(α+1))`` for ``gramian_exponent``
  ``e``). So FairGrad's float32 range is where its weights are floats:
  gradients within ``1e±15`` at ``α = 2`` (weights up to ``1e±20``), wider for
  smaller ``α``; beyond, the weights are ``inf`` or ``0`` and the train step
  skips (and reports) the step.

  Args:
    alpha: ``α ≥ 0`` (LibMTL's default, 1).
    max_iter: cap on Newton steps.

  Returns:
    A stateless :class:`WeightingTransform` with ``needs="gramian"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    >>> G = J @ J.T
    >>> w, _ = jmtl.weighting.fairgrad(alpha=2.0).update(jnp.ones(2), (), gramian=G)
    >>> [round(float(x), 4) for x in w]
    [0.7479, 0.4084]
    >>> bool(jnp.allclose(G @ w, w ** -0.5, rtol=1e-5))  # G w = w^(−1/α)
    True
  """
  if is_concrete(alpha) and not alpha >= 0:
    raise ValueError(f"fairgrad: alpha must be non-negative, got {alpha}")
  if int(max_iter) != max_iter or max_iter < 1:
    raise ValueError(f"fairgrad: max_iter must be a positive integer, got {max_iter}")
  max_iter = int(max_iter)

  def weight_fn(losses, *, gramian=None, present=None, gramian_exponent=0, **_):
    g = checked_gramian("fairgrad", losses, gramian)
    present = present_of(losses, present)
    if is_concrete(alpha) and alpha == 0:
      return present.astype(losses.dtype)
    w = alpha_fair_weights(g, alpha, max_iter=max_iter, present=present)
    # G = gramian · 2**e scales the weights by 2**(−e α/(α+1)).
    a = jnp.asarray(alpha, g.dtype)
    return w * jnp.exp2(-jnp.asarray(gramian_exponent, g.dtype) * a / (a + 1))

  return stateless(weight_fn, needs="gramian")


@functools.partial(jax.jit, static_argnames=("max_iter",))
def priority_multipliers(gramian: Array, tau: Array, *, max_iter: int | None = None) -> Array:
  """PCD's QP in weights: ``[1, μ₂, …, μ_K]`` with ``d = g₁ + Σⱼ μⱼ gⱼ`` solving

      min_d ½‖d − g₁‖²   subject to   gⱼᵀd ≥ τⱼ ‖gⱼ‖²,  j = 2, …, K

  (the QP of priority-constrained descent, on the rows of ``J`` whose
  Gramian is ``gramian``), or ``[1, 0, …, 0]`` when the constraints cannot
  hold together. ``μ ≥ 0`` are the constraints' KKT multipliers: the
  stationarity condition is ``d = g₁ + Σⱼ μⱼ gⱼ``, and by duality ``μ``
  minimises ``½ μᵀG_sμ − bᵀμ`` over ``μ ≥ 0``, with ``G_s`` the secondary
  block of ``G`` and ``bⱼ = τⱼ Gⱼⱼ − Gⱼ₁`` (``bⱼ > 0`` iff ``g₁`` violates
  constraint ``j``): one :func:`~jmtl.weighting._solvers.nonneg_qp` on the
  normalised Gramian with the solvers' relative ridge ``R = 16·K·eps·diag``.

  Infeasibility (e.g. two opposite secondary gradients and ``τ > 0``) makes
  the dual unbounded: there is ``μ₀ ≥ 0`` with ``G_s μ₀ = 0`` and
  ``bᵀμ₀ > 0``. The ridged problem then answers ``μ ≈ μ₀·bᵀμ₀/(μ₀ᵀRμ₀)``, of
  order ``1/δ``, whose optimality condition ``bᵀμ = μᵀG_sμ + μᵀRμ`` is
  carried by the ridge term; on a feasible problem that term is ``O(δ)`` of
  ``bᵀμ``. So the constraints are declared infeasible when ``μᵀRμ > ½ bᵀμ``.

  Args:
    gramian: ``(K, K)`` PSD matrix; row and column 0 are the primary task.
    tau: ``(K − 1,)`` fractions in ``[0, 1]``.
    max_iter: iteration cap of the active-set solver (default ``3K + 10``).

  Returns:
    ``(K,)`` weights ``[1, μ]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._allocation import priority_multipliers
    >>> G = jnp.array([[1.0, -0.5], [-0.5, 1.0]])  # g₂ conflicts with g₁
    >>> [round(float(x), 5) for x in priority_multipliers(G, jnp.array([0.0]))]  # g₂ᵀd = 0: μ = ½
    [1.0, 0.5]
  """
  gn, _ = normalise_gramian(gramian)
  k = gn.shape[0]
  one = jnp.ones((1,), gn.dtype)
  if k == 1:
    return one
  gs = gn[1:, 1:]
  diag = jnp.maximum(jnp.diagonal(gs), 0)
  b = tau.astype(gn.dtype) * diag - gn[1:, 0]
  ridge = _ridge_coef(k, gn.dtype) * (diag + jnp.finfo(gn.dtype).tiny)
  mu = nonneg_qp(gs + jnp.diag(ridge), b, max_iter=max_iter)
  carried = mu @ (ridge * mu)
  pull = mu @ b
  infeasible = (pull > 0) & (2 * carried > pull)
  return jnp.concatenate([one, jnp.where(infeasible, 0, mu)])


class PCDState(NamedTuple):
  """State of :func:`pcd`."""

  count: Array  # (K,) int32: calls with a finite Gramian and the task present (the bias correction's exponent)
  sq_norm_ema: Array  # (K,) float: v, the moving average of the squared gradient norms ‖gₖ‖²


@method(static=("max_iter",))
def pcd(
  tau: float | Sequence[float] = 0.02,
  beta: float = 0.999,
  eps: float = 1e-8,
  *,
  max_iter: int | None = None,
) -> WeightingTransform:
  """Priority-constrained descent (PCD): follow the first task, guarantee the others a share of progress.

  "Not All Objectives Are Born Equal: Priority-Constrained Descent for
  Hierarchical Multi-Objective Optimization", TMLR 2026 (as torchjd 0.18's
  ``PCD`` defines it). Task 0 is the primary objective (PCD is not symmetric
  in the tasks: order them so). With ``v̂ₖ`` the bias-corrected moving average
  of ``‖gₖ‖²`` (decay ``β``, this call's norms included), the scales
  ``sₖ = 1/√(v̂ₖ + ε)`` and the normalised gradients ``g̃ₖ = sₖgₖ``::

      d̃ = argmin_d ½‖d − g̃₁‖²   subject to   g̃ⱼᵀd ≥ τⱼ‖g̃ⱼ‖²,  j = 2, …, K
      d = d̃ · ‖g₁‖ / ‖d̃‖

  so each secondary task gets at least a fraction ``τⱼ`` of the progress a
  step along its own normalised gradient would give, and the step has the
  primary gradient's length. ``d̃ = g̃₁ + Σⱼ μⱼ g̃ⱼ`` with the constraints' KKT
  multipliers ``μ ≥ 0``
  (:func:`~jmtl.weighting._allocation.priority_multipliers`, an exact
  active-set solve of the dual), so the weights are
  ``w = [1, μ] ⊙ s · ‖g₁‖/‖d̃‖``. Thanks to the normalisation, ``τ`` is
  scale-free: multiplying a secondary task's gradient by a constant at every
  call leaves the weights of the others and the direction unchanged (up to
  ``ε``). Special cases, as torchjd: ``g₁ = 0`` gives zero weights; so does
  ``d̃ = 0`` up to rounding (``‖d̃‖² ≤ 10·eps·(Σₖ|w̃ₖ|‖g̃ₖ‖)²`` in the input's
  dtype); constraints that cannot hold together (two opposite secondary
  gradients, say) are dropped, giving ``d = g₁`` (``w = [1, 0, …]``); a
  non-finite Gramian gives ``nan`` weights (the train step then skips the
  step) and leaves the moving average unchanged.

  jmtl solves the dual with its active-set solver
  (:func:`~jmtl.weighting._solvers.nonneg_qp`) where torchjd uses the dual
  method of Goldfarb & Idnani: the same minimiser (to the solvers' ridge,
  ``16·K·eps`` relative), with infeasibility detected from the ridge's share
  of the dual optimum instead of a dependence tolerance.

  Range: the moving average holds squared gradient norms in true units, so
  PCD's float32 range is the Gramian's (gradients within about ``1e±18``);
  beyond, its weights are ``nan`` and the train step skips (and reports) the
  step. ``ε`` is absolute, so the weights are scale-free only while ``v̂ ≫ ε``.

  A task without labels in the batch is left out: the first task that has
  labels is the primary, the others keep their order and their ``τ``, and
  the moving average of an absent task does not move.

  State: the ``(K,)`` step counts and moving average (O(K) memory).

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³,
  10⁶; measured by ``tests/test_weighting_more.py``): step length within
  1e-5 (it is ``‖g₁‖`` by construction), direction within 0.05°.

  Args:
    tau: ``τ ∈ [0, 1]``, one for every secondary task or a sequence of
      ``K − 1`` (torchjd's default 0.02).
    beta: ``β ∈ [0, 1)``, the decay of the moving average (default 0.999).
    eps: ``ε ≥ 0``, added to the moving average (default 1e-8).
    max_iter: iteration cap of the active-set solver (default ``3K + 10``).

  Returns:
    A :class:`WeightingTransform` with ``needs="gramian"`` and state
    :class:`PCDState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # the secondary task conflicts with the primary
    >>> t = jmtl.weighting.pcd(tau=0.1)
    >>> w, state = t.update(jnp.ones(2), t.init(2), gramian=J @ J.T)
    >>> [round(float(x), 4) for x in w @ J]  # ‖d‖ = ‖g₁‖; g̃₂ᵀd̃ = τ‖g̃₂‖² (μ = τ + 1/√2)
    [0.6011, 0.7992]
    >>> J = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # no conflict: the primary gradient itself
    >>> t.update(jnp.ones(2), t.init(2), gramian=J @ J.T)[0].tolist()
    [1.0, 0.0]
  """
  tau = np.asarray(tau, np.float64) if is_concrete(tau) else jnp.asarray(tau)
  if is_concrete(tau) and (tau.ndim > 1 or not np.all((tau >= 0) & (tau <= 1))):
    raise ValueError(f"pcd: tau must be a number or a 1-D sequence of numbers in [0, 1], got {tau.tolist()}")
  if is_concrete(beta) and not 0 <= beta < 1:
    raise ValueError(f"pcd: beta must be in [0, 1), got {beta}")
  if is_concrete(eps) and not eps >= 0:
    raise ValueError(f"pcd: eps must be non-negative, got {eps}")

  def init_fn(num_tasks):
    dtype = jax.dtypes.canonicalize_dtype(float)
    return PCDState(jnp.zeros((num_tasks,), jnp.int32), jnp.zeros((num_tasks,), dtype))

  def update_fn(losses, state, **inputs):
    raw = inputs.get("gramian")
    g = checked_gramian("pcd", losses, raw)
    present = present_of(losses, inputs.get("present"))
    k = state.sq_norm_ema.shape[0]
    if losses.shape != (k,) or tau.shape not in ((), (k - 1,)):
      raise ValueError(
        f"pcd: state is for {k} tasks, got losses of shape {losses.shape} and tau of shape {tau.shape} "
        f"(one τ, or one per secondary task)"
      )
    dtype = g.dtype
    # The moving average holds squared norms in true units (G = gramian · 2**e): PCD's range is the Gramian's.
    g = g * power_of_two(inputs.get("gramian_exponent", 0), dtype)
    finite = jnp.all(jnp.isfinite(g))
    g = jnp.where(finite & present[:, None] & present[None, :], g, 0)
    sq = jnp.maximum(jnp.diagonal(g), 0)
    # Only a present task's moving average moves (and counts the call).
    moved = finite & present
    count = jnp.where(moved, state.count + 1, state.count)
    ema = jnp.where(moved, beta * state.sq_norm_ema.astype(dtype) + (1 - beta) * sq, state.sq_norm_ema.astype(dtype))
    debiased = ema / (1 - jnp.asarray(beta, dtype) ** jnp.maximum(count, 1).astype(dtype))
    den = jnp.sqrt(debiased + eps)
    s = jnp.where(present & (den > 0), 1 / jnp.where(den > 0, den, 1), 0)
    gs = g * jnp.outer(s, s)
    # The present tasks keep their order and the first of them is the primary: the problem is solved on the
    # tasks reordered present-first (an absent secondary has a zero row, so its multiplier is 0).
    order = jnp.argsort(jnp.where(present, 0, 1), stable=True)
    taus = jnp.concatenate([jnp.zeros((1,), dtype), jnp.broadcast_to(jnp.asarray(tau, dtype), (k - 1,))])
    w = (
      jnp.zeros((k,), dtype)
      .at[order]
      .set(priority_multipliers(gs[order][:, order], taus[order][1:], max_iter=max_iter))
    )
    sq_primary = sq[order[0]]
    d2 = w @ gs @ w
    magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.diagonal(gs).clip(0))) ** 2
    precision = 10 * jnp.finfo(jnp.promote_types(raw.dtype, jnp.float32)).eps
    moves = (sq_primary > 0) & (d2 > precision * magnitude)
    w = jnp.where(moves, w * s * jnp.sqrt(sq_primary / jnp.where(moves, d2, 1)), 0)
    w = jnp.where(finite, w, jnp.nan)
    new_state = PCDState(count.astype(jnp.int32), ema.astype(state.sq_norm_ema.dtype))
    return w.astype(losses.dtype), new_state

  return WeightingTransform(init_fn, update_fn, "gramian")
