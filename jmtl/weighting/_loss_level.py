"""Loss-level weightings computed in closed form: DWA, RLW and GLS."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import method
from jmtl.weighting._base import required_key
from jmtl.weighting._base import stateless

Array = jax.Array


class DWAState(NamedTuple):
  """State of :func:`dwa`."""

  count: Array  # () int32: update calls so far in the current period, in [0, period)
  periods: Array  # () int32: completed periods, saturating at 2 (all DWA needs to know)
  running_sum: Array  # (K,) float: sum of the losses of the current period
  last_mean: Array  # (K,) float: L̄(t−1), mean loss of the last completed period
  prev_mean: Array  # (K,) float: L̄(t−2), mean loss of the period before it


@method(static=("period",))
def dwa(temperature: float = 2.0, period: int = 1) -> WeightingTransform:
  """Dynamic Weight Average (DWA).

  Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR
  2019. During period ``t``::

      wₖ(t) = K exp(rₖ(t−1)/T) / Σᵢ exp(rᵢ(t−1)/T),   rₖ(t−1) = L̄ₖ(t−1) / L̄ₖ(t−2)

  where ``L̄ₖ(t)`` is task ``k``'s mean loss over period ``t`` and ``T`` the
  temperature; ``w = 1`` during the first two periods. A task whose loss
  falls more slowly gets more weight. The paper's period is an epoch; here it
  is ``period`` calls of ``update`` (set it to the number of steps per epoch
  to reproduce the paper; ``period=1`` is the iteration-level variant most
  reproductions use). The losses are assumed positive.

  Args:
    temperature: ``T`` > 0; larger is closer to equal weights (paper: 2).
    period: the number of ``update`` calls averaged into one ``L̄``.

  Returns:
    A :class:`WeightingTransform` with state :class:`DWAState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.dwa(temperature=2.0)
    >>> state = t.init(2)
    >>> for losses in ([1.0, 1.0], [0.5, 1.0], [0.4, 1.0]):
    ...   w, state = t.update(jnp.array(losses), state)
    >>> [round(float(x), 3) for x in w]  # from r = (0.5/1, 1/1)
    [0.876, 1.124]
  """
  if is_concrete(temperature) and not temperature > 0:
    raise ValueError(f"dwa: temperature must be positive, got {temperature}")
  if int(period) != period or period < 1:
    raise ValueError(f"dwa: period must be a positive integer, got {period}")
  period = int(period)

  def init_fn(num_tasks):
    zeros = jnp.zeros((num_tasks,), jax.dtypes.canonicalize_dtype(float))
    zero = jnp.zeros((), jnp.int32)
    return DWAState(zero, zero, zeros, zeros, zeros)

  def update_fn(losses, state, **inputs):
    del inputs
    k = state.running_sum.shape[0]
    if losses.shape != (k,):
      raise ValueError(f"dwa: state is for {k} tasks, got losses of shape {losses.shape}")
    dtype = state.running_sum.dtype
    finfo = jnp.finfo(dtype)
    # A zero mean loss would give r = x/0; the floor and the cap keep r finite
    # (softmax subtracts the max, so any finite r is safe).
    ratio = state.last_mean / jnp.maximum(state.prev_mean, finfo.tiny)
    ratio = jnp.minimum(ratio, finfo.max)
    weights = jnp.where(state.periods >= 2, k * jax.nn.softmax(ratio / temperature), jnp.ones((k,), dtype))

    running_sum = state.running_sum + jax.lax.stop_gradient(losses).astype(dtype)
    count = state.count + 1
    done = count >= period
    new_state = DWAState(
      count=jnp.where(done, 0, count).astype(jnp.int32),
      periods=jnp.where(done, jnp.minimum(state.periods + 1, 2), state.periods).astype(jnp.int32),
      running_sum=jnp.where(done, jnp.zeros_like(running_sum), running_sum),
      last_mean=jnp.where(done, running_sum / period, state.last_mean),
      prev_mean=jnp.where(done, state.last_mean, state.prev_mean),
    )
    return weights.astype(losses.dtype), new_state

  return WeightingTransform(init_fn, update_fn, "losses")


_RLW_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


@method()
def rlw(distribution: str = "normal") -> WeightingTransform:
  """Random loss weighting (RLW).

  Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A
  Litmus Test for Multi-Task Learning", TMLR 2022. Every step draws fresh
  weights ``w = softmax(λ̃)``, ``λ̃ ~ N(0, I)`` (the paper's main choice), so
  ``Σₖ wₖ = 1``. The paper also compares other sampling distributions; two are
  offered here: ``"uniform"`` (``λ̃ ~ U(0, 1)ᴷ``, then softmax) and
  ``"dirichlet"`` (``w ~ Dir(1, …, 1)``; it is already on the simplex, so
  here it is used as drawn, without a softmax).

  The weights do not depend on the losses, only on ``key``; ``update`` needs
  a fresh key every step (the train step splits one per step).

  Args:
    distribution: one of ``"normal"``, ``"uniform"``, ``"dirichlet"``.

  Returns:
    A stateless :class:`WeightingTransform`.

  Raises:
    ValueError: for an unknown distribution, or (from ``update``) when
      ``key`` is ``None``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.rlw()
    >>> w, _ = t.update(jnp.ones(3), t.init(3), key=jax.random.key(0))
    >>> bool(jnp.allclose(w, jax.nn.softmax(jax.random.normal(jax.random.key(0), (3,)))))
    True
  """
  if distribution not in _RLW_DISTRIBUTIONS:
    raise ValueError(f"rlw: distribution must be one of {_RLW_DISTRIBUTIONS}, got {distribution!r}")

  def weight_fn(losses, *, key=None, **_):
    key = required_key("rlw", key, "draws random weights")
    k = losses.shape
    # Drawn in float32 at least, so a bfloat16 loss does not coarsen the draw.
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    if distribution == "normal":
      w = jax.nn.softmax(jax.random.normal(key, k, dtype))
    elif distribution == "uniform":
      w = jax.nn.softmax(jax.random.uniform(key, k, dtype))
    else:
      # Dir(1, …, 1) is exactly i.i.d. Exp(1) draws divided by their sum; this
      # avoids the rejection-sampling loop of a general gamma draw.
      e = jax.random.exponential(key, k, dtype)
      w = e / jnp.sum(e)
    return w.astype(losses.dtype)

  return stateless(weight_fn)


@method()
def gls() -> WeightingTransform:
  """Geometric loss strategy (GLS).

  Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature
  Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR
  Workshops 2019. The objective is the geometric mean of the losses,
  ``GM = (Πₖ Lₖ)^{1/K}``, whose gradient is ``Σₖ GM/(K Lₖ) ∇Lₖ``, so::

      wₖ = GM / (K Lₖ) = exp(mean(log L) − log Lₖ) / K

  computed in log space (the product of many small or large losses under- or
  overflows long before the weights do).

  Guard: the geometric mean is only defined for positive losses. Losses
  ``≤ 0`` are clamped to the smallest normal float, so a zero loss gets a very
  large but finite weight (its exact gradient is unbounded) instead of
  ``0·∞ = nan``; weights beyond the losses' dtype range are clipped to its
  largest finite value.

  Returns:
    A stateless :class:`WeightingTransform`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.gls()
    >>> w, _ = t.update(jnp.array([1.0, 4.0]), t.init(2))
    >>> w.tolist()  # GM = 2: [2 / (2·1), 2 / (2·4)]
    [1.0, 0.25]
  """

  def weight_fn(losses, **_):
    losses = jax.lax.stop_gradient(losses)
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    log_l = jnp.log(jnp.maximum(losses.astype(dtype), jnp.finfo(dtype).tiny))
    w = jnp.exp(jnp.mean(log_l) - log_l) / losses.shape[0]
    return jnp.minimum(w, jnp.finfo(losses.dtype).max).astype(losses.dtype)

  return stateless(weight_fn)
