"""Tasks without labels in a batch are left out of that step's weighting (issue 16, item 4).

Every registered method, given ``present`` with one task absent (its loss 0 and its gradient row 0, as the engine
gives them), must return for the present tasks what it returns on the problem of those tasks alone, step after step
(its state included), and the engine's weights of the absent task are 0. Methods that draw from the key draw K numbers
instead of K − 1, so for them the checks are the properties instead: finite, absent weight 0, the present weights as
the method defines them. Then the train step and the evaluation with a task that has no label in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import weighting as W
from tests._asserts import assert_finite
from tests._asserts import init
from tests._asserts import loss_sequence
from tests._asserts import problem
from tests._asserts import random_jacobians
from tests._helpers import three_task_batch
from tests.test_weighting_contract import NAMES
from tests.test_weighting_contract import TABLE
from tests.test_weighting_contract import args_of
from tests.test_weighting_contract import factory

K = 4
ABSENT = 1
PRESENT = np.array([True, False, True, True])
RANDOM = sorted(n for n in NAMES if TABLE[n].key)


def _args(name: str, k: int) -> dict:
  args = args_of(name, K)
  if name == "static":  # one weight per task: the sub-problem's are the present tasks'
    args["weights"] = tuple(np.asarray(args["weights"])[PRESENT]) if k < K else args["weights"]
  return args


def _problems(name: str):
  """``steps`` problems with task 1 absent (loss 0, gradient row 0, ``present``), and the same without task 1."""
  spec = TABLE[name]
  losses = loss_sequence(spec.steps, K, seed=3)
  losses[:, ABSENT] = 0
  jacobians = None if spec.needs == "losses" else random_jacobians(spec.steps, K, seed=3)
  if jacobians is not None:
    jacobians[:, ABSENT] = 0
  full, sub = [], []
  for i in range(spec.steps):
    jac = None if jacobians is None else jacobians[i]
    full.append(problem(spec.needs, losses[i], jac, seed=i, present=PRESENT))
    sub.append(problem(spec.needs, losses[i][PRESENT], None if jac is None else jac[PRESENT], seed=i))
  return full, sub


def _present_part(w):
  """The engine's weights (absent ones zeroed) and their present part, for every kind of return value."""
  w = W.only_present(w, jnp.asarray(PRESENT))
  if isinstance(w, W.Direction):
    return w, W.Direction(w.shared, np.asarray(w.weights)[PRESENT])
  if W.is_task_vector(w):
    return w, np.asarray(w)[PRESENT]
  return w, jax.tree.map(lambda x: np.asarray(x)[PRESENT], w)


def _run(name: str, k: int, probs):
  t = factory(name)(**_args(name, k))
  state = init(t, k)
  update = jax.jit(t.update)
  out = []
  for p in probs:
    w, state = update(p.losses, state, **p.inputs)
    out.append(w)
  return out


@pytest.mark.parametrize("name", [n for n in NAMES if n not in RANDOM])
def test_absent_task_is_left_out_exactly(name):
  full, sub = _problems(name)
  for i, (w_full, w_sub) in enumerate(zip(_run(name, K, full), _run(name, K - 1, sub))):
    engine, part = _present_part(w_full)
    assert_finite(engine, f"{name}, step {i}")
    absent = engine.weights if isinstance(engine, W.Direction) else engine
    assert all(np.all(np.asarray(x)[ABSENT] == 0) for x in jax.tree.leaves(absent)), (name, i, absent)
    jax.tree.map(
      lambda a, b, i=i: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=f"{name}, step {i}"),
      jax.tree.map(np.asarray, part),
      jax.tree.map(np.asarray, w_sub),
    )


@pytest.mark.parametrize("name", RANDOM)
def test_absent_task_gets_no_weight_from_a_random_method(name):
  full, _ = _problems(name)
  for i, w in enumerate(_run(name, K, full)):
    engine, part = _present_part(w)
    assert_finite(engine, f"{name}, step {i}")
    if name in ("rlw", "rgw"):  # a random point of the present tasks' simplex
      assert abs(float(np.sum(part)) - 1) < 1e-5 and np.all(part > 0), (name, part)


def test_the_absent_task_may_come_back():
  """A learned weighting's per-task state does not move while its task is absent, and the task takes part again
  when it returns: uncertainty's log-variance of task 1 stays at its initial value during absent steps."""
  t = W.uncertainty(optax.sgd(0.1))
  state = t.init(2)
  losses = jnp.array([2.0, 0.0])
  for _ in range(3):
    _, state = t.update(losses, state, present=jnp.array([True, False]))
  assert float(state.log_vars[1]) == 0.0 and float(state.log_vars[0]) != 0.0
  _, state = t.update(jnp.array([2.0, 3.0]), state, present=jnp.array([True, True]))
  assert float(state.log_vars[1]) != 0.0


def _model_and_batch():
  model = jmtl.models.mlp({"a": 3, "b": 3, "c": 1}, hidden=(8,))
  tasks = [
    jmtl.Task("a", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()}),
    jmtl.Task("b", jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()}),
    jmtl.Task("c", jmtl.losses.mse, {"mae": jmtl.metrics.mae()}),
  ]
  # no label of task b in this batch
  batch = three_task_batch(0, {"a": jnp.ones(8), "b": jnp.zeros(8), "c": jnp.ones(8)})

  return model, tasks, batch


@pytest.mark.parametrize("name", ["mgda", "nash_mtl", "equal"])
def test_train_step_leaves_out_a_task_without_labels(name):
  """MGDA used to return the zero direction (the step did nothing) and Nash-MTL a weight of ~6e5 on the empty task."""
  model, tasks, batch = _model_and_batch()
  weighting = W.methods()[name]()
  state = jmtl.TrainState.from_model(
    model, batch["inputs"], tx=optax.sgd(0.1), weighting=weighting, rng=jax.random.key(0)
  )
  before = jax.tree.map(np.asarray, state.params)
  state, m = jax.jit(jmtl.make_train_step(model, tasks))(state, batch)
  w = np.asarray(m.per_task["weight"])
  assert w[1] == 0 and np.all(w[[0, 2]] > 0) and np.all(w < 10), w
  assert int(m["skipped"]) == 0 and float(m["grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), before["shared"], state.params["shared"])
  assert max(jax.tree.leaves(moved)) > 0
  assert np.all(
    np.asarray(state.params["tasks"]["b"]["dense_0"]["kernel"]) == before["tasks"]["b"]["dense_0"]["kernel"]
  )


def test_evaluation_says_no_examples_for_a_task_without_labels():
  from jmtl.run import evaluation
  from jmtl.run import report

  model, tasks, batch = _model_and_batch()
  params = model.init(jax.random.key(0), batch["inputs"])
  values = jmtl.evaluate(jmtl.make_eval_step(model, tasks), params, [batch], tasks)
  assert values["b/loss"] is None and values["b/acc"] is None and values["a/acc"] is not None
  marked, non_finite, empty = evaluation.mark_non_finite(values, tasks)
  assert non_finite == [] and empty == ["b"]
  assert evaluation.selection_score(marked, tasks, "loss", empty) > -1e300
  results = {
    "tasks": ["a", "b", "c"],
    "metric": {"a": "acc", "b": "acc", "c": "mae"},
    "test": marked,
    "no_examples": {"test": empty},
    "weighting": "equal",
  }
  table = report.run_table(results)
  assert "no examples" in table and "nan" not in table.lower(), table
