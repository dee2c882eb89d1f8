"""jit, pmap and mesh wrappers give the single-device parameters."""

import jax
import numpy as np
import optax
import pytest

import jmtl
from jmtl import parallel
from jmtl import weighting as W
from tests._engine import PENALTIES
from tests._engine import TASKS
from tests._engine import apply
from tests._engine import make_batch
from tests._engine import make_params
from tests._engine import new_state
from tests._engine import setup

# One stateful loss-level method stands for the loss-level route (equal and FAMO take it too; every method's update
# under pmap is checked by tests/test_weighting_contract.py).
TRANSFORMS = {
  "uncertainty": lambda: W.uncertainty(optimizer=optax.adam(1e-2)),
  # The engine's other inputs and outputs: a tracked direction, the cross-Gramian of the two halves of the global
  # batch (split by global example index, so every wrapper splits alike), RGW's own heads, the validation meta-gradient.
  "moco": W.moco,
  "modo": lambda: W.modo(gamma=0.1),
  "rgw": W.rgw,
  "auto_lambda": lambda: W.auto_lambda(learning_rate=1e-2),
}


def run_single(transform, batches):
  opt = optax.adam(1e-2)
  step = parallel.jit(jmtl.make_train_step(apply, TASKS, penalty=PENALTIES))
  state = new_state(make_params(), opt, transform)
  for b in batches:
    state, m = step(state, b)
  return state, m


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_pmap_and_mesh_match_single_device(name):
  assert jax.device_count() == 4
  batches = [{**make_batch(b=16, seed=s), "validation": make_batch(b=16, seed=s + 10)} for s in range(5)]
  single, m_single = run_single(TRANSFORMS[name](), batches)

  opt = optax.adam(1e-2)
  t = TRANSFORMS[name]()
  pstep = parallel.pmap(jmtl.make_train_step(apply, TASKS, penalty=PENALTIES, axis_name="data"))
  state = parallel.replicate(new_state(make_params(), opt, t))
  for b in batches:
    state, m_pmap = pstep(state, parallel.shard_batch(b))
  pmapped = parallel.unreplicate(state)

  mesh = parallel.make_mesh(4)
  t = TRANSFORMS[name]()
  mstep = parallel.mesh_jit(jmtl.make_train_step(apply, TASKS, penalty=PENALTIES), mesh)
  state = new_state(make_params(), opt, t)
  for b in batches:
    state, m_mesh = mstep(state, parallel.put_batch(b, mesh))
  assert len(state.params["shared"]["w1"].sharding.device_set) == 4

  for got in (pmapped.params, state.params):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, single.params)
  for k in ("loss/a", "loss/b", "weight/c"):
    np.testing.assert_allclose(m_pmap[k][0], m_single[k], rtol=1e-5)
    np.testing.assert_allclose(m_mesh[k], m_single[k], rtol=1e-5)


def test_shard_batch_rejects_uneven_batches():
  with pytest.raises(ValueError, match=r"\['inputs'\].*\(10, 5\).*4 devices"):
    parallel.shard_batch({"inputs": np.zeros((10, 5))}, 4)


# The exact route is the same for every Gramian method: PCGrad (a random key, which every device must draw alike) and
# Nash-MTL (a state carried from step to step) stand for it; MGDA's parallel step is checked in tests/test_groups.py
# and tests/test_models_resnet.py, every method's update under pmap in tests/test_weighting_contract.py.
GRADIENT_METHODS = ["pcgrad", "nash_mtl"]


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_parameter_level_exact_mode_matches_single_device(name):
  """Gramian methods on a separable model: pmap (exact all-reduce of J) and mesh equal one device."""
  model, params, batch, tasks = setup("mlp", dtype=jax.numpy.float32, b=16)
  batches = [batch] * 3
  opt = optax.sgd(0.1)
  make = getattr(W, name)

  t = make()
  step = parallel.jit(jmtl.make_train_step(model, tasks), donate=False)
  single = new_state(params, opt, t)
  for b in batches:
    single, m1 = step(single, b)

  t = make()
  pstep = parallel.pmap(jmtl.make_train_step(model, tasks, axis_name="data"), donate=False)
  state = parallel.replicate(new_state(params, opt, t))
  for b in batches:
    state, m4 = pstep(state, parallel.shard_batch(b))

  mesh = parallel.make_mesh(4)
  t = make()
  mstep = parallel.mesh_jit(jmtl.make_train_step(model, tasks), mesh, donate=False)
  mstate = new_state(params, opt, t)
  for b in batches:
    mstate, _ = mstep(mstate, parallel.put_batch(b, mesh))

  for got in (parallel.unreplicate(state).params, mstate.params):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), got, single.params)
  np.testing.assert_allclose(m4["grad_cosine"][0], m1["grad_cosine"], atol=1e-5)


def test_put_helpers_on_one_process_are_device_puts():
  """put_replicated keeps PRNG keys; put_batch takes this process's rows, or every row with global_batch."""
  mesh = parallel.make_mesh(4)
  state = parallel.put_replicated({"w": np.ones(3, np.float32), "rng": jax.random.key(0)}, mesh)
  assert state["w"].sharding.is_fully_replicated and len(state["w"].sharding.device_set) == 4
  assert jax.dtypes.issubdtype(state["rng"].dtype, jax.dtypes.prng_key)
  batch = {"x": np.arange(8.0)}
  for b in (parallel.put_batch(batch, mesh), parallel.put_batch(batch, mesh, global_batch=True)):
    np.testing.assert_array_equal(b["x"], batch["x"])
    assert b["x"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_a_mesh_needs_the_same_devices_of_every_process(monkeypatch):
  from jmtl.run import loop
  from jmtl.run.config import ConfigError

  monkeypatch.setattr(jax, "process_count", lambda: 2)  # 2 processes, yet every device is process 0's
  with pytest.raises(ValueError, match="do not split evenly over 2 processes"):
    parallel.make_mesh(4)
  with pytest.raises(ConfigError, match="config field 'devices' = 1"):
    loop.data_mesh({"devices": 1})
