"""Learned loss weightings: uncertainty (Kendall), IMTL-L and FAMO.

Each keeps its own parameters and its own optax optimizer state inside the
weighting state and takes one optimizer step per ``update`` call, from the
closed-form gradient of its objective with respect to those parameters. The
losses handed to ``update`` are concrete values; the train step treats the
returned weights as constants (``∇θ Σₖ stop_gradient(wₖ) Lₖ``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl.weighting._base import WeightingTransform
from jmtl.weighting._base import is_concrete
from jmtl.weighting._base import keep_absent
from jmtl.weighting._base import masked_softmax
from jmtl.weighting._base import method
from jmtl.weighting._base import present_of

Array = jax.Array


def _float_dtype():
  # The learned parameters use JAX's default float (float32, or float64 under
  # x64) whatever the losses' dtype, so the state's dtypes never depend on the
  # batch and a jitted step never retraces.
  return jax.dtypes.canonicalize_dtype(float)


class UncertaintyState(NamedTuple):
  """State of :func:`uncertainty`."""

  log_vars: Array  # (K,) float: sₖ = log σₖ²
  opt_state: optax.OptState  # the optimizer's state for ``log_vars``


class IMTLLState(NamedTuple):
  """State of :func:`imtl_l`."""

  log_scales: Array  # (K,) float: sₖ, the task weight is exp(sₖ)
  opt_state: optax.OptState  # the optimizer's state for ``log_scales``


def _learned_scales(name, state_cls, optimizer, init_value, *, weight_fn, grad_fn):
  """A transform whose weights are ``weight_fn(s)`` and whose ``s`` follows ``grad_fn(s, L)``."""

  def init_fn(num_tasks):
    s = jnp.full((num_tasks,), init_value, _float_dtype())
    return state_cls(s, optimizer.init(s))

  def update_fn(losses, state, **inputs):
    s, opt_state = state
    if losses.shape != s.shape:
      raise ValueError(f"{name}: state is for {s.shape[0]} tasks, got losses of shape {losses.shape}")
    present = present_of(losses, inputs.get("present"))
    losses_f = jax.lax.stop_gradient(losses).astype(s.dtype)
    # Weights from s before this step, so that the θ-update of this step is
    # the θ-gradient of the joint objective at the current (θ, s).
    weights = weight_fn(s).astype(losses.dtype)
    grad = jnp.where(present, grad_fn(s, losses_f), 0)
    updates, new_opt_state = optimizer.update(grad, opt_state, s)
    # An absent task's s and its optimizer moments stay as they were.
    new = keep_absent((optax.apply_updates(s, updates), new_opt_state), (s, opt_state), present)
    return weights, state_cls(*new)

  return WeightingTransform(init_fn, update_fn, "losses")


@method(static=("init_log_var",))
def uncertainty(
  optimizer: optax.GradientTransformation | None = None,
  init_log_var: float = 0.0,
) -> WeightingTransform:
  """Homoscedastic-uncertainty weighting (UW).

  Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
  Losses for Scene Geometry and Semantics", CVPR 2018. Each task has a learned
  log-variance ``sₖ = log σₖ²`` and the joint objective is the paper's
  regression (Gaussian-likelihood) form ``1/(2σₖ²) Lₖ + log σₖ`` written in
  ``s`` (``log σ = s/2``)::

      Σₖ ½ exp(−sₖ) Lₖ + ½ sₖ

  so the task weights are ``wₖ = ½ exp(−sₖ)`` and
  ``∂/∂sₖ = −½ exp(−sₖ) Lₖ + ½`` (stationary at ``sₖ = log Lₖ``). The paper
  derives ``1/σₖ² Lₖ + log σₖ`` (no ½ on the loss) for classification; using
  the regression form for every task is the common convention. Note that the
  weights start at ``w = ½`` (not 1) when ``init_log_var = 0``.

  The weights of a step use ``s`` *before* that step's update, so the model's
  update is the θ-gradient of the joint objective at the current ``(θ, s)``;
  then ``s`` takes one ``optimizer`` step on that closed-form gradient.

  Args:
    optimizer: the optax optimizer of ``s``. ``None`` means ``optax.adam(1e-3)``:
      the paper trains ``s`` jointly with the network, so the model's own
      optimizer and rate is the natural choice; Adam's step does not depend on
      the scale of the losses, so ``1e-3`` moves ``s`` by about 1e-3 (a 0.1%
      change of the weight) per step.
    init_log_var: the initial ``sₖ`` for every task.

  Returns:
    A :class:`WeightingTransform` with state :class:`UncertaintyState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jmtl
    >>> t = jmtl.weighting.uncertainty(optax.sgd(0.1))
    >>> state = t.init(2)
    >>> w, state = t.update(jnp.array([1.0, 3.0]), state)
    >>> w.tolist()  # ½ exp(−0)
    [0.5, 0.5]
    >>> [round(float(s), 3) for s in state.log_vars]  # s − 0.1 (−½ L + ½)
    [0.0, 0.1]
  """
  if optimizer is None:
    optimizer = optax.adam(1e-3)
  return _learned_scales(
    "uncertainty",
    UncertaintyState,
    optimizer,
    init_log_var,
    weight_fn=lambda s: 0.5 * jnp.exp(-s),
    grad_fn=lambda s, losses: 0.5 - 0.5 * jnp.exp(-s) * losses,
  )


@method(static=("init_log_scale",))
def imtl_l(
  optimizer: optax.GradientTransformation | None = None,
  init_log_scale: float = 0.0,
) -> WeightingTransform:
  """The loss-balancing part of IMTL (IMTL-L).

  Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
  Learning", ICLR 2021. Each task has a learned log-scale ``sₖ`` and the scaled
  loss ``exp(sₖ) Lₖ − sₖ``, minimised in ``s`` (stationary where the scaled
  loss ``exp(sₖ) Lₖ = 1`` for every task). So the task weights are
  ``wₖ = exp(sₖ)`` and ``∂/∂sₖ = exp(sₖ) Lₖ − 1``.

  As in :func:`uncertainty`, a step's weights use ``s`` before the step, then
  ``s`` takes one ``optimizer`` step.

  Args:
    optimizer: the optax optimizer of ``s``. ``None`` means ``optax.adam(1e-3)``
      (the paper trains ``s`` with the network's optimizer).
    init_log_scale: the initial ``sₖ`` for every task (0 gives ``w = 1``).

  Returns:
    A :class:`WeightingTransform` with state :class:`IMTLLState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jmtl
    >>> t = jmtl.weighting.imtl_l(optax.sgd(0.1))
    >>> w, state = t.update(jnp.array([1.0, 3.0]), t.init(2))
    >>> w.tolist()
    [1.0, 1.0]
    >>> [round(float(s), 3) for s in state.log_scales]  # s − 0.1 (L − 1)
    [0.0, -0.2]
  """
  if optimizer is None:
    optimizer = optax.adam(1e-3)
  return _learned_scales(
    "imtl_l",
    IMTLLState,
    optimizer,
    init_log_scale,
    weight_fn=jnp.exp,
    grad_fn=lambda s, losses: jnp.exp(s) * losses - 1.0,
  )


class FAMOState(NamedTuple):
  """State of :func:`famo`."""

  logits: Array  # (K,) float: task logits ξ, the weights' prior is softmax(ξ)
  opt_state: optax.OptState  # the optimizer's state for ``logits``
  prev_log_loss: Array  # (K,) float: log(L − min_losses + eps) at the task's last call with labels
  has_prev: Array  # (K,) bool: whether ``prev_log_loss`` holds a real value


@method()
def famo(
  learning_rate: float = 0.025,
  weight_decay: float = 1e-3,
  *,
  min_losses: float | Sequence[float] | None = None,
  eps: float = 1e-8,
  optimizer: optax.GradientTransformation | None = None,
) -> WeightingTransform:
  """Fast Adaptive Multitask Optimization (FAMO).

  Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
  NeurIPS 2023. With task logits ``ξ``, ``z = softmax(ξ)`` and shifted losses
  ``Dₖ = max(Lₖ − bₖ, 0) + eps`` (``b = min_losses``), the model follows
  ``∇θ Σₖ c zₖ log Dₖ`` with the constant ``c = 1 / Σᵢ zᵢ/Dᵢ``, i.e. the weights
  are::

      wₖ = c zₖ / Dₖ = softmax(ξ − log D)ₖ        (they sum to 1)

  and the logits follow the decrease of the log-losses,
  ``δₖ = log Dₖ(before) − log Dₖ(after)``: their gradient is
  ``g = (∂z/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ)``, which moves weight *away* from tasks
  whose loss fell faster than average, and ``ξ`` takes one ``optimizer`` step
  on ``g`` (the paper's ``ξ ← ξ − β(g + γξ)``, with Adam in practice).

  The engine runs one forward per step, so this is the amortised form: each
  call first updates ``ξ`` with ``δ = log D(previous call) − log D(this
  call)`` (skipped on the first call), then returns the weights from the new
  ``ξ`` and stores ``log D``. The decrease is therefore measured across two
  consecutive mini-batches; the paper's algorithm re-evaluates the same batch
  after the model step (one more forward). Over many steps the two agree in
  expectation; per step, batch-to-batch noise enters ``δ``.

  Conventions: losses below ``min_losses`` are clamped to it (so ``log D`` is
  always finite; the paper assumes ``L > b``); ``eps`` is added after, as in
  the authors' release. The default optimizer is Adam with the decay as an L2
  term on the gradient, ``optax.chain(optax.add_decayed_weights(γ),
  optax.adam(β))``, which is ``torch.optim.Adam(lr=β, weight_decay=γ)`` used by
  the authors' code; pass ``optimizer=optax.adamw(β, weight_decay=γ)`` for
  decoupled decay.

  Args:
    learning_rate: ``β``, the logits' Adam rate (paper: 0.025).
    weight_decay: ``γ``, the logits' decay toward uniform weights (paper: 1e-3).
    min_losses: ``b``, a lower bound of each loss (a scalar or one per task;
      default 0).
    eps: added to the shifted losses before the log.
    optimizer: replaces the default optimizer of ``ξ`` (then ``learning_rate``
      and ``weight_decay`` are unused).

  Returns:
    A :class:`WeightingTransform` with state :class:`FAMOState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.famo()
    >>> w, state = t.update(jnp.array([1.0, 4.0]), t.init(2))
    >>> [round(float(x), 3) for x in w]  # ∝ 1/L at the uniform start
    [0.8, 0.2]
    >>> w, state = t.update(jnp.array([0.5, 4.0]), state)  # task 0 fell faster
    >>> [round(float(x), 4) for x in state.logits]
    [-0.025, 0.025]
  """
  if optimizer is None:
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
  bounds = np.zeros(()) if min_losses is None else min_losses
  bounds = np.asarray(bounds, np.float64) if is_concrete(bounds) else jnp.asarray(bounds)
  if is_concrete(bounds) and (bounds.ndim > 1 or not np.all(np.isfinite(bounds))):
    raise ValueError(f"famo: min_losses must be a finite scalar or 1-D sequence, got {bounds.tolist()}")
  if is_concrete(eps) and not eps > 0:
    raise ValueError(f"famo: eps must be positive, got {eps}")

  def init_fn(num_tasks):
    dtype = _float_dtype()
    logits = jnp.zeros((num_tasks,), dtype)
    return FAMOState(logits, optimizer.init(logits), jnp.zeros((num_tasks,), dtype), jnp.zeros((num_tasks,), bool))

  def update_fn(losses, state, **inputs):
    k = state.logits.shape[0]
    if losses.shape != (k,) or bounds.shape not in ((), (k,)):
      raise ValueError(
        f"famo: state is for {k} tasks, got losses of shape {losses.shape} and min_losses of shape {bounds.shape}"
      )
    dtype = state.logits.dtype
    shifted = jax.lax.stop_gradient(losses).astype(dtype) - jnp.asarray(bounds, dtype)
    # Clamped at 0 so that a loss below its stated bound cannot make log D nan.
    log_d = jnp.log(jnp.maximum(shifted, 0) + eps)

    present = present_of(losses, inputs.get("present"))
    # The logits learn from the tasks with a loss now and at their last call (every task but on the first call).
    moving = present & state.has_prev
    delta = jnp.where(moving, state.prev_log_loss - log_d, 0)
    z = masked_softmax(state.logits, moving)
    grad = z * (delta - jnp.dot(z, delta))  # (∂softmax/∂ξ)ᵀ δ over the moving tasks
    updates, opt_state = optimizer.update(grad, state.opt_state, state.logits)
    # The others keep ξ and its optimizer moments (on the first call, all: there is no previous loss). A select,
    # not lax.cond: both sides are O(K), and a select also runs eagerly without recompiling the branches.
    old = (state.logits, state.opt_state)
    new = keep_absent((optax.apply_updates(state.logits, updates), opt_state), old, moving)
    logits, opt_state = jax.tree.map(lambda a, b: jnp.where(jnp.any(moving), a, b), new, old)
    weights = masked_softmax(logits - log_d, present).astype(losses.dtype)
    prev = jnp.where(present, log_d, state.prev_log_loss)
    return weights, FAMOState(logits, opt_state, prev, state.has_prev | present)

  return WeightingTransform(init_fn, update_fn, "losses")


class AutoLambdaState(NamedTuple):
  """State of :func:`auto_lambda`."""

  weights: Array  # (K,) float: λ, the task weights themselves
  opt_state: optax.OptState  # the meta-optimizer's state for ``weights``


@method(static=("primary",))
def auto_lambda(
  learning_rate: float = 1e-4,
  lookahead_lr: float = 1e-3,
  init_weight: float = 0.1,
  *,
  primary: Sequence[int] | None = None,
  optimizer: optax.GradientTransformation | None = None,
) -> WeightingTransform:
  """Auto-λ: task weights learned by a one-step lookahead on validation data.

  Liu, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
  Relationships", TMLR 2022. The weights ``λ`` are meta-parameters of

      min_λ  Σ_{k ∈ primary} Lₖ^val(θ − α ∇θ Σⱼ λⱼ Lⱼ(θ))

  and take one ``optimizer`` step (Adam, rate ``learning_rate``) on its
  gradient every training step, before the model's step, which then uses
  the new ``λ`` as task weights. The gradient is
  ``−α Σ_params ∇θLₖ(θ) · ∇θ'L^val(θ')``, which the paper approximates by a
  finite difference of ``∇λ`` at ``θ ± ε∇θ'L^val``; here JAX computes it
  exactly (:meth:`jmtl.grads.Context.meta_gradient`: a few backward passes).
  The virtual step is plain SGD of rate ``α = lookahead_lr`` on every
  parameter (the authors' code also adds the optimizer's momentum and weight
  decay); set it to the model optimizer's learning rate, as the paper does.
  ``λ`` is not constrained (as in the paper) and starts at ``init_weight``.

  The step's batch must carry ``batch["validation"]`` (a batch of validation
  data for the same tasks; ``jmtl train`` adds one when the weighting
  requires it). Defaults are the authors' (``autol_init=0.1``,
  ``autol_lr=1e-4``).

  Args:
    learning_rate: the meta-optimizer's rate (Adam).
    lookahead_lr: ``α``, the rate of the virtual SGD step.
    init_weight: the initial ``λ`` of every task.
    primary: indices of the tasks whose validation loss is the objective
      (``None``: all; the paper's multi-task setting); the others are
      auxiliary.
    optimizer: replaces Adam(``learning_rate``) for ``λ``.

  Returns:
    A :class:`WeightingTransform` (needs the losses, requires
    ``"validation"``) with state :class:`AutoLambdaState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.weighting.auto_lambda(learning_rate=0.1)
    >>> helps = lambda w, lr, v=None: -jnp.array([1.0, -1.0])  # task 0's step lowers the validation loss
    >>> w, state = t.update(jnp.ones(2), t.init(2), meta_gradient=helps)
    >>> [round(float(x), 3) for x in w]
    [0.2, 0.0]
  """
  if optimizer is None:
    optimizer = optax.adam(learning_rate)
  if is_concrete(lookahead_lr) and not lookahead_lr > 0:
    raise ValueError(f"auto_lambda: lookahead_lr must be positive, got {lookahead_lr}")
  picked = None if primary is None else tuple(int(i) for i in primary)
  if picked is not None and (not picked or len(set(picked)) != len(picked) or min(picked) < 0):
    raise ValueError(f"auto_lambda: primary must be distinct non-negative task indices, got {primary!r}")

  def init_fn(num_tasks):
    if picked is not None and max(picked) >= num_tasks:
      raise ValueError(f"auto_lambda: primary {picked} names a task beyond the {num_tasks} tasks")
    w = jnp.full((num_tasks,), init_weight, _float_dtype())
    return AutoLambdaState(w, optimizer.init(w))

  def update_fn(losses, state, **inputs):
    k = state.weights.shape[0]
    if losses.shape != (k,):
      raise ValueError(f"auto_lambda: state is for {k} tasks, got losses of shape {losses.shape}")
    meta_gradient = inputs.get("meta_gradient")
    if meta_gradient is None:
      raise ValueError(
        "auto_lambda learns from validation data: pass meta_gradient=... (the train step gives it when the "
        "batch has batch['validation'])"
      )
    v = None if picked is None else jnp.zeros((k,), state.weights.dtype).at[jnp.asarray(picked)].set(1)
    grad = jax.lax.stop_gradient(meta_gradient(state.weights, lookahead_lr, v)).astype(state.weights.dtype)
    updates, opt_state = optimizer.update(grad, state.opt_state, state.weights)
    # An absent task's λ and its optimizer moments stay as they were.
    weights, opt_state = keep_absent(
      (optax.apply_updates(state.weights, updates), opt_state),
      (state.weights, state.opt_state),
      present_of(losses, inputs.get("present")),
    )
    return weights.astype(losses.dtype), AutoLambdaState(weights, opt_state)

  return WeightingTransform(init_fn, update_fn, "losses", requires=("validation",))
