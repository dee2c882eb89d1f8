"""Loss-level weightings (uncertainty, IMTL-L, FAMO, DWA, RLW, GLS): each method against a reference.

The contract every method keeps (jit, retrace, state and dtypes, extreme losses, permutations, chaining, bad inputs
and arguments) is in test_weighting_contract.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from jmtl import weighting as W
from tests._asserts import loss_sequence
from tests._asserts import problems
from tests._asserts import run


def run_losses(update, state, seq):
  """Applies ``update`` along the loss vectors ``seq``; returns the stacked weights and the final state."""
  ws, state = run(update, state, problems("losses", seq))
  return np.stack(ws), state


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
  seq = loss_sequence(11, 3, seed=1)
  t = W.dwa(temperature, period)
  w, _ = run_losses(jax.jit(t.update), t.init(3), seq)
  np.testing.assert_allclose(w, dwa_reference(seq, temperature, period), rtol=1e-5)


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
  seq = loss_sequence(4, 3, seed=2)  # the first call sets L(t−1); three logit updates follow
  t = W.famo(learning_rate=0.1, weight_decay=0.01, min_losses=0.05)
  w, state = run_losses(jax.jit(t.update), t.init(3), seq)
  w_ref, xi_ref = famo_reference(seq, lr=0.1, decay=0.01, bound=0.05)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5)
  np.testing.assert_allclose(state.logits, xi_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.sum(w, axis=1), 1.0, rtol=1e-6)


def test_famo_moves_weight_away_from_the_task_that_improves_faster():
  t = W.famo(optimizer=optax.sgd(1.0))
  _, state = t.update(jnp.array([1.0, 1.0]), t.init(2))
  _, state = t.update(jnp.array([0.5, 1.0]), state)
  assert state.logits[0] < 0 < state.logits[1]


def test_famo_rejects_min_losses_for_another_number_of_tasks():
  t = W.famo(min_losses=[0.0, 0.1])
  with pytest.raises(ValueError, match="min_losses"):
    t.update(jnp.ones(3), t.init(3))
