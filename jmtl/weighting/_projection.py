"""Gramian-level weightings that project or align task gradients: PCGrad, IMTL-G, ConFIG, Aligned-MTL, GradVac.

Each of these methods follows a direction that is a linear combination of the
task gradients ``gₖ`` (the rows of the shared-parameter Jacobian ``J``), so
each is computed from the Gramian ``G = J Jᵀ`` alone. A modified gradient
``g'ᵢ = Jᵀcᵢ`` is tracked by its coefficient vector ``cᵢ ∈ Rᴷ``: then
``g'ᵢ·gⱼ = (cᵢᵀG)ⱼ`` and ``‖g'ᵢ‖² = cᵢᵀGcᵢ``, and the weights of ``Σᵢ g'ᵢ``
are ``w = Σᵢ cᵢ``. The work is O(K³) on a K×K matrix, whatever the model size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_gramian
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import method
from jmtl.weighting._base import present_of
from jmtl.weighting._base import required_key
from jmtl.weighting._base import restricted
from jmtl.weighting._base import stateless

Array = jax.Array


def _safe_div(num, den):
  """``num / den`` where ``den > 0``, else 0 (a zero gradient has no direction)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _directions(g):
  """``(norms, active)``: each task's gradient norm, and whether it is above ``eps`` times the largest (has a
  direction)."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
  return norms, norms > jnp.max(norms) * jnp.finfo(g.dtype).eps


def _visit_orders(name, key, k):
  """Row ``i``: the random order in which task ``i`` visits the tasks (``i`` itself is skipped)."""
  key = required_key(name, key, "visits the tasks in a random order")
  return jax.vmap(lambda sub: jax.random.permutation(sub, k))(jax.random.split(key, k))


@method()
def pcgrad() -> WeightingTransform:
  """Projecting Conflicting Gradients (PCGrad).

  Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
  Learning", NeurIPS 2020. Each task ``i`` starts from ``g'ᵢ = gᵢ`` and visits
  the other tasks ``j`` in a random order; when ``g'ᵢ·gⱼ < 0`` it removes the
  conflicting component, ``g'ᵢ ← g'ᵢ − (g'ᵢ·gⱼ / ‖gⱼ‖²) gⱼ`` (always projecting
  on the *original* ``gⱼ``). The direction is the **sum** ``Σᵢ g'ᵢ``, as in the
  paper's algorithm (some reimplementations take the mean, i.e. ``w / K``).

  Each task draws its own visiting order from ``key``:
  ``jax.random.permutation(kᵢ, K)`` with ``kᵢ = jax.random.split(key, K)[i]``.
  ``update`` raises ``ValueError`` without a key. A zero ``gⱼ`` is never
  projected on.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 1e-5, 1e-5 (relative), direction
  within 0.05° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-5 at 10⁶.

  Returns:
    A stateless :class:`WeightingTransform` that needs the Gramian.

  Examples:
    Two conflicting tasks, each projected on the other's normal plane:

    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> t = jmtl.weighting.pcgrad()
    >>> w, _ = t.update(jnp.ones(2), t.init(2), gramian=J @ J.T, key=jax.random.key(0))
    >>> w.tolist()  # g₁' = g₁ + ½ g₂, g₂' = g₂ + g₁
    [2.0, 1.5]
    >>> (w @ J).tolist()
    [0.5, 1.5]
  """

  def weight_fn(losses, *, gramian=None, key=None, present=None, **_):
    # An absent task's zero gradient neither projects nor is projected.
    g = restricted(checked_gramian("pcgrad", losses, gramian), present_of(losses, present))
    k = g.shape[0]
    orders = _visit_orders("pcgrad", key, k)
    sq_norms = jnp.diagonal(g)

    def surgery(i, order):
      def visit(t, c):
        j = order[t]
        dot = c @ g[:, j]
        conflict = (dot < 0) & (j != i)
        return c.at[j].add(jnp.where(conflict, -_safe_div(dot, sq_norms[j]), 0))

      return jax.lax.fori_loop(0, k, visit, jnp.eye(k, dtype=g.dtype)[i])

    coefficients = jax.vmap(surgery)(jnp.arange(k), orders)
    return jnp.sum(coefficients, axis=0)

  return stateless(weight_fn, needs="gramian")


@method()
def imtl_g() -> WeightingTransform:
  """The gradient-balancing part of Impartial Multi-Task Learning (IMTL-G).

  Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
  Learning", ICLR 2021. The direction ``d = Σᵢ αᵢ gᵢ`` with ``Σᵢ αᵢ = 1`` has
  equal projections ``dᵀuᵢ`` on every unit gradient ``uᵢ = gᵢ/‖gᵢ‖``. With
  task 1 as reference, ``D = [g₁ − g₂, …, g₁ − g_K]ᵀ`` and
  ``U = [u₁ − u₂, …, u₁ − u_K]ᵀ``, the paper's closed form is::

      α₂…K = g₁ Uᵀ (D Uᵀ)⁻¹,   α₁ = 1 − Σₖ₌₂ᴷ αₖ

  and every inner product in it is an entry of ``G`` divided by norms
  ``‖gᵢ‖ = √Gᵢᵢ``.

  Conventions (the paper assumes nonzero, linearly independent gradients):
  the reference is the task with the largest gradient (when ``D Uᵀ`` is
  invertible the solution does not depend on that choice). ``D Uᵀ`` is
  inverted with a pseudo-inverse (SVD, relative cutoff), so duplicated or
  linearly dependent gradients give the least-norm weights of a direction
  that still has equal projections. A task whose gradient is zero (or
  negligible: below ``eps`` times the largest norm) has no direction: it gets
  weight 0 and the others are balanced among themselves. If every gradient
  is zero, the weights are ``1/K``.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 2e-5, 7e-2 (relative), direction
  within 20° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 2e-3 at 10⁶.

  Returns:
    A stateless :class:`WeightingTransform` that needs the Gramian.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> t = jmtl.weighting.imtl_g()
    >>> w, _ = t.update(jnp.ones(2), t.init(2), gramian=J @ J.T)
    >>> [round(float(x), 4) for x in w]  # d = (⅔, ⅔): equal projections on both axes
    [0.6667, 0.3333]
  """

  def weight_fn(losses, *, gramian=None, present=None, **_):
    present = present_of(losses, present)
    g = restricted(checked_gramian("imtl_g", losses, gramian), present)  # an absent task is inactive
    k = g.shape[0]
    norms, active = _directions(g)
    ref = jnp.argmax(norms)
    proj = _safe_div(g, norms[None, :])  # proj[s, t] = gₛ·uₜ
    b = proj[ref, ref] - proj[ref]  # b[t] = g_r·(u_r − uₜ)
    m = b[None, :] - (proj[:, ref][:, None] - proj)  # m[s, t] = (g_r − gₛ)·(u_r − uₜ)
    # The reference's own row and column are zero; an inactive task's are zeroed
    # too, which drops its equation and pins its weight at 0 in the least-norm
    # solution.
    keep = active & (jnp.arange(k) != ref)
    m = jnp.where(keep[:, None] & keep[None, :], m, 0)
    alpha = jnp.where(keep, jnp.linalg.pinv(m.T) @ jnp.where(keep, b, 0), 0)
    alpha = alpha.at[ref].set(1 - jnp.sum(alpha))
    return jnp.where(jnp.any(active), alpha, _uniform(present, g.dtype))

  return stateless(weight_fn, needs="gramian")


def _uniform(present: Array, dtype) -> Array:
  """``1/K'`` on each of the ``K'`` present tasks: the fallback when no gradient has a direction."""
  return present.astype(dtype) / jnp.maximum(jnp.sum(present), 1)


@method()
def config() -> WeightingTransform:
  """ConFIG, the conflict-free update.

  Liu, Luo & Thuerey, "ConFIG: Towards Conflict-free Training of Physics
  Informed Neural Networks", ICLR 2025 (their Eq. 2). With the unit
  gradients ``uᵢ = gᵢ/‖gᵢ‖`` as the rows of ``U``::

      g_u = U⁺ 1,   g_v = g_u/‖g_u‖,   d = (Σᵢ gᵢᵀ g_v) g_v

  ``g_v`` has the same cosine with every task gradient (``uᵢᵀg_u = 1`` for
  all ``i`` when the gradients are linearly independent), so no task
  conflicts with ``d``, and its length is the sum of the gradients'
  projections on it. On the Gramian: ``g_u = Uᵀ (U Uᵀ)⁺ 1`` with ``U Uᵀ``
  the cosine matrix, so ``g_u = Jᵀa`` with ``aᵢ = ((UUᵀ)⁺ 1)ᵢ/‖gᵢ‖``,
  ``‖g_u‖² = aᵀGa`` and ``Σᵢ gᵢᵀg_v = 1ᵀGa/‖g_u‖``.

  Conventions: a zero (or negligible: below ``eps`` times the largest norm)
  gradient has no direction and is left out of ``U`` (weight 0). When the
  gradients are linearly dependent the pseudo-inverse gives the least-squares
  ``g_u``; equal cosines may then be impossible and ``d`` can conflict with
  a task (gradients ``g``, ``−2g``, ``3g`` give ``g_u ∝ g``, against the
  second; two exactly opposite ones give ``d = 0``). If every gradient is
  zero the weights are ``1/K``.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³;
  measured by ``tests/test_weighting_gramian.py``): step length within 1e-5,
  5e-5 (relative), direction within 0.05°. At condition 10⁶ the float32
  pseudo-inverse drops the smallest singular values and the result is not
  ConFIG's (step length off by up to 6×): turn ``jax_enable_x64`` on, and
  the K×K problem is solved in float64 even in a float32 step (within 1e-5
  at 10⁶).

  Returns:
    A stateless :class:`WeightingTransform` that needs the Gramian.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> t = jmtl.weighting.config()
    >>> w, _ = t.update(jnp.ones(2), t.init(2), gramian=J @ J.T)
    >>> [round(float(x), 4) for x in w]  # g_v = (1, 1)/√2, Σ gᵢᵀg_v = 3/√2: d = (1.5, 1.5)
    [1.5, 0.75]
  """

  def weight_fn(losses, *, gramian=None, present=None, **_):
    present = present_of(losses, present)
    g = restricted(checked_gramian("config", losses, gramian), present)  # an absent task is inactive
    norms, active = _directions(g)
    cosines = _safe_div(_safe_div(g, norms[None, :]), norms[:, None])
    cosines = jnp.where(active[:, None] & active[None, :], cosines, 0)
    a = _safe_div(jnp.linalg.pinv(cosines, hermitian=True) @ active.astype(g.dtype), norms)
    length = jnp.sqrt(jnp.maximum(a @ g @ a, 0))
    unit = _safe_div(a, length)
    w = jnp.sum(g @ unit) * unit
    return jnp.where(jnp.any(active), w, _uniform(present, g.dtype))

  return stateless(weight_fn, needs="gramian")


_ALIGNED_SCALES = ("min", "median", "rmse")


@method()
def aligned_mtl(scale: str = "min", rtol: float | None = None) -> WeightingTransform:
  """Aligned-MTL: align the task gradients into an orthogonal, equal-norm system.

  Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
  for Multi-Task Learning", CVPR 2023 (Algorithm 1). With the eigendecomposition
  ``G = V Λ Vᵀ`` (``Λ = Σ²``, ``Σ`` the singular values of ``J``), the aligned
  gradients ``Ĵᵀ = Jᵀ B`` with the balance matrix::

      B = s V Λ^{−1/2} Vᵀ,   s = √λ_min

  are ``s·U Vᵀ`` in terms of the SVD ``Jᵀ = U Σ Vᵀ``: orthogonal, with equal
  norms, and the condition number of the system is 1. The direction is their
  sum ``Ĵᵀ1 = Jᵀ (B 1)``, so the weights are ``w = B 1`` (some
  reimplementations average instead, ``w / K``; task preferences enter by
  chaining after :func:`static`).

  Rank-aware as in the paper: eigenvalues at most ``rtol · λ_max`` (default
  ``rtol = K · eps``, the rounding level of a computed Gramian) are treated as
  zero and their directions are dropped; ``λ_min`` is the smallest kept one. If
  ``G`` is zero the weights are ones (no alignment is defined; the direction
  is zero anyway).

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 1e-4, 1e-1 (relative), direction
  within 1° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-2 at 10⁶.

  Args:
    scale: ``s²`` among the kept eigenvalues: ``"min"`` (the paper's
      ``λ_min``), ``"median"`` (the lower median) or ``"rmse"`` (their mean, so
      ``s`` is the root-mean-square singular value), the options of the
      authors' code.
    rtol: the relative eigenvalue cutoff (``None``: ``K · eps`` of the
      Gramian's dtype, at least float32).

  Returns:
    A stateless :class:`WeightingTransform` that needs the Gramian.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> t = jmtl.weighting.aligned_mtl()
    >>> w, _ = t.update(jnp.ones(2), t.init(2), gramian=J @ J.T)
    >>> w.tolist()  # both aligned gradients have the smallest norm, 1
    [1.0, 0.5]
  """
  if scale not in _ALIGNED_SCALES:
    raise ValueError(f"aligned_mtl: scale must be one of {_ALIGNED_SCALES}, got {scale!r}")
  if rtol is not None and is_concrete(rtol) and not 0 <= rtol < 1:
    raise ValueError(f"aligned_mtl: rtol must be in [0, 1), got {rtol}")

  def weight_fn(losses, *, gramian=None, present=None, **_):
    # An absent task's zero row adds a zero eigenvalue (dropped) and nothing to the kept eigenvectors.
    present = present_of(losses, present)
    g = restricted(checked_gramian("aligned_mtl", losses, gramian), present)
    k = g.shape[0]
    lam, v = jnp.linalg.eigh(g)  # ascending
    cutoff = jnp.maximum(lam[-1], 0) * (k * jnp.finfo(g.dtype).eps if rtol is None else rtol)
    kept = (lam > cutoff) & (lam > 0)
    rank = jnp.sum(kept)
    inv_sqrt = jnp.where(kept, 1 / jnp.sqrt(jnp.where(kept, lam, 1)), 0)
    if scale == "min":
      s2 = jnp.min(jnp.where(kept, lam, jnp.inf))
    elif scale == "median":
      # The kept eigenvalues are the last ``rank`` ones of the ascending list.
      s2 = lam[jnp.clip(k - rank + (rank - 1) // 2, 0, k - 1)]
    else:
      s2 = jnp.sum(jnp.where(kept, lam, 0)) / jnp.maximum(rank, 1)
    s = jnp.sqrt(jnp.where(rank > 0, s2, 0))
    w = s * (v * inv_sqrt) @ jnp.sum(v, axis=0)  # B 1 = s V Λ^{-1/2} Vᵀ 1
    return jnp.where(rank > 0, w, present.astype(g.dtype))

  return stateless(weight_fn, needs="gramian")


class GradVacState(NamedTuple):
  """State of :func:`gradvac`."""

  targets: Array  # (K, K) float: φ̂ᵢⱼ, EMA of cos(g'ᵢ, gⱼ); row i belongs to task i, diagonal unused (0)


@method()
def gradvac(beta: float = 1e-2) -> WeightingTransform:
  """Gradient Vaccine (GradVac).

  Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving
  Multi-task Optimization in Massively Multilingual Models", ICLR 2021. Each
  task ``i`` starts from ``g'ᵢ = gᵢ`` and visits the other tasks ``j`` in a
  random order (drawn as in :func:`pcgrad`). With ``φᵢⱼ = cos(g'ᵢ, gⱼ)`` and
  the target ``φ̂ᵢⱼ``, if ``φᵢⱼ < φ̂ᵢⱼ`` it adds the multiple of ``gⱼ`` that
  brings the cosine up to the target::

      g'ᵢ ← g'ᵢ + ‖g'ᵢ‖ (φ̂ᵢⱼ √(1−φᵢⱼ²) − φᵢⱼ √(1−φ̂ᵢⱼ²)) / (‖gⱼ‖ √(1−φ̂ᵢⱼ²)) gⱼ

  then moves the target, ``φ̂ᵢⱼ ← (1−β) φ̂ᵢⱼ + β φᵢⱼ`` (with the cosine
  measured before the correction). The direction is ``Σᵢ g'ᵢ``; the targets
  start at 0, where the correction is PCGrad's projection.

  The paper applies the rule per layer (and finds finer groups better); here
  it acts on the whole shared gradient the Gramian describes. Guards: a pair
  with a zero gradient is neither corrected nor averaged into its target;
  ``√(1−φ̂²)`` is floored at ``√eps``, because a target of ±1 could only be
  reached by an infinite multiple of ``gⱼ``.

  Float32 accuracy (``jax_enable_x64`` off; Gramians of condition 1, 10³, 10⁶; measured by
  ``tests/test_weighting_gramian.py``): step length within 1e-5, 1e-5, 1e-5 (relative), direction
  within 0.05° at 10⁶. With ``jax_enable_x64`` on the K×K problem is solved in float64 even in a
  float32 step: within 1e-5 at 10⁶.

  Args:
    beta: ``β`` in (0, 1], the EMA rate of the targets. The default ``1e-2``
      makes the target a slow average of the observed similarity (some
      reimplementations default to 0.5).

  Returns:
    A :class:`WeightingTransform` with state :class:`GradVacState` that needs
    the Gramian and a ``key``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> t = jmtl.weighting.gradvac(beta=0.5)
    >>> w, state = t.update(jnp.ones(2), t.init(2), gramian=J @ J.T, key=jax.random.key(0))
    >>> w.tolist()  # targets 0: the first step is PCGrad's
    [2.0, 1.5]
    >>> [[round(float(x), 4) for x in row] for row in state.targets]  # ½ cos(g₁, g₂)
    [[0.0, -0.3536], [-0.3536, 0.0]]
  """
  if is_concrete(beta) and not 0 < beta <= 1:
    raise ValueError(f"gradvac: beta must be in (0, 1], got {beta}")

  def init_fn(num_tasks):
    return GradVacState(jnp.zeros((num_tasks, num_tasks), jax.dtypes.canonicalize_dtype(float)))

  def update_fn(losses, state, **inputs):
    # An absent task's zero gradient is skipped both ways, and its targets are left as they were.
    g = restricted(checked_gramian("gradvac", losses, inputs.get("gramian")), present_of(losses, inputs.get("present")))
    key = inputs.get("key")
    k = g.shape[0]
    if state.targets.shape != (k, k):
      raise ValueError(f"gradvac: state is for {state.targets.shape[0]} tasks, got losses of shape {losses.shape}")
    orders = _visit_orders("gradvac", key, k)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
    floor = jnp.finfo(g.dtype).eps

    def vaccinate(i, order, targets):
      def visit(t, carry):
        c, targets = carry
        j = order[t]
        norm_i = jnp.sqrt(jnp.maximum(c @ g @ c, 0))
        valid = (j != i) & (norm_i > 0) & (norms[j] > 0)
        phi = jnp.clip(_safe_div(_safe_div(c @ g[:, j], norm_i), norms[j]), -1, 1)
        target = targets[j]
        sin_phi = jnp.sqrt(jnp.maximum(1 - phi**2, 0))
        sin_target = jnp.sqrt(jnp.maximum(1 - target**2, floor))
        step = _safe_div(norm_i, norms[j]) * (target * sin_phi - phi * sin_target) / sin_target
        c = c.at[j].add(jnp.where(valid & (phi < target), step, 0))
        targets = targets.at[j].set(jnp.where(valid, (1 - beta) * target + beta * phi, target))
        return c, targets

      return jax.lax.fori_loop(0, k, visit, (jnp.eye(k, dtype=g.dtype)[i], targets))

    coefficients, targets = jax.vmap(vaccinate)(jnp.arange(k), orders, state.targets.astype(g.dtype))
    weights = jnp.sum(coefficients, axis=0).astype(losses.dtype)
    return weights, GradVacState(targets.astype(state.targets.dtype))

  return WeightingTransform(init_fn, update_fn, "gramian")
