"""Tests for jmtl.models.mtan: structure, a hand-written reference, separability, training.

Parameters are mostly filled from ``jax.eval_shape(model.init, ...)`` with
numpy values; the references are written in numpy (float64), convolutions
as sums of shifted matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.models import mtan
from jmtl.models.mtan import _Attention
from tests._helpers import fill_params
from tests._helpers import normal

KEY = jax.random.key(0)
DIMS = {"left": 4, "right": 3}
RTOL = dict(rtol=1e-4, atol=1e-5)
TRUNKS = {
  "cnn": dict(features=(3, 4), x_shape=(2, 8, 8)),
  "mlp": dict(features=(5, 4), x_shape=(2, 2, 3)),
}


# --- numpy reference --------------------------------------------------------


def _np(a):
  return np.asarray(a, np.float64)


def _relu(v):
  return np.maximum(v, 0.0)


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _layer(p, x):
  """Dense (2-D kernel) or SAME convolution (HWIO kernel) as a sum of shifted matmuls."""
  k, b = _np(p["kernel"]), _np(p["bias"])
  if k.ndim == 2:
    return x @ k + b
  kh, kw = k.shape[:2]
  h, w = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  return sum(xp[:, i : i + h, j : j + w, :] @ k[i, j] for i in range(kh) for j in range(kw)) + b


def _pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _hand_trunk(shared, x, kind):
  prefix = "conv" if kind == "cnn" else "dense"
  h = _np(x)[..., None] if kind == "cnn" else _np(x).reshape(x.shape[0], -1)
  stages = []
  for i in range(len(shared) // 2):
    if i > 0 and kind == "cnn":
      h = _pool(h)
    u = _relu(_layer(shared[f"{prefix}_{i}_u"], h))
    p = _relu(_layer(shared[f"{prefix}_{i}_p"], u))
    stages.append((u, p))
    h = p
  return stages


def _hand_attention(att, u, p, prev, kind):
  """One stage: â = sigmoid(h(relu(g([u, f(â_prev)])))) ⊙ p, f = relu(conv3x3) + pool (relu(Dense) for mlp)."""
  inp = u
  if prev is not None:
    f = _relu(_layer(att["f"], prev))
    inp = np.concatenate([u, _pool(f) if kind == "cnn" else f], axis=-1)
  return _sigmoid(_layer(att["h"], _relu(_layer(att["g"], inp)))) * p


def _hand_head(tp, stages, kind):
  attended = None
  for i, (u, p) in enumerate(stages):
    attended = _hand_attention(tp[f"att_{i}"], _np(u), _np(p), attended, kind)
  return _hand_output(tp, attended, kind)


def _hand_output(tp, attended, kind):
  h = (_pool(attended) if kind == "cnn" else attended).reshape(attended.shape[0], -1)
  n = len(tp["head"])
  for i in range(n):
    h = _layer(tp["head"][f"dense_{i}"], h)
    h = _relu(h) if i < n - 1 else h
  return h


@pytest.fixture(scope="module", params=sorted(TRUNKS))
def setup(request):
  kind = request.param
  cfg = TRUNKS[kind]
  model = mtan(DIMS, features=cfg["features"], trunk=kind, head_hidden=(3,))
  x = normal(cfg["x_shape"])
  return kind, model, fill_params(model, x), x


# --- tests -----------------------------------------------------------------


def test_param_tree_and_output_shapes(setup):
  kind, model, params, x = setup
  assert model.task_names == tuple(DIMS)
  shapes = jax.tree.map(lambda a: a.shape, params)
  if kind == "cnn":
    assert shapes["shared"] == {
      "conv_0_u": {"kernel": (3, 3, 1, 3), "bias": (3,)},
      "conv_0_p": {"kernel": (3, 3, 3, 3), "bias": (3,)},
      "conv_1_u": {"kernel": (3, 3, 3, 4), "bias": (4,)},
      "conv_1_p": {"kernel": (3, 3, 4, 4), "bias": (4,)},
    }
    att1 = {"f": (3, 3, 3, 4), "g": (1, 1, 8, 4), "h": (1, 1, 4, 4)}
    flat = 2 * 2 * 4
  else:
    assert shapes["shared"]["dense_0_u"] == {"kernel": (6, 5), "bias": (5,)}
    assert shapes["shared"]["dense_1_p"] == {"kernel": (4, 4), "bias": (4,)}
    att1 = {"f": (5, 4), "g": (8, 4), "h": (4, 4)}
    flat = 4
  for name, dim in DIMS.items():
    t = shapes["tasks"][name]
    assert sorted(t) == ["att_0", "att_1", "head"]
    assert sorted(t["att_0"]) == ["g", "h"]
    assert {k: v["kernel"] for k, v in t["att_1"].items()} == att1
    assert t["head"] == {
      "dense_0": {"kernel": (flat, 3), "bias": (3,)},
      "dense_1": {"kernel": (3, dim), "bias": (dim,)},
    }
  out, _ = jax.jit(model.apply)(params, x, {})
  assert {k: v.shape for k, v in out.items()} == {k: (2, d) for k, d in DIMS.items()}


def test_apply_is_head_after_encode_and_matches_hand_reference(setup):
  kind, model, params, x = setup
  out, _ = model.apply(params, x, {})
  z, _ = model.encode(params["shared"], x, {})
  stages = _hand_trunk(params["shared"], x, kind)
  assert len(z) == 2
  for (u, p), (hu, hp) in zip(z, stages):
    np.testing.assert_allclose(u, hu, **RTOL)
    np.testing.assert_allclose(p, hp, **RTOL)
  for name in DIMS:
    np.testing.assert_array_equal(out[name], model.head(name, params["tasks"][name], z))
    np.testing.assert_allclose(out[name], _hand_head(params["tasks"][name], stages, kind), **RTOL)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_one_attention_stage_matches_hand_reference(kind):
  rng = np.random.default_rng(3)
  if kind == "cnn":
    u, p, prev = rng.standard_normal((2, 4, 4, 5)), rng.standard_normal((2, 4, 4, 5)), rng.standard_normal((2, 8, 8, 3))
  else:
    u, p, prev = rng.standard_normal((2, 5)), rng.standard_normal((2, 5)), rng.standard_normal((2, 3))
  u, p, prev = (a.astype(np.float32) for a in (u, p, prev))
  module = _Attention(5, kind)

  def fill(*args):
    spec = jax.eval_shape(module.init, KEY, *args)["params"]
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), spec)

  att = fill(u, p, prev)
  out = module.apply({"params": att}, u, p, prev)
  np.testing.assert_allclose(out, _hand_attention(att, _np(u), _np(p), _np(prev), kind), **RTOL)
  att0 = fill(u, p, None)  # stage 0: no f, the input is u alone
  assert sorted(att0) == ["g", "h"]
  first = module.apply({"params": att0}, u, p, None)
  np.testing.assert_allclose(first, _hand_attention(att0, _np(u), _np(p), None, kind), **RTOL)


def test_masks_forced_to_one_pass_the_shared_features_through(setup):
  kind, model, params, x = setup
  tp = dict(params["tasks"]["left"])
  for name in ("att_0", "att_1"):
    h = tp[name]["h"]
    tp[name] = dict(tp[name], h={"kernel": jnp.zeros_like(h["kernel"]), "bias": jnp.full_like(h["bias"], 40.0)})
  z, _ = model.encode(params["shared"], x, {})
  out = model.head("left", tp, z)
  np.testing.assert_allclose(out, _hand_output(tp, _np(z[-1][1]), kind), **RTOL)  # â = p⁽ᴸ⁻¹⁾
  assert not np.allclose(out, model.head("left", params["tasks"]["left"], z), atol=1e-3)


def test_task_params_never_change_other_tasks(setup):
  _, model, params, x = setup
  before, _ = model.apply(params, x, {})
  tasks = dict(params["tasks"], left=jax.tree.map(lambda v: jnp.asarray(np.asarray(v) + 0.5), params["tasks"]["left"]))
  after, _ = model.apply({"shared": params["shared"], "tasks": tasks}, x, {})
  assert not np.allclose(before["left"], after["left"], atol=1e-3)
  np.testing.assert_array_equal(before["right"], after["right"])
  shared = jax.tree.map(lambda v: jnp.asarray(np.asarray(v) + 0.5), params["shared"])
  moved, _ = model.apply({"shared": shared, "tasks": params["tasks"]}, x, {})
  assert not any(np.allclose(before[k], moved[k], atol=1e-3) for k in DIMS)


def test_init_matches_flax_default_initializer_statistics():
  model = mtan({"a": 3, "b": 3}, features=(16, 32), trunk="mlp")
  x = normal((2, 64))
  params = model.init(KEY, x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
    lambda s: (s.shape, s.dtype), jax.eval_shape(model.init, KEY, x)
  )
  kernel = np.asarray(params["shared"]["dense_1_p"]["kernel"])  # fan_in 32: LeCun normal, std 1/sqrt(32)
  assert abs(kernel.std() * np.sqrt(32) - 1.0) < 0.1 and np.abs(kernel).max() <= 2 / np.sqrt(32) / 0.8796 + 1e-6
  assert all(
    np.all(np.asarray(leaf) == 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    if "bias" in str(path[-1])
  )
  ka, kb = params["tasks"]["a"]["att_1"]["g"]["kernel"], params["tasks"]["b"]["att_1"]["g"]["kernel"]
  assert not np.allclose(ka, kb)
  jax.tree.map(np.testing.assert_array_equal, params, model.init(KEY, x[:1]))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(task_dims={}), "empty"),
    (dict(features=()), "at least one stage"),
    (dict(features=(4, -1)), "features"),
    (dict(head_hidden=(0,)), "head_hidden"),
    (dict(trunk="resnet"), r"trunk must be one of \('cnn', 'mlp'\), got 'resnet'"),
    (dict(activation=None), "activation must be callable"),
  ],
)
def test_bad_arguments_raise(kwargs, match):
  kwargs = {"task_dims": {"a": 2}, **kwargs}
  with pytest.raises(ValueError, match=f"mtan: .*{match}"):
    mtan(**kwargs)


def test_bad_inputs_raise(setup):
  kind, model, params, x = setup
  if kind == "cnn":
    with pytest.raises(ValueError, match="too small"):
      model.apply(params, normal((2, 2, 2)), {})
    with pytest.raises(ValueError, match="give 2 channels, but the trunk's first layer expects 1"):
      model.apply(params, normal((2, 8, 8, 2)), {})
  else:
    with pytest.raises(ValueError, match="give 5 features, but the trunk's first layer expects 6"):
      model.apply(params, normal((2, 5)), {})
  z, _ = model.encode(params["shared"], x, {})
  with pytest.raises(ValueError, match=r"z must be 2 \(u, p\) stage pairs"):
    model.head("left", params["tasks"]["left"], z[:1])
  with pytest.raises(ValueError, match="unknown task 'up'"):
    model.head("up", params["tasks"]["left"], z)


@functools.cache
def _train_case(kind):
  """Model, batch, params and each task's loss gradient (one jit per trunk, shared by the cases below)."""
  cfg = TRUNKS[kind]
  model = mtan(DIMS, features=cfg["features"], trunk=kind)
  x = normal((6, *cfg["x_shape"][1:]))
  params = fill_params(model, x)
  r = np.random.default_rng(0)
  labels = {k: jnp.asarray(r.integers(0, d, 6)) for k, d in DIMS.items()}

  def task_grads(p):
    def loss(p, k):
      logits = model.apply(p, x, {})[0][k]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[k][:, None], 1))

    return {k: jax.grad(loss)(p, k) for k in DIMS}

  grads = jax.tree.map(np.asarray, jax.jit(task_grads)(params))
  return model, {"inputs": x, "labels": labels}, params, grads


@pytest.mark.parametrize(
  "kind, weighting, level",
  [
    ("cnn", "mgda", "representation"),
    ("cnn", "mgda", "parameter"),
    ("mlp", "mgda", "parameter"),
    ("mlp", "equal", "parameter"),
  ],
)
def test_train_step_separable_path_gives_the_weighted_gradient(kind, weighting, level):
  """One SGD(lr=1) step moves params by exactly -∇(Σ wₖ Lₖ) with the weights the step reports."""
  model, batch, params, grads = _train_case(kind)
  tasks = [jmtl.Task(k, jmtl.losses.softmax_cross_entropy) for k in DIMS]
  transform = getattr(jmtl.weighting, weighting)()
  opt = optax.sgd(1.0)
  step = jax.jit(jmtl.make_train_step(model, tasks, level=level))
  state, metrics = step(jmtl.TrainState.create(params=params, tx=opt, weighting=transform, num_tasks=2, rng=KEY), batch)
  w = {k: float(metrics[f"weight/{k}"]) for k in DIMS}
  assert all(np.isfinite(float(metrics[f"loss/{k}"])) for k in DIMS)
  if weighting == "mgda":
    assert abs(sum(w.values()) - 1.0) < 1e-5  # MGDA's weights lie on the simplex
  want = jax.tree.map(lambda *g: sum(w[k] * gk for k, gk in zip(DIMS, g)), *grads.values())
  # numpy, not jnp: op-by-op jnp on ~30 leaf shapes would compile ~60 tiny kernels.
  moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, state.params)
  jax.tree.map(lambda g, m: np.testing.assert_allclose(m, g, rtol=1e-3, atol=1e-5), want, moved)
  assert all(np.abs(m).max() > 0 for m in jax.tree.leaves(moved))
