"""Gramian-level weightings (MGDA, UPGrad, DualProj, CAGrad, Nash-MTL) and their K×K solvers: the math.

References are closed forms, brute-force solutions in float64 numpy, and torchjd's documented examples. The solvers
are jitted per input signature, so the tests call the transforms eagerly and reuse the compiled solvers. The contract
every method keeps (jit, retrace, state, degenerate inputs, no conflict, permutations, chaining, bad inputs) is in
test_weighting_contract.py.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmtl import weighting as W
from jmtl.weighting import _solvers as S
from tests._asserts import compiled
from tests._asserts import problem
from tests._asserts import random_jacobian as _random_jacobian

# name -> (factory, arguments): the arguments of the contract suite, so that the jitted updates are shared with it.
# Every one is a linear combination Jᵀw computed from G alone.
FACTORIES = {
  "mgda": (W.mgda, {}),
  "upgrad": (W.upgrad, {}),
  "dualproj": (W.dualproj, {}),
  "cagrad": (W.cagrad, {"c": 0.5}),
  "nash_mtl": (W.nash_mtl, {}),
}
NAMES = sorted(FACTORIES)


def transform(name):
  factory, args = FACTORIES[name]
  return compiled(factory, **args)


def weights(name, jac, losses=None, *, jitted=False):
  """Weights of a fresh transform for the Jacobian ``jac`` (numpy, K × P), in jac's dtype: eagerly, which reuses
  the solvers compiled per Gramian shape across methods and tests, or with the update the contract suite jits for
  the same kind of problem."""
  t, update, _ = transform(name)
  losses = np.ones(len(jac), jac.dtype) if losses is None else np.asarray(losses, jac.dtype)
  if jitted:
    p = problem("gramian", losses, jac)
    w, _ = update(p.losses, t.init(len(jac)), **p.inputs)
  else:
    jac = jnp.asarray(jac)
    w, _ = t.update(jnp.asarray(losses), t.init(jac.shape[0]), gramian=jac @ jac.T)
  return np.asarray(w, np.float64)


def random_jacobian(k, p=7, seed=0, shift=0.5):
  return _random_jacobian(k, p, seed=seed, shift=shift, dtype=np.float64)


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


# --- scale, one task, aggregation, preferences and options ---------------------------------------------------------


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


def test_k1_is_the_task_gradient():
  jac = np.array([[3.0, 4.0]], np.float32)  # jitted: the contract suite compiles K = 1 already
  for name in ("mgda", "upgrad", "dualproj"):
    np.testing.assert_allclose(weights(name, jac, jitted=True), [1.0], rtol=1e-5)
  np.testing.assert_allclose(weights("cagrad", jac, jitted=True), [1.5 / 1.25], rtol=1e-5)  # (1 + c) g, ÷ (1 + c²)
  np.testing.assert_allclose(weights("nash_mtl", jac, jitted=True), [0.2], rtol=1e-5)  # α = 1/‖g‖


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_on_an_array_and_on_a_pytree(name):
  jac = random_jacobian(3, seed=9).astype(np.float32)
  w = weights(name, jac)
  t = transform(name).transform
  d = W.aggregate(t, jnp.asarray(jac))
  tree = W.aggregate(t, {"a": jnp.asarray(jac[:, :3]), "b": jnp.asarray(jac[:, 3:].reshape(3, 2, 2))})
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


def _nash_reference(g):
  """``α > 0`` with ``G α = 1/α``, by Newton on ``F(α) = Gα − 1/α`` in float64 (independent of jmtl's solver)."""
  a = 1 / np.sqrt(np.diag(g))
  for _ in range(200):
    step = np.linalg.solve(g + np.diag(1 / a**2), g @ a - 1 / a)
    t = 1.0
    while np.any(a - t * step <= 0):  # stay in α > 0
      t /= 2
    a = a - t * step
  assert np.allclose(g @ a, 1 / a, rtol=1e-10)
  return a


@pytest.mark.parametrize("scale", [1.0, 1e-2, 1e2])
def test_nash_mtl_normalize_gramian_keeps_the_papers_alpha(scale):
  """The authors' code normalises G but keeps the factor in its constraints: α solves Gα = 1/α on the raw G."""
  jac = scale * random_jacobian(4, seed=14)
  g = jac @ jac.T
  want = _nash_reference(g)
  with jax.enable_x64(True):
    for normalize in (False, True):
      t = W.nash_mtl(normalize_gramian=normalize)
      w, _ = t.update(jnp.ones(4), t.init(4), gramian=jnp.asarray(g))
      np.testing.assert_allclose(w, want, rtol=1e-8)
      np.testing.assert_allclose(np.linalg.norm(jac.T @ np.asarray(w)), 2.0, rtol=1e-8)  # ‖d‖ = √K
      t = W.nash_mtl(normalize_gramian=normalize, max_norm=1.0)
      w, _ = t.update(jnp.ones(4), t.init(4), gramian=jnp.asarray(g))
      np.testing.assert_allclose(w, want / 2, rtol=1e-8)  # the cap scales ‖d‖ = 2 down to 1 at any scale
  # float32, the step's usual dtype: the same α to float32 accuracy, with and without the option.
  for normalize in (False, True):
    t = W.nash_mtl(normalize_gramian=normalize)
    w, _ = t.update(jnp.ones(4, jnp.float32), t.init(4), gramian=jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(w, want, rtol=1e-4)


# --- float32 accuracy on ill-conditioned Gramians ------------------------------------------------------------------

# name -> {condition: (relative error of the step length ‖Jᵀw‖, direction error in degrees)} with jax_enable_x64 off:
# the bounds each method's docstring states ("Float32 accuracy"), against the same method in float64, which
# test_float64_solutions_match_brute_force_on_ill_conditioned_gramians checks against brute-force solutions at the
# same conditions for MGDA, UPGrad, DualProj and Nash-MTL (the other methods: brute force or closed forms on
# well-conditioned problems, above and in test_weighting_projection.py).
FLOAT32_BOUNDS = {
  "mgda": {1: (1e-5, 0.05), 1e3: (1e-5, 0.05), 1e6: (1e-5, 0.5)},
  "upgrad": {1: (1e-5, 0.05), 1e3: (5e-5, 0.05), 1e6: (2e-3, 1.0)},
  "dualproj": {1: (1e-5, 0.05), 1e3: (1e-5, 0.05), 1e6: (5e-5, 1.0)},
  "cagrad": {1: (1e-5, 0.05), 1e3: (1e-5, 0.05), 1e6: (1e-5, 0.05)},
  "nash_mtl": {1: (3e-5, 0.05), 1e3: (5e-4, 0.05), 1e6: (5e-2, 1.0)},
  "imtl_g": {1: (1e-5, 0.05), 1e3: (2e-5, 0.05), 1e6: (7e-2, 20.0)},
  "config": {1: (1e-5, 0.05), 1e3: (5e-5, 0.05)},  # at 10⁶ float32 pinv drops the small singular values
  "aligned_mtl": {1: (1e-5, 0.05), 1e3: (1e-4, 0.05), 1e6: (1e-1, 1.0)},
  "pcgrad": {1: (1e-5, 0.05), 1e3: (1e-5, 0.05), 1e6: (1e-5, 0.05)},
  "gradvac": {1: (1e-5, 0.05), 1e3: (1e-5, 0.05), 1e6: (1e-5, 0.05)},
}
# The same with jax_enable_x64 on and a float32 Gramian: the K×K problem is solved in float64, and what is left is
# the float32 rounding of G itself.
X64_BOUNDS = {"aligned_mtl": 1e-2, "imtl_g": 2e-3}


def conditioned_gramian(k, cond, seed):
  """``G = J Jᵀ`` with eigenvalues log-spaced from 1 to ``1/cond`` in a random basis (float64)."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(k, k)))[0]
  jac = basis @ np.diag(np.logspace(0, -np.log10(cond) / 2, k)) @ np.linalg.qr(rng.normal(size=(k, k)))[0]
  return jac @ jac.T


def _step_errors(name, g, dtype):
  """(length error, angle in degrees) of ``name``'s direction for the Gramian ``g`` computed in ``dtype``."""
  losses = np.linspace(0.5, 2.0, len(g))

  def solve(dt):
    t = W.methods()[name]()
    w, _ = t.update(
      jnp.asarray(losses, dt), t.init(len(g)), gramian=jnp.asarray(g, dt), key=jax.random.key(0), step=jnp.int32(0)
    )
    return np.asarray(w, np.float64)

  with jax.enable_x64(True):
    ref = solve(jnp.float64)
  w = solve(dtype)
  n_ref, n = np.sqrt(ref @ g @ ref), np.sqrt(w @ g @ w)
  return abs(n - n_ref) / n_ref, np.degrees(np.arccos(np.clip((w @ g @ ref) / (n * n_ref), -1, 1)))


@pytest.mark.parametrize("name", sorted(FLOAT32_BOUNDS))
def test_float32_accuracy_on_ill_conditioned_gramians(name):
  for seed in range(3):
    for cond, (length_bound, angle_bound) in FLOAT32_BOUNDS[name].items():
      length, angle = _step_errors(name, conditioned_gramian(5, cond, seed), jnp.float32)
      assert length <= length_bound and angle <= angle_bound, (name, cond, seed, length, angle)
    g = conditioned_gramian(5, 1e6, seed).astype(np.float32).astype(np.float64)
    with jax.enable_x64(True):
      length, angle = _step_errors(name, g, jnp.float32)
    assert length <= X64_BOUNDS.get(name, 1e-5) and angle <= 0.1, (name, "x64", seed, length, angle)


def test_float64_solutions_match_brute_force_on_ill_conditioned_gramians():
  """The float64 references of the float32 bounds above, checked against independent solutions at 1, 10³, 10⁶."""
  k = 5
  references = {
    "mgda": simplex_reference,
    "upgrad": lambda g: np.mean([box_reference(g, np.eye(k)[i]) for i in range(k)], axis=0),
    "dualproj": lambda g: box_reference(g, np.full(k, 1 / k)),
    "nash_mtl": _nash_reference,
  }
  with jax.enable_x64(True):
    for cond in (1, 1e3, 1e6):
      g = conditioned_gramian(k, cond, seed=0)
      for name, reference in references.items():
        t = W.methods()[name]()
        w = np.asarray(t.update(jnp.ones(k), t.init(k), gramian=jnp.asarray(g))[0])
        ref = reference(g)
        n, n_ref = np.sqrt(w @ g @ w), np.sqrt(ref @ g @ ref)
        assert abs(n - n_ref) <= 1e-7 * n_ref, (name, cond, n, n_ref)
        assert (w @ g @ ref) / (n * n_ref) >= 1 - 1e-10, (name, cond)
