"""Gramian-level weightings: MGDA, UPGrad, DualProj, CAGrad and Nash-MTL.

Each sees only ``G = J Jᵀ`` (``K×K``, the unweighted task gradients of the
shared parameters as the rows of ``J``) and returns weights ``w`` whose
direction is ``Jᵀw = Σₖ wₖ gₖ``: every one of these methods moves along a
linear combination of the task gradients, so ``G`` is all it needs. The
solvers are in :mod:`jmtl.weighting._solvers`: exact, jit-friendly and
finite on degenerate ``G`` (zero, duplicated or opposite gradients).

Like every transform, they chain: ``chain(static(p), upgrad())`` runs UPGrad
on the gradients ``pₖ gₖ``; for UPGrad and DualProj that is torchjd's
preference vector ``p/K`` (the dual cone does not change when rows are
rescaled).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_gramian
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import method
from jmtl.weighting._base import power_of_two
from jmtl.weighting._base import present_of
from jmtl.weighting._base import stateless
from jmtl.weighting._solvers import cagrad_qp
from jmtl.weighting._solvers import lower_bound_qp
from jmtl.weighting._solvers import nash_bargaining
from jmtl.weighting._solvers import normalise_gramian
from jmtl.weighting._solvers import simplex_qp

Array = jax.Array


_MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@method(static=("max_iter",))
def mgda(normalization: str = "none", *, max_iter: int | None = None) -> WeightingTransform:
  """Multiple-gradient descent (MGDA): the min-norm point of the gradients' hull.

  Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
  NeurIPS 2018 (after Désidéri, "Multiple-gradient descent algorithm", 2012)::

      w = argmin_{w ≥ 0, Σw = 1} wᵀ G w,      direction Σₖ wₖ gₖ

  The direction has a non-negative inner product with every task gradient
  (it is zero only at a Pareto-stationary point). The paper solves this with
  Frank–Wolfe; here it is solved exactly (:func:`~jmtl.weighting._solvers.simplex_qp`).

  ``normalization`` is the paper's gradient normalisation: the problem is
  solved for ``gₖ / nₖ`` with ``nₖ = 1`` (``"none"``), ``‖gₖ‖`` (``"l2"``),
  ``Lₖ`` (``"loss"``) or ``Lₖ‖gₖ‖`` (``"loss+"``), and, as in the authors'
  code, the resulting weights are applied to the raw losses, so the
  normalisation only chooses which convex combination is taken. (For the
  min-norm point of the normalised gradients themselves, chain a transform
  with weights ``1/nₖ`` before ``mgda()``.) Non-positive or non-finite ``nₖ``
  count as 1; ``nₖ`` below ``eps·max n`` are raised to it.

  Scale: the weights do not change when ``J`` is scaled; the direction scales
  with it.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 1e-5, 1e-5 (relative), direction
  within 0.5° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-5 at 10⁶.

  Args:
    normalization: one of ``"none"``, ``"l2"``, ``"loss"``, ``"loss+"``.
    max_iter: iteration cap of the active-set solver (default ``3K + 10``).

  Returns:
    A stateless :class:`WeightingTransform` with ``needs="gramian"``; the
    weights sum to 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> w, _ = jmtl.weighting.mgda().update(jnp.ones(2), (), gramian=J @ J.T)
    >>> [round(float(x), 5) for x in w]  # 2 tasks: α = (g₂ − g₁)·g₂ / ‖g₁ − g₂‖²
    [0.6, 0.4]
    >>> [round(float(x), 5) for x in jmtl.weighting.aggregate(jmtl.weighting.mgda(), J)]
    [0.0, 1.0, 1.0]
  """
  if normalization not in _MGDA_NORMALIZATIONS:
    raise ValueError(f"mgda: normalization must be one of {_MGDA_NORMALIZATIONS}, got {normalization!r}")

  def weight_fn(losses, *, gramian=None, present=None, **_):
    g = checked_gramian("mgda", losses, gramian)
    present = present_of(losses, present)
    if normalization != "none":
      g, _ = normalise_gramian(g)  # so that dividing by n below cannot overflow
      norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
      loss = jax.lax.stop_gradient(losses).astype(g.dtype)
      n = {"l2": norms, "loss": loss, "loss+": loss * norms}[normalization]
      n = jnp.where((n > 0) & jnp.isfinite(n), n, 1)
      # A common factor does not change the minimiser; the floor bounds the
      # rescaled Gramian by K/eps².
      n = jnp.maximum(n / jnp.max(n), jnp.finfo(g.dtype).eps)
      g = g / jnp.outer(n, n)
    return simplex_qp(g, max_iter=max_iter, present=present)

  return stateless(weight_fn, needs="gramian")


@method(static=("max_iter",))
def upgrad(*, max_iter: int | None = None) -> WeightingTransform:
  """Unconflicting projection of gradients (UPGrad).

  Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
  (arXiv:2406.16232). Every task gradient is projected onto the dual cone
  ``{d : J d ≥ 0}`` of all of them, and the projections are averaged. In
  weights (the paper's dual of the projection: ``Π(Jᵀb) = Jᵀu`` with
  ``u = argmin_{u ≥ b} uᵀGu``)::

      u⁽ⁱ⁾ = argmin_{u ≥ eᵢ} uᵀ G u,      w = (1/K) Σᵢ u⁽ⁱ⁾

  The mean (not the sum) matches torchjd's ``UPGrad()``. The direction never
  conflicts with a task (``J Jᵀw ≥ 0``) and equals the mean gradient when no
  two gradients conflict. A preference vector ``p`` (the paper's
  ``Σᵢ pᵢ Π(gᵢ)``) is ``chain(static(K·p), upgrad())``.

  Scale: the weights do not change when ``J`` is scaled; the direction scales
  with it. Cost: ``K`` active-set solves on the ``K×K`` Gramian, batched.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 5e-5, 2e-3 (relative), direction
  within 1° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-5 at 10⁶.

  Args:
    max_iter: iteration cap of each active-set solve (default ``3K + 10``).

  Returns:
    A stateless :class:`WeightingTransform` with ``needs="gramian"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> d = jmtl.weighting.aggregate(jmtl.weighting.upgrad(), J)
    >>> [round(float(x), 4) for x in d]
    [0.2924, 1.9006, 1.9006]
  """

  def weight_fn(losses, *, gramian=None, present=None, **_):
    g = checked_gramian("upgrad", losses, gramian)
    present = present_of(losses, present)
    k = g.shape[0]
    u = lower_bound_qp(g, jnp.eye(k, dtype=g.dtype), max_iter=max_iter, present=present)
    return jnp.sum(u, axis=0) / jnp.maximum(jnp.sum(present), 1)

  return stateless(weight_fn, needs="gramian")


@method(static=("max_iter",))
def dualproj(*, max_iter: int | None = None) -> WeightingTransform:
  """The mean gradient projected onto the dual cone of the gradients (DualProj).

  Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
  (arXiv:2406.16232), after Lopez-Paz & Ranzato, "Gradient Episodic Memory
  for Continual Learning", NeurIPS 2017 (its eq. 11)::

      w = argmin_{u ≥ 1/K} uᵀ G u,      direction Π_{J d ≥ 0}((1/K) Σₖ gₖ)

  The direction never conflicts with a task and is the mean gradient when
  that one conflicts with none. A preference vector ``p`` (projecting
  ``Σₖ pₖ gₖ``) is ``chain(static(K·p), dualproj())``.

  Scale: the weights do not change when ``J`` is scaled; the direction scales
  with it.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 1e-5, 5e-5 (relative), direction
  within 1° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-5 at 10⁶.

  Args:
    max_iter: iteration cap of the active-set solver (default ``3K + 10``).

  Returns:
    A stateless :class:`WeightingTransform` with ``needs="gramian"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> d = jmtl.weighting.aggregate(jmtl.weighting.dualproj(), J)
    >>> [round(float(x), 4) for x in d]  # the mean (1, 1, 1) conflicts with g₁
    [0.5556, 1.1111, 1.1111]
  """

  def weight_fn(losses, *, gramian=None, present=None, **_):
    g = checked_gramian("dualproj", losses, gramian)
    present = present_of(losses, present)
    mean = present.astype(g.dtype) / jnp.maximum(jnp.sum(present), 1)
    return lower_bound_qp(g, mean, max_iter=max_iter, present=present)

  return stateless(weight_fn, needs="gramian")


@method(static=("max_iter",))
def cagrad(c: float = 0.5, *, rescale: bool = True, max_iter: int = 64) -> WeightingTransform:
  """Conflict-averse gradient descent (CAGrad).

  Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
  Multi-task Learning", NeurIPS 2021. With ``g₀`` the mean gradient and
  ``φ = c²‖g₀‖²``, the direction maximises the worst task's improvement within
  a ball of radius ``√φ`` around ``g₀``; by duality (the paper's Alg. 1)::

      w* = argmin_{w ∈ Δ} g_wᵀ g₀ + √φ ‖g_w‖,    d = g₀ + (√φ / ‖g_w*‖) g_w*

  so the weights are ``1/K + (√φ/‖g_w*‖) w*``. With ``rescale=True`` (the
  default; the authors' released code with its option ``rescale=1``) they are
  divided by ``1 + c²``, which keeps the step near ``‖g₀‖`` for large ``c``;
  ``rescale=False`` is the paper's Alg. 1 (and torchjd's ``CAGrad``). The
  inner problem is solved exactly
  (:func:`~jmtl.weighting._solvers.cagrad_qp`). When ``‖g_w*‖`` is zero to
  working precision the ball constraint is slack and ``d = g₀``.

  Scale: the weights do not change when ``J`` is scaled. ``c = 0`` is equal
  weighting ``1/K``.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 1e-5, 1e-5 (relative), direction
  within 0.05° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-5 at 10⁶.

  Args:
    c: the radius factor ``c ≥ 0``: how far from the mean gradient the
      direction may move to help the worst-off task.
    rescale: divide the weights by ``1 + c²``.
    max_iter: cap on the outer root-finding iterations.

  Returns:
    A stateless :class:`WeightingTransform` with ``needs="gramian"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> d = jmtl.weighting.aggregate(jmtl.weighting.cagrad(0.5, rescale=False), J)
    >>> [round(float(x), 4) for x in d]
    [0.1835, 1.2041, 1.2041]
  """
  if is_concrete(c) and not c >= 0:
    raise ValueError(f"cagrad: c must be non-negative, got {c}")

  def weight_fn(losses, *, gramian=None, present=None, **_):
    g = checked_gramian("cagrad", losses, gramian)
    present = present_of(losses, present)
    w_star, coef = cagrad_qp(g, c, max_iter=max_iter, present=present)
    w = present.astype(g.dtype) / jnp.maximum(jnp.sum(present), 1) + coef * w_star
    return w / (1 + c * c) if rescale else w

  return stateless(weight_fn, needs="gramian")


class NashMTLState(NamedTuple):
  """State of :func:`nash_mtl`."""

  step: Array  # () int32: update calls so far
  weights: Array  # (K,) float: α of the last solve (0 before the first), reused between solves; the next warm start


@method(static=("max_iter", "update_weights_every"))
def nash_mtl(
  *,
  max_norm: float | None = None,
  update_weights_every: int = 1,
  normalize_gramian: bool = False,
  max_iter: int = 100,
) -> WeightingTransform:
  """Nash-MTL: the Nash bargaining solution among the tasks.

  Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
  Learning as a Bargaining Game", ICML 2022. The weights ``α > 0`` solve::

      G α = 1/α   (element-wise),      direction Σₖ αₖ gₖ

  i.e. every task gets ``gₖ·d = 1/αₖ``. The paper approximates the solution
  with a few convex-concave steps through cvxpy; here the equivalent strictly
  convex problem ``min ½αᵀGα − Σ log αₖ`` is solved to convergence by damped
  Newton on ``K×K`` (:func:`~jmtl.weighting._solvers.nash_bargaining`).

  Scale: the direction does not change when ``J`` (or any single task's
  gradient) is scaled; ``αₖ`` scales as ``1/‖gₖ‖``, and ``‖d‖ = √K`` (since
  ``dᵀd = αᵀGα = Σ αₖ/αₖ``). The authors' code divides ``G`` by its
  Frobenius norm before the solve and puts the same factor back into every
  constraint, so its ``α`` solves ``Gα = 1/α`` on the unnormalised ``G``
  too; ``normalize_gramian=True`` does the same: it solves on
  ``Gₙ = G/‖G‖_F`` (better conditioned at extreme gradient scales) and
  returns ``αₙ/‖G‖_F^½``, the same ``α`` and step length as without.

  Range: ``α`` is solved on the scaled Gramian and divided by
  ``2**(gramian_exponent/2)``, so it is right wherever ``α ∝ 1/‖g‖`` is a float
  (gradients of 1e±30 give weights of 1e∓30).

  Degenerate ``G``: when some non-negative combination of the gradients is
  zero (a zero gradient, two exactly opposite ones) the equation has no
  solution. The solver adds a tiny ridge, so the affected weights come out
  large but finite while their part of the direction stays bounded.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 3e-5, 5e-4, 5e-2 (relative), direction
  within 1° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-5 at 10⁶.

  Args:
    max_norm: if set, the weights are scaled down so that ``‖Jᵀα‖ ≤
      max_norm`` (the authors' code uses 1.0; ``None`` is the paper's rule).
    update_weights_every: solve every this many calls and reuse the last
      ``α`` in between (the authors' speed-up; ``max_norm`` is applied every
      call, to the current ``G``).
    normalize_gramian: solve on ``G/‖G‖_F`` and rescale (above); the
      weights are those of the paper's equation either way.
    max_iter: cap on Newton steps.

  Returns:
    A :class:`WeightingTransform` with ``needs="gramian"`` and state
    :class:`NashMTLState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> t = jmtl.weighting.nash_mtl()
    >>> w, _ = t.update(jnp.ones(2), t.init(2), gramian=J @ J.T)
    >>> [round(float(x), 5) for x in w]  # orthogonal gradients: αₖ = 1/‖gₖ‖
    [1.0, 0.5]
  """
  if max_norm is not None and is_concrete(max_norm) and not max_norm > 0:
    raise ValueError(f"nash_mtl: max_norm must be positive or None, got {max_norm}")
  if int(update_weights_every) != update_weights_every or update_weights_every < 1:
    raise ValueError(f"nash_mtl: update_weights_every must be a positive integer, got {update_weights_every}")
  every = int(update_weights_every)

  def init_fn(num_tasks):
    # The default float (not the Gramian's dtype, unknown here): the state's
    # dtypes never depend on the batch, so a jitted step never retraces.
    dtype = jax.dtypes.canonicalize_dtype(float)
    return NashMTLState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), dtype))

  def solve(g, prev, present):
    if not normalize_gramian:
      return nash_bargaining(g, init=prev, max_iter=max_iter, present=present)
    # αₙ solves (G/f²) αₙ = 1/αₙ with f = ‖G‖_F^½; then α = αₙ/f solves G α = 1/α.
    f2 = jnp.sqrt(jnp.sum(g * g))
    f2 = jnp.where(f2 > 0, f2, 1)
    f = jnp.sqrt(f2)
    return nash_bargaining(g / f2, init=prev * f, max_iter=max_iter, present=present) / f

  def keep(g, prev, present):
    del g
    return jnp.where(present, prev, 0)

  def update_fn(losses, state, **inputs):
    g = checked_gramian("nash_mtl", losses, inputs.get("gramian"))
    if state.weights.shape != losses.shape:
      raise ValueError(f"nash_mtl: state is for {state.weights.shape[0]} tasks, got losses of shape {losses.shape}")
    present = present_of(losses, inputs.get("present"))
    # G = gramian · 2**e, so α = α' · 2**(−e/2) with α' solving the scaled equation (e is even).
    unit = power_of_two(jnp.asarray(inputs.get("gramian_exponent", 0), jnp.int32) // 2, g.dtype)
    prev = state.weights.astype(g.dtype) * unit
    # Python-level: with every == 1 there is nothing to skip, so no cond. The
    # branches are defined once per transform, so an eager cond compiles once.
    if every == 1:
      alpha = solve(g, prev, present)
    else:
      alpha = jax.lax.cond(state.step % every == 0, solve, keep, g, prev, present)
    # An absent task keeps its last α (the next solve's warm start).
    new_state = NashMTLState(
      state.step + 1, jnp.where(present, alpha / unit, state.weights.astype(g.dtype)).astype(state.weights.dtype)
    )
    if max_norm is not None:
      norm = jnp.sqrt(jnp.maximum(alpha @ g @ alpha, 0))
      # ‖Jᵀα‖² = αᵀGα = α'ᵀ gramian α': the same in scaled units.
      alpha = alpha * jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1), 1)
    return (alpha / unit).astype(losses.dtype), new_state

  return WeightingTransform(init_fn, update_fn, "gramian")
