"""Tests for jmtl.models.ltb: the Gumbel-softmax branching schedule, the exported tree, shapes and errors.

Parameters are filled from ``jax.eval_shape(model.init, ...)`` with numpy
values where ``init`` itself is not under test (compiling initializers is slow
on XLA:CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.configs import multi_digits
from jmtl.models import ltb
from jmtl.models import ltb_export
from jmtl.models.ltb import hard_gumbel_softmax
from jmtl.models.ltb import ltb_mixing
from jmtl.models.ltb import ltb_schedule
from jmtl.models.ltb import ltb_temperature
from jmtl.models.ltb import ltb_tree
from jmtl.run import registry
from tests._helpers import fill_params
from tests._helpers import normal

KEY = jax.random.key(0)
DIMS = {"a": 3, "b": 2, "c": 3}
NAMES = tuple(DIMS)
RTOL = dict(rtol=1e-5, atol=1e-5)
LEVELS = ("dense_1", "head")


@functools.cache
def _jit_apply(model):
  """``model.apply`` jitted once per model (op-by-op dispatch compiles every small op)."""
  return jax.jit(model.apply, static_argnames="train")


def _state(step, seed=7):
  return {"step": jnp.int32(step), "seed": jnp.uint32(seed)}


def _with_alpha(params, alpha):
  """``params`` with ``params["shared"]["alpha"]`` replaced by ``alpha`` (numpy arrays)."""
  shared = {**params["shared"], "alpha": {k: jnp.asarray(v, jnp.float32) for k, v in alpha.items()}}
  return {"shared": shared, "tasks": params["tasks"]}


def _hand_forward(params, x, mixings, names=NAMES):
  """Reference: explicit loops over branches and parents, in float64."""
  relu = lambda v: np.maximum(v, 0.0)
  dense = lambda p, h, j: h @ np.asarray(p["kernel"][j], np.float64) + np.asarray(p["bias"][j], np.float64)
  branches = params["shared"]["branches"]
  k = len(names)
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  h = [relu(dense(branches["dense_0"], x, t)) for t in range(k)]
  for i in range(1, len(branches)):
    m = np.asarray(mixings[i - 1], np.float64)
    h = [relu(dense(branches[f"dense_{i}"], sum(m[t, j] * h[j] for j in range(k)), t)) for t in range(k)]
  m = np.asarray(mixings[-1], np.float64)
  out = {}
  for t, name in enumerate(names):
    z = sum(m[t, j] * h[j] for j in range(k))
    p = params["tasks"][name]["head"]["dense_0"]
    out[name] = z @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
  return out


@pytest.fixture(scope="module")
def setup():
  model = ltb(DIMS, hidden=(6, 5), num_steps=1000, warmup_steps=10, temperature=2.0, decay_steps=50)
  x = normal((4, 2, 3))
  return model, fill_params(model, x), x


# --- structure --------------------------------------------------------------------------------------------------------


def test_param_tree_state_and_output_shapes(setup):
  model, params, x = setup
  assert model.encode is None and model.head is None and model.head_kind is None
  assert model.task_names == NAMES and model.stateful
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes["shared"] == {
    "branches": {
      "dense_0": {"kernel": (3, 6, 6), "bias": (3, 6)},
      "dense_1": {"kernel": (3, 6, 5), "bias": (3, 5)},
    },
    "alpha": {"dense_1": (3, 3), "head": (3, 3)},
  }
  for name, dim in DIMS.items():
    assert shapes["tasks"][name] == {"head": {"dense_0": {"kernel": (5, dim), "bias": (dim,)}}}
  state = model.init_state(KEY, x)
  assert sorted(state) == ["seed", "step"] and int(state["step"]) == 0
  assert state["step"].dtype == jnp.int32 and state["seed"].dtype == jnp.uint32
  for train in (False, True):
    preds, _ = jax.jit(model.apply, static_argnames="train")(params, x, state, train=train)
    assert {k: v.shape for k, v in preds.items()} == {k: (4, d) for k, d in DIMS.items()}


def test_init_starts_from_uniform_logits_and_distinct_branches():
  x = normal((2, 4))
  params = ltb({"a": 2, "b": 2}, hidden=(3, 3), num_steps=100).init(KEY, x)
  for level in LEVELS:
    np.testing.assert_array_equal(params["shared"]["alpha"][level], np.zeros((2, 2)))
  kernel = params["shared"]["branches"]["dense_0"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])  # every branch has its own key


# --- the schedule -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 7, 30, 299, 2999])
def test_temperature_is_the_stated_formula(step):
  assert math.isclose(float(ltb_temperature(step, 5.0, 30.0)), 5.0 / math.sqrt(1 + step / 30.0), rel_tol=1e-6)
  # The defaults from num_steps: LibMTL's E = 100 epochs, warm-up 1 %, tau = (E/20) / sqrt(1 + epoch).
  s = ltb_schedule(num_steps=3000)
  assert s.warmup_steps == 30
  assert math.isclose(float(s.temperature(step)), 5.0 / math.sqrt(1 + step / 30.0), rel_tol=1e-6)
  s = ltb_schedule(num_steps=3000, warmup_steps=0, temperature=2.0, decay_steps=10)
  assert s.warmup_steps == 0
  assert math.isclose(float(s.temperature(step)), 2.0 / math.sqrt(1 + step / 10.0), rel_tol=1e-6)
  custom = lambda t: 1.0 / (1.0 + t)
  assert ltb_schedule(warmup_steps=3, temperature=custom) == (3, custom)


def test_warmup_mixing_is_uniform_and_gives_alpha_no_gradient(setup):
  model, params, x = setup
  alpha = np.array([[0.0, 2.0, -1.0], [1.0, 0.0, 0.5], [-3.0, 0.0, 3.0]], np.float32)
  rule = dict(train=True, warmup_steps=10, temperature=lambda s: ltb_temperature(s, 2.0, 50.0))
  for step in (0, 9):
    m = ltb_mixing(alpha, step, jax.random.key(step), **rule)
    np.testing.assert_array_equal(m, np.full((3, 3), 1 / 3, np.float32))
    g = jax.grad(lambda a, step=step: jnp.sum(ltb_mixing(a, step, KEY, **rule) * jnp.arange(9.0).reshape(3, 3)))(alpha)
    np.testing.assert_array_equal(g, np.zeros((3, 3)))
  # The model in warm-up: every child reads the mean of its parents, whatever the step, the seed or alpha.
  params = _with_alpha(params, {"dense_1": alpha, "head": alpha.T})
  preds, state = _jit_apply(model)(params, x, _state(3), train=True)
  assert int(state["step"]) == 4
  ref = _hand_forward(params, x, [np.full((3, 3), 1 / 3)] * 2)
  for name in NAMES:
    np.testing.assert_allclose(preds[name], ref[name], **RTOL)
  other, _ = _jit_apply(model)(params, x, _state(9, seed=123), train=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **RTOL), preds, other)

  @jax.jit
  def alpha_grad(p, step):
    loss = lambda p: sum(jnp.sum(v**2) for v in model.apply(p, x, _state(step), train=True)[0].values())
    return jax.grad(loss)(p)["shared"]["alpha"]

  grads = alpha_grad(params, 9)
  assert all(not np.any(grads[level]) for level in LEVELS)
  grads = alpha_grad(params, 10)  # warm-up over: the straight-through gradient reaches alpha
  assert all(np.any(grads[level]) for level in LEVELS)


def test_after_warmup_rows_are_one_hot_with_straight_through_gradients():
  alpha = jnp.asarray(normal((4, 4), seed=3))
  cot = jnp.asarray(normal((4, 4), seed=4))
  for tau in (0.1, 1.0, 5.0):
    for seed in range(3):
      key = jax.random.key(seed)
      m = hard_gumbel_softmax(alpha, key, tau)
      assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}
      np.testing.assert_array_equal(np.asarray(m).sum(axis=1), np.ones(4))  # exactly one parent per row
      noisy = alpha + jax.random.gumbel(key, alpha.shape, alpha.dtype)
      np.testing.assert_array_equal(np.argmax(m, axis=1), np.argmax(noisy, axis=1))
      # Straight-through: the gradient is that of the soft sample softmax((alpha + g) / tau), with the same noise.
      g_hard = jax.grad(lambda a, key=key, tau=tau: jnp.sum(cot * hard_gumbel_softmax(a, key, tau)))(alpha)
      soft = lambda a, key=key, tau=tau: jax.nn.softmax((a + jax.random.gumbel(key, a.shape, a.dtype)) / tau, axis=-1)
      g_soft = jax.grad(lambda a, soft=soft: jnp.sum(cot * soft(a)))(alpha)
      np.testing.assert_allclose(g_hard, g_soft, rtol=1e-5, atol=1e-7)
      assert np.any(g_hard != 0)
  # The same rule through ltb_mixing once the warm-up is over, at the schedule's temperature.
  rule = dict(train=True, warmup_steps=5, temperature=lambda s: ltb_temperature(s, 2.0, 10.0))
  m = ltb_mixing(alpha, 5, KEY, **rule)
  np.testing.assert_array_equal(m, hard_gumbel_softmax(alpha, KEY, ltb_temperature(5, 2.0, 10.0)))


def test_sampled_parents_follow_softmax_alpha_and_concentrate_on_the_argmax():
  """The Gumbel-max sample is distributed as softmax(alpha) at every temperature; the temperature sets how close the
  relaxed (soft) sample is to it. A sharpened alpha (what training does) picks its argmax with high probability."""
  alpha = jnp.array([[1.0, 0.0, -1.0]])
  keys = jax.random.split(KEY, 4000)
  draw = jax.jit(jax.vmap(lambda key, a, tau: hard_gumbel_softmax(a, key, tau), in_axes=(0, None, None)))
  want = np.asarray(jax.nn.softmax(alpha[0]))
  for tau in (5.0, 0.05):
    freq = np.asarray(draw(keys, alpha, tau))[:, 0].mean(axis=0)
    np.testing.assert_allclose(freq, want, atol=0.03)
  sharp = 8.0 * alpha  # p(argmax) = 1 / (1 + e^-8 + e^-16)
  assert np.asarray(draw(keys, sharp, 0.05))[:, 0, 0].mean() > 0.995
  # As tau -> 0 the soft relaxation softmax((alpha + g) / tau) becomes the hard sample itself.
  gaps = []
  for tau in (5.0, 0.5, 0.01):
    noisy = alpha + jax.vmap(lambda key: jax.random.gumbel(key, alpha.shape))(keys[:500])
    soft = jax.nn.softmax(noisy / tau, axis=-1)
    gaps.append(float(jnp.mean(jnp.abs(soft - jax.nn.one_hot(jnp.argmax(noisy, -1), 3)))))
  assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01
  # Inference mode: the argmax parent, deterministically.
  m = ltb_mixing(jnp.array([[0.1, 0.3, 0.2], [2.0, 0.0, 0.0]]), 10**6, None, train=False, warmup_steps=0,
                 temperature=ltb_temperature)  # fmt: skip
  np.testing.assert_array_equal(m, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_train_forward_samples_parents_from_the_state_and_counts_steps(setup):
  """After warm-up, apply(train=True) is the tree of the parents sampled with key fold_in(fold_in(key(seed), step),
  level) at tau(step); the same state gives the same sample, the next step a new one."""
  model, params, x = setup
  params = _with_alpha(params, {"dense_1": normal((3, 3), seed=5), "head": normal((3, 3), seed=6)})
  tau = lambda s: ltb_temperature(s, 2.0, 50.0)
  samples = set()
  for step in (10, 11, 12, 40):
    preds, state = _jit_apply(model)(params, x, _state(step), train=True)
    assert int(state["step"]) == step + 1 and int(state["seed"]) == 7
    base = jax.random.fold_in(jax.random.key(jnp.uint32(7)), jnp.int32(step))
    ms = [
      hard_gumbel_softmax(params["shared"]["alpha"][n], jax.random.fold_in(base, i), tau(step))
      for i, n in enumerate(LEVELS)
    ]
    ref = _hand_forward(params, x, ms)
    for name in NAMES:
      np.testing.assert_allclose(preds[name], ref[name], **RTOL)
    again, _ = _jit_apply(model)(params, x, _state(step), train=True)
    jax.tree.map(np.testing.assert_array_equal, preds, again)
    samples.add(tuple(int(j) for m in ms for j in np.argmax(m, axis=1)))
  assert len(samples) > 1  # the architecture is resampled every step
  # Inference mode reads neither step nor seed and leaves the state as it was: the argmax parents.
  sentinel = {"opaque": np.zeros(1)}
  preds, state = model.apply(params, x, sentinel)
  assert state is sentinel
  ms = [jax.nn.one_hot(jnp.argmax(params["shared"]["alpha"][n], -1), 3) for n in LEVELS]
  ref = _hand_forward(params, x, ms)
  for name in NAMES:
    np.testing.assert_allclose(preds[name], ref[name], **RTOL)
  # Parameter-separable: a task's own parameters (its head) change no other task's prediction.
  changed = {
    "shared": params["shared"],
    "tasks": {**params["tasks"], "a": jax.tree.map(lambda v: v + 1.0, params["tasks"]["a"])},
  }
  for train in (False, True):
    before, _ = _jit_apply(model)(params, x, _state(20), train=train)
    after, _ = _jit_apply(model)(changed, x, _state(20), train=train)
    assert not np.allclose(before["a"], after["a"])
    for name in ("b", "c"):
      np.testing.assert_array_equal(before[name], after[name])


# --- export -----------------------------------------------------------------------------------------------------------

# argmax parents: dense_1's branches 0, 1, 2 read dense_0's 0, 0, 2; heads a, b, c read dense_1's 1, 1, 2. Paths
# a: (0, 1), b: (0, 1), c: (2, 2): a and b share both layers, c has its own.
TREE_ALPHA = {
  "dense_1": np.array([[3.0, 0, 0], [2.0, 1.0, 0], [0, 0, 1.0]]),
  "head": np.array([[0, 1.0, 0], [0, 1.0, 0.5], [0, 0, 1.0]]),
}


def test_export_reads_the_argmax_tree_and_splits_shared_from_own_nodes(setup):
  model, params, x = setup
  params = _with_alpha(params, TREE_ALPHA)
  tree, tree_model, tree_params = ltb_export(model, params)
  assert tree.parents == ((0, 0, 2), (1, 1, 2))
  assert tree.paths == ((0, 1), (0, 1), (2, 2))
  assert tree.groups() == ((("a", "b"), ("c",)), (("a", "b"), ("c",)))
  assert tree.describe() == "dense_0: [a b] [c]\ndense_1: [a b] [c]"
  branches = params["shared"]["branches"]
  assert sorted(tree_params["shared"]) == ["dense_0", "dense_1"]
  shared = tree_params["shared"]
  np.testing.assert_array_equal(shared["dense_0"]["branch_0"]["kernel"], branches["dense_0"]["kernel"][0])
  np.testing.assert_array_equal(shared["dense_1"]["branch_1"]["bias"], branches["dense_1"]["bias"][1])
  assert sorted(tree_params["tasks"]["a"]) == ["head"]
  assert sorted(tree_params["tasks"]["c"]) == ["dense_0", "dense_1", "head"]
  np.testing.assert_array_equal(tree_params["tasks"]["c"]["dense_0"]["kernel"], branches["dense_0"]["kernel"][2])
  # The exported model predicts what the LTB model predicts in inference mode (the argmax parents).
  want, _ = _jit_apply(model)(params, x, {})
  got, state = jax.jit(tree_model.apply)(tree_params, x, {})
  assert state == {} and not tree_model.stateful and tree_model.task_names == NAMES
  for name in NAMES:
    np.testing.assert_allclose(got[name], want[name], **RTOL)
  # Its init makes fresh parameters of the same layout.
  fresh = jax.eval_shape(tree_model.init, KEY, x)
  assert jax.tree.map(lambda a: a.shape, fresh) == jax.tree.map(lambda a: a.shape, tree_params)


@pytest.mark.parametrize(
  "alpha, groups, shared",
  [
    ({"dense_1": np.zeros((3, 3)), "head": np.zeros((3, 3))}, ((NAMES,), (NAMES,)), ["dense_0", "dense_1"]),
    ({"dense_1": np.eye(3), "head": np.eye(3)}, ((("a",), ("b",), ("c",)),) * 2, []),
    ({"dense_1": np.zeros((3, 3)), "head": np.eye(3)}, ((NAMES,), (("a",), ("b",), ("c",))), ["dense_0"]),
  ],
  ids=["hard_sharing", "independent", "shared_first_layer"],
)
def test_export_of_extreme_trees(setup, alpha, groups, shared):
  model, params, x = setup
  params = _with_alpha(params, alpha)
  tree, tree_model, tree_params = ltb_export(model, params)
  assert tree.groups() == groups
  assert sorted(tree_params["shared"]) == shared
  want, _ = _jit_apply(model)(params, x, {})
  got, _ = tree_model.apply(tree_params, x, {})
  for name in NAMES:
    np.testing.assert_allclose(got[name], want[name], **RTOL)


def test_exported_model_trains_on_its_own(setup):
  model, params, x = setup
  # dense_0: [a b c], dense_1: [a b] [c] (every task reaches a shared node: with a task that reaches none, MGDA's
  # min-norm point is that task's zero gradient and the shared nodes would not move).
  alpha = {"dense_1": np.zeros((3, 3)), "head": np.array([[0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])}
  tree, tree_model, tree_params = ltb_export(model, _with_alpha(params, alpha))
  assert tree.describe() == "dense_0: [a b c]\ndense_1: [a b] [c]"
  assert sorted(tree_params["tasks"]["c"]) == ["dense_1", "head"]
  r = np.random.default_rng(0)
  batch = {"inputs": x, "labels": {n: jnp.asarray(r.integers(0, d, 4)) for n, d in DIMS.items()}}
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in NAMES]
  step = jax.jit(jmtl.make_train_step(tree_model, tasks))
  weighting = jmtl.weighting.mgda()
  state = jmtl.TrainState.create(params=tree_params, tx=optax.adam(1e-2), weighting=weighting, num_tasks=3, rng=KEY)
  losses = []
  for _ in range(5):
    state, m = step(state, batch)
    losses.append(float(m["loss/a"] + m["loss/b"] + m["loss/c"]))
  assert int(state.num_skipped) == 0 and losses[-1] < losses[0]
  assert m["grad_cosine"].shape == (3, 3)  # a Gramian of the shared nodes' per-task gradients
  for before, after in zip(jax.tree.leaves(tree_params["shared"]), jax.tree.leaves(state.params["shared"])):
    assert not np.allclose(before, after)


def test_ltb_trains_with_make_train_step_through_warmup_and_exports():
  model = ltb({"a": 3, "b": 2}, hidden=(8, 6), num_steps=300, warmup_steps=3, temperature=1.0, decay_steps=3)
  x = normal((16, 5))
  r = np.random.default_rng(1)
  batch = {"inputs": x, "labels": {"a": r.integers(0, 3, 16), "b": r.integers(0, 2, 16)}}
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in ("a", "b")]
  state = jmtl.TrainState.create(
    params=fill_params(model, x), tx=optax.adam(5e-2), num_tasks=2, rng=KEY, model_state=model.init_state(KEY, x)
  )
  step = jax.jit(jmtl.make_train_step(model, tasks))
  alphas = []
  for _ in range(8):
    alphas.append(state.params["shared"]["alpha"])
    state, m = step(state, batch)
  assert int(state.num_skipped) == 0 and int(state.model_state["step"]) == 8 and np.isfinite(float(m["loss"]))
  for i in range(1, 4):  # steps 0-2 are warm-up: alpha gets no gradient (Adam moves nothing)
    jax.tree.map(np.testing.assert_array_equal, alphas[i], alphas[0])
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(alphas[-1]), jax.tree.leaves(alphas[0])))
  tree, tree_model, tree_params = ltb_export(model, state.params)
  assert tree == ltb_tree(state.params, ("a", "b"))
  want, _ = model.apply(state.params, x, state.model_state)
  got, _ = tree_model.apply(tree_params, x, {})
  for name in ("a", "b"):
    np.testing.assert_allclose(got[name], want[name], **RTOL)


def test_data_parallel_devices_sample_the_same_tree(setup):
  """Under pmap every device holds the same state and so draws the same parents: the sharded forward is the
  single-device one (a per-device key would give each shard another tree)."""
  model, params, _ = setup
  params = _with_alpha(params, {"dense_1": np.zeros((3, 3)), "head": np.zeros((3, 3))})  # uniform: any tree likely
  x = normal((8, 6))
  devices = jax.devices()[:4]
  forward = lambda st, xs: model.apply(params, xs, st, train=True)
  preds, states = jax.pmap(forward, devices=devices)(jmtl.parallel.replicate(_state(50), devices), x.reshape(4, 2, 6))
  want, _ = model.apply(params, x, _state(50), train=True)
  np.testing.assert_array_equal(states["step"], [51] * 4)
  for name in NAMES:
    np.testing.assert_allclose(preds[name].reshape(8, -1), want[name], **RTOL)


# --- shapes, padding, errors ------------------------------------------------------------------------------------------


def test_padding_the_batch_leaves_every_example_unchanged(setup):
  """One architecture per step, not per example: rows added to a batch (padding) change no other row's
  prediction, in training (same state) and inference; a batch of one works."""
  model, params, x = setup
  params = _with_alpha(params, {"dense_1": normal((3, 3), seed=8), "head": normal((3, 3), seed=9)})
  padded = np.concatenate([x, np.zeros((3, 2, 3), np.float32)])
  for train in (True, False):
    small, _ = model.apply(params, x, _state(20), train=train)
    big, _ = model.apply(params, padded, _state(20), train=train)
    one, _ = model.apply(params, x[:1], _state(20), train=train)
    for name in NAMES:
      assert big[name].shape == (7, DIMS[name]) and one[name].shape == (1, DIMS[name])
      np.testing.assert_allclose(big[name][:4], small[name], **RTOL)
      np.testing.assert_allclose(one[name], small[name][:1], **RTOL)


def test_padded_examples_masked_out_of_the_loss_do_not_move_the_parameters(setup):
  """Two batches that differ only in masked-out padding rows (inputs and labels) give the same step."""
  model, params, x = setup
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in NAMES]
  r = np.random.default_rng(2)
  labels = {n: r.integers(0, d, 4).astype(np.int32) for n, d in DIMS.items()}
  pad = lambda a, v: np.concatenate([a, np.full((2, *a.shape[1:]), v, a.dtype)])
  masks = {n: pad(np.ones(4, np.float32), 0.0) for n in NAMES}
  batches = [
    {"inputs": pad(x, v), "labels": {n: pad(y, label) for n, y in labels.items()}, "masks": masks}
    for v, label in ((100.0, 0), (-7.0, 1))
  ]
  step = jax.jit(jmtl.make_train_step(model, tasks))
  out = []
  for b in batches:
    state = jmtl.TrainState.create(params=params, tx=optax.sgd(0.1), num_tasks=3, rng=KEY, model_state=_state(12))
    state, m = step(state, b)
    out.append((state.params, m.per_task["loss"]))
  np.testing.assert_array_equal(out[0][1], out[1][1])
  jax.tree.map(np.testing.assert_array_equal, out[0][0], out[1][0])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(task_dims={}), "empty"),
    (dict(task_dims={"a": 0}), "task 'a'"),
    (dict(hidden=()), "hidden must have at least one layer"),
    (dict(hidden=(4, 0)), "hidden"),
    (dict(num_steps=0), "num_steps must be an int >= 1, got 0"),
    (dict(num_steps=None), "num_steps is None: give num_steps .* or warmup_steps"),
    (dict(num_steps=None, warmup_steps=2), "num_steps is None: give num_steps .* or decay_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(warmup_steps=-1), "warmup_steps must be an int >= 0, got -1"),
    (dict(warmup_steps=True), "warmup_steps"),
    (dict(temperature=0.0), "temperature must be a positive finite number, got 0.0"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="5"), "temperature"),
    (dict(decay_steps=-3), "decay_steps must be a positive finite number, got -3"),
    (dict(temperature=lambda s: 1.0, decay_steps=5), "decay_steps is for the default schedule"),
    (dict(activation="relu"), "activation must be callable"),
  ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
  kwargs = {"task_dims": {"a": 2, "b": 2}, "num_steps": 100, **kwargs}
  with pytest.raises(ValueError, match=f"ltb: .*{match}"):
    ltb(**kwargs)


def test_bad_inputs_params_and_state_raise(setup):
  model, params, _ = setup
  with pytest.raises(ValueError, match=r"flatten to 5 features for 3 branches, but .* kernel has shape \(3, 6, 6\)"):
    model.apply(params, normal((2, 5)), {})
  with pytest.raises(ValueError, match=r"no entry for task\(s\) \['c'\]"):
    model.apply({"shared": params["shared"], "tasks": {k: params["tasks"][k] for k in "ab"}}, normal((2, 6)), {})
  bad = _with_alpha(params, {"dense_1": np.zeros((2, 2)), "head": np.zeros((3, 3))})
  with pytest.raises(ValueError, match=r"\['alpha'\]\['dense_1'\] must have shape \(3, 3\), got \(2, 2\)"):
    model.apply(bad, normal((2, 6)), {})
  with pytest.raises(ValueError, match=r"\['alpha'\]\['head'\] must have shape \(3, 3\), got None"):
    model.apply(_with_alpha(params, {"dense_1": np.zeros((3, 3))}), normal((2, 6)), {})
  with pytest.raises(ValueError, match=r"train=True needs the model state \{'step', 'seed'\} .*got \[\]"):
    model.apply(params, normal((2, 6)), {}, train=True)
  with pytest.raises(ValueError, match=r"ltb_export: model must be made by jmtl\.models\.ltb"):
    ltb_export(jmtl.models.mlp(DIMS, hidden=(4,)), params)
  with pytest.raises(ValueError, match="scalar"):
    model.init(KEY, np.float32(1.0))


# --- the runner -------------------------------------------------------------------------------------------------------


def test_runner_builds_ltb_with_the_schedule_over_config_num_steps():
  config = multi_digits.get_config()
  config.model.name = "ltb"
  config.model.ltb.hidden = (8,)
  config.num_steps = 500  # warm-up: the first 5 steps
  model = registry.make_model(config, {"left": 10, "right": 10})
  x = normal((3, 16, 16, 1))
  params = fill_params(model, x)
  params = _with_alpha(params, {"head": np.array([[0.0, 5.0], [5.0, 0.0]])})  # one mixing level: the heads
  at = lambda s: model.apply(params, x, _state(s), train=True)[0]["left"]
  np.testing.assert_allclose(at(4), at(0), **RTOL)  # warm-up: uniform mixing
  assert not np.allclose(at(5), at(0))  # sampled: one parent
  config.model.ltb.warmup_steps = 0  # the group's own value wins
  no_warmup = registry.make_model(config, {"left": 10, "right": 10})
  assert not np.allclose(no_warmup.apply(params, x, _state(0), train=True)[0]["left"], at(0))
