"""Hard parameter sharing with a residual convolutional trunk (batch norm or group norm)."""

from __future__ import annotations

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

NORMS = ("batch", "group", "none")


class _Norm(nn.Module):
  """Batch norm (running statistics in ``batch_stats``), group norm, or nothing."""

  kind: str
  groups: int
  momentum: float
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if self.kind == "batch":
      return nn.BatchNorm(
        use_running_average=not train,
        momentum=self.momentum,
        epsilon=1e-5,
        axis_name=self.axis_name,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )(x)
    if self.kind == "group":
      return nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x


class _ResidualTrunk(nn.Module):
  """Stem conv, residual basic blocks per stage (stride 2 from the second stage on), global average pool."""

  stage_features: tuple[int, ...]
  blocks_per_stage: int
  norm: str
  groups: int
  momentum: float = 0.9
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Maps images ``(B, H, W, C)`` to ``(B, stage_features[-1])``."""
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    bias = self.norm == "none"  # a bias before a norm layer is redundant

    def norm(name):
      return _Norm(self.norm, self.groups, self.momentum, self.axis_name, name=name, **kw)

    x = nn.Conv(self.stage_features[0], (3, 3), padding="SAME", use_bias=bias, name="stem", **kw)(x)
    x = nn.relu(norm("stem_norm")(x, train))
    for s, f in enumerate(self.stage_features):
      for b in range(self.blocks_per_stage):
        stride = 2 if s > 0 and b == 0 else 1
        name = f"stage{s}_block{b}"
        y = nn.Conv(f, (3, 3), (stride, stride), padding="SAME", use_bias=bias, name=f"{name}_conv0", **kw)(x)
        y = nn.relu(norm(f"{name}_norm0")(y, train))
        y = nn.Conv(f, (3, 3), padding="SAME", use_bias=bias, name=f"{name}_conv1", **kw)(y)
        y = norm(f"{name}_norm1")(y, train)
        if stride != 1 or x.shape[-1] != f:  # projection shortcut (He et al. 2016, option B)
          x = nn.Conv(f, (1, 1), (stride, stride), use_bias=bias, name=f"{name}_proj", **kw)(x)
          x = norm(f"{name}_proj_norm")(x, train)
        x = nn.relu(x + y)
    return jnp.mean(x, axis=(1, 2))


def resnet(
  task_dims: Mapping[str, int],
  stage_features: Sequence[int] = (16, 32, 64),
  blocks_per_stage: int = 1,
  *,
  norm: str = "batch",
  groups: int = 8,
  momentum: float = 0.9,
  dtype: Any = None,
  param_dtype: Any = jnp.float32,
) -> MultiTaskModel:
  """A shared residual CNN trunk and one linear head per task (hard parameter sharing).

  The trunk follows He, Zhang, Ren and Sun, "Deep Residual Learning for
  Image Recognition" (CVPR 2016), at a small scale: a 3x3 stem convolution,
  then for each stage ``blocks_per_stage`` basic blocks (two 3x3
  convolutions, each followed by the norm, ReLU after the first and after the
  residual sum; a 1x1 projection shortcut where the shape changes), the first
  block of every stage but the first with stride 2, and a global average
  pool. ``z = encode(...)`` has shape ``(B, stage_features[-1])``; each head
  is one ``Dense`` layer.

  Normalisation (``norm``):

  * ``"batch"`` -- batch norm (Ioffe & Szegedy, ICML 2015). The model is
    *stateful* (``model.stateful``): the running statistics are
    ``model_state = model.init_state(key, x)``, kept in
    :class:`jmtl.TrainState` and updated by every training step (with
    momentum ``momentum``); ``apply(..., train=True)`` and ``encode`` return
    the new statistics (see :class:`~jmtl.models.MultiTaskModel`). In training the batch statistics
    are those of the global batch: under pmap the step passes its axis name,
    under a mesh the jitted step sees the whole batch. Evaluation uses the
    running statistics.
  * ``"group"`` -- group norm (Wu & He, ECCV 2018) with ``groups`` groups
    (each stage width must be divisible by it): stateless (``model_state``
    is ``{}``), independent of the batch, so per-example and per-device
    results never mix.
  * ``"none"`` -- convolutions with biases and no normalisation.

  Args:
    task_dims: task name -> output dimension; the order fixes the task order.
    stage_features: channels of each stage.
    blocks_per_stage: residual blocks per stage.
    norm: ``"batch"``, ``"group"`` or ``"none"``.
    groups: number of groups of group norm.
    momentum: decay of batch norm's running averages.
    dtype: computation dtype; ``None`` promotes inputs with parameters.
    param_dtype: parameter dtype.

  Returns:
    A :class:`~jmtl.models.MultiTaskModel` with ``encode`` and ``head``
    (``stateful`` with ``norm="batch"``). Inputs are NHWC ``(B, H, W, C)``; a
    ``(B, H, W)`` batch gets a channel axis.

  Raises:
    ValueError: on bad sizes or ``norm``, widths not divisible by ``groups``,
      and inputs that are not images or too small for the strided stages.

  >>> import jax, jax.numpy as jnp
  >>> model = resnet({"left": 10, "right": 10}, stage_features=(8,))
  >>> x = jnp.ones((2, 8, 8, 1))
  >>> params, state = model.init(jax.random.key(0), x), model.init_state(jax.random.key(0), x)
  >>> preds, new_state = model.apply(params, x, state, train=True)
  >>> preds["left"].shape, jax.tree.structure(new_state) == jax.tree.structure(state)
  ((2, 10), True)
  >>> gn = resnet({"a": 3}, stage_features=(8,), norm="group", groups=4)
  >>> preds, gn_state = gn.apply(gn.init(jax.random.key(0), x), x, gn.init_state(jax.random.key(0), x))
  >>> gn.stateful, gn_state, preds["a"].shape
  (False, {}, (2, 3))
  """
  where = "resnet"
  dims = _common.validate_task_dims(task_dims, where)
  stage_features = _common.validate_sizes(stage_features, "stage_features", where)
  if not stage_features:
    raise ValueError(f"{where}: stage_features must have at least one stage, got {stage_features!r}")
  (blocks_per_stage,) = _common.validate_sizes((blocks_per_stage,), "blocks_per_stage", where)
  if norm not in NORMS:
    raise ValueError(f"{where}: norm must be one of {NORMS}, got {norm!r}")
  if norm == "group":
    (groups,) = _common.validate_sizes((groups,), "groups", where)
    bad = [f for f in stage_features if f % groups]
    if bad:
      raise ValueError(f"{where}: group norm with groups={groups} needs stage widths divisible by it; got {bad}")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
  names = tuple(dims)
  num_strided = len(stage_features) - 1
  trunk = _ResidualTrunk(stage_features, blocks_per_stage, norm, groups, momentum, dtype=dtype, param_dtype=param_dtype)
  heads = _common.dense_heads(dims, (), jax.nn.relu, dtype, param_dtype)

  def images(inputs):
    return _common.as_nhwc(inputs, num_strided, where)

  def nhwc(shape, dtype_):
    x = jax.eval_shape(images, jax.ShapeDtypeStruct(shape, dtype_))
    return x.shape, x.dtype

  if norm != "batch":

    def encode(shared: Params, inputs: Array) -> Array:
      return trunk.apply({"params": shared}, images(inputs))

    return _common.hard_sharing(names, where, trunk, heads, stateless(encode), trunk_input=nhwc)

  def encode_stateful(shared, inputs, model_state, *, train=False, axis_name=None):
    if not jax.tree.leaves(model_state):
      raise ValueError(
        f"{where}: batch norm needs its running statistics but model_state is empty ({model_state!r}); "
        "start from model.init_state(key, inputs) (jmtl.TrainState.from_model does)"
      )
    variables = {"params": shared, "batch_stats": model_state}
    module = trunk if axis_name is None else trunk.clone(axis_name=axis_name)
    if not train:
      return module.apply(variables, images(inputs), train=False), model_state
    z, updated = module.apply(variables, images(inputs), train=True, mutable=["batch_stats"])
    return z, updated["batch_stats"]

  return _common.hard_sharing(names, where, trunk, heads, encode_stateful, trunk_input=nhwc, stateful=True)
