"""Loss-level weightings computed in closed form: DWA, RLW, RGW, GLS and STCH."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import masked_softmax
from jmtl.weighting._base import method
from jmtl.weighting._base import present_of
from jmtl.weighting._base import required_key
from jmtl.weighting._base import stateless

Array = jax.Array


class DWAState(NamedTuple):
  """State of :func:`dwa`."""

  count: Array  # () int32: update calls so far in the current period, in [0, period)
  periods: Array  # () int32: completed periods, saturating at 2 (all DWA needs to know)
  running_sum: Array  # (K,) float: sum of the losses of the current period (calls with the task present)
  running_count: Array  # (K,) float: calls of the current period with the task present
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
    return DWAState(zero, zero, zeros, zeros, zeros, zeros)

  def update_fn(losses, state, **inputs):
    k = state.running_sum.shape[0]
    if losses.shape != (k,):
      raise ValueError(f"dwa: state is for {k} tasks, got losses of shape {losses.shape}")
    present = present_of(losses, inputs.get("present"))
    dtype = state.running_sum.dtype
    finfo = jnp.finfo(dtype)
    # A zero mean loss would give r = x/0; the floor and the cap keep r finite
    # (softmax subtracts the max, so any finite r is safe).
    ratio = state.last_mean / jnp.maximum(state.prev_mean, finfo.tiny)
    ratio = jnp.minimum(ratio, finfo.max)
    kp = jnp.sum(present).astype(dtype)
    weights = jnp.where(state.periods >= 2, kp * masked_softmax(ratio / temperature, present), jnp.ones((k,), dtype))

    running_sum = state.running_sum + jnp.where(present, jax.lax.stop_gradient(losses).astype(dtype), 0)
    running_count = state.running_count + present.astype(dtype)
    count = state.count + 1
    done = count >= period
    # A task without labels in the whole period keeps its means.
    seen = done & (running_count > 0)
    new_state = DWAState(
      count=jnp.where(done, 0, count).astype(jnp.int32),
      periods=jnp.where(done, jnp.minimum(state.periods + 1, 2), state.periods).astype(jnp.int32),
      running_sum=jnp.where(done, jnp.zeros_like(running_sum), running_sum),
      running_count=jnp.where(done, jnp.zeros_like(running_count), running_count),
      last_mean=jnp.where(seen, running_sum / jnp.where(seen, running_count, 1), state.last_mean),
      prev_mean=jnp.where(seen, state.last_mean, state.prev_mean),
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
  _check_distribution("rlw", distribution)
  return stateless(
    lambda losses, *, key=None, present=None, **_: _random_weights("rlw", distribution, losses, key, present)
  )


def _check_distribution(name: str, distribution: str) -> None:
  if distribution not in _RLW_DISTRIBUTIONS:
    raise ValueError(f"{name}: distribution must be one of {_RLW_DISTRIBUTIONS}, got {distribution!r}")


def _random_weights(name: str, distribution: str, losses: Array, key, present) -> Array:
  """Random weights on the simplex of the present tasks, drawn from ``key`` (RLW and RGW)."""
  key = required_key(name, key, "draws random weights")
  k = losses.shape
  # Drawn in float32 at least, so a bfloat16 loss does not coarsen the draw.
  dtype = jnp.promote_types(losses.dtype, jnp.float32)
  present = present_of(losses, present)
  if distribution == "normal":
    w = masked_softmax(jax.random.normal(key, k, dtype), present)
  elif distribution == "uniform":
    w = masked_softmax(jax.random.uniform(key, k, dtype), present)
  else:
    # Dir(1, …, 1) is exactly i.i.d. Exp(1) draws divided by their sum; this
    # avoids the rejection-sampling loop of a general gamma draw.
    e = jnp.where(present, jax.random.exponential(key, k, dtype), 0)
    w = e / jnp.maximum(jnp.sum(e), jnp.finfo(dtype).tiny)
  return w.astype(losses.dtype)


@method()
def rgw(distribution: str = "normal") -> WeightingTransform:
  """Random gradient weighting (RGW).

  Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A
  Litmus Test for Multi-Task Learning", TMLR 2022, Algorithm 2. The weights
  are :func:`rlw`'s (the same draw from the same key), applied to the task
  gradients of the *shared* parameters only: ``θ ← θ − η Σₖ wₖ ∇θ Lₖ``,
  while each task's own parameters follow its unweighted gradient
  ``∇ψₖ Lₖ``. That difference from RLW (which also scales ``∇ψₖ Lₖ`` by
  ``wₖ``) is declared as ``heads="own"``, so the engine applies it on every
  route: on the loss-level route the task parameters' gradient is a second
  VJP, batched with the first. The paper takes the gradients at the shared
  representation; the direction on ``θ`` is the same.

  Args:
    distribution: as for :func:`rlw`.

  Returns:
    A stateless :class:`WeightingTransform` (``heads="own"``) that needs a
    ``key``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> t, r = jmtl.weighting.rgw(), jmtl.weighting.rlw()
    >>> key = jax.random.key(0)
    >>> bool(jnp.all(t.update(jnp.ones(3), t.init(3), key=key)[0] == r.update(jnp.ones(3), r.init(3), key=key)[0]))
    True
    >>> t.heads, r.heads
    ('own', None)
  """
  _check_distribution("rgw", distribution)
  t = stateless(
    lambda losses, *, key=None, present=None, **_: _random_weights("rgw", distribution, losses, key, present)
  )
  return t._replace(heads="own")


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

  def weight_fn(losses, present=None, **_):
    present = present_of(losses, present)
    kp = jnp.maximum(jnp.sum(present), 1)
    losses = jax.lax.stop_gradient(losses)
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    log_l = jnp.where(present, jnp.log(jnp.maximum(losses.astype(dtype), jnp.finfo(dtype).tiny)), 0)
    w = jnp.where(present, jnp.exp(jnp.sum(log_l) / kp - log_l) / kp, 0)  # the present tasks' geometric mean
    return jnp.minimum(w, jnp.finfo(losses.dtype).max).astype(losses.dtype)

  return stateless(weight_fn)


class STCHState(NamedTuple):
  """State of :func:`stch`."""

  count: Array  # () int32: update calls so far, saturating at warmup_steps + nadir_steps
  loss_sum: Array  # (K,) float: sum of the losses of the nadir-recording calls with the task present
  loss_count: Array  # (K,) float: those calls' number (the nadir is loss_sum / loss_count)


@method(static=("warmup_steps", "nadir_steps"))
def stch(mu: float = 1.0, warmup_steps: int = 4, nadir_steps: int = 1, eps: float = 1e-20) -> WeightingTransform:
  """Smooth Tchebycheff scalarization (STCH).

  Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for
  Multi-Objective Optimization", ICML 2024. The smooth (log-sum-exp)
  Tchebycheff scalarization ``μ log Σₖ exp(λₖ(fₖ − zₖ)/μ)`` of the paper,
  applied as in the authors' multi-task code to the log-losses relative to a
  nadir point ``n`` (``fₖ = log(Lₖ/nₖ + eps)``, ``z = 0``, ``λ = 1``) and
  scaled by ``K``::

      S(L) = K μ log Σₖ exp(xₖ/μ),      xₖ = log(Lₖ/nₖ + eps)

  The engine applies the weights to ``∇Lₖ``, so they are ``∂S/∂Lₖ`` (and
  ``Σₖ wₖ∇Lₖ = ∇S``)::

      wₖ = K softmax(x/μ)ₖ / (Lₖ + eps·nₖ)

  The nadir is recorded first: during ``warmup_steps + nadir_steps`` calls
  the objective is ``Σₖ log(Lₖ + eps)`` (``wₖ = 1/(Lₖ + eps)``), and the
  losses of the last ``nadir_steps`` of them are averaged into ``n``. The
  reference code counts the warm-up in epochs (4 epochs of log-losses, the
  nadir averaged over the 5th); **here both are counted in update calls
  (steps)**: set ``warmup_steps = 4 × steps_per_epoch`` and ``nadir_steps =
  steps_per_epoch`` to reproduce it (the defaults read an epoch as one
  call). As ``μ → ∞`` the weights tend to the warm-up's; as ``μ → 0`` all the
  weight goes to the task with the largest ``Lₖ/nₖ`` (the Tchebycheff
  scalarization).

  Guards: losses below 0 count as 0; ``x`` and the weights are computed in
  log space (``logaddexp``), so ``Lₖ/nₖ`` cannot overflow; a zero loss gets
  the large but finite weight ``1/eps`` (warm-up) or ``K·softmax/(eps·n)``,
  capped at the losses' dtype's largest value; a zero nadir counts as the
  smallest normal float.

  Args:
    mu: the smoothing ``μ > 0`` (the reference's default 1).
    warmup_steps: calls of log-loss weights before the nadir is recorded
      (``≥ 0``).
    nadir_steps: calls whose mean loss is the nadir (``≥ 1``), also with
      log-loss weights.
    eps: ``eps > 0`` inside the logs (the reference's 1e-20).

  Returns:
    A :class:`WeightingTransform` that needs only the losses, with state
    :class:`STCHState` (the call count and a ``(K,)`` sum: O(K) memory).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.stch(mu=1.0, warmup_steps=0, nadir_steps=1)
    >>> w, state = t.update(jnp.array([2.0, 4.0]), t.init(2))
    >>> [round(float(x), 4) for x in w]  # recording the nadir n = (2, 4): ∂/∂L Σ log L
    [0.5, 0.25]
    >>> w, state = t.update(jnp.array([1.0, 4.0]), state)  # L/n = (½, 1): softmax = (⅓, ⅔)
    >>> [round(float(x), 4) for x in w]  # 2·(⅓/1, ⅔/4)
    [0.6667, 0.3333]
  """
  if is_concrete(mu) and not mu > 0:
    raise ValueError(f"stch: mu must be positive, got {mu}")
  if int(warmup_steps) != warmup_steps or warmup_steps < 0:
    raise ValueError(f"stch: warmup_steps must be a non-negative integer, got {warmup_steps}")
  if int(nadir_steps) != nadir_steps or nadir_steps < 1:
    raise ValueError(f"stch: nadir_steps must be a positive integer, got {nadir_steps}")
  if is_concrete(eps) and not eps > 0:
    raise ValueError(f"stch: eps must be positive, got {eps}")
  warmup_steps, nadir_steps = int(warmup_steps), int(nadir_steps)
  warm = warmup_steps + nadir_steps

  def init_fn(num_tasks):
    dtype = jax.dtypes.canonicalize_dtype(float)
    return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), dtype), jnp.zeros((num_tasks,), dtype))

  def update_fn(losses, state, **inputs):
    present = present_of(losses, inputs.get("present"))
    k = state.loss_sum.shape[0]
    if losses.shape != (k,):
      raise ValueError(f"stch: state is for {k} tasks, got losses of shape {losses.shape}")
    dtype = state.loss_sum.dtype
    finfo = jnp.finfo(dtype)
    loss = jnp.maximum(jax.lax.stop_gradient(losses).astype(dtype), 0)
    log_loss = jnp.log(loss)  # −inf for a zero loss: logaddexp below handles it
    log_eps = jnp.log(jnp.asarray(eps, dtype))
    warming = state.count < warm

    # Warm-up: ∂/∂Lₖ Σ log(Lₖ + eps).
    log_w_warm = -jnp.logaddexp(log_loss, log_eps)
    # STCH, with the nadir of the completed recording (unused while warming).
    nadir = state.loss_sum / jnp.maximum(state.loss_count, 1)
    log_nadir = jnp.log(jnp.maximum(nadir, finfo.tiny))
    x = jnp.logaddexp(log_loss - log_nadir, log_eps)
    # Over the present tasks only (K' of them); an absent task's weight is 0.
    log_softmax = jax.nn.log_softmax(jnp.where(present, x / mu, -jnp.inf))
    log_k = jnp.log(jnp.maximum(jnp.sum(present), 1).astype(dtype))
    log_w_stch = log_k + log_softmax - jnp.logaddexp(log_loss, log_eps + log_nadir)
    log_w = jnp.where(warming, log_w_warm, log_w_stch)
    top = jnp.asarray(jnp.finfo(losses.dtype).max, dtype)
    weights = jnp.where(present, jnp.minimum(jnp.exp(jnp.minimum(log_w, jnp.log(top))), top), 0)

    recording = (state.count >= warmup_steps) & warming & present
    new_state = STCHState(
      jnp.minimum(state.count + 1, warm).astype(jnp.int32),
      jnp.where(recording, state.loss_sum + loss, state.loss_sum),
      state.loss_count + recording.astype(dtype),
    )
    return weights.astype(losses.dtype), new_state

  return WeightingTransform(init_fn, update_fn, "losses")
