"""Gramian- and Jacobian-level weightings (PCGrad, IMTL-G, ConFIG, Aligned-MTL, GradVac, GradNorm, GradDrop): each
method against a hand reference.

The contract every method keeps (jit, retrace, state, degenerate inputs, permutations, chaining, bad inputs and
arguments) is in test_weighting_contract.py. The jitted updates come from :func:`tests._asserts.compiled`, shared
with it, so a method compiles once per input signature for the session.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmtl import weighting as W
from tests._asserts import assert_trees_allclose
from tests._asserts import compiled
from tests._asserts import degenerate_jacobians
from tests._asserts import problem
from tests._asserts import random_jacobians


def visit_orders(key, k):
  """The visiting orders of PCGrad/GradVac, drawn as their docstrings state."""
  return [np.asarray(jax.random.permutation(sub, k)) for sub in jax.random.split(key, k)]


# --- method references (float64, explicit gradient vectors) ---------------------------------------------------------


def direction(made, js, state=None, seed=0):
  """``w @ J``, the weights and the state after one update on the explicit Jacobian ``js`` (all-ones losses, key
  ``jax.random.key(seed)``), with the jitted update of ``made`` (a :func:`~tests._asserts.compiled`)."""
  t, update, _ = made
  p = problem("gramian", np.ones(len(js), js.dtype), js, seed=seed)
  w, state = update(p.losses, t.init(len(js)) if state is None else state, **p.inputs)
  return np.asarray(w) @ js, np.asarray(w), state


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
      js = random_jacobians(1, 4, 5, seed=seed, dtype=np.float64)[0]
      d, _, _ = direction(compiled(W.pcgrad), js, seed=seed)
      np.testing.assert_allclose(d, pcgrad_reference(js, jax.random.key(seed)), rtol=1e-10, atol=1e-12)


def test_pcgrad_two_conflicting_tasks_closed_form():
  g1, g2 = np.array([2.0, 1.0, 0.0, 0.0, 0.0, 0.0]), np.array([-1.0, 0.5, 1.0, 0.0, 0.0, 0.0])
  # float32 and K = 2: the compiled update of the contract's permutation test.
  d, _, _ = direction(compiled(W.pcgrad), np.stack([g1, g2]).astype(np.float32))
  dot = g1 @ g2
  expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
  np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-7)
  # Each projected gradient is orthogonal to the other task's gradient, so d·gᵢ = ‖gᵢ'‖² > 0.
  assert d @ g1 > 0 and d @ g2 > 0


def test_imtl_g_equal_projections_and_paper_closed_form():
  k = 4  # K = 2 is the docstring's example
  with jax.enable_x64(True):
    for seed in range(3):
      js = random_jacobians(1, k, 5, seed=seed, dtype=np.float64)[0]
      d, w, _ = direction(compiled(W.imtl_g), js)
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


def config_reference(js):
  """ConFIG by its definition on the explicit gradients: g_u = U⁺1 (U: unit gradients), d = (Σ gᵢᵀĝ_u) ĝ_u."""
  u = js / np.linalg.norm(js, axis=1, keepdims=True)
  gu = np.linalg.pinv(u) @ np.ones(len(js))
  gv = gu / np.linalg.norm(gu)
  return np.sum(js @ gv) * gv


def test_config_matches_its_definition_and_has_no_conflict():
  with jax.enable_x64(True):
    for seed in range(3):
      js = random_jacobians(1, 3, 6, seed=seed, dtype=np.float64)[0]
      d, _, _ = direction(compiled(W.config), js)
      np.testing.assert_allclose(d, config_reference(js), rtol=1e-9, atol=1e-12)
      cos = js @ d / (np.linalg.norm(js, axis=1) * np.linalg.norm(d))
      np.testing.assert_allclose(cos, cos[0], rtol=1e-9)  # the same angle with every task
      assert cos[0] > 0
    # A zero gradient is left out: the others are balanced among themselves.
    js = random_jacobians(1, 3, 6, seed=7, dtype=np.float64)[0]
    with_zero = np.concatenate([js[:2], np.zeros((1, 6))])
    d, w, _ = direction(compiled(W.config), with_zero)
    assert w[2] == 0
    np.testing.assert_allclose(d, config_reference(js[:2]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl_matches_svd_reference(scale):
  with jax.enable_x64(True):
    for seed in range(2):
      js = random_jacobians(1, 3, 6, seed=seed, dtype=np.float64)[0]
      d, _, _ = direction(compiled(W.aligned_mtl, scale), js)
      np.testing.assert_allclose(d, aligned_reference(js, scale), rtol=1e-9, atol=1e-12)
    # Rank-deficient (a duplicated task): only the kept directions are aligned.
    js = np.concatenate([js[:2], js[:1]])
    d, _, _ = direction(compiled(W.aligned_mtl, scale), js)
    np.testing.assert_allclose(d, aligned_reference(js, scale), rtol=1e-8, atol=1e-10)
    t, update, _ = compiled(W.aligned_mtl, scale)
    for jac in degenerate_jacobians(3).values():  # the contract suite runs "min" only
      j = jac.astype(np.float32)
      w, _ = update(jnp.ones(3), t.init(3), gramian=jnp.asarray(j @ j.T, jnp.float64))
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
    t, state, ds = compiled(W.gradvac, 0.5), None, []
    for i, js in enumerate(seq):
      d, _, state = direction(t, js, state, seed=i)
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
  t, update, traces = compiled(W.graddrop, leak)
  before = len(traces)
  for i in range(3):
    jac = {"w": rng.normal(size=(3, 2, 3)).astype(np.float32), "b": rng.normal(size=(3, 4)).astype(np.float32)}
    key = jax.random.key(i)
    weights, _ = update(jnp.ones(3), t.init(3), jacobian=jax.tree.map(jnp.asarray, jac), key=key)
    assert jax.tree.structure(weights) == jax.tree.structure(jac)
    for got, want in zip(jax.tree.leaves(weights), graddrop_reference(jax.tree.leaves(jac), key, leak)):
      np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(weights["b"][2], 1.0)  # leak 1: task 2 passes through
  assert_trees_allclose(t.update(jnp.ones(3), t.init(3), jacobian=jac, key=key)[0], weights)
  assert len(traces) - before <= 1


def test_graddrop_keeps_every_gradient_of_a_unanimous_sign():
  t, update, _ = compiled(W.graddrop)
  jac = jnp.array([[1.0, -1.0, 0.0, 2.0], [3.0, -2.0, 0.0, -1.0], [0.5, -0.1, 0.0, 0.0]])
  for i in range(20):
    weights, _ = update(jnp.ones(3), t.init(3), jacobian=jac, key=jax.random.key(i))
    np.testing.assert_array_equal(weights[:, :2], 1.0)
    np.testing.assert_array_equal(weights[:, 2], 0.0)  # all zero: nothing to keep, and no nan
    kept = np.asarray(weights[:, 3])  # mixed signs: exactly one sign survives
    assert kept.tolist() in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])


def test_aggregate_with_element_wise_weights_on_an_array_and_a_pytree():
  t, update, _ = compiled(W.graddrop)
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


# --- robust aggregators ---------------------------------------------------------------------------------------------


def krum_reference(js, f, m):
  """Multi-Krum by the paper's definition: the mean of the m gradients whose K−f−2 nearest neighbours are closest."""
  k = len(js)
  scores = []
  for i in range(k):
    dists = sorted(float(np.sum((js[i] - js[j]) ** 2)) for j in range(k) if j != i)
    scores.append(sum(dists[: k - f - 2]))
  chosen = np.argsort(scores, kind="stable")[:m]
  return js[chosen].mean(0)


@pytest.mark.parametrize(("f", "m"), [(0, 1), (1, 1), (1, 3), (2, 2)])
def test_krum_matches_its_definition_and_ignores_an_outlier(f, m):
  with jax.enable_x64(True):
    for seed in range(3):
      js = random_jacobians(1, 7, 5, seed=seed, dtype=np.float64)[0]
      js[seed] = 100 * np.abs(js[seed]) + 50  # one gradient far from the others
      d, w, _ = direction(compiled(W.krum, n_byzantine=f, n_selected=m), js)
      np.testing.assert_allclose(d, krum_reference(js, f, m), rtol=1e-10, atol=1e-12)
      assert w[seed] == 0 and np.isclose(w.sum(), 1.0)
  with pytest.raises(ValueError, match="at least 5 tasks"):
    W.krum(n_byzantine=2).update(jnp.ones(4), (), gramian=jnp.eye(4))


def test_trimmed_mean_matches_its_definition():
  rng = np.random.default_rng(0)
  jac = {"a": rng.normal(size=(7, 4, 3)), "b": rng.normal(size=(7, 5))}
  jac["a"][2] = 1e6  # one task far off everywhere: trimmed at every element
  for trim in (0, 1, 3):
    t = W.trimmed_mean(trim)
    with jax.enable_x64(True):
      got = W.aggregate(t, jax.tree.map(jnp.asarray, jac))
    for name, leaf in jac.items():
      want = np.sort(leaf, axis=0)[trim : 7 - trim].mean(0)
      np.testing.assert_allclose(got[name], want, rtol=1e-12)
  with pytest.raises(ValueError, match="more than 6 tasks"):
    W.trimmed_mean(3).update(jnp.ones(6), (), jacobian=jnp.ones((6, 2)))
