"""Task groups: same-kind heads run as one batched op give the unbatched results, in every route."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import grads
from jmtl import groups
from jmtl import losses as L
from jmtl import models
from jmtl import parallel
from jmtl import weighting as W
from tests._engine import context
from tests._engine import new_state

DIMS = {"d0": 10, "bin": 2, "d1": 10, "reg": 1, "d2": 10}  # three 10-class heads, a 2-class, a regression
TASKS = [
  jmtl.Task(n, L.mse if n == "reg" else L.softmax_cross_entropy, {} if n == "reg" else {"acc": jmtl.metrics.accuracy()})
  for n in DIMS
]


def mixed(head_hidden=(), dtype=jnp.float64, b=8, seed=0):
  r = np.random.default_rng(seed)
  model = models.mlp(DIMS, hidden=(7, 6), head_hidden=head_hidden, param_dtype=dtype)
  x = jnp.asarray(r.normal(size=(b, 5)), dtype)
  params = model.init(jax.random.key(seed), x)
  mask = np.ones(b, np.float32)
  mask[::3] = 0
  labels = {n: jnp.asarray(r.integers(0, d, b)) for n, d in DIMS.items() if n != "reg"}
  labels["reg"] = jnp.asarray(r.normal(size=(b, 1)), dtype)
  batch = {"inputs": x, "labels": labels, "masks": {"d1": jnp.asarray(mask)}}
  return model, params, batch


def ungrouped(model):
  return model._replace(head_kind=None)


def test_groups_of_a_mixed_model():
  model, params, _ = mixed(dtype=jnp.float32)
  assert [g.names for g in groups.task_groups(model, TASKS, params["tasks"])] == [
    ("d0", "d1", "d2"),
    ("bin",),
    ("reg",),
  ]
  assert all(len(g.names) == 1 for g in groups.task_groups(ungrouped(model), TASKS, params["tasks"]))


ROUTES = [
  ("equal", W.equal, {}),
  ("uncertainty", W.uncertainty, {}),
  ("mgda_representation_linear", W.mgda, {"level": "representation"}),
  ("upgrad_parameter", W.upgrad, {}),
  ("upgrad_parameter_chunked", W.upgrad, {"chunk_size": 2}),
  ("pcgrad_own_heads", W.pcgrad, {"heads": "own"}),
  ("graddrop_jacobian", W.graddrop, {}),
]


# Linear heads take the linear-heads route at representation level; heads with a hidden layer the separable one.
CASES = [(*r, ()) for r in ROUTES] + [
  (*r, (4,)) for r in ROUTES if r[0] in ("equal", "mgda_representation_linear", "upgrad_parameter_chunked")
]


@pytest.mark.parametrize(("name", "make", "options", "head_hidden"), CASES, ids=[f"{c[0]}-{len(c[3])}" for c in CASES])
def test_every_route_equals_the_unbatched_computation(name, make, options, head_hidden):
  with jax.enable_x64(True):
    model, params, batch = mixed(head_hidden)
    ctx = lambda m: context(m, params, batch, TASKS, make(), **options)
    run = lambda m: jax.jit(lambda p: grads.compute(dataclasses.replace(ctx(m), params=p)))(params)
    got, want = run(model), run(ungrouped(model))
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-12)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-9, atol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), got.grads, want.grads)
    for key in want.extra:
      np.testing.assert_allclose(got.extra[key], want.extra[key], rtol=1e-9, atol=1e-12)


def test_eval_step_equals_the_unbatched_evaluation():
  model, params, batch = mixed(dtype=jnp.float32)
  got = jmtl.evaluate(jax.jit(jmtl.make_eval_step(model, TASKS)), params, [batch], TASKS)
  want = jmtl.evaluate(jax.jit(jmtl.make_eval_step(ungrouped(model), TASKS)), params, [batch], TASKS)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-6)


@pytest.mark.parametrize("make", [W.equal, W.mgda], ids=["equal", "mgda"])
def test_pmap_and_mesh_equal_the_unbatched_single_device_step(make):
  model, params, batch = mixed(dtype=jnp.float32, b=16)
  tx = optax.sgd(0.1)
  single = jax.jit(jmtl.make_train_step(ungrouped(model), TASKS))
  s1 = new_state(params, tx, make(), num_tasks=len(TASKS))
  pstep = parallel.pmap(jmtl.make_train_step(model, TASKS, axis_name="data"), donate=False)
  s4 = parallel.replicate(new_state(params, tx, make(), num_tasks=len(TASKS)))
  mesh = parallel.make_mesh(4)
  mstep = parallel.mesh_jit(jmtl.make_train_step(model, TASKS), mesh, donate=False)
  sm = new_state(params, tx, make(), num_tasks=len(TASKS))
  for _ in range(2):
    s1, m1 = single(s1, batch)
    s4, m4 = pstep(s4, parallel.shard_batch(batch))
    sm, mm = mstep(sm, parallel.put_batch(batch, mesh))
  for got in (parallel.unreplicate(s4).params, sm.params):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, s1.params)
  for n in DIMS:
    np.testing.assert_allclose(m4[f"weight/{n}"][0], m1[f"weight/{n}"], rtol=1e-4)
    np.testing.assert_allclose(mm[f"loss/{n}"], m1[f"loss/{n}"], rtol=1e-5)


def _dots(k, method, **options):
  """The number of dot operations in the compiled train step of K same-shaped tasks."""
  names = [f"t{i}" for i in range(k)]
  model = models.mlp(dict.fromkeys(names, 10), hidden=(16, 16))
  tasks = [jmtl.Task(n, L.softmax_cross_entropy) for n in names]
  x = jnp.zeros((8, 12))
  batch = {"inputs": x, "labels": {n: jnp.zeros(8, jnp.int32) for n in names}}
  state = jmtl.TrainState.from_model(model, x, tx=optax.sgd(0.1), weighting=method(), rng=jax.random.key(0))
  hlo = jax.jit(jmtl.make_train_step(model, tasks, **options)).lower(state, batch).compile().as_text()
  return len(re.findall(r"\bdot\(", hlo))


@pytest.mark.parametrize(
  ("method", "options"), [(W.equal, {}), (W.mgda, {"level": "representation"}), (W.upgrad, {})], ids=str
)
def test_compiled_step_does_not_grow_with_the_number_of_tasks_of_one_group(method, options):
  # The parameters, the per-task metrics and the stacking of the heads grow with K; the matmuls do not (one matmul per
  # task would give K = 8 at least 4 times the dots of K = 2; K = 40 compiles 2.5 times longer and shows no more).
  two = _dots(2, method, **options)
  assert two > 0 and _dots(8, method, **options) == two
