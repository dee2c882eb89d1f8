"""Cross-stitch networks: one MLP column per task, mixed by learned K×K matrices.

After every hidden layer the K columns' activations are linearly recombined,
``x̃ᵢ = Σⱼ αᵢⱼ xⱼ``; the matrices ``α`` are the only parameters the tasks
share. The columns have identical shapes, so each layer runs for all K
tasks in one :func:`jax.vmap` over stacked column parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmtl.models import _common
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any


def stitch_init(num_tasks: int, init_self: float, width: int | None = None, dtype: Any = jnp.float32) -> Array:
  """The initial cross-stitch matrix: ``init_self`` on the diagonal, the rest of each row spread evenly.

  Off-diagonal entries are ``(1 − init_self) / (K − 1)``, so every row sums to
  one (the paper's ``α_S``/``α_D`` initialisation, e.g. 0.9/0.1 for two
  tasks). ``init_self=1`` gives the identity: K independent columns. With one
  task the matrix is ``[[init_self]]``.

  Args:
    num_tasks: K.
    init_self: the diagonal value, in ``[0, 1]``.
    width: ``None`` for a ``(K, K)`` matrix, else the layer width ``H`` for a
      per-unit ``(K, K, H)`` array (the same matrix repeated for every unit).
    dtype: the parameter dtype.

  Returns:
    The matrix as a ``dtype`` array.

  >>> stitch_init(3, 0.8).tolist()  # doctest: +NUMBER
  [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]
  >>> stitch_init(2, 0.9, width=4).shape
  (2, 2, 4)
  """
  k = num_tasks
  off = 0.0 if k == 1 else (1.0 - init_self) / (k - 1)
  alpha = np.full((k, k), off) + (init_self - off) * np.eye(k)
  if width is not None:
    alpha = np.repeat(alpha[:, :, None], width, axis=2)
  return jnp.asarray(alpha, dtype)


def cross_stitch(
  task_dims: Mapping[str, int],
  hidden: Sequence[int] = (256, 256),
  *,
  activation: Callable[[Array], Array] = jax.nn.relu,
  init_self: float = 0.9,
  per_unit: bool = False,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """Cross-stitch networks: K MLP columns joined by learned linear mixing after every hidden layer.

  Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task
  Learning", CVPR 2016. Column ``k`` flattens the inputs and applies
  ``Dense(h) + activation`` for each ``h`` in ``hidden``; after layer ``ℓ``
  the columns' activations ``x₁ … x_K`` (each ``(B, h)``) are replaced by

      x̃ᵢ = Σⱼ αᵢⱼ⁽ℓ⁾ xⱼ

  and ``x̃ᵢ`` feeds column ``i``'s next layer (or, after the last hidden
  layer, task ``i``'s linear head ``Dense(task_dims[name])``).

  Mixing granularity: by default ``α⁽ℓ⁾`` is one ``(K, K)`` matrix per layer,
  the same for every unit (the paper's basic unit, there applied to whole
  activation maps). With ``per_unit=True`` it is ``(K, K, h)``, one matrix
  per unit of the layer (the paper's per-channel variant, for an MLP).

  Parameters::

      {"shared": {"stitch_0": α⁽⁰⁾, ..., "stitch_{L-1}": α⁽ᴸ⁻¹⁾},
       "tasks": {name: {"column": {"dense_0": ..., ...}, "head": {"dense_0": ...}}}}

  Only the stitches are shared, so a Gramian- or Jacobian-level weighting
  sees the per-task gradients of the ``α`` entries alone (the parameters that
  more than one task uses). There is no single shared representation:
  ``encode`` and ``head`` are ``None``, the gradient engine takes its general
  path (one VJP per task) and ``level="representation"`` is not available.
  Nor are the tasks parameter-separable: unless ``α`` is the identity,
  ``params["tasks"][a]`` changes task b's prediction through the stitches.
  The paper trains ``α`` with a larger learning rate than the columns; use
  ``optax.multi_transform`` over ``"shared"``/``"tasks"`` for that.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order
      (row/column ``i`` of every ``α`` is task ``i``).
    hidden: column layer widths (at least one: the stitches sit after hidden layers).
    activation: the columns' nonlinearity, applied before each stitch.
    init_self: the initial diagonal of every ``α``; the off-diagonal entries
      are ``(1 − init_self)/(K − 1)`` (rows sum to one, see :func:`stitch_init`).
      ``1.0`` starts from K independent columns.
    per_unit: one ``α`` per hidden unit (``(K, K, h)``) instead of per layer.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype (the ``α`` too).

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode = head = None``.

  Raises:
    ValueError: on bad ``task_dims``, widths or ``init_self``, and in
      ``apply`` when inputs or params do not match.

  >>> import jax, jax.numpy as jnp
  >>> model = cross_stitch({"a": 3, "b": 2}, hidden=(8, 8), init_self=0.9)
  >>> x = jnp.ones((4, 5))
  >>> params = model.init(jax.random.key(0), x)
  >>> params["shared"]["stitch_0"].tolist()  # doctest: +NUMBER
  [[0.9, 0.1], [0.1, 0.9]]
  >>> sorted(params["tasks"]["a"])
  ['column', 'head']
  >>> preds, state = model.apply(params, x, {})
  >>> {k: v.shape for k, v in preds.items()}, state
  ({'a': (4, 3), 'b': (4, 2)}, {})
  >>> model.encode is None and model.head is None
  True
  """
  where = "cross_stitch"
  dims = _common.validate_task_dims(task_dims, where)
  hidden = _common.validate_sizes(hidden, "hidden", where)
  if not hidden:
    raise ValueError(f"{where}: hidden must have at least one layer width (the stitches follow hidden layers), got ()")
  _common.check_activation(activation, where)
  if isinstance(init_self, bool) or not isinstance(init_self, (int, float)) or not 0.0 <= init_self <= 1.0:
    raise ValueError(f"{where}: init_self must be a number in [0, 1], got {init_self!r}")
  if not isinstance(per_unit, bool):
    raise ValueError(f"{where}: per_unit must be a bool, got {per_unit!r}")
  init_self = float(init_self)
  names = tuple(dims)
  k = len(names)
  column = _common.MLP(
    features=hidden, activation=activation, activate_last=True, flatten=True, dtype=dtype, param_dtype=param_dtype
  )
  # The column's layers one by one, with the parameter names of ``column``.
  layers = [nn.Dense(h, dtype=dtype, param_dtype=param_dtype) for h in hidden]
  heads = _common.dense_heads(dims, (), activation, dtype, param_dtype)
  uniform = len(set(dims.values())) == 1
  first_head = heads[names[0]]
  alpha_shapes = [(k, k, h) if per_unit else (k, k) for h in hidden]

  def init(key: Array, inputs: Array) -> Params:
    shape, in_dtype = jnp.shape(inputs), jnp.result_type(inputs)
    if len(shape) == 0:
      raise ValueError(f"{where}: inputs must have a leading batch axis, got a scalar")
    column_key, head_key = jax.random.split(key)
    # One cached compile of the column init, run with K keys.
    columns = [_common.init_module(column, kk, shape, in_dtype) for kk in jax.random.split(column_key, k)]
    z_dtype = jnp.result_type(in_dtype, param_dtype) if dtype is None else dtype
    head_ps = _common.init_heads(heads, jax.random.split(head_key, k), (1, hidden[-1]), z_dtype)
    shared = {
      f"stitch_{i}": stitch_init(k, init_self, h if per_unit else None, param_dtype) for i, h in enumerate(hidden)
    }
    tasks = {name: {"column": columns[i], "head": head_ps[name]} for i, name in enumerate(names)}
    return {"shared": shared, "tasks": tasks}

  def check(params: Params, x: Array, inputs: Array) -> None:
    _common.check_tasks(params, names, where)
    shared = params.get("shared")
    for i, want in enumerate(alpha_shapes):
      got = None if not isinstance(shared, Mapping) else shared.get(f"stitch_{i}")
      if got is None or tuple(jnp.shape(got)) != want:
        got_shape = None if got is None else tuple(jnp.shape(got))
        raise ValueError(f"{where}: params['shared']['stitch_{i}'] must have shape {want}, got {got_shape}")
    expected = params["tasks"][names[0]]["column"]["dense_0"]["kernel"].shape[0]
    if x.shape[1] != expected:
      raise ValueError(
        f"{where}: inputs of shape {tuple(jnp.shape(inputs))} flatten to {x.shape[1]} features, "
        f"but the columns' dense_0 kernel expects {expected}"
      )

  def stitch(alpha: Array, h: Array) -> Array:
    """``x̃ᵢ = Σⱼ αᵢⱼ xⱼ`` over the task axis of ``h`` (K, B, H)."""
    if dtype is not None:
      alpha = alpha.astype(dtype)
    if per_unit:
      return jnp.einsum("ijh,jbh->ibh", alpha, h)
    return jnp.einsum("ij,jbh->ibh", alpha, h)

  def predict(params: Params, inputs: Array) -> dict[str, Array]:
    x = _common.flatten_batch(inputs)
    check(params, x, inputs)
    cols = _common.stack_trees([params["tasks"][name]["column"] for name in names])
    h = x
    for i, layer in enumerate(layers):
      run = lambda p, a, layer=layer: layer.apply({"params": p}, a)
      h = jax.vmap(run, in_axes=(0, None if i == 0 else 0))(cols[f"dense_{i}"], h)  # (K, B, hidden[i])
      h = stitch(params["shared"][f"stitch_{i}"], activation(h))
    if uniform:
      head_stack = _common.stack_trees([params["tasks"][name]["head"] for name in names])
      ys = jax.vmap(lambda p, z: first_head.apply({"params": p}, z))(head_stack, h)
      return {name: ys[i] for i, name in enumerate(names)}
    return {name: heads[name].apply({"params": params["tasks"][name]["head"]}, h[i]) for i, name in enumerate(names)}

  return MultiTaskModel(init=init, apply=stateless(predict), encode=None, head=None, task_names=names)
