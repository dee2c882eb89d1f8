"""Hard parameter sharing with a small convolutional trunk for NHWC images."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmtl.models import _common
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any


class _ConvTrunk(nn.Module):
  """``[conv 3x3 SAME + activation + max-pool 2x2] * len(features)``, flatten, dense + activation."""

  features: tuple[int, ...]
  dense: int
  activation: Callable[[Array], Array] = jax.nn.relu
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps images ``(B, H, W, C)`` to a representation ``(B, dense)``."""
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_{i}")(x)
      x = self.activation(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.dense, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
    return self.activation(x)


def cnn(
  task_dims: Mapping[str, int],
  features: Sequence[int] = (32, 64),
  dense: int = 128,
  *,
  activation: Callable[[Array], Array] = jax.nn.relu,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """A shared conv trunk and one linear head per task (hard parameter sharing).

  Each trunk stage is a 3x3 ``SAME`` convolution, ``activation`` and a 2x2
  max-pool with stride 2; then the feature map is flattened and passed through
  ``Dense(dense) + activation``. Parameters: ``params["shared"] =
  {"conv_0": ..., "conv_1": ..., "dense": ...}`` and ``params["tasks"][name] =
  {"dense_0": {"kernel", "bias"}}``. Inputs are NHWC ``(B, H, W, C)``; a
  ``(B, H, W)`` batch gets a channel axis.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    features: output channels of each conv stage.
    dense: width of the dense layer that ends the trunk (the size of ``z``).
    activation: the nonlinearity (ReLU by default).
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A stateless :class:`~jmtl.models.MultiTaskModel` (``model_state`` is
    ``{}``) with ``encode`` and ``head``; ``z, _ = encode(params["shared"], x,
    {})`` has shape ``(B, dense)``.

  Raises:
    ValueError: on bad ``task_dims`` or sizes, and in ``apply``/``encode`` on
      inputs that are not images or are too small for the pooling stages.

  >>> import jax, jax.numpy as jnp
  >>> model = cnn({"left": 10, "right": 10}, features=(4, 8), dense=16)
  >>> x = jnp.ones((2, 8, 8))
  >>> params = model.init(jax.random.key(0), x)
  >>> sorted(params["shared"])
  ['conv_0', 'conv_1', 'dense']
  >>> preds, _ = model.apply(params, x, {})
  >>> {k: v.shape for k, v in preds.items()}
  {'left': (2, 10), 'right': (2, 10)}
  >>> model.encode(params["shared"], x, {})[0].shape
  (2, 16)
  """
  where = "cnn"
  dims = _common.validate_task_dims(task_dims, where)
  features = _common.validate_sizes(features, "features", where)
  (dense,) = _common.validate_sizes((dense,), "dense", where)
  _common.check_activation(activation, where)
  names = tuple(dims)
  trunk = _ConvTrunk(features=features, dense=dense, activation=activation, dtype=dtype, param_dtype=param_dtype)
  heads = _common.dense_heads(dims, (), activation, dtype, param_dtype)

  def encode(shared: Params, inputs: Array) -> Array:
    return trunk.apply({"params": shared}, _common.as_nhwc(inputs, len(features), where))

  def nhwc(shape, dtype):
    x = jax.eval_shape(lambda a: _common.as_nhwc(a, len(features), where), jax.ShapeDtypeStruct(shape, dtype))
    return x.shape, x.dtype

  return _common.hard_sharing(names, where, trunk, heads, stateless(encode), trunk_input=nhwc)
