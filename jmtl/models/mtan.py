"""MTAN: a shared trunk and, per task, soft-attention modules that pick features from every stage.

The trunk is run once (``encode``) and returns its per-stage features; each
task's head runs its own attention modules over them (``head``), so MTAN is
parameter-separable and gets the gradient engine's fast paths.
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

from jmtl.models import _common
from jmtl.models._base import MultiTaskModel
from jmtl.models._base import stateless

Array = jax.Array
Params = Any
_TRUNKS = ("cnn", "mlp")


def _pool(x: Array) -> Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _layer(kind: str, width: int, size: int, name: str, *, dtype, param_dtype) -> nn.Module:
  """A ``size × size`` SAME conv for images, a Dense layer for vectors."""
  if kind == "cnn":
    return nn.Conv(width, (size, size), padding="SAME", dtype=dtype, param_dtype=param_dtype, name=name)
  return nn.Dense(width, dtype=dtype, param_dtype=param_dtype, name=name)


class _Trunk(nn.Module):
  """Stage ``ℓ``: ``u = act(layer_u(x))``, ``p = act(layer_p(u))``; the next stage sees ``pool(p)``."""

  features: tuple[int, ...]
  kind: str
  activation: Callable[[Array], Array] = jax.nn.relu
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[tuple[Array, Array], ...]:
    """Returns ``((u⁽⁰⁾, p⁽⁰⁾), ..., (u⁽ᴸ⁻¹⁾, p⁽ᴸ⁻¹⁾))``."""
    prefix = "conv" if self.kind == "cnn" else "dense"
    stages = []
    for i, c in enumerate(self.features):
      if i > 0 and self.kind == "cnn":
        x = _pool(x)
      u = self.activation(_layer(self.kind, c, 3, f"{prefix}_{i}_u", dtype=self.dtype, param_dtype=self.param_dtype)(x))
      p = self.activation(_layer(self.kind, c, 3, f"{prefix}_{i}_p", dtype=self.dtype, param_dtype=self.param_dtype)(u))
      stages.append((u, p))
      x = p
    return tuple(stages)


class _Attention(nn.Module):
  """One task's attention module at one stage: ``â = sigmoid(h(act(g([u, f(â_prev)])))) ⊙ p``."""

  width: int
  kind: str
  activation: Callable[[Array], Array] = jax.nn.relu
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u: Array, p: Array, prev: Array | None) -> Array:
    """``prev`` is the task's attended features of the previous stage, ``None`` at the first."""
    x = u
    if prev is not None:
      # f: the task's feature extractor, to the stage's width (and resolution).
      f = self.activation(_layer(self.kind, self.width, 3, "f", dtype=self.dtype, param_dtype=self.param_dtype)(prev))
      x = jnp.concatenate([u, _pool(f) if self.kind == "cnn" else f], axis=-1)
    g = self.activation(_layer(self.kind, self.width, 1, "g", dtype=self.dtype, param_dtype=self.param_dtype)(x))
    mask = jax.nn.sigmoid(_layer(self.kind, self.width, 1, "h", dtype=self.dtype, param_dtype=self.param_dtype)(g))
    return mask * p


class _Branch(nn.Module):
  """A task's attention modules over every stage, then pool/flatten and an MLP head."""

  features: tuple[int, ...]
  kind: str
  out: int
  head_hidden: tuple[int, ...] = ()
  activation: Callable[[Array], Array] = jax.nn.relu
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: tuple[tuple[Array, Array], ...]) -> Array:
    """Maps the trunk's stage features to the task's prediction ``(B, out)``."""
    kw = dict(kind=self.kind, activation=self.activation, dtype=self.dtype, param_dtype=self.param_dtype)
    attended = None
    for i, ((u, p), c) in enumerate(zip(z, self.features)):
      attended = _Attention(c, name=f"att_{i}", **kw)(u, p, attended)
    if self.kind == "cnn":
      attended = _pool(attended)  # the trunk's last pooling, on the task's attended features
    head = _common.MLP(
      features=(*self.head_hidden, self.out),
      activation=self.activation,
      flatten=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="head",
    )
    return head(attended)


@functools.partial(jax.jit, static_argnums=1)
def _draw(key: Array, layout: tuple[tuple[str, tuple[int, ...], Any], ...]) -> list[Array]:
  """LeCun-normal kernels and zero biases for ``layout`` = ((name, shape, dtype), ...), from one draw."""
  sizes = [math.prod(shape) for _, shape, _ in layout]
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (max(sum(sizes), 1),), jnp.float32)
  out, offset = [], 0
  for (name, shape, dtype), n in zip(layout, sizes):
    if name == "kernel":
      # 0.8796… is the standard deviation of a unit normal truncated to [-2, 2] (as in flax's variance_scaling).
      std = math.sqrt(1.0 / math.prod(shape[:-1])) / 0.87962566103423978
      out.append((flat[offset : offset + n].reshape(shape) * std).astype(dtype))
    else:
      out.append(jnp.zeros(shape, dtype))
    offset += n
  return out


def _init_params(module: nn.Module, key: Array, spec: Any) -> Params:
  """``module.init(key, spec)["params"]`` in distribution, from one random draw.

  Every layer here is a linen ``Dense`` or ``Conv`` with the default
  initializers: LeCun-normal kernels (truncated at two standard deviations,
  variance ``1/fan_in`` with ``fan_in`` the product of all but the last
  kernel axis) and zero biases. Drawing all kernels from one flat vector
  compiles one small random kernel instead of one per layer, which on
  XLA:CPU cuts ``init`` from seconds to well under one; the compiled draw is
  cached on the parameter layout, so tasks with equal output dims share it.

  ``spec``: a pytree of arrays or ``ShapeDtypeStruct`` of the module's inputs.
  """
  shapes = jax.eval_shape(lambda k, a: _common.params_of(module.init(k, a)), key, spec)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  layout = []
  for path, s in leaves:
    name = getattr(path[-1], "key", None)
    if name not in ("kernel", "bias"):  # a layer with another initializer must not be initialised silently wrong
      raise ValueError(f"mtan: no initializer for parameter {jax.tree_util.keystr(path)}")
    layout.append((name, tuple(s.shape), jnp.dtype(s.dtype)))
  return jax.tree_util.tree_unflatten(treedef, _draw(key, tuple(layout)))


def mtan(
  task_dims: Mapping[str, int],
  features: Sequence[int] = (32, 64),
  *,
  trunk: str = "cnn",
  head_hidden: Sequence[int] = (),
  activation: Callable[[Array], Array] = jax.nn.relu,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """Multi-Task Attention Network: a shared trunk and per-task soft attention at every stage.

  Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
  CVPR 2019. Trunk stage ``j`` (one per entry of ``features``, width ``Cⱼ``)
  is two layers, as in the paper's VGG blocks: ``u⁽ʲ⁾ = act(L_u(x))`` (the
  block's intermediate feature) and ``p⁽ʲ⁾ = act(L_p(u⁽ʲ⁾))`` (its output),
  and the next stage reads ``p⁽ʲ⁾`` (max-pooled 2×2 for images). With
  ``trunk="cnn"`` the layers are 3×3 SAME convolutions on NHWC images; with
  ``trunk="mlp"`` they are Dense layers on the flattened inputs.

  Task ``k``'s attention module at stage ``j`` computes

      aₖ⁽ʲ⁾ = sigmoid(h(act(g([u⁽ʲ⁾, fₖ⁽ʲ⁾(âₖ⁽ʲ⁻¹⁾)]))))      (aₖ⁽⁰⁾ from u⁽⁰⁾ alone)
      âₖ⁽ʲ⁾ = aₖ⁽ʲ⁾ ⊙ p⁽ʲ⁾

  where ``g`` and ``h`` are 1×1 convolutions (Dense for the MLP trunk) to
  ``Cⱼ`` channels and ``f`` is a 3×3 convolution to ``Cⱼ`` channels with
  ``act`` and a 2×2 max-pool that brings ``âₖ⁽ʲ⁻¹⁾`` to the stage's
  resolution (a Dense layer with ``act`` for the MLP trunk). The head
  max-pools ``âₖ⁽ᴸ⁻¹⁾`` (images), flattens it and applies Dense layers of
  widths ``(*head_hidden, task_dims[name])``.

  Departures from the paper, for small trunks and pure functions: no batch
  normalisation in the trunk or the attention modules (small trunks train
  without it, and it would make the model stateful, see
  :class:`~jmtl.models.MultiTaskModel`), and ``f`` is
  the task's own layer rather than one layer per stage used by every task,
  so that all attention parameters live in ``params["tasks"][name]`` and a
  task's parameters never change another task's prediction.

  Parameters (``conv`` for ``trunk="cnn"``, ``dense`` for ``"mlp"``)::

      {"shared": {"conv_0_u": ..., "conv_0_p": ..., "conv_1_u": ..., ...},
       "tasks": {name: {"att_0": {"g", "h"}, "att_1": {"f", "g", "h"}, ...,
                        "head": {"dense_0": ...}}}}

  ``z, _ = encode(params["shared"], x, {})`` gives ``z = ((u⁽⁰⁾, p⁽⁰⁾), ...,
  (u⁽ᴸ⁻¹⁾, p⁽ᴸ⁻¹⁾))`` and ``head(name, params["tasks"][name], z)`` runs the
  task's attention modules and output layers; ``apply`` is ``encode`` once
  then every ``head``. At ``level="representation"`` the gradient engine's
  Gramian is therefore that of the per-task gradients with respect to all
  stage features together (every ``u`` and ``p``, concatenated), not of one
  final feature vector. The model is stateless: ``model_state`` is ``{}``.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    features: the width (channels for ``"cnn"``, units for ``"mlp"``) of each
      trunk stage; the attention modules of stage ``j`` have width ``Cⱼ`` too.
    trunk: ``"cnn"`` (images ``(B, H, W[, C])``, H and W at least
      ``2**len(features)``) or ``"mlp"`` (any ``(B, ...)``, flattened).
    head_hidden: hidden Dense widths of each task's output MLP.
    activation: the nonlinearity of the trunk, ``f``, ``g`` and the head.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode`` and ``head``.

  Raises:
    ValueError: on bad ``task_dims``, widths or ``trunk``, and in
      ``apply``/``encode``/``head`` when inputs, features or params do not match.

  >>> import jax, jax.numpy as jnp
  >>> model = mtan({"left": 10, "right": 10}, features=(4, 8))
  >>> x = jnp.ones((2, 8, 8))
  >>> params = model.init(jax.random.key(0), x)
  >>> sorted(params["shared"]), sorted(params["tasks"]["left"])
  (['conv_0_p', 'conv_0_u', 'conv_1_p', 'conv_1_u'], ['att_0', 'att_1', 'head'])
  >>> z, _ = jax.eval_shape(model.encode, params["shared"], x, {})  # shapes only: quick in a doctest
  >>> [(u.shape, p.shape) for u, p in z]
  [((2, 8, 8, 4), (2, 8, 8, 4)), ((2, 4, 4, 8), (2, 4, 4, 8))]
  >>> vec = mtan({"a": 3, "b": 2}, features=(8, 8), trunk="mlp")
  >>> params = vec.init(jax.random.key(0), jnp.ones((2, 5)))
  >>> params["shared"]["dense_0_u"]["kernel"].shape
  (5, 8)
  >>> preds, state = vec.apply(params, jnp.ones((2, 5)), vec.init_state(jax.random.key(0), x))
  >>> {k: v.shape for k, v in preds.items()}, state
  ({'a': (2, 3), 'b': (2, 2)}, {})
  """
  where = "mtan"
  dims = _common.validate_task_dims(task_dims, where)
  features = _common.validate_sizes(features, "features", where)
  if not features:
    raise ValueError(f"{where}: features must have at least one stage width, got ()")
  head_hidden = _common.validate_sizes(head_hidden, "head_hidden", where)
  if trunk not in _TRUNKS:
    raise ValueError(f"{where}: trunk must be one of {_TRUNKS}, got {trunk!r}")
  _common.check_activation(activation, where)
  names = tuple(dims)
  kw = dict(kind=trunk, activation=activation, dtype=dtype, param_dtype=param_dtype)
  trunk_mod = _Trunk(features=features, **kw)
  branches = {name: _Branch(features=features, out=dim, head_hidden=head_hidden, **kw) for name, dim in dims.items()}

  def prepare(inputs: Array) -> Array:
    if trunk == "cnn":
      return _common.as_nhwc(inputs, len(features), where)
    return _common.flatten_batch(inputs)

  def trunk_features(shared: Params, inputs: Array) -> tuple[tuple[Array, Array], ...]:
    x = prepare(inputs)
    first = shared.get(f"{'conv' if trunk == 'cnn' else 'dense'}_0_u") if isinstance(shared, Mapping) else None
    if first is None:
      raise ValueError(f"{where}: params['shared'] has no first {trunk} trunk layer; got {type(shared).__name__}")
    expected = first["kernel"].shape[-2]
    if x.shape[-1] != expected:
      raise ValueError(
        f"{where}: inputs of shape {tuple(jnp.shape(inputs))} give {x.shape[-1]} "
        f"{'channels' if trunk == 'cnn' else 'features'}, but the trunk's first layer expects {expected}"
      )
    return trunk_mod.apply({"params": shared}, x)

  def head(task: str, task_params: Params, z: Any) -> Array:
    if task not in branches:
      raise ValueError(f"{where}: unknown task {task!r}; tasks are {list(branches)}")
    if not isinstance(z, (tuple, list)) or len(z) != len(features) or any(len(s) != 2 for s in z):
      raise ValueError(
        f"{where}: z must be {len(features)} (u, p) stage pairs from encode, got {jax.tree.structure(z)}"
      )
    return branches[task].apply({"params": task_params}, tuple(tuple(s) for s in z))

  def init(key: Array, inputs: Array) -> Params:
    spec = jax.eval_shape(prepare, jax.ShapeDtypeStruct(jnp.shape(inputs), jnp.result_type(inputs)))
    spec = jax.ShapeDtypeStruct((1, *spec.shape[1:]), spec.dtype)  # only the shape past the batch axis matters
    keys = jax.random.split(key, len(names) + 1)
    shared = _init_params(trunk_mod, keys[0], spec)
    z = jax.eval_shape(trunk_features, shared, spec)
    tasks = {name: _init_params(branches[name], keys[i + 1], z) for i, name in enumerate(names)}
    return {"shared": shared, "tasks": tasks}

  def predict(params: Params, inputs: Array) -> dict[str, Array]:
    _common.check_tasks(params, names, where)
    z = trunk_features(params["shared"], inputs)
    return {name: head(name, params["tasks"][name], z) for name in names}

  return MultiTaskModel(
    init=init,
    apply=stateless(predict),
    encode=stateless(trunk_features),
    head=head,
    task_names=names,
    head_kind=branches.__getitem__,  # linen modules compare by configuration
  )
