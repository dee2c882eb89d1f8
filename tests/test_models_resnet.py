"""Tests for the residual CNN trunk and model state (batch norm) through the train step and parallel wrappers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import parallel
from jmtl import weighting as W
from jmtl.models import resnet
from tests._helpers import fill_params

DIMS = {"a": 3, "b": 2}
TASKS = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy), jmtl.Task("b", jmtl.losses.softmax_cross_entropy)]
KEY = jax.random.key(0)


def _batch(b=8, seed=0):
  r = np.random.default_rng(seed)
  return {
    "inputs": r.standard_normal((b, 8, 8, 1)).astype(np.float32),
    "labels": {"a": r.integers(0, 3, b).astype(np.int32), "b": r.integers(0, 2, b).astype(np.int32)},
  }


@pytest.fixture(scope="module")
def bn():
  model = resnet(DIMS, stage_features=(4, 8))
  x = _batch()["inputs"]
  return model, fill_params(model, x, scale=0.3), model.init_state(KEY, x)


def test_structure_split_and_stateful_contract(bn):
  model, params, state = bn
  assert model.stateful and model.task_names == ("a", "b")
  assert {"stem", "stem_norm", "stage1_block0_proj"} <= set(params["shared"])
  assert "stage0_block0_proj" not in params["shared"]  # same width, stride 1: identity shortcut
  assert set(state) == {k for k in params["shared"] if "norm" in k}
  np.testing.assert_array_equal(state["stem_norm"]["BatchNorm_0"]["var"], np.ones(4))
  x = _batch()["inputs"]
  for train in (True, False):
    preds, new = model.apply(params, x, state, train=train)
    assert {k: v.shape for k, v in preds.items()} == {"a": (8, 3), "b": (8, 2)}
    z, new_z = model.encode(params["shared"], x, state, train=train)
    assert z.shape == (8, 8)
    for t in DIMS:
      np.testing.assert_allclose(preds[t], model.head(t, params["tasks"][t], z), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, new, new_z)
  # Hard sharing: task a's head never changes task b's prediction.
  preds, _ = model.apply(params, x, state, train=True)
  moved = jax.tree.map(lambda v: v + 1.0, params["tasks"]["a"])
  preds2, _ = model.apply({**params, "tasks": {**params["tasks"], "a": moved}}, x, state, train=True)
  np.testing.assert_array_equal(preds2["b"], preds["b"])
  assert not np.allclose(preds2["a"], preds["a"])


def test_train_step_updates_batch_stats_from_the_batch(bn):
  """The stem's running mean after one step is 0.9 * 0 + 0.1 * (mean of the stem conv over B, H, W)."""
  model, params, state0 = bn
  batch = _batch()
  opt = optax.sgd(0.01)
  state = jmtl.TrainState.create(params=params, tx=opt, num_tasks=2, rng=KEY, model_state=state0)
  new, _ = jax.jit(jmtl.make_train_step(model, TASKS))(state, batch)
  stem = jax.lax.conv_general_dilated(
    jnp.asarray(batch["inputs"]),
    params["shared"]["stem"]["kernel"],
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  got = new.model_state["stem_norm"]["BatchNorm_0"]
  np.testing.assert_allclose(got["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)
  assert not np.allclose(new.params["shared"]["stem"]["kernel"], params["shared"]["stem"]["kernel"])
  # Evaluation normalises with the running statistics: the eval step equals apply(train=False).
  stats = jmtl.make_eval_step(model, TASKS)(new.params, batch, new.model_state)
  preds, _ = model.apply(new.params, batch["inputs"], new.model_state, train=False)
  ref = jmtl.losses.softmax_cross_entropy(preds["a"], batch["labels"]["a"]).sum()
  np.testing.assert_allclose(stats["a"]["loss"][0], ref, rtol=1e-5)


@pytest.fixture(scope="module")
def loss_level_step(bn):
  """The new state of one loss-level step on ``_batch()`` (the reference of the gradient routes)."""
  model, params, state0 = bn
  state = jmtl.TrainState.create(params=params, tx=optax.sgd(0.01), num_tasks=2, rng=KEY, model_state=state0)
  return jax.jit(jmtl.make_train_step(model, TASKS))(state, _batch())[0]


# The routes of a Gramian method: the statistics are the route's (which Gramian method weighs does not matter).
@pytest.mark.parametrize("name,level", [("mgda", "representation"), ("mgda", "parameter")])
def test_gradient_paths_carry_the_state(bn, loss_level_step, name, level):
  """Every gradient route returns the same new statistics as the loss-level route (one forward, same batch)."""
  model, params, state0 = bn
  batch, opt, ref = _batch(), optax.sgd(0.01), loss_level_step
  t = getattr(W, name)()
  got, m = jax.jit(jmtl.make_train_step(model, TASKS, level=level))(
    jmtl.TrainState.create(params=params, tx=opt, weighting=t, num_tasks=2, rng=KEY, model_state=state0), batch
  )
  assert m["grad_cosine"].shape == (2, 2) and bool(jnp.isfinite(m["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got.model_state, ref.model_state)


def test_nonfinite_step_keeps_the_state(bn):
  model, params, state0 = bn
  batch, opt = _batch(), optax.sgd(0.01)
  batch["inputs"][0, 0, 0, 0] = np.nan
  state = jmtl.TrainState.create(params=params, tx=opt, num_tasks=2, rng=KEY, model_state=state0)
  new, m = jax.jit(jmtl.make_train_step(model, TASKS))(state, batch)
  assert bool(m["skipped"])
  jax.tree.map(np.testing.assert_array_equal, new.model_state, state0)


def test_missing_state_is_a_clear_error(bn):
  model, params, _ = bn
  x = _batch()["inputs"]
  for empty in ({}, None):
    for train in (True, False):
      with pytest.raises(ValueError, match=r"resnet: batch norm needs its running statistics but model_state is empty"):
        model.apply(params, x, empty, train=train)
    with pytest.raises(ValueError, match="model_state is empty"):
      model.encode(params["shared"], x, empty)
  opt = optax.sgd(0.01)
  state = jmtl.TrainState.create(params=params, tx=opt, num_tasks=2, rng=KEY)  # no model_state: {}
  with pytest.raises(ValueError, match="model_state is empty"):
    jmtl.make_train_step(model, TASKS)(state, _batch())
  with pytest.raises(ValueError, match="pass model_state"):
    jmtl.make_eval_step(model, TASKS)(params, _batch())


@pytest.mark.parametrize("name", ["mgda"])  # the separable path with the all-reduced Jacobian; "equal" passes too
def test_batch_stats_agree_between_one_device_pmap_and_mesh(name):
  """Batch statistics are the global batch's under pmap (synced over the axis) and under a mesh.

  One stage (a stem and a block: three batch norms) compiles the three steps in half the time of ``bn``'s two.
  """
  model = resnet(DIMS, stage_features=(4,))
  x = _batch()["inputs"]
  params, state0 = fill_params(model, x, scale=0.3), model.init_state(KEY, x)
  batches = [_batch(16, seed=s) for s in range(2)]
  opt = optax.sgd(0.05)

  def fresh():
    t = getattr(W, name)()
    return jmtl.TrainState.create(params=params, tx=opt, weighting=t, num_tasks=2, rng=KEY, model_state=state0)

  single = fresh()
  step = parallel.jit(jmtl.make_train_step(model, TASKS), donate=False)
  for b in batches:
    single, _ = step(single, b)

  state = fresh()
  pstep = parallel.pmap(jmtl.make_train_step(model, TASKS, axis_name="data"), donate=False)
  state = parallel.replicate(state)
  for b in batches:
    state, _ = pstep(state, parallel.shard_batch(b))
  pmapped = parallel.unreplicate(state)

  mesh = parallel.make_mesh(4)
  state = fresh()
  mstep = parallel.mesh_jit(jmtl.make_train_step(model, TASKS), mesh, donate=False)
  for b in batches:
    state, _ = mstep(state, parallel.put_batch(b, mesh))

  for got in (pmapped, state):
    for a, b in ((got.model_state, single.model_state), (got.params, single.params)):
      jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5), a, b)
  assert not np.allclose(single.model_state["stem_norm"]["BatchNorm_0"]["mean"], 0.0)


def test_group_norm_is_stateless_and_separable():
  model = resnet(DIMS, stage_features=(4, 8), norm="group", groups=2)
  x = _batch()["inputs"]
  assert not model.stateful and model.init_state(KEY, x) == {}
  params = fill_params(model, x, scale=0.3)
  assert "GroupNorm_0" in params["shared"]["stem_norm"]

  @jax.jit  # one program, not op by op
  def outputs(params, x):
    preds, state = model.apply(params, x, {}, train=True)
    z, z_state = model.encode(params["shared"], x, {}, train=True)
    return preds, state, model.head("b", params["tasks"]["b"], z), z_state, model.apply(params, x[3:4], {})[0]["a"][0]

  preds, state, head_b, z_state, alone = outputs(params, x)
  assert state == {} and z_state == {}
  np.testing.assert_allclose(preds["b"], head_b)
  # Group norm does not mix examples: one example alone gives its row of the batch result.
  np.testing.assert_allclose(alone, preds["a"][3], rtol=1e-5, atol=1e-6)
  opt = optax.sgd(0.05)
  state = jmtl.TrainState.create(params=params, tx=opt, weighting=W.mgda(), num_tasks=2, rng=KEY)
  new, m = jax.jit(jmtl.make_train_step(model, TASKS, level="representation"))(state, _batch())
  assert new.model_state == {} and bool(jnp.isfinite(m["loss"]))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"norm": "layer"}, "norm must be one of"),
    ({"norm": "group", "groups": 3}, "divisible"),
    ({"stage_features": ()}, "at least one stage"),
    ({"blocks_per_stage": 0}, "blocks_per_stage"),
    ({"momentum": 1.0}, "momentum"),
  ],
)
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    resnet(DIMS, **{"stage_features": (4, 8), **kwargs})


def test_inputs_too_small_for_the_strided_stages(bn):
  model, params, state = bn
  with pytest.raises(ValueError, match=r"resnet: inputs of shape \(2, 1, 1, 1\) are too small for 1 stage"):
    model.apply(params, np.zeros((2, 1, 1, 1), np.float32), state, train=False)
