"""Models that follow the MTL parameter convention ``{"shared": ..., "tasks": {...}}``.

flax linen modules are adapters: each constructor returns a
:class:`MultiTaskModel` of pure functions over the parameter dict.

>>> import jax, jax.numpy as jnp
>>> from jmtl import models
>>> model = models.mlp({"a": 3}, hidden=(8,))
>>> model.task_names
('a',)
"""

from jmtl.models._base import MultiTaskModel
from jmtl.models.cnn import cnn
from jmtl.models.cross_stitch import cross_stitch
from jmtl.models.dselect import dselect_k
from jmtl.models.experts import cgc
from jmtl.models.experts import mmoe
from jmtl.models.experts import ple
from jmtl.models.mlp import mlp
from jmtl.models.mtan import mtan
from jmtl.models.resnet import resnet
from jmtl.models.soft import soft_mlp
from jmtl.models.soft import tower_params

__all__ = [
  "MultiTaskModel",
  "cgc",
  "cnn",
  "cross_stitch",
  "dselect_k",
  "mlp",
  "mmoe",
  "mtan",
  "ple",
  "resnet",
  "soft_mlp",
  "tower_params",
]
