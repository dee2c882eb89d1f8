"""GradNorm: learned task weights that balance the tasks' gradient norms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_gramian
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import keep_absent
from jmtl.weighting._base import last_layer
from jmtl.weighting._base import masked_softmax
from jmtl.weighting._base import method
from jmtl.weighting._base import power_of_two
from jmtl.weighting._base import present_of

Array = jax.Array

# The floor of a weight after its optimizer step: positive, so no task is
# silenced for good and the renormalisation never divides by zero, and far
# below any weight GradNorm settles at.
_MIN_WEIGHT = 1e-6


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`."""

  weights: Array  # (K,) float: wᵢ > 0 with Σᵢ wᵢ = K, the weights of the next step
  opt_state: optax.OptState  # the optimizer's state for ``weights``
  initial_losses: Array  # (K,) float: Lᵢ(0), the losses of the task's first call with labels
  has_initial: Array  # (K,) bool: whether ``initial_losses`` is set


@method()
def gradnorm(
  alpha: float = 1.5,
  optimizer: optax.GradientTransformation | None = None,
  select: Callable[[Any], Any] | None = last_layer,
) -> WeightingTransform:
  """Gradient normalization (GradNorm).

  Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization
  for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018. With the
  task weights ``wᵢ`` and the Gramian ``G`` of the task gradients over a
  parameter subset ``W`` (typically the last shared layer)::

      G_W⁽ⁱ⁾ = ‖∇_W wᵢLᵢ‖ = wᵢ √Gᵢᵢ,     Ḡ = meanᵢ G_W⁽ⁱ⁾
      r̃ᵢ = (Lᵢ(t)/Lᵢ(0)) / meanⱼ(Lⱼ(t)/Lⱼ(0))
      L_grad = Σᵢ |G_W⁽ⁱ⁾ − Ḡ r̃ᵢ^α|

  with the target ``Ḡ r̃ᵢ^α`` held constant, so
  ``∂L_grad/∂wᵢ = √Gᵢᵢ sign(G_W⁽ⁱ⁾ − Ḡ r̃ᵢ^α)``. A task that trains slowly
  (large ``r̃ᵢ``) is pushed toward a larger gradient norm; ``α`` sets how hard.

  Each call returns the current weights (the model's step of this call uses
  them), then gives ``w`` one ``optimizer`` step on ``∂L_grad/∂w``, floors it at
  a small positive value and renormalises it to ``Σᵢ wᵢ = K``. The losses
  passed to ``update`` are the ``Lᵢ(t)``; those of the first call are recorded
  as ``Lᵢ(0)`` (so ``r̃ = 1`` on that call). ``r̃`` is computed in log space,
  ``r̃ = K softmax(log L(t) − log L(0))``, with losses floored at the smallest
  normal float, so extreme or zero losses keep it finite.

  Args:
    alpha: ``α ≥ 0``, the strength of the pull toward equal training rates
      (``α = 0``: equal gradient norms). The paper tunes it per problem.
    optimizer: the optax optimizer of ``w``. ``None`` means
      ``optax.adam(0.025)``: Adam's step does not depend on the scale of the
      gradient norms (which varies by orders of magnitude between models), and
      0.025 moves O(1) weights visibly within tens of steps.
    select: ``select(shared_params) -> subtree``, the parameter subset ``W``
      the engine computes the Gramian over: by default
      :func:`~jmtl.weighting.last_layer`, the paper's choice (the last
      top-level entry of ``params["shared"]``); ``None``: all shared
      parameters.

  Returns:
    A :class:`WeightingTransform` with state :class:`GradNormState` that needs
    the Gramian (over ``select``).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jmtl
    >>> t = jmtl.weighting.gradnorm(optimizer=optax.sgd(0.1))
    >>> G = jnp.diag(jnp.array([1.0, 9.0]))  # gradient norms 1 and 3
    >>> w, state = t.update(jnp.array([1.0, 1.0]), t.init(2), gramian=G)
    >>> w.tolist()
    [1.0, 1.0]
    >>> [round(float(x), 3) for x in state.weights]  # 1 + 0.1·1, 1 − 0.1·3, renormalised
    [1.222, 0.778]
  """
  if is_concrete(alpha) and not alpha >= 0:
    raise ValueError(f"gradnorm: alpha must be non-negative, got {alpha}")
  if optimizer is None:
    optimizer = optax.adam(0.025)

  def init_fn(num_tasks):
    # The default float, whatever the losses' dtype: the state's dtypes never
    # depend on the batch, so a jitted step never retraces.
    dtype = jax.dtypes.canonicalize_dtype(float)
    weights = jnp.ones((num_tasks,), dtype)
    return GradNormState(
      weights, optimizer.init(weights), jnp.zeros((num_tasks,), dtype), jnp.zeros((num_tasks,), bool)
    )

  def update_fn(losses, state, **inputs):
    k = state.weights.shape[0]
    gramian = checked_gramian("gradnorm", losses, inputs.get("gramian"))
    if losses.shape != (k,):
      raise ValueError(f"gradnorm: state is for {k} tasks, got losses of shape {losses.shape}")
    present = present_of(losses, inputs.get("present"))
    kp = jnp.sum(present).astype(state.weights.dtype)
    dtype = state.weights.dtype
    w = state.weights
    current = jax.lax.stop_gradient(losses).astype(dtype)
    initial = jnp.where(state.has_initial | ~present, state.initial_losses, current)
    unit = power_of_two(jnp.asarray(inputs.get("gramian_exponent", 0), jnp.int32) // 2, dtype)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian).astype(dtype), 0)) * unit  # G = gramian · 2**e

    # Among the present tasks only: their mean gradient norm and training rates.
    tiny = jnp.finfo(dtype).tiny
    log_ratio = jnp.log(jnp.maximum(current, tiny)) - jnp.log(jnp.maximum(initial, tiny))
    relative_rate = kp * masked_softmax(log_ratio, present)
    weighted = w * norms
    target = jnp.sum(jnp.where(present, weighted, 0)) / jnp.maximum(kp, 1) * relative_rate**alpha
    grad = jnp.where(present, norms * jnp.sign(weighted - target), 0)

    updates, new_opt_state = optimizer.update(grad, state.opt_state, w)
    moved = jnp.maximum(optax.apply_updates(w, updates), _MIN_WEIGHT)
    # The present tasks' weights keep their total (Σ = K over all tasks); an absent task's weight and optimizer
    # moments stay as they were.
    mass = k - jnp.sum(jnp.where(present, 0, w))
    moved = jnp.where(present, mass * moved / jnp.maximum(jnp.sum(jnp.where(present, moved, 0)), tiny), w)
    new_w, opt_state = keep_absent((moved, new_opt_state), (w, state.opt_state), present)
    return w.astype(losses.dtype), GradNormState(new_w, opt_state, initial, state.has_initial | present)

  return WeightingTransform(init_fn, update_fn, "gramian", select)
