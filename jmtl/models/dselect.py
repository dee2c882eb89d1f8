"""DSelect-k: a sparse, continuously differentiable gate over MLP experts.

The gate of each task is a softmax-weighted sum of ``k`` single-expert
selectors, each a smoothed binary code over the experts; :func:`smooth_step`
and :func:`binary_selector` are the two pieces, :func:`dselect_k` the
multi-task model (shared experts, per-task gates and towers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmtl.models import _common
from jmtl.models import _experts_common as _ec
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any


def smooth_step(t: Array, gamma: float = 1.0) -> Array:
  """The cubic smooth-step ``S``: 0 below ``-γ/2``, 1 above ``γ/2``, C¹ everywhere.

  ``S(t) = -2 t³/γ³ + 3 t/(2γ) + 1/2`` on ``[-γ/2, γ/2]``; ``S(0) = 1/2`` and
  ``S'(±γ/2) = 0``, so ``S`` reaches exact 0 and 1 (exact selection) with a
  continuous derivative (Hazimeh et al. 2021, see :func:`dselect_k`).

  Args:
    t: any array.
    gamma: the width of the smooth region, positive.

  Returns:
    ``S(t)``, elementwise, in the dtype of ``t``.

  >>> import jax.numpy as jnp
  >>> smooth_step(jnp.array([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0]))
  Array([0.     , 0.     , 0.5    , 0.84375, 1.     , 1.     ], dtype=float32)
  """
  t = jnp.asarray(t)
  half = gamma / 2
  tc = jnp.clip(t, -half, half)  # keeps the cubic (and its gradient) finite and in range off the ramp
  cubic = -2.0 / gamma**3 * tc**3 + 1.5 / gamma * tc + 0.5
  return jnp.where(t <= -half, jnp.zeros_like(cubic), jnp.where(t >= half, jnp.ones_like(cubic), cubic))


@functools.cache
def _codes(num_bits: int, num_experts: int) -> np.ndarray:
  """``bits[j, l]``: bit ``l`` (least significant first) of expert ``j``'s code, ``(E, m)`` bool."""
  return (np.arange(num_experts)[:, None] >> np.arange(num_bits)[None, :]) & 1 == 1


def num_code_bits(num_experts: int) -> int:
  """``m = max(1, ⌈log₂ E⌉)``: the binary-code length of a selector over ``E`` experts.

  >>> [num_code_bits(e) for e in (1, 2, 3, 4, 5, 8)]
  [1, 1, 2, 2, 3, 3]
  """
  return max(1, math.ceil(math.log2(num_experts)))


def binary_selector(z: Array, num_experts: int, gamma: float = 1.0) -> Array:
  """The single-expert selector ``r(z)`` of DSelect-k, over the first ``num_experts`` codes.

  With ``m = z.shape[-1]`` logits, ``r(z)ⱼ = Πₗ [S(zₗ) if bit l of j is 1 else
  1 − S(zₗ)]`` for ``j < 2ᵐ``; these ``2ᵐ`` entries are non-negative and sum
  to 1, and when every ``|zₗ| ≥ γ/2`` exactly one of them is 1 (the expert
  whose code is the sign pattern of ``z``).

  When ``E = num_experts`` is not a power of two, codes ``j ≥ E`` name no
  expert. The paper presents the power-of-two case; here the first ``E``
  entries are kept and renormalised to sum to 1, so a selector never puts
  weight on a missing expert and stays exact (one-hot) when saturated on a
  valid code. If it saturates on an invalid code (all kept entries exactly 0),
  it returns the uniform ``1/E`` instead of ``0/0``; its gradient is zero
  there, as on any saturated code.

  Args:
    z: logits ``(..., m)`` with ``2ᵐ >= num_experts``.
    num_experts: ``E``, the number of experts.
    gamma: the smooth-step width.

  Returns:
    ``(..., E)`` non-negative weights summing to 1.

  Raises:
    ValueError: if ``2 ** z.shape[-1] < num_experts``.

  >>> import jax.numpy as jnp
  >>> binary_selector(jnp.array([0.0, 0.0]), 4)
  Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
  >>> binary_selector(jnp.array([3.0, -3.0]), 4)  # bits (1, 0) -> expert 1
  Array([0., 1., 0., 0.], dtype=float32)
  """
  z = jnp.asarray(z)
  m = z.shape[-1]
  if 2**m < num_experts:
    raise ValueError(f"binary_selector: {m} code bits cannot address {num_experts} experts (need 2**m >= E)")
  s = smooth_step(z, gamma)[..., None, :]  # (..., 1, m)
  r = jnp.prod(jnp.where(_codes(m, num_experts), s, 1 - s), axis=-1)  # (..., E)
  if num_experts == 2**m:
    return r
  total = jnp.sum(r, axis=-1, keepdims=True)
  valid = total > 0
  return jnp.where(valid, r / jnp.where(valid, total, 1), jnp.full_like(r, 1.0 / num_experts))


@functools.cache
def _logit_init(gamma: float):
  # Selector logits start at a std of about γ/4 for unit-variance inputs: inside the smooth
  # region [-γ/2, γ/2], where S has a gradient, but apart so the k selectors differ.
  return nn.initializers.variance_scaling((gamma / 4) ** 2, "fan_in", "truncated_normal")


def dselect_k(
  task_dims: Mapping[str, int],
  num_experts: int = 4,
  k: int = 2,
  expert_hidden: Sequence[int] = (64,),
  tower_hidden: Sequence[int] = (),
  *,
  gamma: float = 1.0,
  activation: Callable[[Array], Array] = jax.nn.relu,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """Shared MLP experts with one per-example DSelect-k gate and tower per task.

  Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi (2021),
  "DSelect-k: Differentiable Selection in the Mixture of Experts with
  Applications to Multi-Task Learning", NeurIPS.

  Per task, ``k`` selectors with ``m = ⌈log₂ E⌉`` logits each and ``k``
  selector weights are affine functions of the flattened input ``x`` (the
  per-example gate): ``z⁽ⁱ⁾(x) = G⁽ⁱ⁾x + c⁽ⁱ⁾``, ``α(x) = Wx + b`` (the paper
  writes linear maps; the bias adds an input-independent preference). The
  gate is ``q(x) = Σᵢ softmax(α(x))ᵢ r(z⁽ⁱ⁾(x))`` with ``r`` the
  :func:`binary_selector`, so it is a convex combination of the experts with
  at most ``k`` non-zeros once the selectors saturate. Task ``k`` predicts
  ``hₖ(Σⱼ qⱼ(x) fⱼ(x))``. Parameters::

      {"shared": {"experts": {"dense_0": {"kernel": (E, F, H0), ...}, ...}},
       "tasks": {name: {"gate": {"z": {"kernel": (F, k*m), "bias": (k*m,)},
                                 "alpha": {"kernel": (F, k), "bias": (k,)}},
                        "tower": {...}}}}

  Not implemented: the paper's optional entropy regulariser on the
  selectors (it speeds up convergence to binary codes); the smooth-step still
  reaches exact 0/1. Experts that are not a power of two: see
  :func:`binary_selector` (keep the first E codes, renormalise). The
  selector logits are initialised small (std ≈ γ/4 for unit-variance inputs)
  so training starts in the smooth region.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    num_experts: number of shared experts ``E``.
    k: selectors per task, ``1 <= k <= E``: at most ``k`` experts per task
      and example once the gate is binary.
    expert_hidden: expert layer widths (at least one, every layer activated).
    tower_hidden: hidden widths of each task tower.
    gamma: smooth-step width ``γ``; larger is smoother and slower to select.
    activation: nonlinearity of experts and hidden tower layers.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode = head = None``.

  Raises:
    ValueError: on bad ``task_dims``, sizes, ``k`` or ``gamma``, and in
      ``apply`` when the inputs do not match the parameters.

  >>> import jax, jax.numpy as jnp
  >>> model = dselect_k({"a": 3, "b": 2}, num_experts=5, k=2, expert_hidden=(8,))
  >>> x = jnp.ones((4, 6))
  >>> params = model.init(jax.random.key(0), x)
  >>> params["tasks"]["a"]["gate"]["z"]["kernel"].shape  # k=2 selectors x m=3 bits
  (6, 6)
  >>> preds, _ = model.apply(params, x, {})
  >>> {k: v.shape for k, v in preds.items()}
  {'a': (4, 3), 'b': (4, 2)}
  """
  sizes = {"expert_hidden": expert_hidden, "tower_hidden": tower_hidden}
  layers = _ec.LayerSpec(activation, dtype, param_dtype)
  return _dselect_parts(task_dims, num_experts=num_experts, k=k, **sizes, gamma=gamma, layers=layers)[0]


def _dselect_parts(
  task_dims: Mapping[str, int],
  *,
  num_experts: int,
  k: int,
  expert_hidden: Sequence[int],
  tower_hidden: Sequence[int],
  gamma: float = 1.0,
  layers: _ec.LayerSpec = _ec.DEFAULT_LAYERS,
) -> tuple[MultiTaskModel, Callable]:
  """The model and its ``forward``: predictions, gates ``{task: (B, E)}``, selectors ``{task: (B, k, E)}``."""
  activation, dtype, param_dtype = layers
  where = "dselect_k"
  dims = _common.validate_task_dims(task_dims, where)
  num_experts = _common.positive_int(num_experts, "num_experts", where)
  k = _common.positive_int(k, "k", where)
  if k > num_experts:
    raise ValueError(f"{where}: k must be <= num_experts={num_experts}, got {k}")
  if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma) or gamma <= 0:
    raise ValueError(f"{where}: gamma must be a positive finite number, got {gamma!r}")
  gamma = float(gamma)
  sizes = _ec.expert_sizes(expert_hidden, where)
  tower_hidden = _common.validate_sizes(tower_hidden, "tower_hidden", where)
  _common.check_activation(activation, where)
  names = tuple(dims)
  m = num_code_bits(num_experts)
  expert = _ec.expert_module(sizes, activation, dtype, param_dtype)
  z_dense = nn.Dense(k * m, kernel_init=_logit_init(gamma), dtype=dtype, param_dtype=param_dtype)
  alpha_dense = nn.Dense(k, dtype=dtype, param_dtype=param_dtype)
  towers = _common.dense_heads(dims, tower_hidden, activation, dtype, param_dtype)

  def init(key: Array, inputs: Array) -> Params:
    shape, in_dtype = _ec.flat_shape(inputs)
    keys = jax.random.split(key, 1 + 3 * len(names))
    stacked = _ec.init_stack(expert, keys[0], num_experts, shape, in_dtype)
    h = _ec.out_spec(expert, stacked, shape[1], in_dtype)
    tasks = {}
    for i, name in enumerate(names):
      kz, ka, kt = keys[1 + 3 * i : 4 + 3 * i]
      gate = {
        "z": _common.init_module(z_dense, kz, shape, in_dtype),
        "alpha": _common.init_module(alpha_dense, ka, shape, in_dtype),
      }
      tasks[name] = {"gate": gate, "tower": _common.init_module(towers[name], kt, h.shape, h.dtype)}
    return {"shared": {"experts": stacked}, "tasks": tasks}

  def gate_of(p: Params, x: Array) -> tuple[Array, Array]:
    z = z_dense.apply({"params": p["z"]}, x).reshape(x.shape[0], k, m)
    selectors = binary_selector(z, num_experts, gamma)  # (B, k, E)
    alpha = jax.nn.softmax(alpha_dense.apply({"params": p["alpha"]}, x), axis=-1)  # (B, k)
    return jnp.einsum("bk,bke->be", alpha.astype(selectors.dtype), selectors), selectors

  def forward(params: Params, inputs: Array):
    _common.check_tasks(params, names, where)
    stacked = params["shared"]["experts"]
    x = _ec.flat_input(inputs, where, _ec.in_features(stacked))
    outs = _ec.run_stack(expert, stacked, x)  # (E, B, H)
    gates, selectors, preds = {}, {}, {}
    for name in names:
      gates[name], selectors[name] = gate_of(params["tasks"][name]["gate"], x)
      mixed = _ec.mix(gates[name], outs)
      preds[name] = towers[name].apply({"params": params["tasks"][name]["tower"]}, mixed)
    return preds, gates, selectors

  apply = stateless(lambda params, inputs: forward(params, inputs)[0])
  model = MultiTaskModel(init=init, apply=apply, encode=None, head=None, task_names=names)
  return model, forward
