"""The weighting protocol from a user's side: a new input read by a hand-written transform chained with built-ins,
and hyper-parameters annealed with inject_hyperparams. Nothing here touches a built-in."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmtl import weighting as W
from tests._asserts import assert_trees_allclose
from tests._asserts import counting_jit
from tests._asserts import loss_sequence

K = 3
PRIOR = np.array([0.5, 1.0, 2.0], np.float32)
# Orthogonal task gradients: no two conflict, so UPGrad is the mean gradient (weights 1/K) on any rescaling of them.
JACOBIAN = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0]], np.float32)


class ValFocusState(NamedTuple):
  count: jax.Array  # () int32: calls so far
  seen: jax.Array  # (K,) float32: the val_losses of the last call


def val_focus() -> W.WeightingTransform:
  """A user's weighting, written by hand: ``K softmax(val_losses − losses)``, more weight to the tasks whose
  validation loss is high relative to their training loss. It reads ``val_losses``, an input no built-in knows."""

  def init(num_tasks):
    return ValFocusState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), jnp.float32))

  def update(losses, state, *, val_losses, **_):
    w = losses.shape[0] * jax.nn.softmax(val_losses - jax.lax.stop_gradient(losses))
    return w.astype(losses.dtype), ValFocusState(state.count + 1, val_losses.astype(jnp.float32))

  return W.WeightingTransform(init, update, "losses")


def hand_weights(losses_seq, val_seq, temperature):
  """The chain static(PRIOR) → upgrad → dwa(temperature, period=1) → val_focus, step by step, in numpy."""
  out, seen = [], []
  for t, (losses, val) in enumerate(zip(losses_seq.astype(np.float64), val_seq.astype(np.float64))):
    w = PRIOR * np.full(K, 1 / K)  # static, then UPGrad on non-conflicting gradients: the mean
    seen.append(w * losses)  # what DWA sees
    if t < 2:
      w_dwa = np.ones(K)
    else:
      e = np.exp(seen[t - 1] / seen[t - 2] / temperature)
      w_dwa = K * e / e.sum()
    w = w * w_dwa
    e = np.exp(val - w * losses)
    out.append(w * K * e / e.sum())
  return np.stack(out)


def test_a_new_input_passes_through_a_chain_of_built_ins():
  """chain(static, upgrad, dwa, val_focus) under jit: val_focus gets val_losses unchanged, the built-ins ignore it,
  the weights are the hand-computed product; the state is read by position."""
  losses_seq, val_seq = loss_sequence(5, K, seed=0), loss_sequence(5, K, seed=1)
  builtins = (W.static(PRIOR), W.upgrad(), W.dwa(temperature=2.0))
  t = W.chain(*builtins, val_focus())
  assert t.needs == "gramian"
  update, traces = counting_jit(t.update)
  alone = W.chain(*builtins)  # the built-ins, without the new input
  state, alone_state = t.init(K), alone.init(K)
  gramian = jnp.asarray(JACOBIAN @ JACOBIAN.T)
  expected = hand_weights(losses_seq, val_seq, 2.0)
  for i, (losses, val) in enumerate(zip(jnp.asarray(losses_seq), jnp.asarray(val_seq))):
    inputs = {"gramian": gramian, "key": jax.random.key(i), "step": jnp.int32(i)}
    w, state = update(losses, state, val_losses=val, **inputs)
    np.testing.assert_allclose(w, expected[i], rtol=1e-5)
    np.testing.assert_array_equal(state.inner[3].seen, val)  # passed through, not rescaled
    w_alone, alone_state = alone.update(losses, alone_state, **inputs)
    np.testing.assert_allclose(w / w_alone, K * jax.nn.softmax(val - w_alone * losses), rtol=1e-5)
  assert int(state.inner[3].count) == len(losses_seq) and len(traces) == 1
  assert_trees_allclose(state.inner[:3], alone_state.inner)  # the built-ins' states ignore the new input


def test_a_new_input_passes_through_a_named_chain():
  losses_seq, val_seq = loss_sequence(4, K, seed=2), loss_sequence(4, K, seed=3)
  t = W.named_chain(
    ("prior", W.static(PRIOR)), ("upgrad", W.upgrad()), ("dwa", W.dwa(temperature=0.5)), ("val", val_focus())
  )
  state = t.init(K)
  assert set(state) == {"prior", "upgrad", "dwa", "val"}
  gramian = jnp.asarray(JACOBIAN @ JACOBIAN.T)
  expected = hand_weights(losses_seq, val_seq, 0.5)
  for i, (losses, val) in enumerate(zip(jnp.asarray(losses_seq), jnp.asarray(val_seq))):
    w, state = t.update(losses, state, gramian=gramian, val_losses=val, key=jax.random.key(i), step=jnp.int32(i))
    np.testing.assert_allclose(w, expected[i], rtol=1e-5)
    np.testing.assert_array_equal(state["val"].seen, val)
  assert int(state["val"].count) == len(losses_seq)
  assert int(state["dwa"].periods) == 2  # saturated after two periods of one call
  np.testing.assert_allclose(state["dwa"].last_mean, PRIOR / K * losses_seq[-1], rtol=1e-6)


def test_inject_hyperparams_anneals_cagrad_c_under_jit():
  """c from 0 (equal weights 1/K) to 1 over 4 calls, then held: each call's weights are those of cagrad(c) built
  with the scheduled value; one trace for every call."""
  schedule = optax.linear_schedule(0.0, 1.0, 4)
  t = W.inject_hyperparams(W.cagrad)(c=schedule)
  update, traces = counting_jit(t.update)
  jac = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [1.0, -2.0, 0.5]], np.float32)
  gramian, losses = jnp.asarray(jac @ jac.T), jnp.ones(K)
  state = t.init(K)
  seen = []
  for i in range(6):
    w, state = update(losses, state, gramian=gramian, key=jax.random.key(i))
    c = float(schedule(i))
    np.testing.assert_allclose(state.hyperparams["c"], c)
    np.testing.assert_allclose(w, W.cagrad(c).update(losses, (), gramian=gramian)[0], rtol=1e-5, atol=1e-6)
    seen.append(np.asarray(w))
  np.testing.assert_allclose(seen[0], np.full(K, 1 / K), rtol=1e-6)  # c = 0: the mean gradient
  assert not np.allclose(seen[1], seen[4])  # the weights move with c
  assert int(state.count) == 6 and len(traces) == 1


def test_inject_hyperparams_anneals_static_weights_with_an_array_schedule_under_jit():
  schedule = optax.linear_schedule(jnp.array([1.0, 0.0, 0.5]), jnp.array([0.0, 1.0, 0.5]), 4)
  t = W.inject_hyperparams(W.static)(weights=schedule)
  assert repr(t) == "inject_hyperparams(static(weights=schedule(...)))"
  update, traces = counting_jit(t.update)
  state = t.init(K)
  for i in range(6):
    w, state = update(jnp.ones(K), state, key=jax.random.key(i))
    expected = np.asarray(schedule(i))
    np.testing.assert_allclose(state.hyperparams["weights"], expected, rtol=1e-6)
    np.testing.assert_allclose(w, W.static(expected).update(jnp.ones(K), ())[0], rtol=1e-6)
  np.testing.assert_allclose(w, [0.0, 1.0, 0.5])
  assert int(state.count) == 6 and len(traces) == 1
