"""Hard parameter sharing with an MLP trunk and one dense head per task."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jmtl.models import _common
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any


def mlp(
  task_dims: Mapping[str, int],
  hidden: Sequence[int] = (512, 512),
  activation: Callable[[Array], Array] = jax.nn.relu,
  head_hidden: Sequence[int] = (),
  *,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """A shared MLP trunk and one MLP head per task (hard parameter sharing).

  The trunk flattens every non-batch input dimension, then applies
  ``Dense(h) + activation`` for each ``h`` in ``hidden``; its parameters are
  ``params["shared"] = {"dense_0": {"kernel", "bias"}, ...}``. Each task's
  head applies ``Dense`` layers of widths ``(*head_hidden, task_dims[name])``
  with ``activation`` between them and none on the output (logits or
  regression values); its parameters are ``params["tasks"][name] =
  {"dense_0": ..., ...}``. ``apply`` is exactly ``encode`` once then every
  ``head``, so it costs what a hand-written MLP with K heads costs. The model
  is stateless: its ``model_state`` is ``{}`` and comes back unchanged.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    hidden: trunk layer widths; ``()`` gives linear per-task models on the
      flattened inputs (``params["shared"] == {}``).
    activation: the nonlinearity of the trunk and of hidden head layers.
    head_hidden: hidden layer widths of each head; ``()`` for linear heads.
    dtype: computation dtype; ``None`` promotes inputs with parameters, so
      float64 inputs give float64 outputs when ``jax_enable_x64`` is on.
    param_dtype: parameter dtype (use ``jnp.float64`` for float64 tests).

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode`` and ``head``:
    ``z, _ = encode(params["shared"], x, {})`` has shape ``(B, hidden[-1])``.

  Raises:
    ValueError: on bad ``task_dims`` or layer widths, and in ``apply``/``encode``
      when the inputs do not match the parameters.

  >>> import jax, jax.numpy as jnp
  >>> model = mlp({"digit": 10, "parity": 2}, hidden=(32, 16))
  >>> x = jnp.ones((4, 8, 8))
  >>> params = model.init(jax.random.key(0), x)
  >>> params["shared"]["dense_0"]["kernel"].shape, params["tasks"]["parity"]["dense_0"]["kernel"].shape
  ((64, 32), (16, 2))
  >>> state = model.init_state(jax.random.key(0), x)
  >>> preds, state = model.apply(params, x, state)
  >>> {k: v.shape for k, v in preds.items()}, state
  ({'digit': (4, 10), 'parity': (4, 2)}, {})
  >>> z, _ = model.encode(params["shared"], x, state)
  >>> model.head("parity", params["tasks"]["parity"], z).shape
  (4, 2)
  """
  where = "mlp"
  dims = _common.validate_task_dims(task_dims, where)
  hidden = _common.validate_sizes(hidden, "hidden", where)
  head_hidden = _common.validate_sizes(head_hidden, "head_hidden", where)
  _common.check_activation(activation, where)
  names = tuple(dims)
  trunk = _common.MLP(
    features=hidden, activation=activation, activate_last=True, flatten=True, dtype=dtype, param_dtype=param_dtype
  )
  heads = _common.dense_heads(dims, head_hidden, activation, dtype, param_dtype)

  def encode(shared: Params, inputs: Array) -> Array:
    x = _common.flatten_batch(inputs)
    if hidden:
      expected = shared["dense_0"]["kernel"].shape[0]
      if x.shape[1] != expected:
        raise ValueError(
          f"{where}: inputs of shape {tuple(jnp.shape(inputs))} flatten to {x.shape[1]} features, "
          f"but params['shared']['dense_0']['kernel'] expects {expected}"
        )
    return trunk.apply({"params": shared}, x)

  return _common.hard_sharing(names, where, trunk, heads, stateless(encode))
