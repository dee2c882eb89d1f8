"""Methods that follow tracked gradients: MoCo and DB-MTL.

Both keep a moving average ``Y`` of the per-task gradients in their state and
update the shared parameters along a combination of ``Y``'s rows, not of this
step's gradients, so ``update`` returns a :class:`~jmtl.weighting.Direction`.
The state holds ``K`` copies of the (selected) shared parameters: ``K × P``
numbers, the memory of the Jacobian itself, kept from step to step. ``init``
needs their shapes (``requires=("gradient_shapes",)``; ``TrainState.create``
passes them).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import Direction
from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_jacobian
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import keep_absent
from jmtl.weighting._base import method
from jmtl.weighting._base import present_of
from jmtl.weighting._solvers import project_simplex
from jmtl.weighting._solvers import simplex_step_on_present

Array = jax.Array


class MoCoState(NamedTuple):
  """State of :func:`moco`."""

  count: Array  # () int32: updates so far
  tracked: Any  # Y: per-task tracked gradients, leaves (K, ...) like the Jacobian
  lam: Array  # (K,) λ on the simplex


class DBMTLState(NamedTuple):
  """State of :func:`db_mtl`."""

  count: Array  # () int32: updates so far
  tracked: Any  # ĝ: per-task moving averages of ∇ log Lₖ, leaves (K, ...) like the Jacobian


def _tracked_zeros(name: str, num_tasks: int, shapes):
  if shapes is None:
    raise ValueError(
      f"{name} keeps per-task gradients in its state: init needs shapes=... (one task's gradient, as "
      "jax.ShapeDtypeStruct leaves); TrainState.create passes them, or call jmtl.weighting.init_state"
    )
  wide = jax.dtypes.canonicalize_dtype(float)
  return jax.tree.map(lambda s: jnp.zeros((num_tasks, *s.shape), jnp.promote_types(s.dtype, wide)), shapes)


def _checked_jacobian(name: str, losses: Array, jacobian, tracked):
  """The Jacobian, checked against the losses and the tracked state, without gradient, in the state's dtypes."""
  jacobian = checked_jacobian(name, losses, jacobian, tracked)
  return jax.tree.map(lambda j, t: jax.lax.stop_gradient(j).astype(t.dtype), jacobian, tracked)


def _rows(weights: Array, x: Array) -> Array:
  return weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def _row_norms(tree) -> Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1) for x in jax.tree.leaves(tree)))


def _combine(weights: Array, tree):
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, 1), tree)


def _gram(tree) -> Array:
  k = jax.tree.leaves(tree)[0].shape[0]
  return sum(x.reshape(k, -1) @ x.reshape(k, -1).T for x in jax.tree.leaves(tree))


def _check_rate(name: str, arg: str, value, *, low_open: bool = True, high: float | None = 1.0):
  if not is_concrete(value):
    return
  ok = (value > 0 if low_open else value >= 0) and (high is None or value <= high)
  if not ok:
    span = f"{'(' if low_open else '['}0, {high if high is not None else '∞'}{']' if high is not None else ')'}"
    raise ValueError(f"{name}: {arg} must be in {span}, got {value}")


@method()
def moco(
  beta: float = 0.5,
  beta_sigma: float = 0.5,
  gamma: float = 0.1,
  gamma_sigma: float = 0.5,
  rho: float = 0.0,
  *,
  normalize: bool = True,
) -> WeightingTransform:
  """MoCo: multi-objective gradient with tracked gradients (bias correction).

  Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias
  in Multi-objective Learning: A Provably Convergent Approach", ICLR 2023,
  Algorithm 1. With ``hₖ`` this step's gradient of task ``k`` and ``t`` the
  step (from 1)::

      Yₖ ← Yₖ − βₜ (Yₖ − hₖ),                     βₜ = β / t^σ_β
      λ  ← Π_Δ(λ − γₜ (Y Yᵀ + ρ I) λ),            γₜ = γ / t^σ_γ
      d  = Σₖ λₖ Yₖ

  ``Π_Δ`` is the Euclidean projection onto the simplex (the paper's; LibMTL
  takes a softmax instead). ``Y`` starts at 0 and ``λ`` at ``1/K``. With
  ``normalize`` (the authors' experiments, and LibMTL) ``hₖ = Lₖ gₖ/‖gₖ‖``
  (``‖gₖ‖ + 1e-8``): each gradient rescaled to its loss; without it,
  ``hₖ = gₖ``. Defaults are the authors' (as in LibMTL).

  ``update`` returns :class:`~jmtl.weighting.Direction` ``(d, λ)``; the task
  parameters move by the step's head rule with weights ``λ``. The state
  keeps ``Y``: ``K × P`` numbers for ``P`` shared parameters.

  Args:
    beta: ``β``, the tracking rate, in (0, 1].
    beta_sigma: ``σ_β ≥ 0``, its decay exponent.
    gamma: ``γ > 0``, the step size of ``λ``.
    gamma_sigma: ``σ_γ ≥ 0``, its decay exponent.
    rho: ``ρ ≥ 0``, the ℓ2 regularisation of ``λ``'s update.
    normalize: rescale each gradient to its loss before tracking it.

  Returns:
    A :class:`WeightingTransform` that needs the Jacobian, with state
    :class:`MoCoState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> t = jmtl.weighting.moco(normalize=False)
    >>> state = t.init(2, shapes=jax.ShapeDtypeStruct((2,), jnp.float32))
    >>> d, state = t.update(jnp.ones(2), state, jacobian=J)
    >>> state.tracked.tolist()  # Y = ½ J after the first step
    [[0.5, 0.0], [0.0, 1.0]]
    >>> [round(x, 4) for x in d.weights.tolist()], [round(x, 4) for x in d.shared.tolist()]
    ([0.5188, 0.4812], [0.2594, 0.4812])
  """
  _check_rate("moco", "beta", beta)
  _check_rate("moco", "gamma", gamma, high=None)
  for arg, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
    _check_rate("moco", arg, value, low_open=False, high=None)

  def init_fn(num_tasks, shapes=None):
    tracked = _tracked_zeros("moco", num_tasks, shapes)
    dtype = jax.dtypes.canonicalize_dtype(float)
    return MoCoState(jnp.zeros((), jnp.int32), tracked, jnp.full((num_tasks,), 1 / num_tasks, dtype))

  def update_fn(losses, state, **inputs):
    jac = _checked_jacobian("moco", losses, inputs.get("jacobian"), state.tracked)
    if state.lam.shape != losses.shape:
      raise ValueError(f"moco: state is for {state.lam.shape[0]} tasks, got losses of shape {losses.shape}")
    present = present_of(losses, inputs.get("present"))
    t = (state.count + 1).astype(state.lam.dtype)
    if normalize:
      scale = jax.lax.stop_gradient(losses).astype(state.lam.dtype) / (_row_norms(jac) + 1e-8)
      jac = jax.tree.map(lambda x: x * _rows(scale, x), jac)
    b = beta / t**beta_sigma
    # An absent task's tracked gradient stays as it was, and it is left out of the direction.
    tracked = keep_absent(jax.tree.map(lambda y, h: y - b * (y - h), state.tracked, jac), state.tracked, present)
    g = _gram(tracked)
    rate = gamma / t**gamma_sigma
    w, lam = simplex_step_on_present(
      state.lam, present, lambda x: project_simplex(x - rate * (g @ x + rho * x), present)
    )
    direction = Direction(_combine(w, tracked), w.astype(losses.dtype))
    return direction, MoCoState(state.count + 1, tracked, lam)

  return WeightingTransform(init_fn, update_fn, "jacobian", requires=("gradient_shapes",))


@method()
def db_mtl(beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> WeightingTransform:
  """DB-MTL: dual balancing of loss scales and gradient magnitudes.

  Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for
  Multi-Task Learning", 2023 (arXiv:2308.12029), Algorithm 1. Loss-scale
  balancing trains every task on ``log(Lₖ + ε)``, whose gradient is
  ``gₖ / (Lₖ + ε)``; gradient-magnitude balancing tracks those gradients and
  scales each to the largest norm (``t`` the step, from 1)::

      ĝₖ ← βₜ ĝₖ + (1 − βₜ) gₖ / (Lₖ + ε),        βₜ = β / t^σ
      d  = Σₖ (maxⱼ ‖ĝⱼ‖ / (‖ĝₖ‖ + ε)) ĝₖ

  ``ĝ`` starts at 0 (as in the authors' code, without bias correction). The
  task parameters follow their log-loss gradients: ``update`` returns
  :class:`~jmtl.weighting.Direction` ``(d, 1/(L + ε))``, and with the
  ``"weighted"`` head rule head ``k`` moves along ``∇ log(Lₖ + ε)``. The
  state keeps ``ĝ``: ``K × P`` numbers for ``P`` shared parameters.

  Args:
    beta: ``β`` in [0, 1), the moving-average rate.
    beta_sigma: ``σ ≥ 0``, its decay exponent (0: constant).
    eps: ``ε > 0`` inside the logarithm and the norm ratio.

  Returns:
    A :class:`WeightingTransform` that needs the Jacobian, with state
    :class:`DBMTLState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> J = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> t = jmtl.weighting.db_mtl(beta=0.5)
    >>> state = t.init(2, shapes=jax.ShapeDtypeStruct((2,), jnp.float32))
    >>> d, state = t.update(jnp.array([1.0, 0.5]), state, jacobian=J)
    >>> [round(x, 4) for x in d.shared.tolist()]  # both tracked rows have norm 1: weights 1
    [1.0, 1.0]
  """
  if is_concrete(beta) and not 0 <= beta < 1:
    raise ValueError(f"db_mtl: beta must be in [0, 1), got {beta}")
  _check_rate("db_mtl", "beta_sigma", beta_sigma, low_open=False, high=None)
  _check_rate("db_mtl", "eps", eps, high=None)

  def init_fn(num_tasks, shapes=None):
    return DBMTLState(jnp.zeros((), jnp.int32), _tracked_zeros("db_mtl", num_tasks, shapes))

  def update_fn(losses, state, **inputs):
    jac = _checked_jacobian("db_mtl", losses, inputs.get("jacobian"), state.tracked)
    present = present_of(losses, inputs.get("present"))
    dtype = jax.tree.leaves(state.tracked)[0].dtype
    inv = jnp.where(present, 1 / (jax.lax.stop_gradient(losses).astype(dtype) + eps), 0)
    t = (state.count + 1).astype(dtype)
    b = beta / t**beta_sigma
    # An absent task's moving average stays as it was, and it is left out of the direction.
    tracked = jax.tree.map(lambda y, g: b * y + (1 - b) * g * _rows(inv, g), state.tracked, jac)
    tracked = keep_absent(tracked, state.tracked, present)
    norms = _row_norms(tracked)
    alpha = jnp.where(present, jnp.max(jnp.where(present, norms, 0)) / (norms + eps), 0)
    return Direction(_combine(alpha, tracked), inv.astype(losses.dtype)), DBMTLState(state.count + 1, tracked)

  return WeightingTransform(init_fn, update_fn, "jacobian", requires=("gradient_shapes",))
