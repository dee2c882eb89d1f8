"""Gramian-level weightings (MGDA, UPGrad, DualProj, CAGrad, Nash-MTL) and their K×K solvers.

References are closed forms, brute-force solutions in float64 numpy, and torchjd's documented examples. The solvers
are jitted per input signature, so most tests call the transforms eagerly and reuse the compiled solvers; the few
that jit a whole step keep to one K.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jmtl import weighting as W
from jmtl.weighting import _solvers as S

# name -> factory. Every one is a linear combination Jᵀw computed from G alone.
FACTORIES = {
  "mgda": W.mgda,
  "upgrad": W.upgrad,
  "dualproj": W.dualproj,
  "cagrad": lambda: W.cagrad(0.5),
  "nash_mtl": W.nash_mtl,
}
NAMES = sorted(FACTORIES)
NO_CONFLICT = ("dualproj", "mgda", "upgrad")  # J Jᵀw ≥ 0 by construction


@functools.cache
def transform(name):
  return FACTORIES[name]()


def weights(name, jac, losses=None):
  """Weights of a fresh transform for the Jacobian ``jac`` (numpy, K × P), eagerly, in jac's dtype."""
  t = transform(name)
  jac = jnp.asarray(jac)
  losses = jnp.ones(jac.shape[0], jac.dtype) if losses is None else jnp.asarray(losses, jac.dtype)
  w, _ = t.update(losses, t.init(jac.shape[0]), gramian=jac @ jac.T)
  return np.asarray(w, np.float64)


def random_jacobian(k, p=7, seed=0, shift=0.5):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(k, p)) + shift * rng.normal(size=(1, p))


# --- float64 references in numpy -------------------------------------------------------------------------------------


def box_reference(g, lower):
  """argmin_{u ≥ lower} uᵀGu: every free set's stationary point, the best feasible one."""
  k, best = len(lower), (np.inf, None)
  for mask in itertools.product([False, True], repeat=k):
    free = np.array(mask)
    u = lower.astype(np.float64).copy()
    if free.any():
      u[free] = np.linalg.solve(g[np.ix_(free, free)], -g[np.ix_(free, ~free)] @ lower[~free])
    if np.all(u >= lower - 1e-12) and u @ g @ u < best[0]:
      best = (u @ g @ u, u)
  return best[1]


def simplex_reference(g):
  """argmin_{w ∈ Δ} wᵀGw: every support's stationary point (KKT system), the best feasible one."""
  k, best = g.shape[0], (np.inf, None)
  for mask in itertools.product([False, True], repeat=k):
    s = np.array(mask)
    if not s.any():
      continue
    n = int(s.sum())
    kkt = np.block([[2 * g[np.ix_(s, s)], np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    sol = np.linalg.lstsq(kkt, np.r_[np.zeros(n), 1.0], rcond=None)[0]
    w = np.zeros(k)
    w[s] = sol[:n]
    if np.all(w >= -1e-12) and w @ g @ w < best[0]:
      best = (w @ g @ w, w)
  return best[1]


def quadratic(g, w):
  return w @ g @ w


def cagrad_inner(jac, c, w):
  """CAGrad's dual objective g_wᵀg₀ + c‖g₀‖‖g_w‖."""
  g0, gw = jac.mean(0), jac.T @ w
  return gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw)


def simplex_minimise(f, k, rounds=14, n=41):
  """Dense search for a convex f on the simplex (K = 2 or 3): a grid, then grids zoomed on the best point."""
  center, half = np.full(k - 1, 0.5), 0.5
  for _ in range(rounds):
    axes = [np.linspace(c - half, c + half, n) for c in center]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, k - 1)
    pts = pts[(pts >= 0).all(1) & (pts.sum(1) <= 1)]
    ws = np.concatenate([pts, 1 - pts.sum(1, keepdims=True)], 1)
    center, half = pts[np.argmin([f(w) for w in ws])], half / 4
  return np.r_[center, 1 - center.sum()]


# --- published reference values -------------------------------------------------------------------------------------

# torchjd's documented examples (docstrings of torchjd.aggregation.UPGrad, DualProj, MGDA, CAGrad and NashMTL,
# SimplexLab/TorchJD, src/torchjd/aggregation/*.py), all for this matrix. torchjd adds 1e-4·I to the trace-normalised
# Gramian of UPGrad/DualProj and solves Nash-MTL approximately (20 CCP steps), hence the tolerances.
TORCHJD_J = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
TORCHJD = [
  (W.upgrad, [0.2929, 1.9004, 1.9004], 1e-3),
  (W.dualproj, [0.5563, 1.1109, 1.1109], 1e-3),
  (W.mgda, [1.1921e-07, 1.0, 1.0], 1e-5),
  (lambda: W.cagrad(0.5, rescale=False), [0.1835, 1.2041, 1.2041], 1e-4),
  (lambda: W.nash_mtl(max_norm=1.0), [0.0542, 0.7061, 0.7061], 2e-4),
]


@pytest.mark.parametrize(("factory", "expected", "atol"), TORCHJD)
def test_torchjd_documented_examples(factory, expected, atol):
  with jax.enable_x64(True):
    d = W.aggregate(factory(), jnp.asarray(TORCHJD_J))
  np.testing.assert_allclose(d, expected, atol=atol)


# --- closed forms and brute force (float64) --------------------------------------------------------------------------


def test_mgda_two_tasks_closed_form():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    for i in range(6):
      g1, g2 = rng.normal(size=(2, 5))
      if i % 3 == 0:
        g2 = 3 * g1 + 0.1 * g2  # nearly parallel: the clip is active
      alpha = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
      np.testing.assert_allclose(weights("mgda", np.stack([g1, g2])), [alpha, 1 - alpha], atol=1e-9)


def test_mgda_is_the_min_norm_point_and_conflicts_with_no_task():
  with jax.enable_x64(True):
    for seed in range(3):
      jac = random_jacobian(3, seed=seed, shift=0.2)
      g = jac @ jac.T
      w = weights("mgda", jac)
      w_grid = simplex_minimise(functools.partial(quadratic, g), 3)
      assert w @ g @ w <= w_grid @ g @ w_grid + 1e-12
      np.testing.assert_allclose(w, simplex_reference(g), atol=1e-7)
      assert np.all(g @ w >= w @ g @ w - 1e-9)  # gₖ·d ≥ ‖d‖² ≥ 0: the optimality condition


@pytest.mark.parametrize("k", [2, 3])
def test_upgrad_and_dualproj_against_brute_force(k):
  with jax.enable_x64(True):
    for seed in range(2):
      jac = random_jacobian(k, seed=seed, shift=0.0)
      g = jac @ jac.T
      upgrad_ref = np.mean([box_reference(g, np.eye(k)[i]) for i in range(k)], axis=0)
      np.testing.assert_allclose(weights("upgrad", jac), upgrad_ref, rtol=1e-7, atol=1e-9)
      np.testing.assert_allclose(weights("dualproj", jac), box_reference(g, np.full(k, 1 / k)), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_cagrad_against_brute_force(k):
  c = 0.5
  with jax.enable_x64(True):
    for seed in range(2):
      jac = random_jacobian(k, seed=seed, shift=0.3)
      g0 = jac.mean(0)
      gw = jac.T @ simplex_minimise(functools.partial(cagrad_inner, jac, c), k)
      d_ref = (g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * gw) / (1 + c * c)
      np.testing.assert_allclose(jac.T @ weights("cagrad", jac), d_ref, rtol=1e-6, atol=1e-9)


def test_cagrad_options():
  jac = random_jacobian(3, seed=4)
  with jax.enable_x64(True):
    w_paper = np.asarray(W.cagrad(0.5, rescale=False).update(jnp.ones(3), (), gramian=jnp.asarray(jac @ jac.T))[0])
    w_zero = np.asarray(W.cagrad(0.0).update(jnp.ones(3), (), gramian=jnp.asarray(jac @ jac.T))[0])
  np.testing.assert_allclose(weights("cagrad", jac), w_paper / 1.25, rtol=1e-5)  # rescale: ÷ (1 + c²)
  np.testing.assert_allclose(w_zero, np.full(3, 1 / 3), rtol=1e-12)  # c = 0 is the mean gradient
  with pytest.raises(ValueError, match="c must be"):
    W.cagrad(-1.0)


def test_nash_mtl_solves_the_bargaining_equation():
  with jax.enable_x64(True):
    for seed in range(3):
      jac = random_jacobian(3, seed=seed, shift=0.5)
      alpha = weights("nash_mtl", jac)
      np.testing.assert_allclose(alpha * (jac @ jac.T @ alpha), 1.0, rtol=1e-9)  # G α = 1/α


def test_solvers_satisfy_kkt_at_k40():
  """The solvers used at scale: optimality conditions of both QPs at K = 40 in float64."""
  with jax.enable_x64(True):
    jac = random_jacobian(40, p=120, seed=3, shift=0.3) * np.random.default_rng(3).uniform(0.1, 10, (40, 1))
    g = jac @ jac.T
    scale = np.trace(g) / 40
    w = np.asarray(S.simplex_qp(jnp.asarray(g)))
    gw = g @ w / scale
    assert abs(w.sum() - 1) < 1e-12 and w.min() >= 0
    assert np.all(gw >= w @ gw - 1e-9) and np.all(np.abs(gw - w @ gw)[w > 1e-12] < 1e-9)
    lower = np.full(40, 1 / 40)
    u = np.asarray(S.lower_bound_qp(jnp.asarray(g), jnp.asarray(lower)))
    gu = g @ u / scale
    assert np.all(u >= lower) and np.all(gu >= -1e-9) and np.all(np.abs(gu * (u - lower)) < 1e-9)


# --- properties ------------------------------------------------------------------------------------------------------


# Entries are 0 or at least 1e-6 in magnitude: a float32 Gramian cannot see a row whose squared norm underflows
# (‖g‖ < 1e-19); extreme but representable scales are covered by test_degenerate_inputs_stay_finite.
entries = st.floats(-10, 10, width=32).filter(lambda x: x == 0 or abs(x) >= 1e-6)
jacobians = hnp.arrays(np.float32, (3, 5), elements=entries)


@settings(max_examples=25, deadline=None)
@given(jacobians)
def test_no_conflict_with_any_task(jac):
  jac64 = jac.astype(np.float64)
  norms = np.linalg.norm(jac64, axis=1)
  for name in NO_CONFLICT:
    w = weights(name, jac)
    assert np.all(np.isfinite(w))
    d = jac64.T @ w
    # J d ≥ 0 up to the solver's ridge and float32 rounding of G.
    assert np.all(jac64 @ d >= -1e-4 * norms * np.linalg.norm(jac64) * np.abs(w).sum()), name


@pytest.mark.parametrize("name", NAMES)
def test_permutation_equivariance(name):
  jac, perm = random_jacobian(3, seed=5).astype(np.float32), np.array([2, 0, 1])
  np.testing.assert_allclose(weights(name, jac[perm]), weights(name, jac)[perm], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("s", [1e-4, 1e4])
def test_scale(name, s):
  """Scaling J by s: the weights of MGDA, UPGrad, DualProj and CAGrad are unchanged (their direction scales by s);
  Nash-MTL's weights scale by 1/s and its direction is unchanged."""
  jac = random_jacobian(3, seed=6).astype(np.float32)
  expected = weights(name, jac) / (s if name == "nash_mtl" else 1)
  np.testing.assert_allclose(weights(name, s * jac), expected, rtol=1e-4)


def test_nash_mtl_direction_ignores_per_task_scales():
  jac = random_jacobian(3, seed=7).astype(np.float32)
  scales = np.array([1e-3, 1.0, 50.0], np.float32)[:, None]
  d = jac.T @ weights("nash_mtl", jac)
  np.testing.assert_allclose((scales * jac).T @ weights("nash_mtl", scales * jac), d, rtol=1e-4)


def degenerate_jacobians():
  g = random_jacobian(2, p=5, seed=8)
  return {
    "zero row": np.stack([g[0], np.zeros(5), g[1]]),
    "duplicated": np.stack([g[0], g[0], g[1]]),
    "opposite": np.stack([g[0], -g[0], g[1]]),
    "opposite pair only": np.stack([g[0], -g[0], 0 * g[1]]),
    "all zero": np.zeros((3, 5)),
    "rank one": np.outer([1.0, -2.0, 3.0], g[0]),
    "1e-8 and 1e8": np.stack([1e-8 * g[0], 1e8 * g[1], g[0] + g[1]]),
    "all 1e-8": 1e-8 * np.stack([g[0], g[1], g[0] - g[1]]),
    "all 1e8": 1e8 * np.stack([g[0], g[1], g[0] - g[1]]),
    "K=1": g[:1],
    "K=1 zero": np.zeros((1, 5)),
    "K=1 1e8": 1e8 * g[:1],
  }


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_inputs_stay_finite(name):
  for case, jac64 in degenerate_jacobians().items():
    jac = jac64.astype(np.float32)
    w = weights(name, jac)
    d = jac.astype(np.float64).T @ w
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(d)), case
    if name in NO_CONFLICT:
      norms = np.linalg.norm(jac.astype(np.float64), axis=1)
      assert np.all(jac @ d >= -1e-4 * norms * np.linalg.norm(jac) * np.abs(w).sum()), case


def test_k1_is_the_task_gradient():
  jac = np.array([[3.0, 4.0]], np.float32)
  for name in ("mgda", "upgrad", "dualproj"):
    np.testing.assert_allclose(weights(name, jac), [1.0], rtol=1e-5)
  np.testing.assert_allclose(weights("cagrad", jac), [1.5 / 1.25], rtol=1e-5)  # (1 + c) g, ÷ (1 + c²)
  np.testing.assert_allclose(weights("nash_mtl", jac), [0.2], rtol=1e-5)  # α = 1/‖g‖


def signature(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", NAMES)
def test_chained_after_a_loss_level_transform_jit_equals_eager_without_retrace(name):
  """One compiled step per method (compiles dominate this file): chain(static(p), method) under jit equals the
  eager chain, equals p ⊙ the method's weights for the rows pₖ gₖ, and the state keeps its signature."""
  p = np.array([0.5, 1.0, 2.0], np.float32)
  t = W.chain(W.static(p), transform(name))
  traces = []

  def step(losses, state, gramian):
    traces.append(None)  # runs once per trace, never when the compiled step is reused
    return t.update(losses, state, gramian=gramian)

  jitted = jax.jit(step)
  state = eager_state = t.init(3)
  before = signature(state)
  for seed in range(3):
    jac = random_jacobian(3, seed=seed).astype(np.float32)
    g, losses = jnp.asarray(jac @ jac.T), jnp.ones(3)
    w, state = jitted(losses, state, g)
    w_eager, eager_state = t.update(losses, eager_state, gramian=g)
    np.testing.assert_allclose(w, w_eager, rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state, eager_state)
    np.testing.assert_allclose(w, p * weights(name, p[:, None] * jac), rtol=1e-5, atol=1e-7)
    assert signature(state) == before
  assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_on_an_array_and_on_a_pytree(name):
  jac = random_jacobian(3, seed=9).astype(np.float32)
  w = weights(name, jac)
  d = W.aggregate(transform(name), jnp.asarray(jac))
  tree = W.aggregate(transform(name), {"a": jnp.asarray(jac[:, :3]), "b": jnp.asarray(jac[:, 3:].reshape(3, 2, 2))})
  np.testing.assert_allclose(d, jac.T @ w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.concatenate([tree["a"], tree["b"].ravel()]), jac.T @ w, rtol=1e-5, atol=1e-6)


def test_upgrad_preference_vector_by_chaining():
  """chain(static(K·p), upgrad()) gives torchjd's UPGrad(pref_vector=p): Σᵢ pᵢ Π(gᵢ)."""
  jac, p = random_jacobian(3, seed=11, shift=-0.5), np.array([0.2, 0.3, 0.5])
  with jax.enable_x64(True):
    t = W.chain(W.static(3 * p), W.upgrad())
    d = W.aggregate(t, jnp.asarray(jac))
  g = jac @ jac.T
  projections = [jac.T @ box_reference(g, np.eye(3)[i]) for i in range(3)]
  np.testing.assert_allclose(d, np.tensordot(p, projections, 1), rtol=1e-7)


def test_mgda_normalizations():
  jac = random_jacobian(3, seed=12).astype(np.float32)
  losses = np.array([0.5, 2.0, 1.0], np.float32)
  norms = np.linalg.norm(jac, axis=1)
  g = jac @ jac.T
  for normalization, n in [("l2", norms), ("loss", losses), ("loss+", losses * norms)]:
    t = W.mgda(normalization)
    w, _ = t.update(jnp.asarray(losses), (), gramian=jnp.asarray(g))
    # The weights are those of MGDA on gₖ/nₖ, applied to the raw losses (the authors' code).
    np.testing.assert_allclose(w, S.simplex_qp(jnp.asarray(g / np.outer(n, n))), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="normalization"):
    W.mgda("l1")


def test_nash_mtl_options():
  jac = random_jacobian(3, seed=13).astype(np.float32)
  g1, g2 = jnp.asarray(jac @ jac.T), jnp.asarray(4 * jac @ jac.T)
  t = W.nash_mtl(update_weights_every=2)
  w1, state = t.update(jnp.ones(3), t.init(3), gramian=g1)
  w2, state = t.update(jnp.ones(3), state, gramian=g2)  # reused
  w3, state = t.update(jnp.ones(3), state, gramian=g2)  # solved again
  np.testing.assert_allclose(w2, w1)
  np.testing.assert_allclose(w3, np.asarray(w1) / 2, rtol=1e-4)
  assert int(state.step) == 3
  t = W.nash_mtl(max_norm=0.5)
  w, _ = t.update(jnp.ones(3), t.init(3), gramian=g1)
  np.testing.assert_allclose(np.linalg.norm(jac.T @ np.asarray(w)), 0.5, rtol=1e-5)  # ‖d‖ = √3 before the cap
  t = W.nash_mtl(normalize_gramian=True)
  w, _ = t.update(jnp.ones(3), t.init(3), gramian=g1)
  np.testing.assert_allclose(w, weights("nash_mtl", jac) * np.linalg.norm(jac @ jac.T) ** 0.5, rtol=1e-4)
  for bad in (dict(max_norm=0.0), dict(update_weights_every=0)):
    with pytest.raises(ValueError, match="nash_mtl"):
      W.nash_mtl(**bad)


@pytest.mark.parametrize("name", NAMES)
def test_needs_the_gramian(name):
  t = transform(name)
  assert t.needs == "gramian"
  with pytest.raises(ValueError, match="gramian"):
    t.update(jnp.ones(2), t.init(2))
  with pytest.raises(ValueError, match="gramian"):
    t.update(jnp.ones(2), t.init(2), gramian=jnp.eye(3))
