"""Tests for the expert-based models: MMoE, CGC, PLE and DSelect-k.

Parameters are filled from ``jax.eval_shape(model.init, ...)`` with numpy
values (compiling initializers is slow on XLA:CPU), and the forward passes are
checked against hand-written numpy references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.models import cgc
from jmtl.models import dselect
from jmtl.models import dselect_k
from jmtl.models import experts
from jmtl.models import mlp
from jmtl.models import mmoe
from jmtl.models import ple
from tests._helpers import fill_params
from tests._helpers import normal
from tests._helpers import shapes

KEY = jax.random.key(0)
DIMS = {"a": 3, "b": 2, "c": 1}
RTOL = dict(rtol=1e-5, atol=1e-6)


def _run(fn, *args):
  """``jax.jit(fn)(*args)``: one compile per function is cheaper on CPU than op-by-op dispatch."""
  return jax.jit(fn)(*args)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# --- numpy references --------------------------------------------------------


def _relu(v):
  return np.maximum(v, 0.0)


def _softmax(v):
  e = np.exp(v - v.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_mlp(p, h, activate_last):
  n = len(p)
  for i in range(n):
    h = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
    if i < n - 1 or activate_last:
      h = _relu(h)
  return h


def _np_experts(stacked, h):
  """A list of each expert's output, one expert at a time."""
  n = stacked["dense_0"]["kernel"].shape[0]
  return [_np_mlp(jax.tree.map(lambda a, i=i: a[i], stacked), h, True) for i in range(n)]


def _np_gate(p, h):
  return _softmax(h @ p["kernel"] + p["bias"])


def _np_mixture(gate, outs):
  return sum(gate[:, i : i + 1] * o for i, o in enumerate(outs))


def np_mmoe(params, x, names):
  p = _np(params)
  x = x.reshape(x.shape[0], -1)
  outs = _np_experts(p["shared"]["experts"], x)
  res = {}
  for n in names:
    mixed = _np_mixture(_np_gate(p["tasks"][n]["gate"], x), outs)
    res[n] = _np_mlp(p["tasks"][n]["tower"], mixed, False)
  return res


def np_ple(params, x, names, num_levels):
  p = _np(params)
  x = x.reshape(x.shape[0], -1)
  task_in, shared_in = dict.fromkeys(names, x), x
  for lvl in range(num_levels):
    key = f"level_{lvl}"
    s_out = _np_experts(p["shared"][key]["experts"], shared_in)
    t_out = {n: _np_experts(p["tasks"][n][key]["experts"], task_in[n]) for n in names}
    new = {n: _np_mixture(_np_gate(p["tasks"][n][key]["gate"], task_in[n]), t_out[n] + s_out) for n in names}
    if lvl < num_levels - 1:
      every = [o for n in names for o in t_out[n]] + s_out
      shared_in = _np_mixture(_np_gate(p["shared"][key]["gate"], shared_in), every)
    task_in = new
  return {n: _np_mlp(p["tasks"][n]["tower"], task_in[n], False) for n in names}


def np_smooth_step(t, gamma):
  t = np.asarray(t, np.float64)
  cubic = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
  return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0, cubic))


def np_selector(z, num_experts, gamma):
  """r(z) over all 2^m codes by the product formula, then the first E renormalised."""
  m = z.shape[-1]
  s = np_smooth_step(z, gamma)
  r = np.stack(
    [np.prod([s[..., b] if (j >> b) & 1 else 1 - s[..., b] for b in range(m)], axis=0) for j in range(2**m)], -1
  )
  r = r[..., :num_experts]
  return r / r.sum(-1, keepdims=True)


def np_dselect(params, x, names, *, num_experts, k, gamma):
  p = _np(params)
  x = x.reshape(x.shape[0], -1)
  m = int(np.ceil(np.log2(num_experts)))
  outs = _np_experts(p["shared"]["experts"], x)
  res = {}
  for n in names:
    g = p["tasks"][n]["gate"]
    z = (x @ g["z"]["kernel"] + g["z"]["bias"]).reshape(x.shape[0], k, m)
    alpha = _softmax(x @ g["alpha"]["kernel"] + g["alpha"]["bias"])
    gate = sum(alpha[:, i : i + 1] * np_selector(z[:, i], num_experts, gamma) for i in range(k))
    res[n] = _np_mlp(p["tasks"][n]["tower"], _np_mixture(gate, outs), False)
  return res


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mmoe_setup():
  model = mmoe(DIMS, num_experts=3, expert_hidden=(6, 4), tower_hidden=(5,))
  x = normal((4, 2, 3))
  return model, fill_params(model, x), x


@pytest.fixture(scope="module")
def cgc_setup():
  model = cgc(DIMS, num_shared_experts=2, num_task_experts=2, expert_hidden=(6, 4), tower_hidden=(3,))
  x = normal((4, 6))
  return model, fill_params(model, x), x


@pytest.fixture(scope="module")
def ple_setup():
  model = ple(DIMS, num_levels=3, num_shared_experts=2, num_task_experts=1, expert_hidden=(5,))
  x = normal((4, 2, 3))
  return model, fill_params(model, x), x


DSEL = dict(num_experts=3, k=2, expert_hidden=(6, 4), tower_hidden=(3,), gamma=2.0)


@pytest.fixture(scope="module")
def dselect_setup():
  model = dselect_k(DIMS, **DSEL)
  x = normal((5, 2, 3))
  params = fill_params(model, x)
  # Small selector logits: the smooth region, where all codes get weight (exercised, not saturated).
  for n in DIMS:
    params["tasks"][n]["gate"]["z"] = jax.tree.map(lambda a: 0.2 * a, params["tasks"][n]["gate"]["z"])
  return model, params, x


def _dselect_forward():
  return dselect._dselect_parts(DIMS, **DSEL)[1]


# --- MMoE --------------------------------------------------------------------


def test_mmoe_params_and_shapes(mmoe_setup):
  model, params, x = mmoe_setup
  assert model.encode is None and model.head is None
  assert model.task_names == ("a", "b", "c")
  got = shapes(params)
  assert got["shared"] == {
    "experts": {"dense_0": {"kernel": (3, 6, 6), "bias": (3, 6)}, "dense_1": {"kernel": (3, 6, 4), "bias": (3, 4)}}
  }
  assert got["tasks"]["a"]["gate"] == {"kernel": (6, 3), "bias": (3,)}
  assert got["tasks"]["b"]["tower"] == {
    "dense_0": {"kernel": (4, 5), "bias": (5,)},
    "dense_1": {"kernel": (5, 2), "bias": (2,)},
  }
  out, _ = _run(model.apply, params, x, {})
  assert {k: v.shape for k, v in out.items()} == {"a": (4, 3), "b": (4, 2), "c": (4, 1)}


def test_mmoe_matches_numpy_reference(mmoe_setup):
  model, params, x = mmoe_setup
  out, ref = _run(model.apply, params, x, {})[0], np_mmoe(params, x, model.task_names)
  for n in model.task_names:
    np.testing.assert_allclose(out[n], ref[n], **RTOL)


@pytest.mark.parametrize("build", [mmoe, lambda *a, **kw: dselect_k(*a, k=1, **kw)], ids=["mmoe", "dselect_k"])
def test_one_expert_is_hard_sharing(build):
  """One expert: the gate is the constant 1, so the model is mlp() with the expert as trunk."""
  model = build(DIMS, num_experts=1, expert_hidden=(6, 4), tower_hidden=(5,))
  x = normal((4, 7), seed=3)
  params = fill_params(model, x, seed=4)
  hard = mlp(DIMS, hidden=(6, 4), head_hidden=(5,))
  hard_params = {
    "shared": jax.tree.map(lambda a: a[0], params["shared"]["experts"]),
    "tasks": {n: params["tasks"][n]["tower"] for n in DIMS},
  }
  assert shapes(hard_params) == shapes(jax.eval_shape(hard.init, KEY, x))
  out, want = _run(model.apply, params, x, {})[0], _run(hard.apply, hard_params, x, {})[0]
  for n in DIMS:
    np.testing.assert_allclose(out[n], want[n], **RTOL)


def test_mmoe_gates_are_convex_combinations(mmoe_setup):
  model, params, x = mmoe_setup
  _, forward = experts._mmoe_parts("mmoe", DIMS, num_experts=3, expert_hidden=(6, 4), tower_hidden=(5,))
  preds, gates = _run(forward, params, x)
  for n in DIMS:
    g = np.asarray(gates[n])
    assert g.shape == (4, 3) and (g >= 0).all()
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(preds[n], _run(model.apply, params, x, {})[0][n], **RTOL)


def test_experts_run_as_one_batched_kernel():
  """The experts are vmapped: E experts give the same number of dot_generals as one."""
  x = normal((2, 5))
  count = {}
  for e in (1, 4):
    model = mmoe({"a": 2}, num_experts=e, expert_hidden=(3, 3))
    count[e] = str(jax.make_jaxpr(model.apply)(fill_params(model, x), x, {})).count("dot_general")
  assert count[1] == count[4]


# --- CGC / PLE ---------------------------------------------------------------


def test_cgc_params_shapes_and_reference(cgc_setup):
  model, params, x = cgc_setup
  assert model.encode is None and model.head is None
  got = shapes(params)
  assert got["shared"]["level_0"]["experts"]["dense_1"]["kernel"] == (2, 6, 4)
  assert set(got["shared"]["level_0"]) == {"experts"}
  assert got["tasks"]["a"]["level_0"]["experts"]["dense_0"]["kernel"] == (2, 6, 6)
  assert got["tasks"]["a"]["level_0"]["gate"]["kernel"] == (6, 4)  # own 2 + shared 2
  out, ref = _run(model.apply, params, x, {})[0], np_ple(params, x, model.task_names, 1)
  for n, d in DIMS.items():
    assert out[n].shape == (4, d)
    np.testing.assert_allclose(out[n], ref[n], **RTOL)


def test_ple_params_shapes_and_reference(ple_setup):
  model, params, x = ple_setup
  got = shapes(params)
  assert set(got["shared"]) == {"level_0", "level_1", "level_2"}
  assert set(got["shared"]["level_1"]) == {"experts", "gate"}
  assert set(got["shared"]["level_2"]) == {"experts"}
  assert got["shared"]["level_0"]["gate"]["kernel"] == (6, 3 * 1 + 2)
  assert got["shared"]["level_1"]["experts"]["dense_0"]["kernel"] == (2, 5, 5)
  assert got["tasks"]["c"]["level_2"]["gate"]["kernel"] == (5, 3)
  out, ref = _run(model.apply, params, x, {})[0], np_ple(params, x, model.task_names, 3)
  for n, d in DIMS.items():
    assert out[n].shape == (4, d)
    np.testing.assert_allclose(out[n], ref[n], **RTOL)


def test_ple_gates_are_convex_combinations(ple_setup):
  _, params, x = ple_setup
  sizes = {"num_shared_experts": 2, "num_task_experts": 1, "expert_hidden": (5,), "tower_hidden": ()}
  _, forward = experts._extraction("ple", DIMS, num_levels=3, **sizes)
  _, levels = _run(forward, params, x)
  assert [sorted(g) for g in levels] == [["a", "b", "c", "shared"]] * 2 + [["a", "b", "c"]]
  for gates in levels:
    for n, gate in gates.items():
      g = np.asarray(gate)
      assert g.shape == (4, 5 if n == "shared" else 3) and (g >= 0).all()
      np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)


def _perturbed(params, task, path=()):
  """``params`` with every leaf of ``params['tasks'][task][*path]`` shifted by 1."""
  tasks = dict(params["tasks"])
  tasks[task] = _set(tasks[task], path, jax.tree.map(lambda a: a + 1.0, _get(tasks[task], path)))
  return {"shared": params["shared"], "tasks": tasks}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def test_cgc_split_is_separable(cgc_setup):
  model, params, x = cgc_setup
  base, _ = _run(model.apply, params, x, {})
  moved, _ = _run(model.apply, _perturbed(params, "a"), x, {})
  assert not np.allclose(moved["a"], base["a"])
  for n in ("b", "c"):
    np.testing.assert_array_equal(moved[n], base[n])


def test_ple_split_is_not_separable(ple_setup):
  """Task a's level-0 experts feed the shared gate, which feeds b: the split is not separable."""
  model, params, x = ple_setup
  base, _ = _run(model.apply, params, x, {})
  moved, _ = _run(model.apply, _perturbed(params, "a", ("level_0", "experts")), x, {})
  assert not np.allclose(moved["b"], base["b"], rtol=1e-4)
  # The last level has no shared gate: its task experts only reach their own task.
  last, _ = _run(model.apply, _perturbed(params, "a", ("level_2",)), x, {})
  np.testing.assert_array_equal(last["b"], base["b"])
  assert not np.allclose(last["a"], base["a"])


# --- DSelect-k ---------------------------------------------------------------


def test_smooth_step_closed_form_and_c1():
  for gamma in (1.0, 2.5):
    h = gamma / 2
    step = jax.jit(lambda u, g=gamma: dselect.smooth_step(u, g))
    s = step(jnp.array([-3 * h, -h, 0.0, h, 3 * h]))
    np.testing.assert_array_equal(s, [0.0, 0.0, 0.5, 1.0, 1.0])
    t = np.linspace(-2 * h, 2 * h, 41).astype(np.float32)
    np.testing.assert_allclose(step(t), np_smooth_step(t, gamma), atol=1e-6)
    # C¹: S' = 3/(2γ) - 6t²/γ³ on the ramp (0 at t = ±γ/2), 0 off it; continuous at the ends.
    grad = jax.jit(jax.vmap(jax.grad(step)))
    ds = np.asarray(grad(t))
    want = np.where(np.abs(t) < h, 1.5 / gamma - 6 * t.astype(np.float64) ** 2 / gamma**3, 0.0)
    np.testing.assert_allclose(ds, want, atol=1e-5)
    eps = 1e-3 * gamma
    near = np.asarray(grad(jnp.array([-h + eps, h - eps], jnp.float32)))
    assert (np.abs(near) <= 7 * eps / gamma**2).all()


@pytest.mark.parametrize("num_experts", [4, 8, 3, 5])
def test_binary_selector_is_a_distribution(num_experts):
  m = dselect.num_code_bits(num_experts)
  z = 0.3 * normal((6, m), seed=num_experts)
  r = np.asarray(dselect.binary_selector(z, num_experts, 1.0))
  assert r.shape == (6, num_experts) and (r >= 0).all()
  np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(r, np_selector(z, num_experts, 1.0), rtol=1e-5, atol=1e-7)
  if num_experts == 2**m:  # all 2^m codes sum to 1 before any renormalisation
    raw = np_selector(z, 2**m, 1.0)
    np.testing.assert_allclose(raw, r, rtol=1e-5, atol=1e-7)


def test_binary_selector_saturated_is_exact_one_hot():
  """|z| >= γ/2 selects exactly the expert whose code is the sign pattern of z (LSB first)."""
  for j in range(5):
    bits = np.array([(j >> b) & 1 for b in range(3)])
    z = jnp.asarray(np.where(bits == 1, 0.5, -0.7), jnp.float32)
    np.testing.assert_array_equal(dselect.binary_selector(z, 5, 1.0), np.eye(5)[j])
  # A saturated code >= E names no expert: uniform fallback, never 0/0.
  np.testing.assert_array_equal(dselect.binary_selector(jnp.array([5.0, 5.0, 5.0]), 5), np.full(5, 0.2, np.float32))
  with pytest.raises(ValueError, match="2 code bits cannot address 5 experts"):
    dselect.binary_selector(jnp.zeros(2), 5)


def test_dselect_params_shapes_and_reference(dselect_setup):
  model, params, x = dselect_setup
  assert model.encode is None and model.head is None
  got = shapes(params)
  assert got["shared"]["experts"]["dense_0"]["kernel"] == (3, 6, 6)
  assert got["tasks"]["b"]["gate"] == {
    "z": {"kernel": (6, 4), "bias": (4,)},  # k=2 selectors x m=2 bits
    "alpha": {"kernel": (6, 2), "bias": (2,)},
  }
  out, ref = _run(model.apply, params, x, {})[0], np_dselect(params, x, model.task_names, num_experts=3, k=2, gamma=2.0)
  for n, d in DIMS.items():
    assert out[n].shape == (5, d)
    np.testing.assert_allclose(out[n], ref[n], **RTOL)


def test_dselect_gates_are_convex_and_select_exactly_with_large_logits(dselect_setup):
  model, params, x = dselect_setup
  forward = _dselect_forward()
  preds, gates, selectors = _run(forward, params, x)
  for n in DIMS:
    g = np.asarray(gates[n])
    assert g.shape == (5, 3) and (g >= 0).all()
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(preds[n], _run(model.apply, params, x, {})[0][n], **RTOL)
  # Large constant logits: selector 0 -> code (1, 0) = expert 1, selector 1 -> code (0, 1) = expert 2.
  gate = dict(params["tasks"]["a"]["gate"])
  gate["z"] = {"kernel": jnp.zeros_like(gate["z"]["kernel"]), "bias": jnp.array([50.0, -50.0, -50.0, 50.0])}
  hard = _set(params, ("tasks", "a", "gate"), gate)
  _, gates, selectors = _run(forward, hard, x)
  np.testing.assert_array_equal(selectors["a"], np.broadcast_to(np.eye(3)[[1, 2]], (5, 2, 3)))
  g = np.asarray(gates["a"])
  assert (g[:, 0] == 0).all() and np.allclose(g[:, 1] + g[:, 2], 1.0)


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple", "dselect_k"])
def test_param_dtype_float64(name):
  build = {"mmoe": mmoe, "cgc": cgc, "ple": ple, "dselect_k": dselect_k}[name]
  with jax.enable_x64(True):
    model = build({"a": 2}, expert_hidden=(3,), param_dtype=jnp.float64)
    x = normal((2, 4)).astype(np.float64)
    params = fill_params(model, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
    assert _run(model.apply, params, x, {})[0]["a"].dtype == jnp.float64


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
  ("build", "match"),
  [
    (lambda: mmoe(DIMS, num_experts=0), r"mmoe: num_experts must be an int >= 1, got 0"),
    (lambda: mmoe(DIMS, expert_hidden=()), r"mmoe: expert_hidden must have at least one"),
    (lambda: mmoe(DIMS, tower_hidden=(0,)), r"mmoe: tower_hidden"),
    (lambda: mmoe({}), r"mmoe: task_dims is empty"),
    (lambda: cgc(DIMS, num_shared_experts=0), r"cgc: num_shared_experts must be an int >= 1, got 0"),
    (lambda: cgc(DIMS, num_task_experts=1.5), r"cgc: num_task_experts"),
    (lambda: ple(DIMS, num_levels=0), r"ple: num_levels must be an int >= 1, got 0"),
    (lambda: ple(DIMS, activation="relu"), r"ple: activation must be callable"),
    (lambda: dselect_k(DIMS, num_experts=3, k=4), r"dselect_k: k must be <= num_experts=3, got 4"),
    (lambda: dselect_k(DIMS, k=0), r"dselect_k: k must be an int >= 1, got 0"),
    (lambda: dselect_k(DIMS, gamma=0.0), r"dselect_k: gamma must be a positive finite number, got 0.0"),
  ],
)
def test_bad_arguments_raise(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_apply_checks_inputs_and_tasks(mmoe_setup, ple_setup):
  model, params, x = mmoe_setup
  with pytest.raises(ValueError, match=r"mmoe: inputs of shape \(4, 7\) flatten to 7 features.*expects 6"):
    model.apply(params, np.zeros((4, 7), np.float32), {})
  model, params, x = ple_setup
  with pytest.raises(ValueError, match=r"ple: params\['tasks'\] has no entry for task\(s\) \['c'\]"):
    model.apply({"shared": params["shared"], "tasks": {k: params["tasks"][k] for k in ("a", "b")}}, x, {})


# --- train step --------------------------------------------------------------


def _train_tasks(names):
  return [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in names]


def _train_batch(x, dims, seed=5):
  rng = np.random.default_rng(seed)
  return {"inputs": x, "labels": {n: jnp.asarray(rng.integers(0, d, size=x.shape[0])) for n, d in dims.items()}}


TRAIN_DIMS = {"left": 3, "right": 2}
TRAIN_BUILDERS = {
  "mmoe": lambda: mmoe(TRAIN_DIMS, num_experts=3, expert_hidden=(4,)),
  "cgc": lambda: cgc(TRAIN_DIMS, expert_hidden=(4,)),
  "ple": lambda: ple(TRAIN_DIMS, num_levels=2, expert_hidden=(4,)),
  "dselect_k": lambda: dselect_k(TRAIN_DIMS, num_experts=3, k=2, expert_hidden=(4,)),
}


@pytest.mark.parametrize("name", sorted(TRAIN_BUILDERS))
def test_train_step_runs(name):
  model = TRAIN_BUILDERS[name]()
  x = normal((6, 2, 2, 1), seed=7)
  params = fill_params(model, x)
  batch = _train_batch(x, TRAIN_DIMS)
  tasks = _train_tasks(model.task_names)
  opt = optax.sgd(0.1)
  step = jax.jit(jmtl.make_train_step(model, tasks))
  for weighting in (jmtl.weighting.mgda(), jmtl.weighting.equal()):
    state = jmtl.TrainState.create(params=params, tx=opt, weighting=weighting, num_tasks=len(tasks), rng=KEY)
    for _ in range(2):
      state, metrics = step(state, batch)
      assert all(np.isfinite(metrics[f"loss/{n}"]) for n in model.task_names)
      assert int(metrics["skipped"]) == 0
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, state.params)
    assert all(jax.tree.leaves(changed["shared"])), name
    # MGDA may put weight 0 on a task (whose parameters may still move in PLE, through other tasks).
    for n in model.task_names:
      if float(metrics[f"weight/{n}"]) > 0:
        assert any(jax.tree.leaves(changed["tasks"][n])), (name, n)


def test_representation_level_raises():
  model = TRAIN_BUILDERS["mmoe"]()
  x = normal((6, 4), seed=7)
  params = fill_params(model, x)
  opt = optax.sgd(0.1)
  weighting = jmtl.weighting.mgda()
  step = jmtl.make_train_step(model, _train_tasks(model.task_names), level="representation")
  state = jmtl.TrainState.create(params=params, tx=opt, weighting=weighting, num_tasks=2, rng=KEY)
  with pytest.raises(ValueError, match=r"representation.*encode and head"):
    step(state, _train_batch(x, TRAIN_DIMS))
