"""Shared building blocks of the model adapters: validation, input shaping, linen modules, hard sharing.

Private module, public names: every constructor in :mod:`jmtl.models` may use
them (the expert stacks are in :mod:`jmtl.models._experts_common`).
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

from jmtl.models._base import MultiTaskModel
from jmtl.models._base import no_state

Array = jax.Array
Params = Any


def validate_task_dims(task_dims: Mapping[str, int], where: str) -> dict[str, int]:
  """Checks ``task_dims`` and returns it as a plain dict in the given order.

  Args:
    task_dims: task name -> output dimension. Non-empty; names are non-empty
      strings, dimensions positive ints.
    where: the caller's name, for error messages.

  Returns:
    ``dict(task_dims)``, order preserved.

  Raises:
    ValueError: on an empty mapping, a bad name or a non-positive dimension.

  >>> validate_task_dims({"a": 3, "b": 1}, "mlp")
  {'a': 3, 'b': 1}
  >>> validate_task_dims({"a": 0}, "mlp")
  Traceback (most recent call last):
  ...
  ValueError: mlp: task 'a': output dim must be a positive int, got 0
  """
  if not isinstance(task_dims, Mapping):
    raise ValueError(f"{where}: task_dims must be a mapping task name -> output dim, got {type(task_dims).__name__}")
  if not task_dims:
    raise ValueError(f"{where}: task_dims is empty; give at least one task, e.g. {{'digit': 10}}")
  out = {}
  for name, dim in task_dims.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"{where}: task names must be non-empty strings, got {name!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
      raise ValueError(f"{where}: task {name!r}: output dim must be a positive int, got {dim!r}")
    out[name] = dim
  return out


def validate_sizes(sizes: Sequence[int], field: str, where: str) -> tuple[int, ...]:
  """Checks a sequence of layer widths and returns it as a tuple.

  >>> validate_sizes([8, 4], "hidden", "mlp")
  (8, 4)
  >>> validate_sizes([8, -1], "hidden", "mlp")
  Traceback (most recent call last):
  ...
  ValueError: mlp: hidden must be a sequence of positive ints, got [8, -1]
  """
  if isinstance(sizes, int) or not isinstance(sizes, Sequence):
    raise ValueError(f"{where}: {field} must be a sequence of positive ints, got {sizes!r}")
  if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
    raise ValueError(f"{where}: {field} must be a sequence of positive ints, got {sizes!r}")
  return tuple(sizes)


def positive_int(value: Any, field: str, where: str, minimum: int = 1) -> int:
  """Checks an integer count (not a bool) of at least ``minimum`` and returns it.

  >>> positive_int(3, "num_experts", "mmoe")
  3
  >>> positive_int(0, "k", "dselect_k")
  Traceback (most recent call last):
  ...
  ValueError: dselect_k: k must be an int >= 1, got 0
  """
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{where}: {field} must be an int >= {minimum}, got {value!r}")
  return value


def check_activation(activation: Any, where: str) -> None:
  """Fails unless ``activation`` is callable.

  >>> check_activation("relu", "mlp")
  Traceback (most recent call last):
  ...
  ValueError: mlp: activation must be callable, got 'relu'
  """
  if not callable(activation):
    raise ValueError(f"{where}: activation must be callable, got {activation!r}")


def stack_trees(trees: Sequence[Params]) -> Params:
  """Stacks identically structured pytrees along a new leading axis (for one vmapped kernel).

  >>> stack_trees([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])["w"].shape
  (2, 2)
  """
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def check_tasks(params: Params, names: tuple[str, ...], where: str) -> None:
  """Fails with a clear message when ``params["tasks"]`` misses a task.

  >>> check_tasks({"shared": {}, "tasks": {"a": {}}}, ("a", "b"), "mlp")
  Traceback (most recent call last):
  ...
  ValueError: mlp: params['tasks'] has no entry for task(s) ['b']; it has ['a']
  """
  if not isinstance(params, Mapping) or "tasks" not in params:
    raise ValueError(f"{where}: params must be a dict {{'shared': ..., 'tasks': {{name: ...}}}}")
  missing = [k for k in names if k not in params["tasks"]]
  if missing:
    raise ValueError(f"{where}: params['tasks'] has no entry for task(s) {missing}; it has {list(params['tasks'])}")


def flatten_batch(x: Array) -> Array:
  """Flattens all non-batch dimensions: ``(B, ...) -> (B, prod(...))``.

  >>> flatten_batch(jnp.zeros((2, 3, 4))).shape
  (2, 12)
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(f"inputs must have a leading batch axis, got a scalar of shape {x.shape}")
  return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: an empty batch has no size to infer it from


def as_nhwc(inputs: Array, num_stages: int, where: str) -> Array:
  """Adds a channel axis to ``(B, H, W)`` images and checks H and W survive ``num_stages`` halvings.

  >>> as_nhwc(jnp.zeros((2, 8, 8)), 2, "cnn").shape
  (2, 8, 8, 1)
  >>> as_nhwc(jnp.zeros((2, 3, 3, 1)), 2, "cnn")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: cnn: inputs of shape (2, 3, 3, 1) are too small for 2 stage(s) ...; H and W must be at least 4
  """
  x = jnp.asarray(inputs)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{where}: inputs must be images (B, H, W) or (B, H, W, C), got shape {tuple(x.shape)}")
  h, w = x.shape[1], x.shape[2]
  if h >> num_stages == 0 or w >> num_stages == 0:
    raise ValueError(
      f"{where}: inputs of shape {tuple(x.shape)} are too small for {num_stages} stage(s) that halve H and W; "
      f"H and W must be at least {2**num_stages}"
    )
  return x


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jit_init(module: nn.Module, key: Array, spec: jax.ShapeDtypeStruct) -> dict[str, Params]:
  return dict(module.init(key, jnp.zeros(spec.shape, spec.dtype)))


def init_variables(module: nn.Module, key: Array, shape: tuple[int, ...], dtype: Any) -> dict[str, Params]:
  """All linen variable collections of ``module``, as :func:`init_module` (jitted, cached).

  >>> v = init_variables(nn.BatchNorm(use_running_average=True), jax.random.key(0), (8, 3), jnp.float32)
  >>> sorted(v), v["batch_stats"]["var"].tolist()
  (['batch_stats', 'params'], [1.0, 1.0, 1.0])
  """
  if len(shape) == 0:
    raise ValueError(f"inputs must have a leading batch axis, got a scalar of shape {tuple(shape)}")
  return _jit_init(module, key, jax.ShapeDtypeStruct((1, *shape[1:]), jnp.dtype(dtype)))


def init_module(module: nn.Module, key: Array, shape: tuple[int, ...], dtype: Any) -> Params:
  """The ``"params"`` of ``module.init(key, zeros((1, *shape[1:]), dtype))``, jitted and cached.

  Only the shape and dtype of the inputs matter, and only past the batch axis.
  The jitted init is cached on the (hashable) module configuration and the
  input shape, process-wide: K heads of one configuration compile once and
  run K times. This matters on XLA:CPU, where compiling a random-number
  kernel costs far more than running it, so K=40 per-task initializers in
  one program (or op by op) make ``init`` take seconds.

  >>> p = init_module(MLP(features=(3,)), jax.random.key(0), (8, 5), jnp.float32)
  >>> p["dense_0"]["kernel"].shape
  (5, 3)
  """
  return params_of(init_variables(module, key, shape, dtype))


def params_of(variables: Mapping[str, Any]) -> Params:
  """The ``"params"`` collection of linen variables, ``{}`` when there is none.

  >>> params_of({})
  {}
  """
  return dict(variables.get("params", {}))


class MLP(nn.Module):
  """Dense layers named ``dense_0, dense_1, ...`` with an activation between.

  Attributes:
    features: the layer widths.
    activation: applied after every layer but the last, and after the last
      too when ``activate_last``.
    activate_last: whether the output is activated (a trunk) or not (a head).
    flatten: flatten non-batch input dimensions first.
    dtype: computation dtype; ``None`` promotes inputs and params.
    param_dtype: parameter dtype.

  >>> m = MLP(features=(4, 2))
  >>> v = m.init(jax.random.key(0), jnp.zeros((3, 5)))
  >>> m.apply(v, jnp.ones((3, 5))).shape
  (3, 2)
  """

  features: tuple[int, ...]
  activation: Callable[[Array], Array] = jax.nn.relu
  activate_last: bool = False
  flatten: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the layers to ``x`` of shape ``(B, F)`` (or ``(B, ...)`` with ``flatten``)."""
    if self.flatten:
      x = flatten_batch(x)
    n = len(self.features)
    for i, f in enumerate(self.features):
      x = nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(x)
      if i < n - 1 or self.activate_last:
        x = self.activation(x)
    return x


def dense_heads(task_dims: Mapping[str, int], head_hidden: tuple[int, ...], activation, dtype, param_dtype):
  """One :class:`MLP` head per task: ``head_hidden`` then the task's output dim.

  >>> heads = dense_heads({"a": 3}, (), jax.nn.relu, None, jnp.float32)
  >>> heads["a"].features
  (3,)
  """
  return {
    name: MLP(
      features=(*head_hidden, dim), activation=activation, activate_last=False, dtype=dtype, param_dtype=param_dtype
    )
    for name, dim in task_dims.items()
  }


def make_head_fn(heads: Mapping[str, nn.Module], where: str):
  """Returns ``head(task, task_params, z) -> prediction`` over linen ``heads``.

  >>> heads = dense_heads({"a": 3}, (), jax.nn.relu, None, jnp.float32)
  >>> p = params_of(heads["a"].init(jax.random.key(0), jnp.zeros((1, 4))))
  >>> make_head_fn(heads, "mlp")("a", p, jnp.ones((2, 4))).shape
  (2, 3)
  """

  def head(task: str, task_params: Params, z: Array) -> Array:
    if task not in heads:
      raise ValueError(f"{where}: unknown task {task!r}; tasks are {list(heads)}")
    return heads[task].apply({"params": task_params}, z)

  return head


def init_heads(heads: Mapping[str, nn.Module], keys: Array, z_shape: tuple[int, ...], z_dtype) -> dict[str, Params]:
  """Initializes every head on a dummy representation, with ``keys[i]`` for task ``i``.

  >>> heads = dense_heads({"a": 3, "b": 2}, (), jax.nn.relu, None, jnp.float32)
  >>> p = init_heads(heads, jax.random.split(jax.random.key(0), 2), (5, 4), jnp.float32)
  >>> p["b"]["dense_0"]["kernel"].shape
  (4, 2)
  """
  return {name: init_module(mod, keys[i], z_shape, z_dtype) for i, (name, mod) in enumerate(heads.items())}


def hard_sharing(names, where, trunk, heads, encode, *, trunk_input=None, stateful=False) -> MultiTaskModel:
  """The :class:`MultiTaskModel` of a shared ``trunk`` and one head per task.

  Args:
    names: the task names, in order.
    where: the constructor's name, for error messages.
    trunk: the linen trunk, initialised into ``params["shared"]``.
    heads: task name -> linen head (see :func:`dense_heads`).
    encode: ``encode(shared, inputs, model_state, *, train=False,
      axis_name=None) -> (z, model_state)``; lift a stateless ``encode(shared,
      inputs) -> z`` with :func:`jmtl.models._base.stateless`.
    trunk_input: ``(shape, dtype) -> (shape, dtype)`` of what the trunk's
      ``init`` sees, when ``encode`` reshapes the inputs first.
    stateful: the trunk has ``batch_stats``: they are the model state
      (``init_state``); otherwise the model state is ``{}``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jmtl.models._base import stateless
    >>> trunk = MLP(features=(3,), activate_last=True)
    >>> heads = dense_heads({"a": 2}, (), jax.nn.relu, None, jnp.float32)
    >>> m = hard_sharing(("a",), "demo", trunk, heads, stateless(lambda s, x: trunk.apply({"params": s}, x)))
    >>> preds, state = m.apply(m.init(jax.random.key(0), jnp.ones((4, 5))), jnp.ones((4, 5)), {})
    >>> preds["a"].shape, state, m.stateful
    ((4, 2), {}, False)
  """
  head = make_head_fn(heads, where)

  def trunk_variables(key, inputs):
    shape, dtype = jnp.shape(inputs), jnp.result_type(inputs)
    trunk_shape, trunk_dtype = (shape, dtype) if trunk_input is None else trunk_input(shape, dtype)
    return init_variables(trunk, key, trunk_shape, trunk_dtype)

  def init(key, inputs):
    keys = jax.random.split(key, len(names) + 1)
    variables = trunk_variables(keys[0], inputs)
    shared = params_of(variables)
    x = jax.ShapeDtypeStruct((1, *jnp.shape(inputs)[1:]), jnp.result_type(inputs))
    state = variables["batch_stats"] if stateful else {}
    z, _ = jax.eval_shape(lambda s, v, st: encode(s, v, st, train=False), shared, x, state)
    return {"shared": shared, "tasks": init_heads(heads, keys[1:], z.shape, z.dtype)}

  def init_state(key, inputs):
    # The same trunk key as ``init``: the statistics start at (mean 0, var 1) either way.
    return trunk_variables(jax.random.split(key, len(names) + 1)[0], inputs)["batch_stats"]

  def apply(params, inputs, model_state, *, train=False, axis_name=None):
    check_tasks(params, names, where)
    z, model_state = encode(params["shared"], inputs, model_state, train=train, axis_name=axis_name)
    return {name: head(name, params["tasks"][name], z) for name in names}, model_state

  return MultiTaskModel(
    init=init,
    apply=apply,
    encode=encode,
    head=head,
    task_names=names,
    init_state=init_state if stateful else no_state,
    stateful=stateful,
    head_kind=heads.__getitem__,  # linen modules compare by configuration: equal heads compute the same function
  )
