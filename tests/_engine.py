"""Fixtures of the train-step and gradient-engine tests: a small hand-written model, tasks, batches, states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jmtl
from jmtl import grads
from jmtl import losses as L
from jmtl import models
from jmtl import sharing

NAMES = ("a", "b", "c")


def apply(p, x):
  """A plain ``apply(params, x)``: tanh trunk, a tower and an output layer per task."""
  h = jnp.tanh(x @ p["shared"]["w1"] + p["shared"]["b1"])
  t = p["tasks"]
  return {
    "a": jnp.tanh(h @ t["a"]["tower"]) @ t["a"]["w"],
    "b": (jnp.tanh(h @ t["b"]["tower"]) @ t["b"]["w"])[:, 0],
    "c": jnp.tanh(h @ t["c"]["tower"]) @ t["c"]["w"],
  }


TASKS = [
  jmtl.Task("a", L.softmax_cross_entropy),
  jmtl.Task("b", L.mse),
  jmtl.Task("c", L.sigmoid_binary_cross_entropy),
]


def make_params(dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  n = lambda k, s: (0.5 * jax.random.normal(k, s)).astype(dtype)
  return {
    "shared": {"w1": n(ks[0], (5, 4)), "b1": n(ks[1], (4,))},
    "tasks": {
      "a": {"tower": n(ks[2], (4, 4)), "w": n(ks[3], (4, 3))},
      "b": {"tower": n(ks[4], (4, 4)), "w": n(ks[5], (4, 1))},
      "c": {"tower": n(ks[6], (4, 4)), "w": n(ks[7], (4, 2))},
    },
  }


def make_batch(b=8, dtype=jnp.float32, seed=1):
  r = np.random.default_rng(seed)
  mask_b = np.ones(b, np.float32)
  mask_b[::3] = 0  # partially labelled: every third example has no label for "b"
  return {
    "inputs": jnp.asarray(r.normal(size=(b, 5)), dtype),
    "labels": {
      "a": jnp.asarray(r.integers(0, 3, size=b)),
      "b": jnp.asarray(r.normal(size=b), dtype),
      "c": jnp.asarray(r.integers(0, 2, size=(b, 2)), dtype),
    },
    "masks": {"b": jnp.asarray(mask_b)},
  }


WD, SOFT = 1e-2, 0.3
PENALTIES = (
  sharing.weight_decay(WD, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
  sharing.soft_sharing(SOFT, lambda p: [p["tasks"][k]["tower"] for k in NAMES]),
)


def new_state(params, tx, weighting=None, num_tasks=3, seed=0):
  """``jmtl.TrainState.create`` with the tests' defaults."""
  return jmtl.TrainState.create(
    params=params, tx=tx, weighting=weighting, num_tasks=num_tasks, rng=jax.random.key(seed)
  )


def setup(kind="mlp", dtype=jnp.float64, b=6, seed=0):
  """A jmtl model (mlp or cnn), its parameters, a partially labelled batch and three tasks of three kinds."""
  r = np.random.default_rng(seed)
  dims = {"a": 3, "b": 1, "c": 2}
  if kind == "mlp":
    model = models.mlp(dims, hidden=(7, 5), param_dtype=dtype)
    x = r.normal(size=(b, 4))
  else:
    model = models.cnn(dims, features=(3, 4), dense=6, param_dtype=dtype)
    x = r.normal(size=(b, 8, 8, 1))
  params = model.init(jax.random.key(seed), jnp.asarray(x, dtype))
  mask = np.ones(b, np.float32)
  mask[1] = 0
  batch = {
    "inputs": jnp.asarray(x, dtype),
    "labels": {
      "a": jnp.asarray(r.integers(0, 3, b)),
      "b": jnp.asarray(r.normal(size=(b, 1)), dtype),
      "c": jnp.asarray(r.integers(0, 2, (b, 2)), dtype),
    },
    "masks": {"b": jnp.asarray(mask)},
  }
  return model, params, batch, list(TASKS)


def context(model, params, batch, tasks, transform, **options):
  """A :class:`jmtl.grads.Context` of one step, with a fixed key."""
  return grads.Context(
    model=models.as_model(model),
    tasks=tuple(tasks),
    params=params,
    batch=batch,
    transform=transform,
    weighting_state=transform.init(len(tasks)),
    inputs={"key": jax.random.key(0)},
    options=grads.GradientOptions(**options).check(),
  )
