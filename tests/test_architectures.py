"""Every architecture through the runner's registry and configs; every weighting method on the general path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.configs import multi_digits
from jmtl.configs import synthetic
from jmtl.run import registry
from jmtl.run.config import ConfigError

IMAGE_ONLY = {"cnn", "resnet"}  # convolutional trunks: MultiDigits only (synthetic inputs are vectors)
# Packed molecules (B, N, 5) only: tests/test_models_graph.py trains it through the runner's qm9 config (with MGDA).
MOLECULES_ONLY = {"schnet"}
# MultiDigits trains every architecture. The synthetic configs change what the others compute only in size (their
# trunks flatten images and take vectors alike): those are traced through init and the train step (every config
# field, shape and dtype), not compiled again. MTAN's synthetic config picks another trunk (an MLP): it trains.
TRAINED_ON_SYNTHETIC = {"mtan"}


def _batch(shape, names, classes, seed=0):
  r = np.random.default_rng(seed)
  return {
    "inputs": r.uniform(size=(16, *shape)).astype(np.float32),
    "labels": {n: r.integers(0, classes, 16).astype(np.int32) for n in names},
  }


def _train(config, names, classes, shape, steps=3):
  model = registry.make_model(config, dict.fromkeys(names, classes))
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in names]
  opt = optax.adam(1e-3)
  w = registry.make_weighting(config, len(names))
  batch = _batch(shape, names, classes)
  state = jmtl.TrainState.from_model(model, batch["inputs"], tx=opt, weighting=w, rng=jax.random.key(config.seed))
  step = jax.jit(jmtl.make_train_step(model, tasks))
  first = None
  for _ in range(steps):
    state, m = step(state, batch)
    first = m["loss"] if first is None else first
  return state, first, m


def _trace(config, names, classes, shape):
  """``_train`` abstractly: the state and a step's new state and metrics as shapes and dtypes, nothing compiled."""
  model = registry.make_model(config, dict.fromkeys(names, classes))
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in names]
  w = registry.make_weighting(config, len(names))
  batch = _batch(shape, names, classes)
  create = lambda key, x: jmtl.TrainState.from_model(model, x, tx=optax.adam(1e-3), weighting=w, rng=key)
  state = jax.eval_shape(create, jax.random.key(config.seed), batch["inputs"])
  return (state, *jax.eval_shape(jmtl.make_train_step(model, tasks), state, batch))


@pytest.mark.parametrize("dataset", ["multi_digits", "synthetic"])
@pytest.mark.parametrize("name", list(registry.model_constructors()))
def test_every_architecture_trains_from_the_runner_config_with_mgda(dataset, name):
  if dataset == "synthetic" and name in IMAGE_ONLY:
    pytest.skip("convolutional trunk: images only (the runner says so with a config error)")
  if name in MOLECULES_ONLY:
    pytest.skip("a graph model: packed molecules only (tests/test_models_graph.py)")
  config = (multi_digits if dataset == "multi_digits" else synthetic).get_config()
  config.model.name = name
  config.weighting = "equal" if name == "soft_mlp" else "mgda"  # soft_mlp has no shared parameters
  images = dataset == "multi_digits"
  names, classes, shape = (("left", "right"), 10, (16, 16, 1)) if images else (("t0", "t1"), 2, (32,))
  if not images and name not in TRAINED_ON_SYNTHETIC:
    state, new, m = _trace(config, names, classes, shape)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new) == jax.tree.map(lambda a: (a.shape, a.dtype), state)
    assert m["loss"].shape == () and m["loss"].dtype == jnp.float32
    assert name == "soft_mlp" or m["grad_cosine"].shape == (2, 2)
    return
  state, first, m = _train(config, names, classes, shape)
  assert int(state.num_skipped) == 0
  assert float(m["loss"]) < float(first)  # three Adam steps on one batch lower its loss
  if name != "soft_mlp":
    assert m["grad_cosine"].shape == (2, 2)


# One method per way the general path serves a transform: losses only, learned weights, the Gramian,
# a Gramian of a parameter subset, a random key, the element-wise Jacobian, a chain.
PATHS = ["static", "uncertainty", "mgda", "gradnorm", "pcgrad", "graddrop", "uncertainty+upgrad"]


@pytest.mark.parametrize("method", PATHS)
def test_every_kind_of_method_runs_on_a_non_separable_model(method):
  """MMoE has no single shared representation: Gramian and Jacobian methods go through the general path."""
  config = synthetic.get_config()
  config.model.name = "mmoe"
  config.model.mmoe.update(num_experts=3, expert_hidden=(8,), tower_hidden=())
  config.weighting = method
  if method == "static":
    config.static_weights = (1.0, 0.5, 2.0)
  state, _, m = _train(config, ("t0", "t1", "t2"), 2, (5,), steps=2)
  assert int(state.num_skipped) == 0 and bool(jnp.isfinite(m["loss"]))
  assert all(bool(jnp.isfinite(m[f"weight/t{i}"])) for i in range(3))


def test_bfloat16_compute_dtype_from_the_config():
  """model.dtype = bfloat16: the model computes in bfloat16; parameters, losses and the update stay float32."""
  config = synthetic.get_config()
  config.model.dtype = "bfloat16"
  state, first, m = _train(config, ("t0", "t1"), 2, (32,), steps=3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert m["loss/t0"].dtype == jnp.float32 and float(m["loss"]) < float(first)
  model = registry.make_model(config, {"t0": 2, "t1": 2})
  preds, _ = model.apply(state.params, jnp.ones((2, 32)), {})
  assert preds["t0"].dtype == jnp.bfloat16
  config.model.dtype = "float13"
  with pytest.raises(ConfigError, match=r"model\.dtype"):
    registry.make_model(config, {"t0": 2})
