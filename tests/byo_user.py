"""A user's own model, dataset and weighting, outside jmtl, run by ``jmtl train --config tests.byo_user``.

Everything here is reached by import path only: ``model.name``,
``dataset.name`` and ``weighting`` name the functions below, and their
arguments are the config groups of their last name parts (``model.linen_mlp``,
``dataset.options``, ``weighting_args.tilted``). tests/test_run_byo.py trains it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import jmtl
from jmtl.configs import synthetic

SIZES = {"train": 512, "validation": 256, "test": 256}


def two_tasks(split: str, *, dim: int = 8, seed: int = 0) -> jmtl.data.ArraySource:
  """Two 3-class tasks that read different halves of one random projection of Gaussian inputs.

  The projection is fixed by ``seed``; each split draws its own inputs.
  """
  w = np.random.default_rng(seed).standard_normal((dim, 6))
  x = np.random.default_rng([seed, list(SIZES).index(split) + 1]).standard_normal((SIZES[split], dim))
  h = x @ w
  labels = {"first": h[:, :3].argmax(1), "second": h[:, 3:].argmax(1)}
  tasks = {t: {"kind": "classification", "num_classes": 3} for t in labels}
  return jmtl.data.ArraySource({"inputs": x.astype(np.float32), "labels": labels}, tasks=tasks)


class Trunk(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(self.hidden)(x))


def linen_mlp(task_dims: dict[str, int], hidden: int = 16) -> jmtl.models.MultiTaskModel:
  """A linen trunk and one linen Dense head per task, with ``encode``/``head`` (the separable fast paths)."""
  trunk, heads = Trunk(hidden), {t: nn.Dense(d) for t, d in task_dims.items()}

  def init(key, x):
    keys = jax.random.split(key, len(heads) + 1)
    shared = trunk.init(keys[0], x)["params"]
    z = trunk.apply({"params": shared}, x)
    return {"shared": shared, "tasks": {t: heads[t].init(k, z)["params"] for t, k in zip(heads, keys[1:])}}

  def encode(shared, x, model_state, *, train=False, axis_name=None):
    return trunk.apply({"params": shared}, x), model_state

  def head(task, params, z):
    return heads[task].apply({"params": params}, z)

  def apply(params, x, model_state, *, train=False, axis_name=None):
    z, model_state = encode(params["shared"], x, model_state)
    return {t: head(t, params["tasks"][t], z) for t in heads}, model_state

  return jmtl.models.MultiTaskModel(init=init, apply=apply, encode=encode, head=head, task_names=tuple(heads))


def tilted(tilt: float = 1.0) -> jmtl.weighting.WeightingTransform:
  """Weights ``(tilt, 1, ..., 1)`` scaled to sum to K: a stateless loss-level transform."""

  def update(losses, state, **inputs):
    w = jnp.ones_like(losses).at[0].set(tilt)
    return w * losses.shape[0] / w.sum(), state

  return jmtl.weighting.WeightingTransform(init=lambda num_tasks: jmtl.weighting.EmptyState(), update=update)


def get_config() -> ml_collections.ConfigDict:
  config = synthetic.get_config()
  config.dataset.name = "tests.byo_user.two_tasks"
  config.dataset.config = ""
  config.dataset.options = ml_collections.ConfigDict(dict(dim=8, seed=0))
  config.model.name = "tests.byo_user.linen_mlp"
  config.model.linen_mlp = ml_collections.ConfigDict(dict(hidden=16))
  config.weighting = "tests.byo_user.tilted"
  config.weighting_args.tilted = ml_collections.ConfigDict(dict(tilt=3.0))
  config.num_steps = 60
  config.batch_size = 32
  config.log_every = 10
  config.eval_every = 20
  config.checkpoint_every = 20
  config.eval_batch_size = 256
  config.plots = False
  return config
