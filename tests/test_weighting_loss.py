"""Loss-level weightings: the transform contract for all of them, then each method against a reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from jmtl import weighting as W

# name -> (factory(num_tasks) -> transform, behaviour under a permutation of the tasks):
# "equivariant": weights permute with the losses; "invariant": weights ignore the losses
# (rlw: they depend on the key only); None: neither (static weights are tied to task positions).
TRANSFORMS = {
  "equal": (lambda k: W.equal(), "equivariant"),
  "static": (lambda k: W.static(np.linspace(0.5, 1.5, k)), None),
  "uncertainty": (lambda k: W.uncertainty(), "equivariant"),
  "imtl_l": (lambda k: W.imtl_l(), "equivariant"),
  "famo": (lambda k: W.famo(min_losses=0.05), "equivariant"),
  "dwa": (lambda k: W.dwa(temperature=0.5, period=2), "equivariant"),
  "rlw": (lambda k: W.rlw(), "invariant"),
  "gls": (lambda k: W.gls(), "equivariant"),
}
NAMES = sorted(TRANSFORMS)


@functools.cache
def transform(name, k):
  """The transform and its jitted update, shared by the tests so that each compiles once per input signature."""
  t = TRANSFORMS[name][0](k)
  return t, jax.jit(t.update)


def loss_sequence(k, n=7, seed=0):
  return np.random.default_rng(seed).uniform(0.1, 2.0, (n, k)).astype(np.float32)


def run(update, state, seq, seed=0):
  """Applies ``update`` along ``seq``; returns the stacked weights and the final state."""
  ws = []
  for i, losses in enumerate(seq):
    w, state = update(jnp.asarray(losses), state, key=jax.random.key(seed + i))
    ws.append(w)
  return np.stack(ws), state


def signature(tree):
  leaves = jax.tree.leaves(tree)
  return jax.tree.structure(tree), [(x.shape, x.dtype, jax.typeof(x).weak_type) for x in leaves]


# --- the contract, for every transform -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
  t, jitted = transform(name, 3)
  seq = loss_sequence(3)
  w_eager, s_eager = run(t.update, t.init(3), seq)
  w_jit, s_jit = run(jitted, t.init(3), seq)
  np.testing.assert_allclose(w_jit, w_eager, rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s_jit, s_eager)


@pytest.mark.parametrize("name", NAMES)
def test_no_retrace_stable_state_and_losses_dtype(name):
  t, _ = transform(name, 3)
  traces = []

  def two_steps(losses, state, key):
    traces.append(None)  # runs once per trace, never when the compiled step is reused
    k1, k2 = jax.random.split(key)
    w1, state = t.update(losses, state, key=k1)
    w2, state = t.update(0.9 * losses, state, key=k2)
    return w1 + w2, state

  step = jax.jit(two_steps)
  state = t.init(3)
  before = signature(state)
  # bfloat16 losses: the weights follow the losses' dtype, the state keeps its own dtypes.
  for i, losses in enumerate(loss_sequence(3, n=3)):
    w, state = step(jnp.asarray(losses, jnp.bfloat16), state, jax.random.key(i))
    assert w.dtype == jnp.bfloat16
  assert len(traces) == 1
  assert signature(state) == before


EXTREMES = {
  1: [[1e-8], [1e8], [1.0], [1e8], [1e-8], [1e8], [1.0], [1e-8]],
  3: [
    [1e-8, 1e8, 1.0],
    [1e8, 1e-8, 1.0],
    [1e-8, 1e-8, 1e8],
    [1.0, 1e8, 1e-8],
    [1e8, 1e8, 1e-8],
    [1e-8, 1.0, 1e8],
    [1e8, 1e-8, 1e-8],
    [1.0, 1.0, 1e8],
  ],
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_finite_weights_for_extreme_losses(name, k):
  t, jitted = transform(name, k)
  ws, state = run(jitted, t.init(k), np.asarray(EXTREMES[k], np.float32))
  assert ws.shape == (len(EXTREMES[k]), k) and ws.dtype == np.float32
  assert np.all(np.isfinite(ws)), ws
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", [n for n in NAMES if TRANSFORMS[n][1] is not None])
def test_permutation(name):
  k, perm = 3, np.array([2, 0, 1])
  seq = loss_sequence(k)
  t, jitted = transform(name, k)
  w, _ = run(jitted, t.init(k), seq)
  w_perm, _ = run(jitted, t.init(k), seq[:, perm])
  expected = w[:, perm] if TRANSFORMS[name][1] == "equivariant" else w
  np.testing.assert_allclose(w_perm, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_chains_with_a_user_transform_under_jit(name):
  focus = W.stateless(lambda losses, **_: jax.nn.softmax(losses))  # a user's own weighting
  k = 3
  base, base_update = transform(name, k)
  chained = W.chain(base, focus)
  update = jax.jit(chained.update)
  state, base_state = chained.init(k), base.init(k)
  for i, losses in enumerate(jnp.asarray(loss_sequence(k, n=4))):
    key = jax.random.key(i)
    w, state = update(losses, state, key=key)
    w_base, base_state = base_update(losses, base_state, key=jax.random.split(key, 2)[0])
    np.testing.assert_allclose(w, w_base * jax.nn.softmax(w_base * losses), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["uncertainty", "imtl_l", "famo", "dwa"])
def test_wrong_number_of_tasks_is_rejected(name):
  t, _ = transform(name, 3)
  with pytest.raises(ValueError, match="tasks"):
    t.update(jnp.ones(2), t.init(3))


# --- method references -----------------------------------------------------------------------------------------------


def test_uncertainty_two_sgd_steps_against_closed_form():
  lr, s = 0.1, np.array([0.0, 0.5, -1.0])
  t = W.uncertainty(optax.sgd(lr), init_log_var=0.0)
  state = t.init(3)._replace(log_vars=jnp.asarray(s, jnp.float32))
  for losses in (np.array([1.0, 2.0, 0.5]), np.array([0.7, 2.5, 0.1])):
    w, state = t.update(jnp.asarray(losses, jnp.float32), state)
    np.testing.assert_allclose(w, 0.5 * np.exp(-s), rtol=1e-6)
    # The weights are ∂/∂L of the joint objective at the current s, so the θ-step is its θ-gradient.
    objective = lambda s_, l_: jnp.sum(0.5 * jnp.exp(-s_) * l_ + 0.5 * s_)
    np.testing.assert_allclose(w, jax.grad(objective, 1)(jnp.asarray(s), jnp.asarray(losses)), rtol=1e-6)
    s = s - lr * (-0.5 * np.exp(-s) * losses + 0.5)
    np.testing.assert_allclose(state.log_vars, s, rtol=1e-6)


def test_uncertainty_default_optimizer_is_adam():
  t = W.uncertainty(init_log_var=1.0)
  w, state = t.update(jnp.array([5.0, 0.1]), t.init(2))
  np.testing.assert_allclose(w, 0.5 * np.exp(-1.0) * np.ones(2), rtol=1e-6)
  # Adam's first step is −lr·sign(g): g = ½ − ½ e⁻¹ L is < 0 for L = 5 and > 0 for L = 0.1.
  np.testing.assert_allclose(state.log_vars, [1.001, 0.999], rtol=1e-6)


def test_imtl_l_two_steps_against_closed_form():
  lr, s = 0.05, np.zeros(3)
  t = W.imtl_l(optax.sgd(lr))
  state = t.init(3)
  for losses in (np.array([1.0, 2.0, 0.5]), np.array([0.7, 2.5, 0.1])):
    w, state = t.update(jnp.asarray(losses, jnp.float32), state)
    np.testing.assert_allclose(w, np.exp(s), rtol=1e-6)
    s = s - lr * (np.exp(s) * losses - 1.0)
    np.testing.assert_allclose(state.log_scales, s, rtol=1e-6)


def dwa_reference(seq, temperature, period):
  k = seq.shape[1]
  means = [seq[p * period : (p + 1) * period].astype(np.float64).mean(0) for p in range(len(seq) // period)]
  out = []
  for i in range(len(seq)):
    p = i // period
    if p < 2:
      out.append(np.ones(k))
    else:
      r = means[p - 1] / means[p - 2]
      e = np.exp(r / temperature)
      out.append(k * e / e.sum())
  return np.stack(out)


@pytest.mark.parametrize(("temperature", "period"), [(2.0, 1), (0.7, 3)])
def test_dwa_against_brute_force(temperature, period):
  seq = loss_sequence(3, n=11, seed=1)
  t = W.dwa(temperature, period)
  w, _ = run(jax.jit(t.update), t.init(3), seq)
  np.testing.assert_allclose(w, dwa_reference(seq, temperature, period), rtol=1e-5)


def test_dwa_rejects_bad_hyperparameters():
  with pytest.raises(ValueError, match="temperature"):
    W.dwa(temperature=0.0)
  with pytest.raises(ValueError, match="period"):
    W.dwa(period=1.5)


def test_rlw_is_softmax_of_a_normal_draw():
  t = W.rlw()
  w0, _ = t.update(jnp.ones(4), t.init(4), key=jax.random.key(0))
  w1, _ = t.update(jnp.ones(4), t.init(4), key=jax.random.key(1))
  np.testing.assert_allclose(w0, jax.nn.softmax(jax.random.normal(jax.random.key(0), (4,))), rtol=1e-6)
  assert not np.allclose(w0, w1)
  u, _ = W.rlw("uniform").update(jnp.ones(4), (), key=jax.random.key(2))
  np.testing.assert_allclose(u, jax.nn.softmax(jax.random.uniform(jax.random.key(2), (4,))), rtol=1e-6)
  d, _ = W.rlw("dirichlet").update(jnp.ones(4), (), key=jax.random.key(3))
  e = jax.random.exponential(jax.random.key(3), (4,))  # Dir(1) = normalised Exp(1) draws
  np.testing.assert_allclose(d, e / e.sum(), rtol=1e-6)


def test_rlw_needs_a_key_and_a_known_distribution():
  t = W.rlw()
  with pytest.raises(ValueError, match="key"):
    t.update(jnp.ones(2), t.init(2))
  with pytest.raises(ValueError, match="distribution"):
    W.rlw("cauchy")


def geometric_mean(losses):
  return jnp.prod(losses) ** (1.0 / losses.shape[0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4))  # one K: one compile
def test_gls_weights_are_the_gradient_of_the_geometric_mean(values):
  w, grad = gls_and_grad(jnp.asarray(values, jnp.float32))
  np.testing.assert_allclose(w, grad, rtol=1e-4)


@jax.jit
def gls_and_grad(losses):
  t = W.gls()
  return t.update(losses, t.init(losses.shape[0]))[0], jax.grad(geometric_mean)(losses)


def test_gls_guards_zero_and_negative_losses():
  t = W.gls()
  w, _ = t.update(jnp.array([0.0, -1.0, 2.0]), t.init(3))
  assert np.all(np.isfinite(w)) and np.all(np.asarray(w) > 0)


def famo_reference(seq, lr, decay, *, bound=0.0, eps=1e-8, b1=0.9, b2=0.999, adam_eps=1e-8):
  """FAMO in float64 numpy, amortised over consecutive calls, Adam with the decay added to the gradient."""
  k = seq.shape[1]
  xi, m, v, n = np.zeros(k), np.zeros(k), np.zeros(k), 0
  prev, out = None, []
  for losses in seq.astype(np.float64):
    log_d = np.log(np.maximum(losses - bound, 0) + eps)
    if prev is not None:
      delta = prev - log_d
      z = np.exp(xi) / np.exp(xi).sum()
      jac = np.diag(z) - np.outer(z, z)  # ∂softmax/∂ξ (symmetric)
      g = jac.T @ delta + decay * xi
      n += 1
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      xi = xi - lr * (m / (1 - b1**n)) / (np.sqrt(v / (1 - b2**n)) + adam_eps)
    z = np.exp(xi) / np.exp(xi).sum()
    d = np.exp(log_d)
    c = 1.0 / np.sum(z / d)
    out.append(c * z / d)
    prev = log_d
  return np.stack(out), xi


def test_famo_against_numpy_reference():
  seq = loss_sequence(3, n=4, seed=2)  # the first call sets L(t−1); three logit updates follow
  t = W.famo(learning_rate=0.1, weight_decay=0.01, min_losses=0.05)
  w, state = run(jax.jit(t.update), t.init(3), seq)
  w_ref, xi_ref = famo_reference(seq, lr=0.1, decay=0.01, bound=0.05)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5)
  np.testing.assert_allclose(state.logits, xi_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.sum(w, axis=1), 1.0, rtol=1e-6)


def test_famo_moves_weight_away_from_the_task_that_improves_faster():
  t = W.famo(optimizer=optax.sgd(1.0))
  _, state = t.update(jnp.array([1.0, 1.0]), t.init(2))
  _, state = t.update(jnp.array([0.5, 1.0]), state)
  assert state.logits[0] < 0 < state.logits[1]


def test_famo_rejects_bad_arguments():
  with pytest.raises(ValueError, match="eps"):
    W.famo(eps=0.0)
  t = W.famo(min_losses=[0.0, 0.1])
  with pytest.raises(ValueError, match="min_losses"):
    t.update(jnp.ones(3), t.init(3))
