"""Tests for jmtl.models: the param and calling conventions, as_model, encode/head, soft sharing, dtypes.

Compiling random initializers dominates the run time on XLA:CPU (~0.3 s per
layer), so most tests fill parameters from ``jax.eval_shape(model.init, ...)``
with numpy values, and the tests of ``init`` itself use tiny layers whose
compiled initializers are shared (``init_module`` caches them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmtl import models
from jmtl.models import MultiTaskModel
from jmtl.models import as_model
from jmtl.models import cnn
from jmtl.models import mlp
from jmtl.models import soft_mlp
from jmtl.models import tower_params
from tests._helpers import fill_params
from tests._helpers import normal
from tests._helpers import shapes

KEY = jax.random.key(0)
DIMS = {"digit": 10, "parity": 2, "size": 1}
RTOL = dict(rtol=1e-5, atol=1e-6)


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _count_dots(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def _sum_sq(model, x):
  return lambda p: sum(jnp.sum(v**2) for v in model.apply(p, x, {})[0].values())


@pytest.fixture(scope="module")
def mlp_setup():
  model = mlp(DIMS, hidden=(16, 8), head_hidden=(4,))
  x = normal((4, 2, 5))
  return model, fill_params(model, x), x


@pytest.fixture(scope="module")
def cnn_setup():
  model = cnn({"left": 10, "right": 3}, features=(4, 8), dense=16)
  x = normal((2, 8, 8))
  return model, fill_params(model, x), x


@pytest.fixture(scope="module")
def soft_setup():
  model = soft_mlp(DIMS, hidden=(8, 6))
  x = normal((4, 2, 3))
  return model, fill_params(model, x), x


# --- mlp -------------------------------------------------------------------


def test_mlp_param_tree_follows_convention(mlp_setup):
  model, params, _ = mlp_setup
  assert isinstance(model, MultiTaskModel)
  assert model.task_names == ("digit", "parity", "size")
  assert set(params) == {"shared", "tasks"}
  assert list(params["tasks"]) == list(DIMS)
  assert shapes(params["shared"]) == {
    "dense_0": {"kernel": (10, 16), "bias": (16,)},
    "dense_1": {"kernel": (16, 8), "bias": (8,)},
  }
  for name, dim in DIMS.items():
    assert shapes(params["tasks"][name]) == {
      "dense_0": {"kernel": (8, 4), "bias": (4,)},
      "dense_1": {"kernel": (4, dim), "bias": (dim,)},
    }
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_mlp_apply_equals_encode_then_head_and_hand_reference(mlp_setup):
  model, params, x = mlp_setup
  out, _ = model.apply(params, x, {})
  assert list(out) == list(DIMS)
  z, _ = model.encode(params["shared"], x, {})
  assert z.shape == (4, 8)
  s = params["shared"]
  h = jax.nn.relu(_dense(s["dense_1"], jax.nn.relu(_dense(s["dense_0"], x.reshape(4, -1)))))
  np.testing.assert_allclose(z, h, **RTOL)
  for name, dim in DIMS.items():
    assert out[name].shape == (4, dim)
    np.testing.assert_array_equal(out[name], model.head(name, params["tasks"][name], z))
    t = params["tasks"][name]
    np.testing.assert_allclose(out[name], _dense(t["dense_1"], jax.nn.relu(_dense(t["dense_0"], h))), **RTOL)


def test_mlp_apply_has_no_redundant_work(mlp_setup):
  model, params, x = mlp_setup
  assert _count_dots(model.apply, params, x, {}) == 2 + 2 * len(DIMS)  # trunk layers + head layers, once each


def test_mlp_init_is_deterministic_with_one_key_per_layer_and_task():
  model = mlp({"a": 3, "b": 3}, hidden=(4,))
  x = normal((5, 2, 2))
  params = model.init(KEY, x)
  assert shapes(params) == {
    "shared": {"dense_0": {"kernel": (4, 4), "bias": (4,)}},
    "tasks": {k: {"dense_0": {"kernel": (4, 3), "bias": (3,)}} for k in "ab"},
  }
  # Only the shape and dtype of the inputs matter.
  jax.tree.map(np.testing.assert_array_equal, params, model.init(KEY, np.zeros((1, 2, 2), np.float32)))
  ka, kb = params["tasks"]["a"]["dense_0"]["kernel"], params["tasks"]["b"]["dense_0"]["kernel"]
  assert not np.allclose(ka, kb)
  assert np.all(np.asarray(params["shared"]["dense_0"]["bias"]) == 0)
  other = model.init(jax.random.key(1), x)
  assert not np.allclose(other["shared"]["dense_0"]["kernel"], params["shared"]["dense_0"]["kernel"])


def test_mlp_without_hidden_layers_is_linear_per_task():
  model = mlp({"a": 2}, hidden=())
  x = normal((3, 4))
  params = fill_params(model, x)
  assert params["shared"] == {}
  np.testing.assert_allclose(model.apply(params, x, {})[0]["a"], _dense(params["tasks"]["a"]["dense_0"], x), **RTOL)


def test_mlp_jit_and_grad(mlp_setup):
  model, params, x = mlp_setup
  out, _ = jax.jit(model.apply)(params, x, {})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **RTOL), out, model.apply(params, x, {})[0])
  grads = jax.jit(jax.grad(_sum_sq(model, x)))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)

  # The separable form gives the same gradients through encode and head.
  def sep(p):
    z, _ = model.encode(p["shared"], x, {})
    return sum(jnp.sum(model.head(k, p["tasks"][k], z) ** 2) for k in model.task_names)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **RTOL), grads, jax.jit(jax.grad(sep))(params))


def test_mlp_float64_with_enable_x64():
  with jax.enable_x64(True):
    x = normal((3, 5), dtype=np.float64)
    model = mlp({"a": 2, "b": 2}, hidden=(4,), param_dtype=jnp.float64)
    spec = jax.eval_shape(model.init, KEY, x)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(spec))
    params = fill_params(model, x)
    out, _ = jax.jit(model.apply)(params, x, {})
    assert all(v.dtype == jnp.float64 for v in out.values())
    # float32 params (the default) with float64 inputs promote to float64 outputs.
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(jax.eval_shape(mlp({"a": 2}).init, KEY, x)))
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    out32 = model.apply(params32, x, {})[0]["a"]
    assert out32.dtype == jnp.float64
    np.testing.assert_allclose(out32, out["a"], rtol=1e-5)


# --- cnn -------------------------------------------------------------------


def test_cnn_structure_and_apply_equals_encode_then_head(cnn_setup):
  model, params, x = cnn_setup
  assert shapes(params["shared"]) == {
    "conv_0": {"kernel": (3, 3, 1, 4), "bias": (4,)},
    "conv_1": {"kernel": (3, 3, 4, 8), "bias": (8,)},
    "dense": {"kernel": (2 * 2 * 8, 16), "bias": (16,)},
  }
  assert shapes(params["tasks"]["right"]) == {"dense_0": {"kernel": (16, 3), "bias": (3,)}}
  out, _ = jax.jit(model.apply)(params, x, {})
  z, _ = model.encode(params["shared"], x, {})
  assert z.shape == (2, 16)
  for name, dim in {"left": 10, "right": 3}.items():
    assert out[name].shape == (2, dim)
    np.testing.assert_allclose(out[name], model.head(name, params["tasks"][name], z), **RTOL)


def test_cnn_adds_channel_axis_and_checks_inputs(cnn_setup):
  model, params, x = cnn_setup
  np.testing.assert_array_equal(
    model.encode(params["shared"], x, {})[0], model.encode(params["shared"], x[..., None], {})[0]
  )
  with pytest.raises(ValueError, match="too small"):
    cnn({"a": 2}, features=(2, 2, 2)).init(KEY, normal((1, 4, 4)))
  with pytest.raises(ValueError, match=r"images .* got shape \(2, 6\)"):
    model.encode(params["shared"], normal((2, 6)), {})


# --- soft sharing ----------------------------------------------------------


def _hand_soft(params, names, x):
  """Reference: a Python loop applying each task's own tower, then its head."""
  out = {}
  for name in names:
    t = params["tasks"][name]["tower"]
    h = x.reshape(x.shape[0], -1)
    for i in range(len(t)):
      h = jax.nn.relu(_dense(t[f"dense_{i}"], h))
    out[name] = _dense(params["tasks"][name]["head"]["dense_0"], h)
  return out


def test_soft_mlp_param_tree_follows_convention(soft_setup):
  model, params, _ = soft_setup
  assert model.encode is None and model.head is None
  assert params["shared"] == {}
  assert list(params["tasks"]) == list(DIMS)
  for name, dim in DIMS.items():
    assert shapes(params["tasks"][name]) == {
      "tower": {"dense_0": {"kernel": (6, 8), "bias": (8,)}, "dense_1": {"kernel": (8, 6), "bias": (6,)}},
      "head": {"dense_0": {"kernel": (6, dim), "bias": (dim,)}},
    }


@pytest.mark.parametrize("dims", [DIMS, {"a": 2, "b": 2, "c": 2}], ids=["mixed_dims", "equal_dims"])
def test_soft_mlp_vmapped_apply_equals_python_loop(soft_setup, dims):
  _, _, x = soft_setup
  model = soft_mlp(dims, hidden=(8, 6))
  params = fill_params(model, x)
  out, _ = jax.jit(model.apply)(params, x, {})
  ref = _hand_soft(params, model.task_names, x)
  assert list(out) == list(dims)
  for name, dim in dims.items():
    assert out[name].shape == (4, dim)
    np.testing.assert_allclose(out[name], ref[name], **RTOL)
  # One batched matmul per tower layer (not K); heads batched when dims are equal.
  uniform = len(set(dims.values())) == 1
  assert _count_dots(model.apply, params, x, {}) == 2 + (1 if uniform else len(dims))


def test_soft_mlp_towers_differ_by_default_and_match_with_same_init():
  # Same layer configs as the mlp init test: the compiled initializers are reused.
  x = normal((5, 2, 2))
  towers = tower_params(soft_mlp({"a": 3, "b": 3}, hidden=(4,)).init(KEY, x))
  assert not np.allclose(towers[0]["dense_0"]["kernel"], towers[1]["dense_0"]["kernel"])
  params = soft_mlp({"a": 3, "b": 3, "c": 3}, hidden=(4,), same_init=True).init(KEY, x)
  towers = tower_params(params)
  ptr = towers[0]["dense_0"]["kernel"].unsafe_buffer_pointer()
  for t in towers[1:]:
    jax.tree.map(np.testing.assert_array_equal, towers[0], t)
    assert t["dense_0"]["kernel"].unsafe_buffer_pointer() != ptr  # separate buffers: safe to donate
  heads = [params["tasks"][n]["head"]["dense_0"]["kernel"] for n in "abc"]
  assert not np.allclose(heads[0], heads[1])


def test_tower_params_order_and_errors(soft_setup, mlp_setup):
  _, _, x = soft_setup
  model = soft_mlp({"parity": 2, "digit": 10}, hidden=(8, 6))
  params = fill_params(model, x)
  towers = tower_params(params, model.task_names)
  assert towers[0] is params["tasks"]["parity"]["tower"] and towers[1] is params["tasks"]["digit"]["tower"]
  assert tower_params(params, ["digit"])[0] is params["tasks"]["digit"]["tower"]
  with pytest.raises(ValueError, match="no task 'z'"):
    tower_params(params, ["z"])
  with pytest.raises(ValueError, match="no 'tower' entry"):
    tower_params(mlp_setup[1])


def test_soft_mlp_grad_reaches_every_tower(soft_setup):
  model, params, x = soft_setup
  grads = jax.jit(jax.grad(_sum_sq(model, x)))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g in tower_params(grads):
    assert float(jnp.abs(g["dense_0"]["kernel"]).sum()) > 0


# --- validation ------------------------------------------------------------


@pytest.mark.parametrize("factory", [mlp, cnn, soft_mlp])
@pytest.mark.parametrize(
  "dims, match",
  [
    ({}, "empty"),
    ({"a": 0}, "task 'a': output dim must be a positive int, got 0"),
    ({"a": 2.0}, "task 'a'"),
    ({"a": True}, "task 'a'"),
    ({"": 2}, "non-empty strings"),
    ([("a", 2)], "mapping"),
  ],
)
def test_bad_task_dims_raise(factory, dims, match):
  with pytest.raises(ValueError, match=match):
    factory(dims)


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="hidden"):
    mlp({"a": 2}, hidden=(8, 0))
  with pytest.raises(ValueError, match="hidden"):
    mlp({"a": 2}, hidden=8)
  with pytest.raises(ValueError, match="head_hidden"):
    mlp({"a": 2}, head_hidden=(-1,))
  with pytest.raises(ValueError, match="at least one"):
    soft_mlp({"a": 2}, hidden=())
  with pytest.raises(ValueError, match="features"):
    cnn({"a": 2}, features=(0,))
  with pytest.raises(ValueError, match="scalar"):
    mlp({"a": 2}).init(KEY, np.float32(1.0))


def test_bad_inputs_and_params_raise(mlp_setup, soft_setup):
  model, params, _ = mlp_setup
  with pytest.raises(ValueError, match=r"shape \(2, 6\) flatten to 6 features.*expects 10"):
    model.apply(params, normal((2, 6)), {})
  with pytest.raises(ValueError, match=r"no entry for task\(s\) \['parity', 'size'\]"):
    model.apply({"shared": params["shared"], "tasks": {"digit": params["tasks"]["digit"]}}, normal((2, 10)), {})
  with pytest.raises(ValueError, match="unknown task 'c'"):
    model.head("c", params["tasks"]["digit"], jnp.zeros((2, 8)))
  soft, soft_params, _ = soft_setup
  with pytest.raises(ValueError, match="expects 6"):
    soft.apply(soft_params, normal((2, 7)), {})


# --- the one calling convention ----------------------------------------------

STATELESS = {
  "mlp": (lambda d: models.mlp(d, hidden=(4,)), (2, 3)),
  "cnn": (lambda d: models.cnn(d, features=(2,), dense=4), (2, 4, 4)),
  "resnet_group": (lambda d: models.resnet(d, stage_features=(2,), norm="group", groups=2), (2, 4, 4, 1)),
  "resnet_none": (lambda d: models.resnet(d, stage_features=(2,), norm="none"), (2, 4, 4, 1)),
  "mtan": (lambda d: models.mtan(d, features=(3,), trunk="mlp"), (2, 3)),
  "soft_mlp": (lambda d: models.soft_mlp(d, hidden=(4,)), (2, 3)),
  "cross_stitch": (lambda d: models.cross_stitch(d, hidden=(4,)), (2, 3)),
  "mmoe": (lambda d: models.mmoe(d, num_experts=2, expert_hidden=(4,)), (2, 3)),
  "cgc": (lambda d: models.cgc(d, expert_hidden=(4,)), (2, 3)),
  "ple": (lambda d: models.ple(d, num_levels=2, expert_hidden=(4,)), (2, 3)),
  "dselect_k": (lambda d: models.dselect_k(d, num_experts=3, k=2, expert_hidden=(4,)), (2, 3)),
}


@pytest.mark.parametrize("name", sorted(STATELESS))
def test_every_stateless_model_follows_the_one_calling_convention(name):
  """init_state gives {}; apply and encode take a state and give back the very object they were given."""
  build, x_shape = STATELESS[name]
  dims = {"a": 3, "b": 2}
  model = build(dims)
  x = normal(x_shape)
  assert isinstance(model, MultiTaskModel) and model.task_names == ("a", "b")
  assert model.stateful is False
  assert model.init_state(KEY, x) == {}
  params = fill_params(model, x)
  sentinel = {"opaque": np.zeros(1)}  # not the model's: a stateless model must pass it through untouched
  preds, state = model.apply(params, x, sentinel)
  assert state is sentinel
  assert {k: v.shape for k, v in preds.items()} == {"a": (2, 3), "b": (2, 2)}
  train_preds, state = model.apply(params, x, sentinel, train=True, axis_name=None)
  assert state is sentinel
  jax.tree.map(np.testing.assert_array_equal, train_preds, preds)  # no state, so train mode changes nothing
  if model.encode is None:
    assert model.head is None
    return
  z, state = model.encode(params["shared"], x, sentinel, train=True)
  assert state is sentinel
  for k in dims:
    np.testing.assert_allclose(model.head(k, params["tasks"][k], z), preds[k], **RTOL)


def test_the_state_of_a_stateless_model_goes_through_jit():
  model, x = mlp({"a": 2}, hidden=(3,)), normal((2, 4))
  params = fill_params(model, x)
  preds, state = jax.jit(model.apply, static_argnames="train")(params, x, {}, train=True)
  assert state == {} and preds["a"].shape == (2, 2)
  z, state = jax.jit(model.encode)(params["shared"], x, {})
  assert state == {} and z.shape == (2, 3)


def test_multitaskmodel_defaults_are_stateless():
  apply = lambda p, x, s, *, train=False, axis_name=None: ({"a": x}, s)
  m = MultiTaskModel(init=lambda k, x: {}, apply=apply, encode=None, head=None, task_names=("a",))
  assert m.stateful is False and m.init_state(KEY, None) == {}


# --- as_model ------------------------------------------------------------------


def _plain(params, x):
  return {"a": x * params["w"], "b": x + params["w"]}


def _check_plain_model(model, names):
  assert isinstance(model, MultiTaskModel)
  assert model.task_names == names
  assert model.init is None and model.encode is None and model.head is None
  assert model.stateful is False and model.init_state(KEY, None) == {}
  params, x, sentinel = {"w": np.float32(2.0)}, np.arange(3, dtype=np.float32), {"s": 1}
  preds, state = model.apply(params, x, sentinel)
  assert state is sentinel
  np.testing.assert_array_equal(preds["a"], [0.0, 2.0, 4.0])
  np.testing.assert_array_equal(preds["b"], [2.0, 3.0, 4.0])
  preds, state = model.apply(params, x, {}, train=True, axis_name="data")  # both ignored by a plain function
  assert state == {}
  np.testing.assert_array_equal(preds["a"], [0.0, 2.0, 4.0])
  preds, state = jax.jit(model.apply)(params, x, {})
  assert state == {}
  np.testing.assert_array_equal(preds["b"], [2.0, 3.0, 4.0])


def test_as_model_wraps_a_plain_function():
  _check_plain_model(as_model(_plain, task_names=["a", "b"]), ("a", "b"))
  _check_plain_model(as_model(_plain), ())


def test_as_model_returns_a_multitaskmodel_unchanged():
  model = mlp({"a": 2}, hidden=(3,))
  assert as_model(model) is model
  assert as_model(model, task_names=("ignored",)) is model
  plain = as_model(_plain, ("a", "b"))
  assert as_model(plain) is plain


def test_as_model_uses_the_apply_attribute_of_an_object():
  class Net:
    """Callable too: ``.apply`` wins."""

    def apply(self, params, x):
      return _plain(params, x)

    def __call__(self, params, x):
      raise AssertionError("as_model must call .apply, not the object")

  _check_plain_model(as_model(Net(), ("a", "b")), ("a", "b"))


@pytest.mark.parametrize("bad", [42, None, "apply", {"apply": _plain}], ids=["int", "None", "str", "dict"])
def test_as_model_rejects_what_it_cannot_call(bad):
  with pytest.raises(TypeError, match=f"as_model: expected a MultiTaskModel.*got {type(bad).__name__}$"):
    as_model(bad)


def test_as_model_rejects_a_string_of_task_names():
  with pytest.raises(TypeError, match="task_names must be a sequence of task names, got the string 'ab'"):
    as_model(_plain, "ab")
