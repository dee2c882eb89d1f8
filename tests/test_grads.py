"""The gradient engine: Gramians and combined gradients against brute force."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import _taps
from jmtl import grads
from jmtl import losses as L
from jmtl import models
from jmtl import parallel
from jmtl import weighting as W

K = 3
NAMES = ("a", "b", "c")


class Captured(NamedTuple):
  gramian: jax.Array  # (K, K) the Gramian the transform was given


def capture(needs="gramian", select=None):
  """Weights 1/‖gₖ‖ (a nontrivial function of G); the state keeps G for inspection."""

  def update(losses, state, *, gramian=None, jacobian=None, key=None):
    del state, jacobian, key
    w = 1.0 / jnp.sqrt(jnp.diagonal(gramian) + 1e-30)
    return w.astype(losses.dtype), Captured(gramian)

  return W.WeightingTransform(lambda k: Captured(jnp.zeros((k, k))), update, needs, select)


def setup(kind="mlp", dtype=jnp.float64, b=6, seed=0):
  r = np.random.default_rng(seed)
  dims = {"a": 3, "b": 1, "c": 2}
  if kind == "mlp":
    model = models.mlp(dims, hidden=(7, 5), param_dtype=dtype)
    x = r.normal(size=(b, 4))
  else:
    model = models.cnn(dims, features=(3, 4), dense=6, param_dtype=dtype)
    x = r.normal(size=(b, 8, 8, 1))
  params = model.init(jax.random.key(seed), jnp.asarray(x, dtype))
  mask = np.ones(b, np.float32)
  mask[1] = 0
  batch = {
    "inputs": jnp.asarray(x, dtype),
    "labels": {
      "a": jnp.asarray(r.integers(0, 3, b)),
      "b": jnp.asarray(r.normal(size=(b, 1)), dtype),
      "c": jnp.asarray(r.integers(0, 2, (b, 2)), dtype),
    },
    "masks": {"b": jnp.asarray(mask)},
  }
  tasks = [
    jmtl.Task("a", L.softmax_cross_entropy),
    jmtl.Task("b", L.mse),
    jmtl.Task("c", L.sigmoid_binary_cross_entropy),
  ]
  return model, params, batch, tasks


def brute_jacobian(model, params, batch, tasks):
  """Each task's gradient of all parameters, one jax.grad per task."""
  out = []
  for t in tasks:

    def loss(p, t=t):
      s, c = jmtl.tasks.loss_terms(t, model.apply(p, batch["inputs"]), batch)
      return s / c

    out.append(jax.grad(loss)(params))
  return out


def flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def run(model, params, batch, tasks, transform, **opts):
  o = grads.GradientOptions(**opts).check()
  return jax.jit(
    lambda p, bt: grads.compute(model, tasks, p, bt, transform, transform.init(K), jax.random.key(0), None, o)
  )(params, batch)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_parameter_gramian_and_gradient_match_brute_force(kind, chunk):
  with jax.enable_x64(True):
    model, params, batch, tasks = setup(kind)
    out = run(model, params, batch, tasks, capture(), chunk_size=chunk)
    js = brute_jacobian(model, params, batch, tasks)
    jshared = jnp.stack([flat(j["shared"]) for j in js])
    np.testing.assert_allclose(out.weighting_state.gramian, jshared @ jshared.T, rtol=1e-10, atol=1e-14)
    w = out.weights
    want = jax.tree.map(lambda *g: sum(wi * gi for wi, gi in zip(w, g)), *js)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), out.grads, want)


@pytest.mark.parametrize("head_hidden", [(), (4,)])
def test_chunked_layer_by_layer_gramian_equals_unchunked(head_hidden):
  """chunk_size takes the Dense-layer Gramian one layer and a few tasks at a time: the same G and update.

  Linear heads rebuild dzₖ = δₖWₖᵀ inside the loop; other heads read the stacked dz.
  """
  with jax.enable_x64(True):
    _, params, batch, tasks = setup("mlp")
    model = models.mlp({"a": 3, "b": 1, "c": 2}, hidden=(7, 5), head_hidden=head_hidden, param_dtype=jnp.float64)
    params = model.init(jax.random.key(1), batch["inputs"])
    js = brute_jacobian(model, params, batch, tasks)
    jshared = jnp.stack([flat(j["shared"]) for j in js])
    whole = run(model, params, batch, tasks, capture())
    for chunk in (1, 2, 3, 5):
      out = run(model, params, batch, tasks, capture(), chunk_size=chunk)
      np.testing.assert_allclose(out.weighting_state.gramian, jshared @ jshared.T, rtol=1e-10, atol=1e-14)
      np.testing.assert_allclose(out.weighting_state.gramian, whole.weighting_state.gramian, rtol=1e-10, atol=1e-14)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), out.grads, whole.grads)


@pytest.mark.parametrize("chunk", [None, 2])
def test_select_restricts_the_gramian_to_a_subset(chunk):
  with jax.enable_x64(True):
    model, params, batch, tasks = setup("mlp")
    select = lambda shared: shared["dense_1"]
    out = run(model, params, batch, tasks, capture(select=select), chunk_size=chunk)
    js = brute_jacobian(model, params, batch, tasks)
    jsub = jnp.stack([flat(j["shared"]["dense_1"]) for j in js])
    np.testing.assert_allclose(out.weighting_state.gramian, jsub @ jsub.T, rtol=1e-10)
    kernel_only = lambda shared: {"k": shared["dense_0"]["kernel"]}
    out = run(model, params, batch, tasks, capture(select=kernel_only), chunk_size=chunk)
    jk = jnp.stack([j["shared"]["dense_0"]["kernel"].ravel() for j in js])
    np.testing.assert_allclose(out.weighting_state.gramian, jk @ jk.T, rtol=1e-10)


def test_representation_gramian_is_of_dz():
  with jax.enable_x64(True):
    model, params, batch, tasks = setup("mlp")
    out = run(model, params, batch, tasks, capture(), level="representation")
    z = model.encode(params["shared"], batch["inputs"])
    dzs = []
    for t in tasks:
      f = lambda zz, t=t: jnp.divide(
        *jmtl.tasks.loss_terms(t, {t.name: model.head(t.name, params["tasks"][t.name], zz)}, batch)
      )
      dzs.append(jax.grad(f)(z).ravel())
    d = jnp.stack(dzs)
    np.testing.assert_allclose(out.weighting_state.gramian, d @ d.T, rtol=1e-10)
    js = brute_jacobian(model, params, batch, tasks)
    want = jax.tree.map(lambda *g: sum(wi * gi for wi, gi in zip(out.weights, g)), *js)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), out.grads, want)


def test_general_path_matches_separable_and_own_heads():
  with jax.enable_x64(True):
    model, params, batch, tasks = setup("mlp")
    sep = run(model, params, batch, tasks, capture())
    gen = run(model.apply, params, batch, tasks, capture())
    np.testing.assert_allclose(sep.weighting_state.gramian, gen.weighting_state.gramian, rtol=1e-10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), sep.grads, gen.grads)
    own = run(model, params, batch, tasks, capture(), heads="own")
    js = brute_jacobian(model, params, batch, tasks)
    for i, n in enumerate(NAMES):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), own.grads["tasks"][n], js[i]["tasks"][n])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), own.grads["shared"], sep.grads["shared"])
    with pytest.raises(ValueError, match="representation"):
      run(model.apply, params, batch, tasks, capture(), level="representation")


def test_elementwise_jacobian_weights():
  """A Jacobian-level transform returning per-element weights: Σ Wₖ ⊙ Jₖ."""

  def keep_positive(losses, jacobian, **_):
    return jax.tree.map(lambda j: (j > 0).astype(j.dtype), jacobian)

  t = W.stateless(keep_positive, needs="jacobian")
  with jax.enable_x64(True):
    model, params, batch, tasks = setup("mlp")
    for m in (model, model.apply):
      out = run(m, params, batch, tasks, t)
      js = brute_jacobian(model, params, batch, tasks)
      want = jax.tree.map(lambda *g: sum(jnp.where(gi > 0, gi, 0) for gi in g), *[j["shared"] for j in js])
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), out.grads["shared"], want)
      heads = jax.tree.map(lambda *g: sum(g), *[j["tasks"] for j in js])
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), out.grads["tasks"], heads)


def test_bad_options():
  with pytest.raises(ValueError, match="level"):
    grads.GradientOptions(level="layer").check()
  with pytest.raises(ValueError, match="chunk_size"):
    grads.GradientOptions(chunk_size=0).check()


@pytest.mark.parametrize("cross_device", ["exact", "approximate"])
def test_pmap_parameter_level(cross_device):
  model, params, batch, tasks = setup("mlp", dtype=jnp.float32, b=16)
  t = capture()
  opt = optax.sgd(0.1)
  single = jax.jit(jmtl.make_train_step(model, tasks, opt, t))
  s1, m1 = single(jmtl.TrainState.create(params, opt, t, K, jax.random.key(0)), batch)
  pstep = parallel.pmap(
    jmtl.make_train_step(model, tasks, opt, t, axis_name="data", cross_device=cross_device), donate=False
  )
  s4, m4 = pstep(
    parallel.replicate(jmtl.TrainState.create(params, opt, t, K, jax.random.key(0))), parallel.shard_batch(batch)
  )
  g1, g4 = s1.weighting_state.gramian, s4.weighting_state.gramian[0]
  if cross_device == "exact":
    np.testing.assert_allclose(g4, g1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), s4.params, s1.params)
  else:
    # The sum of local Gramians misses the cross-device terms: close, not equal.
    assert np.all(np.isfinite(g4)) and not np.allclose(g4, g1, rtol=1e-5)
  np.testing.assert_allclose(m4["grad_cosine"][0], m1["grad_cosine"], atol=1e-5 if cross_device == "exact" else 1.0)


def test_gramian_method_without_shared_parameters_fails_clearly():
  model = models.soft_mlp({"a": 2, "b": 2}, hidden=(4,))
  x = jnp.zeros((2, 3))
  params = model.init(jax.random.key(0), x)
  tasks = [jmtl.Task("a", L.softmax_cross_entropy), jmtl.Task("b", L.softmax_cross_entropy)]
  batch = {"inputs": x, "labels": {"a": jnp.zeros(2, jnp.int32), "b": jnp.zeros(2, jnp.int32)}}
  t = W.mgda()
  with pytest.raises(ValueError, match=r"params\['shared'\] is empty"):
    grads.compute(model, tasks, params, batch, t, t.init(2), jax.random.key(0), None, grads.GradientOptions())


@pytest.mark.parametrize("head_hidden", [(), (4,)])
def test_representation_level_linear_heads_identity_and_fallback(head_hidden):
  """Linear heads take the δᵀδ ⊙ WᵀW route; other heads the stacked-dz route; both exact."""
  with jax.enable_x64(True):
    _, params, batch, tasks = setup("mlp")
    model = models.mlp({"a": 3, "b": 1, "c": 2}, hidden=(7, 5), head_hidden=head_hidden, param_dtype=jnp.float64)
    params = model.init(jax.random.key(0), batch["inputs"])
    z = jax.eval_shape(model.encode, params["shared"], batch["inputs"])
    assert (_taps.linear_head_kernels(model, tasks, params, z) is not None) == (head_hidden == ())
    out = run(model, params, batch, tasks, capture(), level="representation", heads="own")
    zz = model.encode(params["shared"], batch["inputs"])
    rows = []
    for t in tasks:
      f = lambda v, t=t: jnp.divide(
        *jmtl.tasks.loss_terms(t, {t.name: model.head(t.name, params["tasks"][t.name], v)}, batch)
      )
      rows.append(jax.grad(f)(zz).ravel())
    d = jnp.stack(rows)
    np.testing.assert_allclose(out.weighting_state.gramian, d @ d.T, rtol=1e-10)
    js = brute_jacobian(model, params, batch, tasks)
    want_shared = jax.tree.map(lambda *g: sum(wi * gi for wi, gi in zip(out.weights, g)), *[j["shared"] for j in js])
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), out.grads["shared"], want_shared
    )
    for i, n in enumerate(NAMES):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), out.grads["tasks"][n], js[i]["tasks"][n])
