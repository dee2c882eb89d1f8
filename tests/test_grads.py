"""The gradient engine: Gramians and combined gradients against brute force."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import grads
from jmtl import losses as L
from jmtl import models
from jmtl import parallel
from jmtl import weighting as W
from tests._engine import context
from tests._engine import new_state
from tests._engine import setup

K = 3


class Captured(NamedTuple):
  gramian: jax.Array  # (K, K) the Gramian the transform was given


def capture(needs="gramian", select=None):
  """Weights 1/‖gₖ‖ (a nontrivial function of G); the state keeps G for inspection."""

  def update(losses, state, *, gramian, **_):
    del state
    w = 1.0 / jnp.sqrt(jnp.diagonal(gramian) + 1e-30)
    return w.astype(losses.dtype), Captured(gramian)

  return W.WeightingTransform(lambda k: Captured(jnp.zeros((k, k))), update, needs, select)


def brute_jacobian(model, params, batch, tasks):
  """Each task's gradient of all parameters, one jax.grad per task."""
  out = []
  for t in tasks:

    def loss(p, t=t):
      s, c = jmtl.tasks.loss_terms(t, model.apply(p, batch["inputs"], {})[0], batch)
      return s / c

    out.append(jax.grad(loss)(params))
  return out


def flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def run(model, params, batch, tasks, transform, **opts):
  ctx = context(model, params, batch, tasks, transform, **opts)
  return jax.jit(lambda p, bt: grads.compute(dataclasses.replace(ctx, params=p, batch=bt)))(params, batch)


def general(model):
  """The same model without encode/head: the general route."""
  return model._replace(encode=None, head=None)


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
    bias_only = lambda shared: {"b": shared["dense_0"]["bias"]}
    out = run(model, params, batch, tasks, capture(select=bias_only), chunk_size=chunk)
    jb = jnp.stack([j["shared"]["dense_0"]["bias"].ravel() for j in js])
    np.testing.assert_allclose(out.weighting_state.gramian, jb @ jb.T, rtol=1e-10)


def test_representation_gramian_is_of_dz():
  with jax.enable_x64(True):
    model, params, batch, tasks = setup("mlp")
    out = run(model, params, batch, tasks, capture(), level="representation")
    z, _ = model.encode(params["shared"], batch["inputs"], {})
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
    assert grads.route(context(general(model), params, batch, tasks, capture())).name == "general"
    gen = run(general(model), params, batch, tasks, capture())
    np.testing.assert_allclose(sep.weighting_state.gramian, gen.weighting_state.gramian, rtol=1e-10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), sep.grads, gen.grads)
    own = run(model, params, batch, tasks, capture(), heads="own")
    js = brute_jacobian(model, params, batch, tasks)
    for i, n in enumerate("abc"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), own.grads["tasks"][n], js[i]["tasks"][n])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), own.grads["shared"], sep.grads["shared"])
    with pytest.raises(ValueError, match="representation"):
      run(general(model), params, batch, tasks, capture(), level="representation")


def test_elementwise_jacobian_weights():
  """A Jacobian-level transform returning per-element weights: Σ Wₖ ⊙ Jₖ."""

  def keep_positive(losses, jacobian, **_):
    return jax.tree.map(lambda j: (j > 0).astype(j.dtype), jacobian)

  t = W.stateless(keep_positive, needs="jacobian")
  with jax.enable_x64(True):
    model, params, batch, tasks = setup("mlp")
    for m in (model, general(model)):
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
  single = jax.jit(jmtl.make_train_step(model, tasks))
  s1, m1 = single(new_state(params, opt, t), batch)
  pstep = parallel.pmap(jmtl.make_train_step(model, tasks, axis_name="data", cross_device=cross_device), donate=False)
  s4, m4 = pstep(parallel.replicate(new_state(params, opt, t)), parallel.shard_batch(batch))
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
    grads.compute(context(model, params, batch, tasks, t))


@pytest.mark.parametrize("head_hidden", [(), (4,)])
def test_representation_level_linear_heads_identity_and_fallback(head_hidden):
  """Linear heads take the δᵀδ ⊙ WᵀW route; other heads the stacked-dz route; both exact."""
  with jax.enable_x64(True):
    _, params, batch, tasks = setup("mlp")
    model = models.mlp({"a": 3, "b": 1, "c": 2}, hidden=(7, 5), head_hidden=head_hidden, param_dtype=jnp.float64)
    params = model.init(jax.random.key(0), batch["inputs"])
    ctx = context(model, params, batch, tasks, capture(), level="representation", heads="own")
    assert grads.route(ctx).name == ("linear_heads" if head_hidden == () else "separable")
    out = run(model, params, batch, tasks, capture(), level="representation", heads="own")
    zz, _ = model.encode(params["shared"], batch["inputs"], {})
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
    for i, n in enumerate("abc"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), out.grads["tasks"][n], js[i]["tasks"][n])


def test_route_says_which_route_and_how():
  """route() names the route and how the Gramian is obtained, without running the step."""
  model, params, batch, tasks = setup("mlp", dtype=jnp.float32)
  say = lambda m, t, **o: grads.route(context(m, params, batch, tasks, t, **o))
  assert say(model, W.equal()).name == "loss_level"
  r = say(model, W.mgda())
  assert r.name == "separable" and "Dense-layer Gramian over 2 layers" in r.detail
  assert "Jacobian" in say(model, W.graddrop()).detail
  assert say(general(model), W.mgda()).name == "general"
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  assert grads.route(context(model, params, shapes, tasks, W.upgrad(), level="representation")).name == "linear_heads"
