"""Tests for jmtl.models.cross_stitch: structure, hand-written references, coupling, training.

Parameters are filled from ``jax.eval_shape(model.init, ...)`` with numpy
values (compiling initializers is slow on XLA:CPU); one test runs ``init``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.models import cross_stitch
from jmtl.models.cross_stitch import stitch_init
from tests._helpers import fill_params
from tests._helpers import normal

KEY = jax.random.key(0)
DIMS = {"a": 3, "b": 2, "c": 4}
RTOL = dict(rtol=1e-5, atol=1e-5)


def _with_alpha(params, fn):
  """``params`` with every stitch replaced by ``fn(stitch)``."""
  shared = {k: jnp.asarray(fn(np.asarray(v)), v.dtype) for k, v in params["shared"].items()}
  return {"shared": shared, "tasks": params["tasks"]}


def _eye(a):
  k = a.shape[0]
  return np.eye(k) if a.ndim == 2 else np.repeat(np.eye(k)[:, :, None], a.shape[2], axis=2)


def _relu(v):
  return np.maximum(v, 0.0)


def _dense(p, h):
  return h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _independent_columns(params, names, x):
  """Reference at α = I: each task's own MLP, nothing else."""
  out = {}
  for name in names:
    col = params["tasks"][name]["column"]
    h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    for i in range(len(col)):
      h = _relu(_dense(col[f"dense_{i}"], h))
    out[name] = _dense(params["tasks"][name]["head"]["dense_0"], h)
  return out


def _hand_cross_stitch(params, names, x):
  """Reference: x̃ᵢ = Σⱼ αᵢⱼ xⱼ written as explicit loops over tasks (α scalar or per unit)."""
  h = {n: np.asarray(x, np.float64).reshape(x.shape[0], -1) for n in names}
  for layer in range(len(params["shared"])):
    pre = {n: _relu(_dense(params["tasks"][n]["column"][f"dense_{layer}"], h[n])) for n in names}
    alpha = np.asarray(params["shared"][f"stitch_{layer}"], np.float64)
    h = {}
    for i, ni in enumerate(names):
      acc = np.zeros_like(pre[ni])
      for j, nj in enumerate(names):
        acc = acc + alpha[i, j] * pre[nj]  # alpha[i, j] is a scalar or one value per unit
      h[ni] = acc
  return {n: _dense(params["tasks"][n]["head"]["dense_0"], h[n]) for n in names}


@pytest.fixture(scope="module")
def setup():
  model = cross_stitch(DIMS, hidden=(6, 5))
  x = normal((4, 2, 3))
  return model, fill_params(model, x), x


def test_param_tree_and_output_shapes(setup):
  model, params, x = setup
  assert model.encode is None and model.head is None
  assert model.task_names == tuple(DIMS)
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes["shared"] == {"stitch_0": (3, 3), "stitch_1": (3, 3)}
  for name, dim in DIMS.items():
    assert shapes["tasks"][name] == {
      "column": {"dense_0": {"kernel": (6, 6), "bias": (6,)}, "dense_1": {"kernel": (6, 5), "bias": (5,)}},
      "head": {"dense_0": {"kernel": (5, dim), "bias": (dim,)}},
    }
  out, _ = jax.jit(model.apply)(params, x, {})
  assert {k: v.shape for k, v in out.items()} == {k: (4, d) for k, d in DIMS.items()}
  per_unit = cross_stitch(DIMS, hidden=(6, 5), per_unit=True)
  assert jax.tree.map(lambda a: a.shape, fill_params(per_unit, x)["shared"]) == {
    "stitch_0": (3, 3, 6),
    "stitch_1": (3, 3, 5),
  }


def test_identity_stitches_give_independent_columns(setup):
  model, params, x = setup
  params = _with_alpha(params, _eye)
  out, _ = model.apply(params, x, {})
  ref = _independent_columns(params, model.task_names, x)
  for name in DIMS:
    np.testing.assert_allclose(out[name], ref[name], **RTOL)


@pytest.mark.parametrize("per_unit", [False, True], ids=["per_layer", "per_unit"])
@pytest.mark.parametrize("dims", [DIMS, {"p": 2, "q": 2}], ids=["mixed_heads", "equal_heads"])
def test_mixing_matches_hand_written_loop(per_unit, dims):
  x = normal((3, 7))
  model = cross_stitch(dims, hidden=(4, 3), per_unit=per_unit)
  params = fill_params(model, x, seed=2)  # random α: a generic (non-identity, per-unit-varying) mixing
  out, _ = jax.jit(model.apply)(params, x, {})
  ref = _hand_cross_stitch(params, model.task_names, x)
  for name in dims:
    np.testing.assert_allclose(out[name], ref[name], **RTOL)


def test_tasks_are_coupled_through_the_stitches_unless_alpha_is_identity(setup):
  """Cross-stitch is NOT parameter-separable: task a's column feeds task b when α_ba ≠ 0."""
  model, params, x = setup

  def change_a(p):
    tasks = dict(p["tasks"])
    tasks["a"] = jax.tree.map(lambda v: v + 1.0, tasks["a"])
    return {"shared": p["shared"], "tasks": tasks}

  ident = _with_alpha(params, _eye)
  before, after = model.apply(ident, x, {})[0], model.apply(change_a(ident), x, {})[0]
  assert not np.allclose(before["a"], after["a"])
  for name in ("b", "c"):
    np.testing.assert_array_equal(before[name], after[name])
  mixed = _with_alpha(params, lambda a: stitch_init(3, 0.9))
  before, after = model.apply(mixed, x, {})[0], model.apply(change_a(mixed), x, {})[0]
  for name in ("b", "c"):
    assert not np.allclose(before[name], after[name], atol=1e-3)


def test_init_values_of_alpha_and_columns():
  x = normal((2, 4))
  params = cross_stitch({"a": 2, "b": 2, "c": 2}, hidden=(3, 3), init_self=0.9).init(KEY, x)
  want = np.full((3, 3), 0.05) + 0.85 * np.eye(3)
  for i in range(2):
    np.testing.assert_allclose(params["shared"][f"stitch_{i}"], want, rtol=1e-6)
    assert params["shared"][f"stitch_{i}"].dtype == jnp.float32
  cols = [params["tasks"][n]["column"]["dense_0"]["kernel"] for n in "abc"]
  assert not np.allclose(cols[0], cols[1])  # every column has its own key
  ident = cross_stitch({"a": 2, "b": 2}, hidden=(3, 3), init_self=1.0, per_unit=True).init(KEY, x)
  np.testing.assert_array_equal(ident["shared"]["stitch_1"], np.repeat(np.eye(2)[:, :, None], 3, axis=2))
  np.testing.assert_allclose(stitch_init(2, 0.9), [[0.9, 0.1], [0.1, 0.9]], rtol=1e-6)
  np.testing.assert_allclose(stitch_init(1, 0.9), [[0.9]], rtol=1e-6)


def test_float64_params_and_compute_dtype():
  with jax.enable_x64(True):
    x = normal((2, 4)).astype(np.float64)
    model = cross_stitch({"a": 2, "b": 3}, hidden=(3,), param_dtype=jnp.float64)
    spec = jax.eval_shape(model.init, KEY, x)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(spec))
    assert all(v.dtype == jnp.float64 for v in model.apply(fill_params(model, x), x, {})[0].values())
  model = cross_stitch({"a": 2, "b": 3}, hidden=(3,), dtype=jnp.bfloat16)
  assert all(
    v.dtype == jnp.bfloat16 for v in model.apply(fill_params(model, normal((2, 4))), normal((2, 4)), {})[0].values()
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(task_dims={}), "empty"),
    (dict(task_dims={"a": 0}), "task 'a'"),
    (dict(hidden=()), "at least one layer"),
    (dict(hidden=(4, 0)), "hidden"),
    (dict(init_self=1.5), r"init_self must be a number in \[0, 1\], got 1.5"),
    (dict(init_self=-0.1), "init_self"),
    (dict(init_self=float("nan")), "init_self"),
    (dict(init_self="0.9"), "init_self"),
    (dict(activation="relu"), "activation must be callable"),
    (dict(per_unit=1), "per_unit"),
  ],
)
def test_bad_arguments_raise(kwargs, match):
  kwargs = {"task_dims": {"a": 2, "b": 2}, **kwargs}
  with pytest.raises(ValueError, match=f"cross_stitch: .*{match}"):
    cross_stitch(**kwargs)


def test_bad_inputs_and_params_raise(setup):
  model, params, _ = setup
  with pytest.raises(ValueError, match=r"flatten to 5 features, but the columns' dense_0 kernel expects 6"):
    model.apply(params, normal((2, 5)), {})
  with pytest.raises(ValueError, match=r"no entry for task\(s\) \['c'\]"):
    model.apply({"shared": params["shared"], "tasks": {k: params["tasks"][k] for k in "ab"}}, normal((2, 6)), {})
  bad = {"shared": {"stitch_0": jnp.eye(2), "stitch_1": params["shared"]["stitch_1"]}, "tasks": params["tasks"]}
  with pytest.raises(ValueError, match=r"stitch_0'\] must have shape \(3, 3\), got \(2, 2\)"):
    model.apply(bad, normal((2, 6)), {})


def test_train_step_general_path():
  model = cross_stitch({"a": 3, "b": 2}, hidden=(4,), init_self=0.9)
  x = normal((6, 5))
  params = fill_params(model, x)
  params = _with_alpha(params, lambda a: stitch_init(2, 0.9))
  r = np.random.default_rng(0)
  batch = {"inputs": x, "labels": {"a": jnp.asarray(r.integers(0, 3, 6)), "b": jnp.asarray(r.integers(0, 2, 6))}}
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in ("a", "b")]
  opt = optax.sgd(0.1)
  step = jax.jit(jmtl.make_train_step(model, tasks))
  for weighting in (jmtl.weighting.mgda(), jmtl.weighting.equal()):
    state = jmtl.TrainState.create(params=params, tx=opt, weighting=weighting, num_tasks=2, rng=KEY)
    for _ in range(2):
      state, metrics = step(state, batch)
    assert all(np.isfinite(float(metrics[f"loss/{n}"])) for n in "ab")
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
      assert not np.allclose(before, after)  # the stitches and every column and head move
  step = jmtl.make_train_step(model, tasks, level="representation")
  state = jmtl.TrainState.create(params=params, tx=opt, weighting=jmtl.weighting.mgda(), num_tasks=2, rng=KEY)
  with pytest.raises(ValueError, match="level='representation' needs a model with encode and head"):
    step(state, batch)
