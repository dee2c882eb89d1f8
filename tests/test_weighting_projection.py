"""Gramian- and Jacobian-level weightings: the contract for each, then each method against a hand reference."""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmtl import weighting as W

# name -> (factory, behaviour under a permutation of the tasks): "equivariant": the weights permute with the
# Gramian; "order": equivariant only in distribution (a random visiting order), so checked at K = 2, where each
# task has one other task to visit and the order cannot matter.
TRANSFORMS = {
  "pcgrad": (W.pcgrad, "order"),
  "imtl_g": (W.imtl_g, "equivariant"),
  "aligned_mtl": (W.aligned_mtl, "equivariant"),
  "gradvac": (lambda: W.gradvac(beta=0.5), "order"),
  "gradnorm": (W.gradnorm, "equivariant"),
}
NAMES = sorted(TRANSFORMS)
TRACES = collections.Counter()  # (factory, args) -> how many times its shared jitted update was traced


@functools.cache
def made(factory, *args):
  """``factory(*args)`` and its jitted update, built once and shared, so each compiles once per input signature."""
  t = factory(*args)

  def update(*a, **kw):
    TRACES[factory, args] += 1  # runs once per trace, never when a compiled update is reused
    return t.update(*a, **kw)

  return t, jax.jit(update)


def transform(name):
  return made(TRANSFORMS[name][0])


def traces(name):
  return TRACES[TRANSFORMS[name][0], ()]


def jacobians(k, n=3, p=6, seed=0, dtype=np.float32):
  """``n`` Jacobians ``(k, p)`` with a mix of aligned and conflicting task gradients."""
  rng = np.random.default_rng(seed)
  common = rng.normal(size=(n, 1, p))
  return (rng.normal(size=(n, k, p)) + 0.5 * common).astype(dtype)


def run(update, state, js, losses=None, seed=0):
  """Applies ``update`` along the Jacobians ``js``; returns the stacked weights and the final state."""
  ws = []
  for i, jac in enumerate(js):
    j = jnp.asarray(jac)
    ls = jnp.ones(j.shape[0], j.dtype) if losses is None else jnp.asarray(losses[i])
    w, state = update(ls, state, gramian=j @ j.T, key=jax.random.key(seed + i))
    ws.append(w)
  return np.stack(ws), state


def signature(tree):
  leaves = jax.tree.leaves(tree)
  return jax.tree.structure(tree), [(x.shape, x.dtype, jax.typeof(x).weak_type) for x in leaves]


def visit_orders(key, k):
  """The visiting orders of PCGrad/GradVac, drawn as their docstrings state."""
  return [np.asarray(jax.random.permutation(sub, k)) for sub in jax.random.split(key, k)]


def allclose_tree(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


# --- the contract, for every Gramian-level transform -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
  t, jitted = transform(name)
  js = jacobians(3, n=1)  # one eager step (each recompiles the loops): enough to compare weights and state
  losses = np.array([[1.0, 2.0, 0.5]], np.float32)
  w_eager, s_eager = run(t.update, t.init(3), js, losses)
  w_jit, s_jit = run(jitted, t.init(3), js, losses)
  np.testing.assert_allclose(w_jit, w_eager, rtol=1e-5, atol=1e-6)
  allclose_tree(s_jit, s_eager, rtol=1e-5, atol=1e-6)


def degenerate_gramians():
  g = jacobians(3, n=1, seed=3)[0]
  cases = {
    "zero row": [g[0], 0 * g[1], g[2]],
    "duplicates": [g[0], g[0], g[2]],
    "all equal": [g[0], g[0], g[0]],
    "exactly opposite": [g[0], -g[0], g[2]],
    "opposite and zero": [g[0], -g[0], 0 * g[0]],
    "all zero": [0 * g[0]] * 3,
    "small": list(1e-8 * g),
    "large": list(1e8 * g),
    "mixed scales": [1e-8 * g[0], g[1], 1e8 * g[2]],
  }
  return {name: np.asarray(rows, np.float32) @ np.asarray(rows, np.float32).T for name, rows in cases.items()}


@pytest.mark.parametrize("name", NAMES)
def test_finite_on_degenerate_gramians_without_retrace(name):
  t, jitted = transform(name)
  before, signature_before = traces(name), signature(t.init(3))
  seq = jnp.asarray([[1.0, 1.0, 1.0], [1e-8, 1e8, 0.0], [1.0, 2.0, 0.5]])
  for case, gram in degenerate_gramians().items():
    state = t.init(3)
    for i, losses in enumerate(seq):
      w, state = jitted(losses, state, gramian=jnp.asarray(gram), key=jax.random.key(i))
      assert w.shape == (3,) and w.dtype == losses.dtype and np.all(np.isfinite(w)), (case, w)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)), (case, state)
    assert signature(state) == signature_before  # same structure, shapes, dtypes and weak types
  assert traces(name) <= before + 1  # 27 calls, at most one trace (none if an earlier test compiled it)
  for gram in ([[4.0]], [[0.0]]):  # K = 1
    w, state = jitted(jnp.ones(1), t.init(1), gramian=jnp.asarray(gram), key=jax.random.key(0))
    assert np.all(np.isfinite(w)) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", NAMES)
def test_permutation(name):
  k = 2 if TRANSFORMS[name][1] == "order" else 3
  perm = np.roll(np.arange(k), 1)
  js = jacobians(k, n=3, seed=1)
  losses = np.random.default_rng(0).uniform(0.5, 2.0, (3, k)).astype(np.float32)
  t, jitted = transform(name)
  w, state = run(jitted, t.init(k), js, losses)
  w_perm, state_perm = run(jitted, t.init(k), js[:, perm], losses[:, perm])
  np.testing.assert_allclose(w_perm, w[:, perm], rtol=1e-4, atol=1e-6)
  if name == "gradvac":
    np.testing.assert_allclose(state_perm.targets, state.targets[np.ix_(perm, perm)], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_chains_after_static_under_jit(name):
  k, scale = 3, np.array([0.5, 1.0, 2.0], np.float32)
  base, base_update = transform(name)
  chained = W.chain(W.static(scale), base)
  assert chained.needs == "gramian" and chained.select is base.select
  update = jax.jit(chained.update)
  state, base_state = chained.init(k), base.init(k)
  for i, j in enumerate(jnp.asarray(jacobians(k))):
    losses, gram, key = jnp.array([1.0, 2.0, 0.5]), j @ j.T, jax.random.key(i)
    w, state = update(losses, state, gramian=gram, key=key)
    # The second transform of a chain sees the rescaled problem and the second half of the split key.
    w_base, base_state = base_update(
      scale * losses, base_state, gramian=gram * np.outer(scale, scale), key=jax.random.split(key, 2)[1]
    )
    np.testing.assert_allclose(w, scale * w_base, rtol=1e-5, atol=1e-6)
  allclose_tree(state.inner[1], base_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_rejected(name):
  t, _ = transform(name)
  with pytest.raises(ValueError, match="Gramian"):
    t.update(jnp.ones(2), t.init(2), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"\(3, 3\)"):
    t.update(jnp.ones(2), t.init(2), gramian=jnp.eye(3), key=jax.random.key(0))
  if TRANSFORMS[name][1] == "order":
    with pytest.raises(ValueError, match="key"):
      t.update(jnp.ones(2), t.init(2), gramian=jnp.eye(2))


def test_hyperparameters_are_checked():
  with pytest.raises(ValueError, match="scale"):
    W.aligned_mtl("max")
  with pytest.raises(ValueError, match="beta"):
    W.gradvac(beta=0.0)
  with pytest.raises(ValueError, match="alpha"):
    W.gradnorm(alpha=-1.0)
  with pytest.raises(ValueError, match="leak"):
    W.graddrop(leak=1.5)


# --- method references (float64, explicit gradient vectors) ---------------------------------------------------------


def direction(made_t, js, state=None, key=None):
  """``w @ J``, the weights and the state after one update on the explicit Jacobian ``js``."""
  t, update = made_t
  j = jnp.asarray(js)
  w, state = update(
    jnp.ones(j.shape[0], j.dtype), t.init(j.shape[0]) if state is None else state, gramian=j @ j.T, key=key
  )
  return np.asarray(w @ j), np.asarray(w), state


def pcgrad_reference(js, key):
  out = []
  for i, order in enumerate(visit_orders(key, js.shape[0])):
    g = js[i].copy()
    for j in order:
      if j != i and g @ js[j] < 0:
        g = g - (g @ js[j]) / (js[j] @ js[j]) * js[j]
    out.append(g)
  return np.sum(out, axis=0)


def test_pcgrad_matches_brute_force():
  with jax.enable_x64(True):
    for seed in range(3):
      js, key = jacobians(4, n=1, p=5, seed=seed, dtype=np.float64)[0], jax.random.key(seed)
      d, _, _ = direction(made(W.pcgrad), js, key=key)
      np.testing.assert_allclose(d, pcgrad_reference(js, key), rtol=1e-10, atol=1e-12)


def test_pcgrad_two_conflicting_tasks_closed_form():
  g1, g2 = np.array([2.0, 1.0, 0.0, 0.0, 0.0, 0.0]), np.array([-1.0, 0.5, 1.0, 0.0, 0.0, 0.0])
  # float32 and K = 2: the compiled update of the permutation test.
  d, _, _ = direction(transform("pcgrad"), np.stack([g1, g2]).astype(np.float32), key=jax.random.key(0))
  dot = g1 @ g2
  expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
  np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-7)
  # Each projected gradient is orthogonal to the other task's gradient, so d·gᵢ = ‖gᵢ'‖² > 0.
  assert d @ g1 > 0 and d @ g2 > 0


def test_imtl_g_equal_projections_and_paper_closed_form():
  k = 4  # K = 2 is the docstring's example
  with jax.enable_x64(True):
    for seed in range(3):
      js = jacobians(k, n=1, p=5, seed=seed, dtype=np.float64)[0]
      d, w, _ = direction(made(W.imtl_g), js)
      u = js / np.linalg.norm(js, axis=1, keepdims=True)
      np.testing.assert_allclose(u @ d, np.full(k, (u @ d)[0]), rtol=1e-9)
      np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-12)
      # The paper's formula with task 1 as reference: α₂…K = g₁ Uᵀ (D Uᵀ)⁻¹.
      dd, uu = js[0] - js[1:], u[0] - u[1:]
      rest = np.linalg.solve((dd @ uu.T).T, uu @ js[0])
      np.testing.assert_allclose(w, np.concatenate([[1 - rest.sum()], rest]), rtol=1e-8)


def aligned_reference(js, scale):
  """Aligned-MTL from the SVD of the gradient matrix: σ U Vᵀ summed over the tasks."""
  u, s, vt = np.linalg.svd(js.T, full_matrices=False)
  kept = s**2 > s[0] ** 2 * js.shape[0] * np.finfo(np.float64).eps
  u, s, vt = u[:, kept], s[kept], vt[kept]
  lam = np.sort(s**2)
  sigma = np.sqrt({"min": lam[0], "median": lam[(len(lam) - 1) // 2], "rmse": lam.mean()}[scale])
  return (sigma * u @ vt).sum(axis=1)


@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl_matches_svd_reference(scale):
  with jax.enable_x64(True):
    for seed in range(2):
      js = jacobians(3, n=1, p=6, seed=seed, dtype=np.float64)[0]
      d, _, _ = direction(made(W.aligned_mtl, scale), js)
      np.testing.assert_allclose(d, aligned_reference(js, scale), rtol=1e-9, atol=1e-12)
    # Rank-deficient (a duplicated task): only the kept directions are aligned.
    js = np.concatenate([js[:2], js[:1]])
    d, _, _ = direction(made(W.aligned_mtl, scale), js)
    np.testing.assert_allclose(d, aligned_reference(js, scale), rtol=1e-8, atol=1e-10)
    t, update = made(W.aligned_mtl, scale)
    for gram in degenerate_gramians().values():  # the contract suite runs "min" only
      w, _ = update(jnp.ones(3), t.init(3), gramian=jnp.asarray(gram, jnp.float64))
      assert np.all(np.isfinite(w))


def gradvac_reference(seq, keys, beta):
  k = seq.shape[1]
  targets, out = np.zeros((k, k)), []
  for js, key in zip(seq, keys):
    rows = []
    for i, order in enumerate(visit_orders(key, k)):
      g = js[i].copy()
      for j in order:
        if j == i:
          continue
        gj = js[j]
        phi = g @ gj / (np.linalg.norm(g) * np.linalg.norm(gj))
        tgt = targets[i, j]
        if phi < tgt:
          num = tgt * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - tgt**2)
          g = g + np.linalg.norm(g) * num / (np.linalg.norm(gj) * np.sqrt(1 - tgt**2)) * gj
        targets[i, j] = (1 - beta) * tgt + beta * phi
      rows.append(g)
    out.append(np.sum(rows, axis=0))
  return np.stack(out), targets


def test_gradvac_matches_brute_force_with_its_targets():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    common = rng.normal(size=5)
    # Aligned gradients first (the targets become positive), then less aligned ones (they fall below them).
    seq = np.stack([rng.normal(size=(3, 5)) + 2 * common, rng.normal(size=(3, 5)), rng.normal(size=(3, 5))])
    keys = [jax.random.key(i) for i in range(len(seq))]
    t, state, ds = made(W.gradvac, 0.5), None, []
    for js, key in zip(seq, keys):
      d, _, state = direction(t, js, state, key)
      ds.append(d)
    d_ref, targets_ref = gradvac_reference(seq, keys, 0.5)
    np.testing.assert_allclose(np.stack(ds), d_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state.targets, targets_ref, rtol=1e-9, atol=1e-12)
    assert np.any(gradvac_reference(seq[:1], keys[:1], 0.5)[1] > 0)


def test_gradnorm_two_sgd_steps_against_hand_computation():
  lr, alpha, k = 0.05, 1.5, 3
  t = W.gradnorm(alpha, optax.sgd(lr), select=lambda shared: shared["last"])
  assert t.needs == "gramian" and t.select({"last": 1}) == 1
  grams = [np.diag([1.0, 4.0, 0.25]), np.array([[1.0, 0.2, 0.0], [0.2, 2.0, 0.1], [0.0, 0.1, 0.5]])]
  losses = [np.array([1.0, 2.0, 4.0]), np.array([0.5, 1.8, 2.0])]
  with jax.enable_x64(True):
    state, w_ref, l0, update = t.init(k), np.ones(k), losses[0], jax.jit(t.update)
    for gram, ls in zip(grams, losses):
      w, state = update(jnp.asarray(ls), state, gramian=jnp.asarray(gram))
      np.testing.assert_allclose(w, w_ref, rtol=1e-12)
      norms = np.sqrt(np.diag(gram))
      rate = (ls / l0) / np.mean(ls / l0)
      target = np.mean(w_ref * norms) * rate**alpha
      w_ref = w_ref - lr * norms * np.sign(w_ref * norms - target)
      w_ref = k * np.maximum(w_ref, 1e-6) / np.sum(np.maximum(w_ref, 1e-6))
      np.testing.assert_allclose(state.weights, w_ref, rtol=1e-12)
      np.testing.assert_allclose(state.initial_losses, l0)


# --- GradDrop: element-wise weights from the Jacobian ----------------------------------------------------------------


def graddrop_reference(leaves, key, leak):
  out = []
  for leaf, sub in zip(leaves, jax.random.split(key, len(leaves))):
    u = np.asarray(jax.random.uniform(sub, leaf.shape[1:], jnp.float32))
    purity = 0.5 * (1 + leaf.sum(0) / np.abs(leaf).sum(0))
    mask = np.where(u < purity, leaf > 0, leaf < 0)
    lk = np.reshape(leak, (-1,) + (1,) * (leaf.ndim - 1))
    out.append(lk + (1 - lk) * mask)
  return out


def test_graddrop_matches_numpy_on_a_pytree_jit_equals_eager_without_retrace():
  rng = np.random.default_rng(0)
  leak = (0.0, 0.25, 1.0)
  t, update = made(W.graddrop, leak)
  for i in range(3):
    jac = {"w": rng.normal(size=(3, 2, 3)).astype(np.float32), "b": rng.normal(size=(3, 4)).astype(np.float32)}
    key = jax.random.key(i)
    weights, _ = update(jnp.ones(3), t.init(3), jacobian=jax.tree.map(jnp.asarray, jac), key=key)
    assert jax.tree.structure(weights) == jax.tree.structure(jac)
    for got, want in zip(jax.tree.leaves(weights), graddrop_reference(jax.tree.leaves(jac), key, leak)):
      np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(weights["b"][2], 1.0)  # leak 1: task 2 passes through
  allclose_tree(t.update(jnp.ones(3), t.init(3), jacobian=jac, key=key)[0], weights)
  assert TRACES[W.graddrop, (leak,)] == 1


def test_graddrop_keeps_every_gradient_of_a_unanimous_sign():
  t, update = made(W.graddrop)
  jac = jnp.array([[1.0, -1.0, 0.0, 2.0], [3.0, -2.0, 0.0, -1.0], [0.5, -0.1, 0.0, 0.0]])
  for i in range(20):
    weights, _ = update(jnp.ones(3), t.init(3), jacobian=jac, key=jax.random.key(i))
    np.testing.assert_array_equal(weights[:, :2], 1.0)
    np.testing.assert_array_equal(weights[:, 2], 0.0)  # all zero: nothing to keep, and no nan
    kept = np.asarray(weights[:, 3])  # mixed signs: exactly one sign survives
    assert kept.tolist() in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])


def test_aggregate_with_element_wise_weights_on_an_array_and_a_pytree():
  t, update = made(W.graddrop)
  agg = W.as_aggregator(t, 3)
  arr = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32))
  tree = {"a": arr[:, :2].reshape(3, 2, 1), "b": arr[:, 2:]}
  key = jax.random.key(3)

  @jax.jit
  def directions(arr, tree, key):
    via_aggregator, _ = agg.update(arr, agg.init(None), key=key)
    return W.aggregate(t, arr, key=key), W.aggregate(t, tree, key=key), via_aggregator

  d, d_tree, d_agg = directions(arr, tree, key)
  weights, _ = update(jnp.ones(3), t.init(3), jacobian=arr, key=key)
  np.testing.assert_allclose(d, np.sum(np.asarray(weights) * np.asarray(arr), axis=0), rtol=1e-6)
  np.testing.assert_allclose(d_agg, d, rtol=1e-6)
  assert d_tree["a"].shape == (2, 1) and d_tree["b"].shape == (2,)
  # Every output element is the sum of the kept task gradients of one sign.
  for leaf, out in zip(jax.tree.leaves(tree), jax.tree.leaves(d_tree)):
    x = np.asarray(leaf)
    pos, neg = np.where(x > 0, x, 0).sum(0), np.where(x < 0, x, 0).sum(0)
    assert np.all(np.isclose(out, pos, rtol=1e-6) | np.isclose(out, neg, rtol=1e-6))


def test_graddrop_rejects_missing_inputs():
  t, _ = made(W.graddrop)
  assert t.needs == "jacobian"
  with pytest.raises(ValueError, match="Jacobian"):
    t.update(jnp.ones(2), t.init(2), key=jax.random.key(0))
  with pytest.raises(ValueError, match="key"):
    t.update(jnp.ones(2), t.init(2), jacobian=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="leading axis"):
    t.update(jnp.ones(2), t.init(2), jacobian=jnp.ones((3, 3)), key=jax.random.key(0))
