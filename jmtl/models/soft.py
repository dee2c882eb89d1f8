"""Soft parameter sharing: one MLP tower per task, evaluated with one vmap.

Every task owns a copy of the tower; a penalty (:mod:`jmtl.sharing`) pulls
the copies together. In ``apply`` the K towers are stacked on a leading task
axis and run with a single :func:`jax.vmap`, so XLA sees one batched kernel
per layer instead of K separate forward passes.
"""

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


def tower_params(params: Params, task_names: Sequence[str] | None = None) -> list[Params]:
  """The K tower pytrees of a :func:`soft_mlp` parameter dict, in task order.

  This is the ``select`` function for the soft-sharing penalty
  ``λ Σ_{i<j} ‖θᵢ − θⱼ‖²``: it picks ``params["tasks"][name]["tower"]`` and
  leaves the heads (whose shapes may differ) out.

  Args:
    params: ``{"shared": {}, "tasks": {name: {"tower": ..., "head": ...}}}``.
    task_names: the order to return the towers in. ``None`` uses the key
      order of ``params["tasks"]``, which is the model's order right after
      ``init`` but alphabetical after a ``jax.tree`` round trip; the pairwise
      penalty does not depend on the order, so ``None`` is fine for it. Pass
      ``model.task_names`` when the order matters.

  Returns:
    A list of K pytrees, one per task.

  Raises:
    ValueError: if a task has no ``"tower"`` entry or is missing.

  >>> import jax, jax.numpy as jnp
  >>> model = soft_mlp({"a": 3, "b": 2}, hidden=(4,))
  >>> params = model.init(jax.random.key(0), jnp.zeros((2, 5)))
  >>> towers = tower_params(params, model.task_names)
  >>> len(towers), towers[0]["dense_0"]["kernel"].shape
  (2, (5, 4))
  """
  if not isinstance(params, Mapping) or "tasks" not in params:
    raise ValueError(
      "tower_params: params must be a dict {'shared': ..., 'tasks': {name: {'tower': ..., 'head': ...}}}, "
      f"got {type(params).__name__}"
    )
  tasks = params["tasks"]
  names = list(tasks) if task_names is None else list(task_names)
  out = []
  for name in names:
    if name not in tasks:
      raise ValueError(f"tower_params: params['tasks'] has no task {name!r}; it has {list(tasks)}")
    if not isinstance(tasks[name], Mapping) or "tower" not in tasks[name]:
      raise ValueError(f"tower_params: params['tasks'][{name!r}] has no 'tower' entry (not soft-sharing params?)")
    out.append(tasks[name]["tower"])
  return out


def soft_mlp(
  task_dims: Mapping[str, int],
  hidden: Sequence[int] = (256, 256),
  activation: Callable[[Array], Array] = jax.nn.relu,
  *,
  same_init: bool = False,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """One MLP tower and one linear head per task (soft parameter sharing).

  Each task's tower flattens the non-batch input dimensions and applies
  ``Dense(h) + activation`` for each ``h`` in ``hidden``; its head is a
  linear ``Dense(task_dims[name])``. Parameters::

      {"shared": {},
       "tasks": {name: {"tower": {"dense_0": ..., ...}, "head": {"dense_0": ...}}}}

  ``apply`` stacks the towers on a leading task axis and evaluates them with
  one :func:`jax.vmap` (the input is broadcast, not copied). The heads run in
  one vmap too when every task has the same output dim, else one per task.
  ``encode`` and ``head`` are ``None``: there is no shared representation, so
  the separable fast paths of the gradient engine do not apply. Use
  :func:`tower_params` as the parameter selector of the soft-sharing penalty.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    hidden: tower layer widths (at least one layer).
    activation: the tower nonlinearity.
    same_init: if ``False`` (the default) every tower is initialized with its
      own key, so the copies start apart; if ``True`` all towers start equal
      (separate buffers holding equal values). Heads always get their own keys.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode = head = None``.

  Raises:
    ValueError: on bad ``task_dims`` or layer widths, or when ``apply`` gets
      params that miss a task.

  >>> import jax, jax.numpy as jnp
  >>> model = soft_mlp({"a": 3, "b": 2}, hidden=(8, 8))
  >>> x = jnp.ones((4, 5))
  >>> params = model.init(jax.random.key(0), x)
  >>> params["shared"], sorted(params["tasks"]["a"])
  ({}, ['head', 'tower'])
  >>> preds, state = model.apply(params, x, {})
  >>> {k: v.shape for k, v in preds.items()}, state
  ({'a': (4, 3), 'b': (4, 2)}, {})
  >>> model.encode is None and model.head is None
  True
  """
  where = "soft_mlp"
  dims = _common.validate_task_dims(task_dims, where)
  hidden = _common.validate_sizes(hidden, "hidden", where)
  if not hidden:
    raise ValueError(f"{where}: hidden must have at least one layer width, got {hidden!r}")
  _common.check_activation(activation, where)
  names = tuple(dims)
  tower = _common.MLP(
    features=hidden, activation=activation, activate_last=True, flatten=True, dtype=dtype, param_dtype=param_dtype
  )
  heads = _common.dense_heads(dims, (), activation, dtype, param_dtype)
  uniform = len(set(dims.values())) == 1
  first_head = heads[names[0]]

  def run_tower(tower_p: Params, x: Array) -> Array:
    return tower.apply({"params": tower_p}, x)

  def init(key: Array, inputs: Array) -> Params:
    shape, in_dtype = jnp.shape(inputs), jnp.result_type(inputs)
    tower_key, head_key = jax.random.split(key)
    tower_keys = jax.random.split(tower_key, len(names))
    head_keys = jax.random.split(head_key, len(names))
    # One cached compile of the tower init, run once per task (same key if same_init).
    keys = [tower_key] * len(names) if same_init else list(tower_keys)
    tower_ps = [_common.init_module(tower, k, shape, in_dtype) for k in keys]
    z = jax.eval_shape(run_tower, tower_ps[0], jax.ShapeDtypeStruct((1, *shape[1:]), in_dtype))
    head_ps = _common.init_heads(heads, head_keys, z.shape, z.dtype)
    tasks = {name: {"tower": tower_ps[i], "head": head_ps[name]} for i, name in enumerate(names)}
    return {"shared": {}, "tasks": tasks}

  def predict(params: Params, inputs: Array) -> dict[str, Array]:
    _common.check_tasks(params, names, where)
    x = _common.flatten_batch(inputs)
    expected = params["tasks"][names[0]]["tower"]["dense_0"]["kernel"].shape[0]
    if x.shape[1] != expected:
      raise ValueError(
        f"{where}: inputs of shape {tuple(jnp.shape(inputs))} flatten to {x.shape[1]} features, "
        f"but the towers' dense_0 kernel expects {expected}"
      )
    stacked = _common.stack_trees(tower_params(params, names))
    zs = jax.vmap(run_tower, in_axes=(0, None))(stacked, x)  # (K, B, hidden[-1])
    if uniform:
      head_stack = _common.stack_trees([params["tasks"][name]["head"] for name in names])
      ys = jax.vmap(lambda p, z: first_head.apply({"params": p}, z))(head_stack, zs)
      return {name: ys[i] for i, name in enumerate(names)}
    return {name: heads[name].apply({"params": params["tasks"][name]["head"]}, zs[i]) for i, name in enumerate(names)}

  return MultiTaskModel(init=init, apply=stateless(predict), encode=None, head=None, task_names=names)
