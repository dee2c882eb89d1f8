"""Stacks of identically shaped MLP experts: one vmapped kernel per layer.

Private module, public names: the building blocks shared by the mixtures of
experts in :mod:`jmtl.models.experts` (MMoE, CGC, PLE) and
:mod:`jmtl.models.dselect` (DSelect-k). The experts of one group are stacked
on a leading expert axis and evaluated with one :func:`jax.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmtl.models import _common

Array = jax.Array
Params = Any


class LayerSpec(NamedTuple):
  """How the layers of a mixture compute: the nonlinearity, the computation dtype and the parameter dtype.

  >>> LayerSpec().param_dtype
  <class 'jax.numpy.float32'>
  """

  activation: Callable[[Array], Array] = jax.nn.relu
  dtype: Any = None
  param_dtype: Any = jnp.float32


DEFAULT_LAYERS = LayerSpec()  # ReLU, dtype promoted from inputs and parameters, float32 parameters


def expert_sizes(expert_hidden: Sequence[int], where: str) -> tuple[int, ...]:
  """Checks the expert layer widths (at least one).

  >>> expert_sizes([8, 4], "mmoe")
  (8, 4)
  >>> expert_sizes((), "mmoe")
  Traceback (most recent call last):
  ...
  ValueError: mmoe: expert_hidden must have at least one layer width, got ()
  """
  sizes = _common.validate_sizes(expert_hidden, "expert_hidden", where)
  if not sizes:
    raise ValueError(f"{where}: expert_hidden must have at least one layer width, got {expert_hidden!r}")
  return sizes


def expert_module(sizes: tuple[int, ...], activation, dtype, param_dtype) -> _common.MLP:
  """One expert: ``Dense + activation`` per width, the last one activated too.

  >>> expert_module((4, 3), jax.nn.relu, None, jnp.float32).activate_last
  True
  """
  return _common.MLP(features=sizes, activation=activation, activate_last=True, dtype=dtype, param_dtype=param_dtype)


def init_stack(module: nn.Module, key: Array, n: int, shape: tuple[int, ...], dtype: Any) -> Params:
  """``n`` independent inits of ``module`` (one cached compile) stacked on a leading axis.

  >>> p = init_stack(expert_module((3,), jax.nn.relu, None, jnp.float32), jax.random.key(0), 4, (2, 5), jnp.float32)
  >>> p["dense_0"]["kernel"].shape
  (4, 5, 3)
  """
  return _common.stack_trees([_common.init_module(module, k, shape, dtype) for k in jax.random.split(key, n)])


def run_stack(module: nn.Module, stacked: Params, x: Array) -> Array:
  """All experts of a stack on the same input ``(B, F)``: returns ``(n, B, H)``.

  >>> e = expert_module((3,), jax.nn.relu, None, jnp.float32)
  >>> stacked = {"dense_0": {"kernel": jnp.ones((4, 5, 3)), "bias": jnp.zeros((4, 3))}}
  >>> run_stack(e, stacked, jnp.ones((2, 5))).shape
  (4, 2, 3)
  """
  return jax.vmap(lambda p: module.apply({"params": p}, x))(stacked)


def mix(gate: Array, outs: Array) -> Array:
  """``Σᵢ gate[:, i] · outs[i]``: gate ``(B, n)``, outs ``(n, B, H)`` -> ``(B, H)``.

  >>> mix(jnp.array([[0.25, 0.75]]), jnp.array([[[4.0]], [[8.0]]])).tolist()
  [[7.0]]
  """
  return jnp.einsum("bn,nbh->bh", gate.astype(outs.dtype), outs)


def softmax_gate(dense: nn.Dense, p: Params, x: Array) -> Array:
  """``softmax(W x + b)`` over the last axis, with ``dense``'s parameters ``p``.

  >>> g = softmax_gate(nn.Dense(3), {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}, jnp.ones((1, 2)))
  >>> g.tolist()  # doctest: +NUMBER
  [[0.333, 0.333, 0.333]]
  """
  return jax.nn.softmax(dense.apply({"params": p}, x), axis=-1)


def flat_input(inputs: Any, where: str, expected: int | None = None) -> Array:
  """Flattens ``inputs`` to ``(B, F)`` and checks ``F`` against the first expert layer.

  >>> flat_input(jnp.ones((2, 3, 2)), "mmoe", 6).shape
  (2, 6)
  >>> flat_input(jnp.ones((2, 7)), "mmoe", 6)
  Traceback (most recent call last):
  ...
  ValueError: mmoe: inputs of shape (2, 7) flatten to 7 features, but the experts' dense_0 kernel expects 6
  """
  x = _common.flatten_batch(inputs)
  if expected is not None and x.shape[1] != expected:
    raise ValueError(
      f"{where}: inputs of shape {tuple(jnp.shape(inputs))} flatten to {x.shape[1]} features, "
      f"but the experts' dense_0 kernel expects {expected}"
    )
  return x


def flat_shape(inputs: Any) -> tuple[tuple[int, int], Any]:
  """``((B, F), dtype)`` of ``inputs`` flattened past the batch axis, without touching the values.

  >>> flat_shape(jnp.ones((2, 3, 4)))
  ((2, 12), dtype('float32'))
  """
  shape = jnp.shape(inputs)
  if len(shape) == 0:
    raise ValueError(f"inputs must have a leading batch axis, got a scalar of shape {tuple(shape)}")
  features = 1
  for d in shape[1:]:
    features *= d
  return (shape[0], features), jnp.result_type(inputs)


def out_spec(module: nn.Module, stacked: Params, features: int, dtype: Any) -> jax.ShapeDtypeStruct:
  """Shape and dtype of one expert's output on one example, without running it.

  >>> e = expert_module((3,), jax.nn.relu, None, jnp.float32)
  >>> stacked = {"dense_0": {"kernel": jnp.ones((4, 5, 3)), "bias": jnp.zeros((4, 3))}}
  >>> out_spec(e, stacked, 5, jnp.float32).shape
  (1, 3)
  """
  return jax.eval_shape(lambda p: run_stack(module, p, jnp.zeros((1, features), dtype))[0], stacked)


def in_features(stacked: Params) -> int:
  """The input features ``F`` of a stack of experts (kernel ``(n, F, H)``).

  >>> in_features({"dense_0": {"kernel": jnp.zeros((4, 6, 3))}})
  6
  """
  return stacked["dense_0"]["kernel"].shape[1]
