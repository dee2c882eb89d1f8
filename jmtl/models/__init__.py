"""Models that follow the MTL parameter convention ``{"shared": ..., "tasks": {...}}``.

flax linen modules are adapters: each constructor returns a
:class:`MultiTaskModel` of pure functions over the parameter dict, all with
one calling convention, ``apply(params, inputs, model_state, *, train=False,
axis_name=None) -> (predictions, model_state)`` (a stateless model's state is
``{}``). :func:`as_model` wraps a plain ``apply(params, inputs) -> {task:
prediction}`` into that convention; :func:`from_nnx` and :func:`from_equinox`
wrap a trunk and per-task heads written with flax.nnx or equinox.

>>> import jax, jax.numpy as jnp
>>> from jmtl import models
>>> model = models.mlp({"a": 3}, hidden=(8,))
>>> x = jnp.ones((2, 4))
>>> preds, state = model.apply(model.init(jax.random.key(0), x), x, model.init_state(jax.random.key(0), x))
>>> model.task_names, preds["a"].shape, state
(('a',), (2, 3), {})
"""

from jmtl.models._base import MultiTaskModel
from jmtl.models._base import as_model
from jmtl.models.adapters import from_equinox
from jmtl.models.adapters import from_nnx
from jmtl.models.cnn import cnn
from jmtl.models.cross_stitch import cross_stitch
from jmtl.models.dselect import dselect_k
from jmtl.models.experts import cgc
from jmtl.models.experts import mmoe
from jmtl.models.experts import ple
from jmtl.models.graph import schnet
from jmtl.models.ltb import ltb
from jmtl.models.ltb import ltb_export
from jmtl.models.mlp import mlp
from jmtl.models.mtan import mtan
from jmtl.models.resnet import resnet
from jmtl.models.soft import soft_mlp
from jmtl.models.soft import tower_params

__all__ = [
  "MultiTaskModel",
  "as_model",
  "cgc",
  "cnn",
  "cross_stitch",
  "dselect_k",
  "from_equinox",
  "from_nnx",
  "ltb",
  "ltb_export",
  "mlp",
  "mmoe",
  "mtan",
  "ple",
  "resnet",
  "schnet",
  "soft_mlp",
  "tower_params",
]
