"""FairGrad, PCD, STCH and ExcessMTL, each against its definition.

References are written here in float64 numpy, independently of jmtl's solvers: a Newton solve of FairGrad's
equation and the α-fair utility it maximises, a brute-force enumeration of PCD's active sets, finite differences of
the smooth Tchebycheff loss, and a step-by-step re-implementation of ExcessMTL's update; when torch is installed, also
torchjd 0.18's FairGrad, PCD and ExcessMTL on the same inputs. The contract every method keeps (jit, retrace, state,
degenerate inputs, permutations, chaining, bad inputs, pmap) is in test_weighting_contract.py.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import weighting as W
from jmtl.weighting._allocation import alpha_fair_solve
from jmtl.weighting._allocation import alpha_fair_weights
from jmtl.weighting._allocation import priority_multipliers
from tests._asserts import random_jacobian
from tests._engine import TASKS
from tests._engine import apply
from tests._engine import make_batch
from tests._engine import make_params
from tests._engine import new_state


def jacobian64(k, p=6, seed=0, shift=0.3, spread=1.0):
  """A float64 Jacobian ``(k, p)``; row norms multiplied by factors log-uniform in ``[1/spread, spread]``."""
  scales = np.exp(np.random.default_rng(seed + 100).uniform(-np.log(spread), np.log(spread), (k, 1)))
  return random_jacobian(k, p, seed=seed, shift=shift, dtype=np.float64) * scales


_JITTED = {}


def jitted(transform):
  """``jax.jit(transform.update)``, one per method and arguments (its repr) for the module: compiling, not
  computing, is what costs time."""
  return _JITTED.setdefault(repr(transform), jax.jit(transform.update))


def weights_of(transform, gramian=None, losses=None, state=None, **inputs):
  """One jitted ``update`` from a fresh (or given) state, as float64 numpy, with the state."""
  k = len(gramian) if gramian is not None else len(losses)
  losses = jnp.ones(k) if losses is None else jnp.asarray(losses)
  if gramian is not None:
    inputs["gramian"] = jnp.asarray(gramian)
  state = transform.init(k) if state is None else state
  w, state = jitted(transform)(losses, state, **inputs)
  return np.asarray(w, np.float64), state


# --- FairGrad -------------------------------------------------------------------------------------------------------


def fair_reference(g, alpha):
  """``w > 0`` with ``G w = w^{-1/α}``: Newton on ``F(w) = Gw − w^{-1/α}`` with backtracking on ``‖F‖`` (not jmtl's
  potential, variables or steps)."""
  w = np.diag(g) ** (-alpha / (alpha + 1))
  merit = lambda v: np.linalg.norm(g @ v - v ** (-1 / alpha))
  for _ in range(200):
    f = g @ w - w ** (-1 / alpha)
    step = np.linalg.solve(g + np.diag(w ** (-1 / alpha - 1) / alpha), f)
    t = 1.0
    while t > 1e-12 and (np.any(w - t * step <= 0) or merit(w - t * step) > (1 - 1e-4 * t) * merit(w)):
      t /= 2
    w = w - t * step
    if np.max(np.abs(t * step / w)) < 1e-15:
      break
  assert backward_error(g, w, alpha) < 1e-13
  return w


def backward_error(g, w, alpha):
  """``max |(Gw)ₖ − wₖ^{-1/α}| / ((|G|w)ₖ + wₖ^{-1/α})``: the equation's residual at the scale of its terms."""
  rhs = w ** (-1 / alpha)
  return np.max(np.abs(g @ w - rhs) / (np.abs(g) @ w + rhs))


def utility(jac, d, alpha):
  """The α-fair utility ``Σₖ uₐ(gₖᵀd)`` of a direction (−∞ where a task gets no progress)."""
  x = jac @ d
  if np.any(x <= 0):
    return -np.inf
  return np.sum(np.log(x)) if alpha == 1 else np.sum(x ** (1 - alpha) / (1 - alpha))


def test_fairgrad_solves_its_equation():
  """In float64, the weights solve ``G w = w^{-1/α}`` to rounding and match an independent Newton solve, for
  gradient norms spread over two orders of magnitude; the solver takes a handful of steps."""
  with jax.enable_x64(True):
    for alpha, seed, k in itertools.product((0.5, 1.0, 2.0, 4.0), range(3), (2, 5)):
      jac = jacobian64(k, seed=seed, spread=10.0)
      g = jac @ jac.T
      w, steps = alpha_fair_solve(jnp.asarray(g), alpha)
      w = np.asarray(w)
      assert backward_error(g, w, alpha) < 1e-13 and steps <= 12, (alpha, seed, k, int(steps))
      np.testing.assert_allclose(w, fair_reference(g, alpha), rtol=1e-10)
    # The transform is the solver on the checked Gramian.
    np.testing.assert_allclose(weights_of(W.fairgrad(2.0), g)[0], alpha_fair_weights(jnp.asarray(g), 2.0), rtol=1e-15)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_direction_is_the_alpha_fair_point(alpha):
  """``d = Jᵀw`` maximises ``Σₖ uₐ(gₖᵀd)`` on the sphere ``‖d‖ = ‖Jᵀw‖``: the utility's gradient
  ``Σₖ (gₖᵀd)^{-α} gₖ`` is ``d`` itself, and no direction nearby on the sphere does better."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for seed in range(3):
      jac = jacobian64(3, p=6, seed=seed, shift=0.8)
      w = np.asarray(alpha_fair_weights(jnp.asarray(jac @ jac.T), alpha))
      d = jac.T @ w
      np.testing.assert_allclose(jac.T @ (jac @ d) ** -alpha, d, rtol=1e-10)
      best, r = utility(jac, d, alpha), np.linalg.norm(d)
      for _ in range(200):
        other = d + 0.05 * r * rng.normal(size=d.shape)
        assert utility(jac, r * other / np.linalg.norm(other), alpha) <= best + 1e-12


def test_fairgrad_alpha_one_is_proportional_fairness():
  """α = 1: ``G w = 1/w``, the Nash bargaining point (Nash-MTL's weights)."""
  with jax.enable_x64(True):
    for seed in range(3):
      jac = jacobian64(4, seed=seed, spread=10.0)
      g = jac @ jac.T
      w, _ = weights_of(W.fairgrad(), g)
      np.testing.assert_allclose(w * (g @ w), 1.0, rtol=1e-12)
      np.testing.assert_allclose(w, weights_of(W.nash_mtl(), g)[0], rtol=1e-10)


def test_fairgrad_degenerate_gramians():
  g0 = jacobian64(3, seed=4)
  fair = lambda jac, alpha: np.asarray(alpha_fair_weights(jnp.asarray(jac @ jac.T), alpha))  # α traced: one compile
  with jax.enable_x64(True):
    for alpha in (0.5, 2.0):
      e = -alpha / (alpha + 1)
      # K = 1: ‖g‖² w = w^{-1/α}; two identical tasks share 2‖g‖² w = w^{-1/α}.
      np.testing.assert_allclose(fair(g0[:1], alpha), [(g0[0] @ g0[0]) ** e], rtol=1e-13)
      np.testing.assert_allclose(fair(np.stack([g0[0], g0[0]]), alpha), (2 * g0[0] @ g0[0]) ** e, rtol=1e-12)
      # A zero gradient: a large, finite weight of its own, the others' weights as without it.
      jac = np.stack([g0[0], g0[1], 0 * g0[2]])
      w = fair(jac, alpha)
      assert np.all(np.isfinite(w)) and w[2] > 1e3 * max(w[:2])
      np.testing.assert_allclose(w[:2], fair(jac[:2], alpha), rtol=1e-12)
      # Opposite gradients (no solution): finite weights, and the direction is orthogonal to both (to the ridge).
      jac = np.stack([g0[0], -g0[0], g0[1]])
      w = fair(jac, alpha)
      d = jac.T @ w
      assert np.all(np.isfinite(w)) and abs(g0[0] @ d) < 1e-4 * np.linalg.norm(g0[0]) * np.linalg.norm(d)
      # G → cG scales the weights by c^{−α/(α+1)}.
      jac = jacobian64(3, seed=5)
      np.testing.assert_allclose(fair(1e2 * jac, alpha), 1e4**e * fair(jac, alpha), rtol=1e-12)
    # α = 0 is the limit w = 1, also when α is traced (inject_hyperparams).
    np.testing.assert_array_equal(weights_of(W.fairgrad(0.0), g0 @ g0.T)[0], np.ones(3))
    np.testing.assert_allclose(fair(g0, 0.0), np.ones(3))


def conditioned_gramian(k, cond, seed):
  """``G = J Jᵀ`` with eigenvalues log-spaced from 1 to ``1/cond`` in a random basis (float64)."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(k, k)))[0]
  jac = basis @ np.diag(np.logspace(0, -np.log10(cond) / 2, k)) @ np.linalg.qr(rng.normal(size=(k, k)))[0]
  return jac @ jac.T


# name -> (factory, {condition: (relative error of ‖Jᵀw‖, direction error in degrees)}) with jax_enable_x64 off,
# against the same method in float64: the bounds the docstrings state.
FLOAT32_BOUNDS = {
  "fairgrad": (lambda: W.fairgrad(2.0), {1: (1e-5, 0.05), 1e3: (5e-4, 0.05), 1e6: (5e-2, 0.5)}),
  "pcd": (lambda: W.pcd(0.2), {1: (1e-5, 0.05), 1e3: (1e-5, 0.05), 1e6: (1e-5, 0.05)}),
}


@pytest.mark.parametrize("name", sorted(FLOAT32_BOUNDS))
def test_float32_accuracy_on_ill_conditioned_gramians(name):
  factory, bounds = FLOAT32_BOUNDS[name]

  def errors(g, dtype):
    def solve(dt):
      return weights_of(factory(), jnp.asarray(g, dt), losses=jnp.ones(len(g), dt))[0]

    with jax.enable_x64(True):
      ref = solve(jnp.float64)
    w = solve(dtype)
    n_ref, n = np.sqrt(ref @ g @ ref), np.sqrt(w @ g @ w)
    return abs(n - n_ref) / n_ref, np.degrees(np.arccos(np.clip((w @ g @ ref) / (n * n_ref), -1, 1)))

  for seed in range(3):
    for cond, (length_bound, angle_bound) in bounds.items():
      length, angle = errors(conditioned_gramian(5, cond, seed), jnp.float32)
      assert length <= length_bound and angle <= angle_bound, (cond, seed, length, angle)
    if name == "fairgrad":
      g = conditioned_gramian(5, 1e6, seed).astype(np.float32).astype(np.float64)
      with jax.enable_x64(True):  # a float32 Gramian, the K×K problem in float64
        length, angle = errors(g, jnp.float32)
      assert length <= 1e-6 and angle <= 0.01, ("x64", seed, length, angle)


def test_fairgrad_against_torchjd():
  torch = pytest.importorskip("torch")
  from torchjd.aggregation import FairGradWeighting

  with jax.enable_x64(True):
    for alpha, seed in itertools.product((0.5, 1.0, 2.0), range(2)):
      jac = jacobian64(3, seed=seed, shift=0.5)
      g = jac @ jac.T
      theirs = FairGradWeighting(alpha)(torch.tensor(g)).numpy()
      np.testing.assert_allclose(alpha_fair_weights(jnp.asarray(g), alpha), theirs, rtol=1e-5)


# --- PCD ------------------------------------------------------------------------------------------------------------


def pcd_multipliers_reference(g, tau):
  """``[1, μ]`` of ``min ½‖d − g₁‖² s.t. gⱼᵀd ≥ τⱼ‖gⱼ‖²``, ``d = g₁ + Σ μⱼ gⱼ``: every active set's equality
  solution, the feasible one with the smallest objective; ``[1, 0, …]`` if none is feasible."""
  k = len(g)
  gs, b = g[1:, 1:], tau * np.diag(g)[1:] - g[1:, 0]
  best = (np.inf, None)
  for mask in itertools.product([False, True], repeat=k - 1):
    act = np.array(mask, bool)
    mu = np.zeros(k - 1)
    if act.any():
      mu[act] = np.linalg.lstsq(gs[np.ix_(act, act)], b[act], rcond=None)[0]
    slack = gs @ mu - b
    if np.all(mu >= -1e-12) and np.all(slack >= -1e-9 * np.max(np.diag(g))) and mu @ gs @ mu < best[0]:
      best = (mu @ gs @ mu, mu)
  return np.r_[1.0, np.zeros(k - 1) if best[1] is None else best[1]]


def pcd_reference(gramians, tau, beta=0.999, eps=1e-8):
  """PCD's weights along a sequence of Gramians, as torchjd's documentation defines them, in numpy."""
  ema, out = np.zeros(len(gramians[0])), []
  for n, g in enumerate(gramians, start=1):
    sq = np.diag(g)
    ema = beta * ema + (1 - beta) * sq
    s = 1 / np.sqrt(ema / (1 - beta**n) + eps)
    gs = g * np.outer(s, s)
    w = pcd_multipliers_reference(gs, tau)
    d2 = w @ gs @ w
    out.append(w * s * np.sqrt(sq[0] / d2) if sq[0] > 0 else np.zeros_like(w))
  return out


def run_pcd(transform, gramians):
  state, ws = transform.init(len(gramians[0])), []
  for g in gramians:
    w, state = weights_of(transform, g, state=state)
    ws.append(w)
  return ws, state


def test_pcd_against_brute_force_and_its_kkt_conditions():
  tau = np.array([0.2, 0.05, 0.3])
  with jax.enable_x64(True):
    for seed in range(3):
      jacs = [jacobian64(4, seed=10 * seed + i, shift=-0.4, spread=3.0) for i in range(3)]
      gramians = [j @ j.T for j in jacs]
      ws, state = run_pcd(W.pcd(tuple(tau), beta=0.9), gramians)
      for w, want, jac in zip(ws, pcd_reference(gramians, tau, beta=0.9), jacs):
        np.testing.assert_allclose(w, want, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(jac.T @ w), np.linalg.norm(jac[0]), rtol=1e-12)  # ‖d‖ = ‖g₁‖
      # KKT of the last call, in the normalised gradients g̃ = s g: μ ≥ 0, feasible, complementary.
      s = 1 / np.sqrt(np.asarray(state.sq_norm_ema) / (1 - 0.9**3) + 1e-8)
      jt = jacs[-1] * s[:, None]
      mu = ws[-1][1:] / ws[-1][0] * s[0] / s[1:]
      d = jt[0] + mu @ jt[1:]
      slack = jt[1:] @ d - tau * np.sum(jt[1:] ** 2, axis=1)
      assert np.all(mu >= 0) and np.all(slack >= -1e-10) and np.all(np.abs(mu * slack) < 1e-10), (mu, slack)


def test_pcd_documented_properties():
  g0 = jacobian64(3, seed=7)
  with jax.enable_x64(True):
    # No secondary task conflicts (g₁ itself gives each at least τ of its progress): d = g₁.
    jac = np.stack([g0[0], g0[0] + 0.1 * g0[1], g0[0] - 0.1 * g0[2]])
    np.testing.assert_allclose(weights_of(W.pcd(0.2), jac @ jac.T)[0], [1.0, 0.0, 0.0], rtol=1e-14, atol=0)
    # Two opposite secondary gradients cannot both progress: the constraints are dropped, d = g₁.
    jac = np.stack([g0[0], g0[1], -g0[1]])
    np.testing.assert_allclose(weights_of(W.pcd(0.2), jac @ jac.T)[0], [1.0, 0.0, 0.0], rtol=1e-14, atol=0)
    # …but with τ = 0 they can (gⱼᵀd = 0): the primary projected off them.
    w, _ = weights_of(W.pcd(0.0), jac @ jac.T)
    assert abs(g0[1] @ (jac.T @ w)) < 1e-12 * np.linalg.norm(g0[1]) * np.linalg.norm(g0[0])
    # A zero primary gradient, or d̃ = 0 (the secondary exactly opposite and τ = 0): zero weights.
    jac = np.stack([0 * g0[0], g0[1], g0[2]])
    np.testing.assert_array_equal(weights_of(W.pcd(0.2), jac @ jac.T)[0], np.zeros(3))
    jac = np.stack([g0[0], -2 * g0[0]])
    np.testing.assert_array_equal(weights_of(W.pcd(0.0), jac @ jac.T)[0], np.zeros(2))
    # K = 1: the primary gradient.
    np.testing.assert_allclose(weights_of(W.pcd(0.2), g0[:1] @ g0[:1].T)[0], [1.0], rtol=1e-14)
    # A non-finite Gramian: nan weights, the moving average and the count unchanged.
    t = W.pcd(0.2)
    _, state = weights_of(t, g0 @ g0.T)
    bad = (g0 @ g0.T).copy()
    bad[1, 2] = bad[2, 1] = np.inf
    w, after = weights_of(t, bad, state=state)
    assert np.all(np.isnan(w)) and np.asarray(after.count).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(after.sq_norm_ema, state.sq_norm_ema)


def test_pcd_secondary_rows_are_scale_free():
  """A secondary gradient multiplied by the same constant at every call: the direction does not change (ε = 0)."""
  jacs = [jacobian64(3, seed=20 + i, shift=-0.5) for i in range(4)]
  c = np.array([1.0, 1e3, 1e-2])[:, None]
  with jax.enable_x64(True):
    ws, _ = run_pcd(W.pcd(0.3, eps=0.0), [j @ j.T for j in jacs])
    ws_scaled, _ = run_pcd(W.pcd(0.3, eps=0.0), [(c * j) @ (c * j).T for j in jacs])
  for w, w_scaled, j in zip(ws, ws_scaled, jacs):
    np.testing.assert_allclose((c * j).T @ w_scaled, j.T @ w, rtol=1e-10)


def test_pcd_qp_solver_matches_brute_force():
  with jax.enable_x64(True):
    for seed, k in itertools.product(range(4), (2, 3, 5)):
      jac = jacobian64(k, seed=seed, shift=-0.5, spread=5.0)
      g = jac @ jac.T
      tau = np.random.default_rng(seed).uniform(0, 0.5, k - 1)
      got = np.asarray(priority_multipliers(jnp.asarray(g), jnp.asarray(tau)))
      np.testing.assert_allclose(got, pcd_multipliers_reference(g, tau), rtol=1e-9, atol=1e-12)


def test_pcd_against_torchjd():
  torch = pytest.importorskip("torch")
  from torchjd.aggregation import PCDWeighting

  g0 = jacobian64(4, seed=30)
  jacs = [jacobian64(4, seed=31 + i, shift=-0.5, spread=4.0) for i in range(3)]
  jacs += [np.stack([g0[0], g0[1], -g0[1], g0[2]]), np.stack([g0[0], g0[0], g0[0], g0[0]])]  # infeasible; no conflict
  tau = (0.1, 0.3, 0.02)
  theirs = PCDWeighting(tau=torch.tensor(tau, dtype=torch.float64), beta=0.9, eps=1e-8)
  with jax.enable_x64(True):
    ws, _ = run_pcd(W.pcd(tau, beta=0.9), [j @ j.T for j in jacs])
  for w, j in zip(ws, jacs):
    np.testing.assert_allclose(w, theirs(torch.tensor(j @ j.T)).numpy(), rtol=1e-8, atol=1e-12)


# --- STCH -----------------------------------------------------------------------------------------------------------


def stch_objective(losses, nadir, mu, eps=1e-20):
  """``K μ log Σₖ exp(log(Lₖ/nₖ + eps)/μ)`` in float64 numpy."""
  x = np.log(losses / nadir + eps) / mu
  return len(losses) * mu * (np.max(x) + np.log(np.sum(np.exp(x - np.max(x)))))


def stch_reference_jax(losses, nadir, mu):
  """The authors' loss, transcribed (the max subtracted as a constant): its gradient is what they back-propagate."""
  logs = jnp.log(losses / nadir + 1e-20)
  reg = logs - jax.lax.stop_gradient(jnp.max(logs))
  return mu * jnp.log(jnp.sum(jnp.exp(reg / mu))) * losses.shape[0]


def run_losses(transform, sequence):
  state, ws = transform.init(len(sequence[0])), []
  for losses in sequence:
    w, state = weights_of(transform, losses=losses, state=state)
    ws.append(w)
  return ws, state


@pytest.mark.parametrize("mu", [0.1, 1.0, 5.0])
def test_stch_weights_are_the_gradient_of_the_smoothed_tchebycheff_loss(mu):
  rng = np.random.default_rng(0)
  seq = rng.uniform(0.05, 3.0, (6, 4))
  with jax.enable_x64(True):
    ws, state = run_losses(W.stch(mu, warmup_steps=0, nadir_steps=1), seq)
    nadir = seq[0]
    np.testing.assert_allclose(state.loss_sum, nadir, rtol=1e-15)
    for losses, w in zip(seq[1:], ws[1:]):
      h = 1e-6 * losses
      fd = [
        (stch_objective(losses + h * e, nadir, mu) - stch_objective(losses - h * e, nadir, mu)) / (2 * h @ e)
        for e in np.eye(4)
      ]
      np.testing.assert_allclose(w, fd, rtol=1e-7, atol=1e-9 * np.max(w))
      grad = jax.grad(stch_reference_jax)(jnp.asarray(losses), jnp.asarray(nadir), mu)
      np.testing.assert_allclose(w, grad, rtol=1e-12)


def test_stch_warmup_records_the_mean_loss_as_nadir():
  rng = np.random.default_rng(1)
  seq = rng.uniform(0.1, 2.0, (8, 3))
  with jax.enable_x64(True):
    t = W.stch(0.5, warmup_steps=2, nadir_steps=3)
    ws, state = run_losses(t, seq)
    for losses, w in zip(seq[:5], ws[:5]):  # ∂/∂L Σ log(L + eps)
      np.testing.assert_allclose(w, 1 / losses, rtol=1e-14)
    nadir = seq[2:5].mean(0)
    np.testing.assert_allclose(np.asarray(state.loss_sum) / 3, nadir, rtol=1e-14)
    assert int(state.count) == 5  # saturated after the warm-up
    for losses, w in zip(seq[5:], ws[5:]):
      grad = jax.grad(stch_reference_jax)(jnp.asarray(losses), jnp.asarray(nadir), 0.5)
      np.testing.assert_allclose(w, grad, rtol=1e-12)


def test_stch_limits_and_scale():
  rng = np.random.default_rng(2)
  seq = rng.uniform(0.1, 2.0, (3, 3))
  with jax.enable_x64(True):
    # μ → ∞: the warm-up's log-loss weights; μ → 0: all on the task with the largest L/n (the Tchebycheff max).
    w_big = run_losses(W.stch(1e6, warmup_steps=0), seq)[0][-1]
    np.testing.assert_allclose(w_big, 1 / seq[-1], rtol=1e-5)
    w_small = run_losses(W.stch(1e-3, warmup_steps=0), seq)[0][-1]
    top = np.argmax(seq[-1] / seq[0])
    np.testing.assert_allclose(w_small[top] * seq[-1][top], 3.0, rtol=1e-6)
    assert np.all(np.delete(w_small, top) < 1e-20)
    # A task's losses scaled by c at every call (nadir included): its weight scales by 1/c, the others' are unchanged.
    c = np.array([1.0, 1e4, 1e-3])
    np.testing.assert_allclose(
      run_losses(W.stch(0.7, warmup_steps=0), seq * c)[0][-1] * c,
      run_losses(W.stch(0.7, warmup_steps=0), seq)[0][-1],
      rtol=1e-12,
    )


def test_stch_degenerate_losses():
  with jax.enable_x64(True):
    t = W.stch(1.0, warmup_steps=0)
    # K = 1: softmax of one task is 1, w = 1/(L + eps·n).
    ws, _ = run_losses(t, np.array([[2.0], [0.5]]))
    np.testing.assert_allclose(ws[1], [2.0], rtol=1e-14)
    # Identical tasks: equal weights; a zero loss (and a zero nadir): large but finite.
    ws, _ = run_losses(t, np.array([[1.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 1.0]]))
    assert all(np.all(np.isfinite(w)) for w in ws)
    np.testing.assert_allclose(ws[1][0], ws[1][1], rtol=1e-15)
    np.testing.assert_allclose(ws[0][2], 1e20, rtol=1e-12)
    assert ws[1][2] > 1e19
  ws, _ = run_losses(t, np.array([[0.0, 1.0], [0.0, 1e-30]], np.float32))  # float32: capped, finite
  assert all(np.all(np.isfinite(w)) for w in ws)


# --- ExcessMTL ------------------------------------------------------------------------------------------------------


def excess_reference(jacobians, step_size, eps=1e-7):
  """The weights of every call of the authors' update, from per-task Jacobians ``(K, P)``, in float64 numpy."""
  k = len(jacobians[0])
  weights, total, initial, out = np.ones(k), np.zeros_like(jacobians[0]), None, []
  for jac in jacobians:
    total = total + jac**2
    excess = np.sum(jac**2 / np.sqrt(total + eps), axis=1)
    if initial is None:
      initial = excess
    else:
      weights = weights * np.exp(step_size * excess / initial)
      weights = k * weights / weights.sum()
    out.append(weights)
  return out


def flat(tree):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1)


def run_excess(transform, jacobians):
  k = jax.tree.leaves(jacobians[0])[0].shape[0]
  state = W.init_state(transform, k, jax.tree.map(lambda x: x[0], jacobians[0]))
  ws = []
  for jac in jacobians:
    w, state = jitted(transform)(jnp.ones(k), state, jacobian=jac)
    ws.append(np.asarray(w, np.float64))
  return ws, state


def test_excess_mtl_against_a_numpy_reimplementation():
  rng = np.random.default_rng(3)
  scales = np.array([1.0, 0.1, 5.0])[:, None]
  jacobians = [scales * rng.normal(size=(3, 7)) * np.array([[0.8**i], [1.0], [0.9**i]]) for i in range(6)]
  # As a pytree {"a": (3, 4), "b": (3, 1, 3)}: the estimate sums over leaves.
  trees = [{"a": j[:, :4], "b": j[:, 4:].reshape(3, 1, 3)} for j in jacobians]
  want = excess_reference(jacobians, 0.5)
  with jax.enable_x64(True):
    ws, state = run_excess(W.excess_mtl(0.5), [jax.tree.map(jnp.asarray, t) for t in trees])
    for w, ref in zip(ws, want):
      np.testing.assert_allclose(w, ref, rtol=1e-12)
    np.testing.assert_allclose(flat(state.sq_grad_sum), sum(j**2 for j in jacobians), rtol=1e-14)
    assert all(abs(w.sum() - 3) < 1e-12 for w in ws)
  ws, _ = run_excess(W.excess_mtl(0.5), [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in trees])
  for w, ref in zip(ws, want):
    np.testing.assert_allclose(w, ref, rtol=1e-5)


def test_excess_mtl_degenerate_gradients():
  g = jacobian64(3, seed=40)
  with jax.enable_x64(True):
    for jacs in (
      [np.stack([g[0], g[0], g[1]])] * 3,  # identical tasks: identical weights
      [np.stack([g[0], -g[0], g[1]])] * 3,  # opposite tasks: the same squares, identical weights
    ):
      ws, _ = run_excess(W.excess_mtl(1.0), [jnp.asarray(j) for j in jacs])
      np.testing.assert_allclose(ws[-1][0], ws[-1][1], rtol=1e-15)
      np.testing.assert_allclose(ws[-1], excess_reference(jacs, 1.0)[-1], rtol=1e-12)
    # K = 1: always 1.
    ws, _ = run_excess(W.excess_mtl(1.0), [jnp.asarray(g[:1])] * 3)
    np.testing.assert_array_equal(np.concatenate(ws), np.ones(3))
    # A zero gradient at the first call: no estimate to normalise by; the ratio is capped, the weights stay finite.
    jacs = [np.stack([g[0], 0 * g[1], g[2]]), g, g]
    ws, _ = run_excess(W.excess_mtl(1e-2), [jnp.asarray(j) for j in jacs])
    assert all(np.all(np.isfinite(w)) and abs(w.sum() - 3) < 1e-12 for w in ws)
    np.testing.assert_allclose(ws[-1], [0, 3, 0], atol=1e-12)


def test_excess_mtl_state_is_k_copies_of_the_selected_gradient():
  shared = {"dense_0": np.zeros((2, 3), np.float32), "dense_1": np.zeros(4, np.float32)}
  state = W.init_state(W.excess_mtl(), 3, shared)
  assert jax.tree.map(np.shape, state.sq_grad_sum) == {"dense_0": (3, 2, 3), "dense_1": (3, 4)}
  t = W.excess_mtl(select=W.last_layer)
  assert t.select is W.last_layer and t.requires == ("gradient_shapes",)
  assert jax.tree.map(np.shape, W.init_state(t, 3, shared).sq_grad_sum) == {"dense_1": (3, 4)}
  with pytest.raises(ValueError, match="shapes"):
    t.init(3)


def test_excess_mtl_in_the_train_step():
  """``TrainState.create`` sizes the accumulator from the shared parameters; after two steps it holds the squared
  per-task gradients of the shared parameters, and the step's weights are the reference update's."""

  def task_losses(p, batch):
    pred, y, m = apply(p, batch["inputs"]), batch["labels"], batch["masks"]["b"]
    la = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(pred["a"]), y["a"][:, None], 1))
    lb = jnp.sum(m * (pred["b"] - y["b"]) ** 2) / jnp.sum(m)
    z = pred["c"]
    lc = jnp.mean(jnp.maximum(z, 0) - z * y["c"] + jnp.log1p(jnp.exp(-jnp.abs(z))))
    return jnp.stack([la, lb, lc])

  with jax.enable_x64(True):
    state = new_state(make_params(jnp.float64), optax.sgd(0.5), W.excess_mtl(step_size=1.0))
    step = jax.jit(jmtl.make_train_step(apply, TASKS))
    jacobians = []
    jac_fn = jax.jit(jax.jacrev(lambda s, p, b: task_losses({**p, "shared": s}, b)))  # one compile, not op by op
    for seed in range(2):
      batch = make_batch(dtype=jnp.float64, seed=seed)
      jacobians.append(flat(jac_fn(state.params["shared"], state.params, batch)))
      state, metrics = step(state, batch)
    np.testing.assert_allclose(flat(state.weighting_state.sq_grad_sum), sum(j**2 for j in jacobians), rtol=1e-10)
    np.testing.assert_allclose(metrics.per_task["weight"], excess_reference(jacobians, 1.0)[-1], rtol=1e-10)


def test_excess_mtl_against_torchjd():
  """torchjd's weights sum to 1 and take a first step with the raw first estimate: with equal first estimates (rows
  that are permutations and sign flips of one another) that step is uniform, and the weights are jmtl's / K."""
  torch = pytest.importorskip("torch")
  from torchjd.aggregation import ExcessMTLWeighting

  rng = np.random.default_rng(5)
  v = rng.normal(size=6)
  first = np.stack([v, -v[::-1], np.roll(v, 2)])
  jacs = [first] + [rng.normal(size=(3, 6)) * np.array([[1.0], [0.3], [2.0]]) for _ in range(4)]
  theirs = ExcessMTLWeighting(robust_step_size=0.5)
  with jax.enable_x64(True):
    ws, _ = run_excess(W.excess_mtl(0.5), [jnp.asarray(j) for j in jacs])
  for w, j in zip(ws, jacs):
    np.testing.assert_allclose(w / 3, theirs(torch.tensor(j)).numpy(), rtol=1e-6)
