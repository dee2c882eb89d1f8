"""flax.nnx and equinox models train through make_train_step, by the separable route, exactly."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jmtl
from jmtl import grads
from jmtl import losses as L
from jmtl import models
from jmtl import weighting as W
from tests._engine import context

DIMS = {"a": 3, "b": 1}
TASKS = [jmtl.Task("a", L.softmax_cross_entropy), jmtl.Task("b", L.mse)]


def batch(b=8, seed=0):
  r = np.random.default_rng(seed)
  return {
    "inputs": jnp.asarray(r.normal(size=(b, 5)), jnp.float32),
    "labels": {"a": jnp.asarray(r.integers(0, 3, b)), "b": jnp.asarray(r.normal(size=(b, 1)), jnp.float32)},
  }


def linen_twin(kernels):
  """jmtl's linen MLP (5 → 8 → 6, linear heads) holding the given (kernel, bias) pairs: trunk 0, 1, heads a, b."""
  model = models.mlp(DIMS, hidden=(8, 6))
  dense = lambda kb: {"dense_0": {"kernel": kb[0], "bias": kb[1]}}
  params = {
    "shared": {"dense_0": dense(kernels[0])["dense_0"], "dense_1": dense(kernels[1])["dense_0"]},
    "tasks": {"a": dense(kernels[2]), "b": dense(kernels[3])},
  }
  return model, params


def nnx_model():
  rngs = nnx.Rngs(0)
  trunk = nnx.Sequential(nnx.Linear(5, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 6, rngs=rngs), nnx.relu)
  model = models.from_nnx(trunk, {"a": nnx.Linear(6, 3, rngs=rngs), "b": nnx.Linear(6, 1, rngs=rngs)})
  p = model.init(jax.random.key(0), None)
  layers = p["shared"]["layers"]
  pairs = [(layers[0]["kernel"], layers[0]["bias"]), (layers[2]["kernel"], layers[2]["bias"])]
  pairs += [(p["tasks"][n]["kernel"], p["tasks"][n]["bias"]) for n in DIMS]
  return model, pairs


def equinox_model():
  k = jax.random.split(jax.random.key(1), 4)
  trunk = eqx.nn.Sequential(
    [
      eqx.nn.Linear(5, 8, key=k[0]),
      eqx.nn.Lambda(jax.nn.relu),
      eqx.nn.Linear(8, 6, key=k[1]),
      eqx.nn.Lambda(jax.nn.relu),
    ]
  )
  model = models.from_equinox(trunk, {"a": eqx.nn.Linear(6, 3, key=k[2]), "b": eqx.nn.Linear(6, 1, key=k[3])})
  p = model.init(jax.random.key(0), None)
  lin = [p["shared"].layers[0], p["shared"].layers[2], p["tasks"]["a"], p["tasks"]["b"]]
  return model, [(m.weight.T, m.bias) for m in lin]  # equinox stores (out, in)


@pytest.mark.parametrize("make", [nnx_model, equinox_model], ids=["nnx", "equinox"])
def test_trains_like_the_same_linen_model_with_a_gramian_method(make):
  """Three MGDA steps (parameter level, Adam): the same losses and weights as jmtl's linen MLP with the same weights."""
  model, pairs = make()
  twin, twin_params = linen_twin(pairs)
  b = batch()
  route = grads.route(context(model, model.init(None, None), b, TASKS, W.mgda()))
  assert route.name == "separable" and "Jacobian rows of the trunk" in route.detail
  step = jax.jit(jmtl.make_train_step(model, TASKS))
  twin_step = jax.jit(jmtl.make_train_step(twin, TASKS))
  tx = optax.adam(1e-2)
  state = jmtl.TrainState.from_model(model, b["inputs"], tx=tx, weighting=W.mgda(), rng=jax.random.key(0))
  ref = jmtl.TrainState.create(params=twin_params, tx=tx, weighting=W.mgda(), num_tasks=2, rng=jax.random.key(0))
  for s in range(3):
    bs = batch(seed=s)
    state, m = step(state, bs)
    ref, want = twin_step(ref, bs)
    for key in ("loss/a", "loss/b", "weight/a", "weight/b"):
      np.testing.assert_allclose(m[key], want[key], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(m["grad_cosine"], want["grad_cosine"], atol=2e-4)
  assert int(state.num_skipped) == 0


def test_nnx_batch_norm_statistics_are_the_model_state():
  rngs = nnx.Rngs(0)
  trunk = nnx.Sequential(nnx.Linear(5, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs), nnx.relu)
  model = models.from_nnx(trunk, {"a": nnx.Linear(8, 3, rngs=rngs), "b": nnx.Linear(8, 1, rngs=rngs)})
  b = batch()
  state = jmtl.TrainState.from_model(model, b["inputs"], tx=optax.sgd(0.1), rng=jax.random.key(0))
  assert model.stateful and state.model_state["shared"]["layers"][1]["mean"].shape == (8,)
  new, _ = jax.jit(jmtl.make_train_step(model, TASKS))(state, b)
  mean = new.model_state["shared"]["layers"][1]["mean"]
  assert not np.allclose(mean, 0)  # the running mean moved toward the batch's
  ev = jax.jit(jmtl.make_eval_step(model, TASKS))
  got = jmtl.evaluate(ev, new.params, [b], TASKS, new.model_state)
  preds, _ = model.apply(new.params, b["inputs"], new.model_state, train=False)
  want = float(jnp.mean(jnp.square(preds["b"] - b["labels"]["b"])))
  assert got["b/loss"] == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match="model_state"):
    ev(new.params, b)
