"""ExcessMTL: task weights driven by estimated excess risks, from the per-task gradients.

The estimate needs a diagonal preconditioner accumulated over the steps, one
number per task and shared parameter, so the state holds ``K × P`` numbers
(``P`` = the size of the shared parameters, or of the ``select``-ed part):
the memory of the Jacobian itself, kept from step to step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import checked_jacobian
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import keep_absent
from jmtl.weighting._base import masked_softmax
from jmtl.weighting._base import method
from jmtl.weighting._base import present_of

Array = jax.Array


class ExcessMTLState(NamedTuple):
  """State of :func:`excess_mtl`."""

  count: Array  # (K,) int32: calls with the task present, saturating at 2 (only its first call is special)
  weights: Array  # (K,) float: the task weights, Σ = K (1 before the second call)
  initial_excess: Array  # (K,) float: Ê(1), the first call's excess-risk estimates (the normaliser)
  sq_grad_sum: Any  # Σₜ gₜ², per task and parameter: leaves (K, ...) like the Jacobian


def _accumulator(shapes, num_tasks: int):
  """Zeros ``(K, ...)`` for one task's gradient ``shapes`` (a pytree of arrays or ``ShapeDtypeStruct``)."""
  wide = jax.dtypes.canonicalize_dtype(float)
  return jax.tree.map(
    lambda s: jnp.zeros((num_tasks, *jnp.shape(s)), jnp.promote_types(jnp.result_type(s), wide)), shapes
  )


@method()
def excess_mtl(
  step_size: float = 1e-2, eps: float = 1e-7, *, select: Callable[[Any], Any] | None = None
) -> WeightingTransform:
  """Multi-task learning with excess risks (ExcessMTL).

  He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task
  Learning with Excess Risks", ICML 2024. A task's excess risk (its loss
  above the best attainable, i.e. its distance to convergence, unlike the
  loss itself, which label noise inflates) is estimated by a second-order
  Taylor expansion with a diagonal, AdaGrad-like Hessian accumulated over the
  calls; with ``gₜ`` task ``k``'s gradient of the shared parameters at call
  ``t``::

      Sₜ = Σ_{s ≤ t} gₛ²,      Êₜ = Σᵢ gₜ,ᵢ² / √(Sₜ,ᵢ + eps)      (element-wise, summed over parameters i)

  The estimates are divided by the first call's (the paper's scale
  processing, so that tasks of different loss scales compare), and the
  weights take an exponentiated-gradient (multiplicative-weights) step,
  renormalised to sum to ``K``::

      rₜ = Êₜ / Ê₁,      wₜ = K · wₜ₋₁ e^{η rₜ} / Σₖ wₜ₋₁,ₖ e^{η rₖ,ₜ}

  ``w₁ = 1``: the first call records ``Ê₁`` and leaves the weights at 1; each
  later call updates them and returns the new ones (as the authors' code and
  LibMTL do). A task further from convergence gets more weight.

  Conventions: the step is computed in log space, ``w = K·softmax(log w +
  ηr)``, so a huge ``r`` saturates the weights instead of overflowing; a task
  whose first estimate is zero (a zero gradient on the first call) has its
  ratio capped at the dtype's largest value instead of ``x/0``.
  torchjd's ``ExcessMTL`` differs: its weights sum to 1, it also updates them
  on the first call (with the raw, unnormalised ``Ê₁``), and its default
  ``η`` is 1; here ``η = 0.01`` and ``eps`` follow the authors' code.

  State (:class:`ExcessMTLState`): the ``(K,)`` weights and first estimates,
  and the accumulator ``S``, **``K × P`` numbers** (a copy of the Jacobian's
  size, kept across steps; ``select`` restricts both to a parameter subset,
  e.g. :func:`~jmtl.weighting.last_layer`, where the authors use all shared
  parameters). ``init(num_tasks, shapes=...)`` needs one task's
  gradient shapes (``requires=("gradient_shapes",)``):
  :class:`jmtl.TrainState` passes them, through
  :func:`jmtl.weighting.init_state`, as do :func:`~jmtl.weighting.aggregate`
  and :func:`~jmtl.weighting.as_aggregator`.

  Args:
    step_size: ``η > 0``, the multiplicative-weights step (the authors'
      ``robust_step_size``, default 0.01).
    eps: ``eps ≥ 0`` in the preconditioner's square root (the authors' 1e-7).
    select: ``None`` (all shared parameters) or ``select(shared_params) ->
      subtree``, the parameters whose per-task gradients the estimate uses
      (and the accumulator holds).

  Returns:
    A :class:`WeightingTransform` with ``needs="jacobian"`` and state
    :class:`ExcessMTLState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.excess_mtl(step_size=1.0)
    >>> state = t.init(2, shapes=jax.ShapeDtypeStruct((2,), jnp.float32))  # one task's gradient
    >>> w, state = t.update(jnp.ones(2), state, jacobian=jnp.array([[1.0, 0.0], [0.0, 2.0]]))
    >>> w.tolist()  # the first call records Ê₁ = (1, 2)
    [1.0, 1.0]
    >>> w, state = t.update(jnp.ones(2), state, jacobian=jnp.array([[1.0, 0.0], [0.0, 0.2]]))
    >>> [round(float(x), 4) for x in w]  # r = (1/√2 / 1, 0.04/√4.04 / 2): task 0 is further from convergence
    [1.3351, 0.6649]
  """
  if is_concrete(step_size) and not step_size > 0:
    raise ValueError(f"excess_mtl: step_size must be positive, got {step_size}")
  if is_concrete(eps) and not eps >= 0:
    raise ValueError(f"excess_mtl: eps must be non-negative, got {eps}")

  def init_fn(num_tasks, shapes=None):
    if shapes is None:
      raise ValueError(
        "excess_mtl accumulates per-task squared gradients in its state: init needs shapes=... (one task's "
        "gradient, as jax.ShapeDtypeStruct leaves); TrainState.create passes them, or call "
        "jmtl.weighting.init_state"
      )
    dtype = jax.dtypes.canonicalize_dtype(float)
    ones = jnp.ones((num_tasks,), dtype)
    return ExcessMTLState(
      jnp.zeros((num_tasks,), jnp.int32), ones, jnp.zeros_like(ones), _accumulator(shapes, num_tasks)
    )

  def update_fn(losses, state, **inputs):
    jacobian = checked_jacobian("excess_mtl", losses, inputs.get("jacobian"), state.sq_grad_sum)
    k = losses.shape[0]
    if state.weights.shape != (k,):
      raise ValueError(f"excess_mtl: state is for {state.weights.shape[0]} tasks, got losses of shape {losses.shape}")
    dtype = state.weights.dtype
    finfo = jnp.finfo(dtype)
    present = present_of(losses, inputs.get("present"))
    sq = jax.tree.map(lambda j, s: jnp.square(jax.lax.stop_gradient(j).astype(s.dtype)), jacobian, state.sq_grad_sum)
    # An absent task's accumulator, normaliser and weight stay as they were.
    total = keep_absent(jax.tree.map(jnp.add, state.sq_grad_sum, sq), state.sq_grad_sum, present)

    def estimate(q, s):
      # A parameter whose gradient has always been 0 adds 0 (with eps = 0 it would be 0/0).
      den = jnp.sqrt(s + eps)
      return jnp.sum(jnp.where(den > 0, q / jnp.where(den > 0, den, 1), 0).reshape(k, -1), axis=1).astype(dtype)

    excess = sum(jax.tree.leaves(jax.tree.map(estimate, sq, total)))

    first = state.count == 0
    initial = jnp.where(present & first, excess, state.initial_excess)
    big = 0.5 * finfo.max
    ratio = jnp.minimum(excess / jnp.maximum(initial, finfo.tiny), big)
    logits = jnp.log(jnp.maximum(state.weights, finfo.tiny)) + jnp.minimum(step_size * ratio, big)
    # The tasks that move share their weights' total (K on a full batch after the first call, as in the paper).
    active = present & ~first
    mass = jnp.sum(jnp.where(active, state.weights, 0))
    weights = jnp.where(active, mass * masked_softmax(logits, active), state.weights)
    count = jnp.where(present, jnp.minimum(state.count + 1, 2), state.count).astype(jnp.int32)
    new_state = ExcessMTLState(count, weights, initial, total)
    return weights.astype(losses.dtype), new_state

  return WeightingTransform(init_fn, update_fn, "jacobian", select, requires=("gradient_shapes",))
