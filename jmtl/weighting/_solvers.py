"""Small exact solvers on a K×K Gramian, shared by the Gramian-level weightings.

Every solver takes ``G = J Jᵀ`` (the task gradients as the rows of ``J``) and
returns weights. They are pure JAX (fixed shapes, ``lax.while_loop`` with a
tolerance and an iteration cap, no host round-trip, no LAPACK call: on CPU
those go through a multi-threaded BLAS that stalls on a busy machine), so
they run inside a jitted step and under ``vmap``; each public solver is also
jitted on its own, so eager calls compile once.

* The minimisers are scale-free (``G → s²G`` leaves them unchanged, or changes
  them by a known factor), so ``G`` is first divided by its mean diagonal:
  gradients of size 1e-8 and 1e8 give the same well-scaled problem. The
  engine hands over ``G`` already divided by a power of two whenever the
  gradients are beyond ``2**±24`` (:func:`jmtl.weighting.scaled_gramian`), so
  the float32 range of a Gramian method is the gradients' (1e±38), not their
  squares' (1e±19); ``tests/test_gramian_range.py`` fuzzes every method at
  1e±30.
* A zero, duplicated or exactly opposite gradient makes ``G`` singular and the
  minimiser non-unique (or, for Nash-MTL, non-existent). A tiny ridge
  ``δ·diag(G)`` (``δ = 16·K·eps`` of the dtype; relative to each task's own
  squared norm, so a tiny task is not swamped) makes every problem strictly
  convex: the solution is then unique (duplicated tasks share their weight
  equally), finite, and within O(δ) of an exact one.
* Accuracy: float64 solutions match closed forms to ~1e-12; float32 ones to
  ~1e-5 relative on well-conditioned Gramians, less as the condition number
  grows (the ridge above is O(δ) of the largest eigenvalue): each method's
  docstring states its float32 bounds at conditions 10³ and 10⁶, which the
  tests measure. With ``jax_enable_x64`` on, every method solves its K×K
  problem in float64 (:func:`jmtl.weighting.checked_gramian`). Only when
  ``G``'s rank is far below ``K`` (more tasks than gradient dimensions) can
  the active set meet a numerically singular block; it then leaves that
  task out and the result is accurate to ~1e-4.

The core is :func:`nonneg_qp`, a Lawson–Hanson active-set method in Gramian
form; the simplex and lower-bound problems reduce to it exactly.

``present`` (``(K,)`` bool, optional) leaves tasks out of a problem: each
solver then solves the problem of the present tasks alone, exactly (the
absent ones are decoupled, :func:`jmtl.weighting._base.decoupled`), and gives
the absent ones weight 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import decoupled

Array = jax.Array


def _ridge_coef(k: int, dtype) -> float:
  return 16.0 * k * float(jnp.finfo(dtype).eps)


def normalise_gramian(gramian: Array) -> tuple[Array, Array]:
  """``(G / σ, σ)`` with ``σ`` the mean diagonal of the symmetrised ``G``.

  ``σ`` falls back to 1 for a zero Gramian (all gradients zero), where any
  positive scale gives the same minimisers.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._solvers import normalise_gramian
    >>> gn, scale = normalise_gramian(jnp.array([[4.0, 2.0], [2.0, 0.0]]))
    >>> gn.tolist(), float(scale)
    ([[2.0, 1.0], [1.0, 0.0]], 2.0)
  """
  g = 0.5 * (gramian + gramian.T)
  scale = jnp.mean(jnp.diagonal(g))
  scale = jnp.where(scale > jnp.finfo(g.dtype).tiny, scale, jnp.ones_like(scale))
  return g / scale, scale


def _ridge(gn: Array) -> Array:
  # Relative to each task's own squared norm, so that a task 1e16 times
  # smaller than the others (in G) is not swamped by the ridge; the tiny
  # floor only keeps a zero gradient's diagonal positive.
  delta = _ridge_coef(gn.shape[0], gn.dtype)
  return delta * (jnp.maximum(jnp.diagonal(gn), 0) + jnp.finfo(gn.dtype).tiny)


class _Carry(NamedTuple):
  it: Array  # () int32
  v: Array  # (K,) current feasible point, zero outside the passive set
  passive: Array  # (K,) bool: the free variables
  blocked: Array  # (K,) bool: variables that cannot be freed without a singular system
  inv: Array  # (K, K) inverse of q on the passive block, identity elsewhere
  last: Array  # () int32: the variable freed by the previous iteration, or -1
  done: Array  # () bool


def nonneg_qp(q: Array, p: Array, *, max_iter: int | None = None) -> Array:
  """``argmin_{v ≥ 0} ½ vᵀ q v − pᵀ v`` for a symmetric positive-definite ``q``.

  Lawson & Hanson's active-set NNLS ("Solving Least Squares Problems", 1974,
  ch. 23) written on the normal equations. The inverse of the free block is
  updated by one symmetric rank-one term per iteration (bordering when a
  variable is freed, a downdate when one is dropped) and each solve gets one
  step of iterative refinement, so an iteration costs O(K²) and calls no
  LAPACK routine. It ends at the exact minimiser (up to rounding) after
  about as many iterations as the solution has positive entries; an
  interior solution (all entries positive) is found by one Cholesky solve
  before the loop, which then does not run. A variable
  whose freeing would make the free block numerically singular, or that
  cycles, is kept at zero.

  Args:
    q: ``(K, K)`` symmetric positive-definite matrix.
    p: ``(K,)`` linear term.
    max_iter: iteration cap (default ``3K + 10``).

  Returns:
    ``v`` of shape ``(K,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._solvers import nonneg_qp
    >>> v = nonneg_qp(jnp.array([[2.0, 1.0], [1.0, 2.0]]), jnp.array([1.0, -1.0]))
    >>> [round(float(x), 6) for x in v]  # unconstrained minimiser is (1, -1)
    [0.5, 0.0]
  """
  k = q.shape[-1]
  dtype = q.dtype
  eps = jnp.finfo(dtype).eps
  max_iter = 3 * k + 10 if max_iter is None else max_iter
  idx = jnp.arange(k)
  # Jacobi scaling v = S ṽ keeps the constraint ṽ ≥ 0 and gives the scaled q a
  # unit diagonal (so |q_ij| ≤ 1), and the tolerances below become relative.
  d = jnp.diagonal(q)
  scale = jnp.where(d > jnp.finfo(dtype).tiny, 1 / jnp.sqrt(jnp.where(d > 0, d, 1)), 1)
  q = q * jnp.outer(scale, scale)
  p = p * scale
  diag = jnp.diagonal(q)

  def body(c):
    pp = jnp.where(c.passive, p, 0)
    z = c.inv @ pp
    # The inverse is updated, never refactorised, so it drifts; one step of
    # iterative refinement keeps z at working precision for K² flops.
    z = jnp.where(c.passive, z + c.inv @ jnp.where(c.passive, pp - q @ z, 0), 0)
    feasible = jnp.all(jnp.where(c.passive, z > 0, True))

    # Feasible: z is optimal on the free set; free the most violated variable.
    # (One-hot vectors instead of dynamic indexing: under vmap, as in UPGrad,
    # they stay matmuls and fused element-wise ops instead of gathers/scatters.)
    grad = p - q @ z
    tol = 8 * k * eps * (jnp.max(jnp.abs(p)) + jnp.sum(jnp.abs(z)))
    score = jnp.where(c.passive | c.blocked, -jnp.inf, grad)
    e_add = idx == jnp.argmax(score)
    want_add = feasible & (jnp.max(score) > tol)
    col = jnp.where(c.passive, q @ e_add.astype(dtype), 0)
    y = c.inv @ col
    schur = diag @ e_add - col @ y
    # The bordered block stays positive definite only if its Schur complement
    # is clearly positive; otherwise the variable is (numerically) redundant.
    ok = schur > 4 * k * eps
    add = want_add & ok

    # Infeasible: step from v towards z until a free variable hits zero; drop it.
    denom = c.v - z
    ratio = jnp.where(c.passive & (z <= 0), c.v / jnp.where(denom > 0, denom, 1), jnp.inf)
    e_rm = idx == jnp.argmin(ratio)
    alpha = jnp.clip(jnp.min(ratio), 0, 1)
    v_step = jnp.where(c.passive & ~e_rm, jnp.maximum(c.v + alpha * (z - c.v), 0), 0)
    b = c.inv @ e_rm.astype(dtype)
    b_jj = b @ e_rm
    b_jj = jnp.where(b_jj > 0, b_jj, 1)

    # Both changes of the free set are inv + coef·x xᵀ ± e eᵀ: bordering
    # (x = inv·q_j − e_j, coef = 1/schur) or downdate (x = inv e_j, coef = −1/b_jj).
    x = jnp.where(add, y - e_add, jnp.where(feasible, 0, b))
    coef = jnp.where(add, 1 / jnp.where(ok, schur, 1), jnp.where(feasible, 0, -1 / b_jj))
    e = jnp.where(add, e_add, e_rm).astype(dtype) * jnp.where(add, -1, jnp.where(feasible, 0, 1)).astype(dtype)
    inv = c.inv + coef * jnp.outer(x, x) + jnp.diag(e)
    passive = jnp.where(add, c.passive | e_add, jnp.where(feasible, c.passive, c.passive & ~e_rm))
    # A variable freed at zero that must be dropped at once would cycle forever.
    cycled = ~feasible & (jnp.argmin(ratio) == c.last) & (c.v @ e_rm <= 0)
    blocked = c.blocked | (want_add & ~ok & e_add) | (cycled & e_rm)
    return _Carry(
      it=c.it + 1,
      v=jnp.where(feasible, z, v_step),
      passive=passive,
      blocked=blocked,
      inv=inv,
      last=jnp.where(add, jnp.argmax(score), -1).astype(jnp.int32),
      done=feasible & ~want_add,
    )

  # An interior minimiser (every variable positive: MGDA among tasks that
  # mostly agree, say) needs no active set: the solution of the whole system,
  # refined once, meets the KKT conditions with no active constraint. One
  # Cholesky factorisation checks that; otherwise (or if q is numerically not
  # positive definite) the loop starts from the empty set as usual.
  factor = jax.scipy.linalg.cho_factor(q)
  full = jax.scipy.linalg.cho_solve(factor, p)
  full = full + jax.scipy.linalg.cho_solve(factor, p - q @ full)
  interior = jnp.all(full > 0) & jnp.all(jnp.isfinite(full))
  no = jnp.zeros((k,), bool)
  v0 = jnp.where(interior, full, 0).astype(dtype)
  carry = _Carry(jnp.int32(0), v0, no | interior, no, jnp.eye(k, dtype=dtype), jnp.int32(-1), interior)
  carry = jax.lax.while_loop(lambda c: ~c.done & (c.it < max_iter), body, carry)
  return carry.v * scale


def _simplex_from_normalised(an: Array, max_iter: int | None = None, present: Array | None = None) -> Array:
  """``argmin_{w ∈ Δ} wᵀ A w`` for a normalised PSD ``A``, via one :func:`nonneg_qp`.

  With ``u = t·w`` (``t ≥ 0``, ``w ∈ Δ``), ``uᵀ(A + 11ᵀ)u − 2·1ᵀu =
  t²(wᵀAw + 1) − 2t``, whose minimum over ``t`` is ``−1/(wᵀAw + 1)``: the
  non-negative QP's solution is ``t*·w*`` with ``t* = 1/(w*ᵀAw* + 1) > 0``
  (the least-distance-programming trick of Lawson & Hanson, ch. 23).
  """
  k = an.shape[0]
  q = an + jnp.diag(_ridge(an)) + jnp.ones_like(an)
  p = jnp.ones((k,), an.dtype)
  if present is not None:
    # An absent task, decoupled with a zero linear term, stays at 0.
    q, p = decoupled(q, present), present.astype(an.dtype)
  v = nonneg_qp(q, p, max_iter=max_iter)
  total = jnp.sum(v)
  return jnp.where(total > 0, v / jnp.where(total > 0, total, 1), p / jnp.maximum(jnp.sum(p), 1))


def _shifted(g: Array, offset: Array) -> Array:
  """``(I + 1oᵀ) G (I + o1ᵀ)``: the Gramian of the gradients ``gₖ + Jᵀo``."""
  go = g @ offset
  return g + go[:, None] + go[None, :] + offset @ go


@functools.partial(jax.jit, static_argnames=("max_iter",))
def simplex_qp(
  gramian: Array, offset: Array | None = None, *, max_iter: int | None = None, present: Array | None = None
) -> Array:
  """``argmin_{w ∈ Δ} (w + offset)ᵀ G (w + offset)`` over the probability simplex.

  With ``offset = None`` this is the min-norm point of the convex hull of the
  task gradients (MGDA). An offset ``o`` asks for the hull point nearest to
  ``−Jᵀo``: on the simplex ``Jᵀ(w + o) = Jᵀ(I + o1ᵀ)w``, so it is the same
  problem on the Gramian ``(I + 1oᵀ) G (I + o1ᵀ)`` of the shifted gradients
  ``gₖ + Jᵀo``. This covers any linear term in the range of ``G``.

  Args:
    gramian: ``(K, K)`` PSD matrix ``J Jᵀ``.
    offset: optional ``(K,)`` vector ``o``.
    max_iter: iteration cap of the active-set loop.
    present: optional ``(K,)`` bool: the simplex of these tasks only.

  Returns:
    ``w`` of shape ``(K,)``, ``w ≥ 0``, ``Σ w = 1``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._solvers import simplex_qp
    >>> w = simplex_qp(jnp.array([[1.0, 0.0], [0.0, 4.0]]))  # orthogonal, norms 1 and 2
    >>> [round(float(x), 5) for x in w]
    [0.8, 0.2]
  """
  gn, _ = normalise_gramian(gramian)
  if offset is not None:
    gn, _ = normalise_gramian(_shifted(gn, offset.astype(gn.dtype)))
  return _simplex_from_normalised(gn, max_iter=max_iter, present=present)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def lower_bound_qp(gramian: Array, lower: Array, *, max_iter: int | None = None, present: Array | None = None) -> Array:
  """``argmin_{u ≥ lower} uᵀ G u`` (element-wise bound).

  ``Jᵀu`` is then the projection of ``Jᵀlower`` onto the dual cone
  ``{d : J d ≥ 0}`` (the dual of that projection; Quinton & Rey, "Jacobian
  Descent for Multi-Objective Optimization", 2024): ``u = lower + v`` gives
  :func:`nonneg_qp` with ``q = G``, ``p = −G·lower``.

  Args:
    gramian: ``(K, K)`` PSD matrix ``J Jᵀ``.
    lower: ``(K,)`` bound, or ``(N, K)`` for ``N`` problems on the same ``G``.
    max_iter: iteration cap of the active-set loop.
    present: optional ``(K,)`` bool: the problem of these tasks only (an
      absent task's bound counts as 0 and its ``u`` is 0).

  Returns:
    ``u`` shaped like ``lower``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._solvers import lower_bound_qp
    >>> g = jnp.array([[1.0, -1.0], [-1.0, 4.0]])  # the two gradients conflict
    >>> [round(float(x), 5) for x in lower_bound_qp(g, jnp.array([1.0, 0.0]))]
    [1.0, 0.25]
  """
  gn, _ = normalise_gramian(gramian)
  a = gn + jnp.diag(_ridge(gn))
  if present is not None:
    a = decoupled(a, present)
    lower = jnp.where(present, lower, 0)

  def one(b):
    b = b.astype(a.dtype)
    return b + nonneg_qp(a, -(a @ b), max_iter=max_iter)

  return one(lower) if lower.ndim == 1 else jax.vmap(one)(lower)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def cagrad_qp(gramian: Array, c: float, *, max_iter: int = 64, present: Array | None = None) -> tuple[Array, Array]:
  """CAGrad's inner problem: ``w* = argmin_{w ∈ Δ} g_wᵀg₀ + c‖g₀‖ ‖g_w‖``.

  Here ``g_w = Jᵀw`` and ``g₀`` is the mean gradient (Liu et al.,
  "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021).
  With ``x = g_w`` ranging over the hull ``C`` of the gradients and
  ``s = c‖g₀‖``, ``x*`` minimises ``g₀ᵀx + s‖x‖`` iff ``x* = Π_C(−τg₀)`` with
  ``‖x*‖ = sτ``. Each ``Π_C(−τg₀)`` is a :func:`simplex_qp` with offset
  ``τ/K·1``, so the scalar equation ``h(τ) = ‖Π_C(−τg₀)‖ − sτ = 0`` (``h(0) ≥
  0``, ``h(max‖gₖ‖/s) ≤ 0``, ``h`` continuous) is solved by the Illinois
  variant of regula falsi (superlinear; a few solves in practice).

  Args:
    gramian: ``(K, K)`` PSD matrix ``J Jᵀ``.
    c: ``c ≥ 0``.
    max_iter: cap on the root-finding iterations.
    present: optional ``(K,)`` bool: the problem of these tasks only (``g₀``
      their mean).

  Returns:
    ``(w*, s/‖g_w*‖)``: the simplex weights and the coefficient of ``g_w*`` in
    CAGrad's direction (0 when ``s = 0`` or when ``‖g_w*‖`` is below the
    solver's resolution, where ``g₀`` itself solves the primal problem).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._solvers import cagrad_qp
    >>> w, coef = cagrad_qp(jnp.array([[1.0, 0.0], [0.0, 1.0]]), 0.5)
    >>> [round(float(x), 5) for x in w], round(float(coef), 5)  # symmetric: w* = (½, ½)
    ([0.5, 0.5], 0.5)
  """
  gn, _ = normalise_gramian(gramian)
  k = gn.shape[0]
  dtype = gn.dtype
  eps = jnp.finfo(dtype).eps
  if present is None:
    m = jnp.full((k,), 1.0 / k, dtype)
  else:
    gn = jnp.where(present[:, None] & present[None, :], gn, 0)
    m = present.astype(dtype) / jnp.maximum(jnp.sum(present), 1)
  s = c * jnp.sqrt(jnp.maximum(m @ gn @ m, 0))
  # s = 0 (c = 0 or g₀ = 0) makes the coefficient 0 whatever w*; a floor keeps
  # the bracket finite meanwhile.
  s_safe = jnp.maximum(s, jnp.sqrt(eps))

  def h(tau):
    w = _simplex_from_normalised(normalise_gramian(_shifted(gn, tau * m))[0], present=present)
    return jnp.sqrt(jnp.maximum(w @ gn @ w, 0)) - s_safe * tau, w

  tau_hi = jnp.sqrt(jnp.max(jnp.diagonal(gn))) / s_safe

  def cond(st):
    it, a, _, b, fb, _ = st
    unresolved = jnp.abs(fb) > 8 * k * eps * (1 + s_safe * jnp.abs(b))
    return (it == 0) | ((it < max_iter) & unresolved & (jnp.abs(b - a) > 4 * eps * tau_hi))

  def body(st):
    # Iterations 0 and 1 evaluate the bracket's ends (b = 0, then a = τ_hi),
    # so that the solver appears once in the compiled loop, not three times.
    it, a, fa, b, fb, w_prev = st
    den = fb - fa
    t = jnp.where(den != 0, (a * fb - b * fa) / jnp.where(den != 0, den, 1), 0.5 * (a + b))
    t = jnp.clip(t, jnp.minimum(a, b), jnp.maximum(a, b))
    t = jnp.where(it == 0, 0, jnp.where(it == 1, tau_hi, t))
    ft, wt = h(t)
    same = ft * fb > 0
    # Illinois: when the same end is kept twice, halve its value so that the
    # secant does not stall on one side (superlinear instead of linear).
    a, fa = jnp.where(same, a, b), jnp.where(same, 0.5 * fa, fb)
    new = (a, fa, t, ft, wt)
    return it + 1, *(jnp.where(it == 1, x, y) for x, y in zip((tau_hi, ft, b, fb, w_prev), new))

  # After iteration 0, b = 0 is the latest point, so a root there (h(0) = 0:
  # 0 is in the hull) stops the loop before τ_hi is even evaluated.
  one = jnp.ones((), dtype)
  st = (jnp.int32(0), tau_hi, -one, 0 * one, one, m)
  w = jax.lax.while_loop(cond, body, st)[5]
  n = jnp.sqrt(jnp.maximum(w @ gn @ w, 0))
  # Below the ridge's resolution ‖g_w‖ carries no direction, and d = g₀ is
  # then an optimum of CAGrad's primal problem (the ball constraint is slack).
  resolved = (n > jnp.sqrt(_ridge_coef(k, dtype))) & (s > 0)
  coef = jnp.where(resolved, s / jnp.where(resolved, n, 1), 0)
  return w, coef


def _spd_solve(a: Array, b: Array) -> Array:
  """``a⁻¹ b`` for a symmetric positive-definite ``a``.

  Gauss–Jordan elimination without pivoting (stable for SPD matrices) in
  plain XLA ops: LAPACK custom calls on CPU go through a multi-threaded BLAS
  whose threads, on a busy machine, turn a 10 µs factorisation into 10 ms.
  """
  k = a.shape[0]

  def step(j, m):
    row = m[j] / m[j, j]
    return (m - jnp.outer(m[:, j], row)).at[j].set(row)

  return jax.lax.fori_loop(0, k, step, jnp.concatenate([a, b[:, None]], axis=1))[:, k]


@functools.partial(jax.jit, static_argnames=("max_iter",))
def nash_bargaining(
  gramian: Array, *, init: Array | None = None, max_iter: int = 100, present: Array | None = None
) -> Array:
  """``α > 0`` with ``G α = 1/α`` (element-wise): the Nash bargaining solution.

  Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022. The
  equation is the stationarity condition of the strictly convex
  ``½ αᵀGα − Σₖ log αₖ``, minimised here by damped Newton steps
  ``α ← α − Δ/(1 + λ)`` (``λ`` the Newton decrement): the function is
  self-concordant, so these steps stay in ``α > 0`` and converge
  quadratically (Boyd & Vandenberghe, "Convex Optimization", §9.6). Before
  each step ``α`` is rescaled to its best multiple (``αᵀGα = K``, an exact
  line search along the ray), which skips the slow start from a badly scaled
  guess. The equation is invariant to rescaling tasks (``α = β/‖g‖``, ``β``
  solving it for the cosine matrix), so it is solved for the cosine matrix,
  whose diagonal is 1 whatever the gradient scales.

  For a singular ``G`` with a non-negative null vector (a zero gradient,
  exactly opposite gradients) no solution exists (the objective is unbounded
  below). The ridge makes it exist: the affected weights come out large
  (∝ δ^-½) but finite, and their contribution to ``Jᵀα`` stays bounded.

  Args:
    gramian: ``(K, K)`` PSD matrix ``J Jᵀ``.
    init: optional warm start, in the units of the output (entries that are
      not positive and finite start from the default).
    max_iter: cap on Newton steps.
    present: optional ``(K,)`` bool: the bargaining of these tasks only.

  Returns:
    ``α`` of shape ``(K,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl.weighting._solvers import nash_bargaining
    >>> a = nash_bargaining(jnp.array([[1.0, 0.0], [0.0, 4.0]]))
    >>> [round(float(x), 5) for x in a]  # orthogonal gradients: αₖ = 1/‖gₖ‖
    [1.0, 0.5]
  """
  gn, scale = normalise_gramian(gramian)
  k = gn.shape[0]
  dtype = gn.dtype
  eps = jnp.finfo(dtype).eps
  delta = _ridge_coef(k, dtype)
  # A zero gradient has no direction; the floor treats it as a gradient of
  # relative norm δ orthogonal to the others.
  norms = jnp.maximum(jnp.sqrt(jnp.maximum(jnp.diagonal(gn), 0)), delta)
  cos = jnp.clip(gn / jnp.outer(norms, norms), -1, 1)
  cos = cos.at[jnp.diag_indices(k)].set(1 + delta)
  if present is not None:
    cos = decoupled(cos, present)
  to_beta = norms * jnp.sqrt(scale)
  if init is None:
    beta0 = jnp.ones((k,), dtype)
  else:
    beta0 = init.astype(dtype) * to_beta
    beta0 = jnp.where((beta0 > 0) & jnp.isfinite(beta0), beta0, 1)

  def body(st):
    it, beta, _ = st
    beta = beta * jnp.sqrt(k / jnp.maximum(beta @ cos @ beta, jnp.finfo(dtype).tiny))
    grad = cos @ beta - 1 / beta
    step = _spd_solve(cos + jnp.diag(1 / (beta * beta)), grad)
    lam2 = jnp.maximum(grad @ step, 0)
    beta = beta - step / (1 + jnp.sqrt(lam2))
    # Damped steps keep β > 0 in exact arithmetic; the floor guards rounding.
    return it + 1, jnp.maximum(beta, jnp.finfo(dtype).tiny), lam2

  st = (jnp.int32(0), beta0, jnp.asarray(jnp.inf, dtype))
  _, beta, _ = jax.lax.while_loop(lambda st: (st[0] < max_iter) & (st[2] > k * eps), body, st)
  alpha = beta / to_beta
  return alpha if present is None else jnp.where(present, alpha, 0)


def project_simplex(v: Array, present: Array | None = None) -> Array:
  """The Euclidean projection of ``v`` onto the probability simplex ``{w ≥ 0, Σ w = 1}``.

  With ``present`` (``(K,)`` bool), the projection of the present entries
  onto the simplex of the present tasks; the others are 0.

  The sort-based rule (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with
  ``u`` sorted descending and ``ρ`` the largest index with
  ``uᵨ > (Σ_{i≤ρ} uᵢ − 1)/ρ``, ``w = max(v − θ, 0)`` for
  ``θ = (Σ_{i≤ρ} uᵢ − 1)/ρ``. Exact, ``O(K log K)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> [round(x, 6) for x in project_simplex(jnp.array([0.5, 0.5, 0.5])).tolist()]
    [0.333333, 0.333333, 0.333333]
    >>> project_simplex(jnp.array([2.0, 0.0])).tolist()
    [1.0, 0.0]
  """
  if present is not None:
    # Below max(v) − 1 ≤ θ, an entry is projected to 0 without changing θ.
    low = jnp.max(jnp.where(present, v, -jnp.inf)) - 2
    v = jnp.where(present, v, jnp.where(jnp.any(present), low, 0))
  u = jnp.sort(v)[::-1]
  css = jnp.cumsum(u)
  idx = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
  # Written as u·i − css > −1: at i = 1 it is exactly 0 > −1, whatever the rounding of a huge u.
  rho = jnp.maximum(jnp.sum(u * idx - css > -1), 1)
  theta = (css[rho - 1] - 1) / rho.astype(v.dtype)
  return jnp.maximum(v - theta, 0)


def simplex_step_on_present(lam: Array, present: Array, step):
  """``(weights, new λ)``: ``step`` on the present tasks' share of ``λ``, rescaled to their simplex.

  A task without labels in the batch is left out: the present entries of
  ``λ``, divided by their sum ``m``, take the step (which projects them
  onto the present tasks' simplex) and are the weights; the new ``λ`` is
  ``m`` times them, with the absent entries as they were (so ``λ`` stays on
  the simplex of all tasks). With every task present this is ``step(λ)``.
  """
  every = jnp.all(present)  # then exactly step(λ), without the rounding of a division by Σλ ≈ 1
  mass = jnp.where(every, 1, jnp.sum(jnp.where(present, lam, 0)))
  ok = mass > 0
  share = jnp.where(present, lam / jnp.where(ok, mass, 1), 0)
  share = jnp.where(ok, share, present.astype(lam.dtype) / jnp.maximum(jnp.sum(present), 1))
  weights = step(share)
  return weights, jnp.where(present & ok, mass * weights, lam)
