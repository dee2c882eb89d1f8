"""The train step: exact gradients, skipping non-finite steps, errors, no retrace."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import losses as L
from jmtl import weighting as W
from tests._engine import NAMES
from tests._engine import PENALTIES
from tests._engine import SOFT
from tests._engine import TASKS
from tests._engine import WD
from tests._engine import apply
from tests._engine import make_batch
from tests._engine import make_params
from tests._engine import new_state


def hand_objective(p, batch, w):
  """Σ wₖ Lₖ + penalties, written out without jmtl."""
  pred = apply(p, batch["inputs"])
  y = batch["labels"]
  la = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(pred["a"]), y["a"][:, None], 1))
  m = batch["masks"]["b"]
  lb = jnp.sum(m * (pred["b"] - y["b"]) ** 2) / jnp.sum(m)
  z = pred["c"]
  lc = jnp.mean(jnp.maximum(z, 0) - z * y["c"] + jnp.log1p(jnp.exp(-jnp.abs(z))))
  total = w[0] * la + w[1] * lb + w[2] * lc
  kernels = [p["shared"]["w1"]] + [p["tasks"][k][n] for k in NAMES for n in ("tower", "w")]
  total += WD * sum(jnp.sum(x**2) for x in kernels)
  towers = [p["tasks"][k]["tower"] for k in NAMES]
  total += SOFT * sum(jnp.sum((towers[i] - towers[j]) ** 2) for i in range(3) for j in range(i + 1, 3))
  return total, jnp.stack([la, lb, lc])


# Jitted: op by op, every primitive of the hand-written objective and of its gradient would compile on its own.
hand_gradient = jax.jit(jax.grad(hand_objective, has_aux=True))  # (∂/∂p, the three losses)


def sgd_gradient(transform, steps=1):
  """Runs `steps` SGD(lr=1) steps; returns (params before, batch, gradient of last step)."""
  opt = optax.sgd(1.0)
  step = jax.jit(jmtl.make_train_step(apply, TASKS, penalty=PENALTIES))
  state = new_state(make_params(jnp.float64), opt, transform)
  batches = [make_batch(dtype=jnp.float64, seed=s) for s in range(steps)]
  history = []
  for batch in batches:
    before = state.params
    state, metrics = step(state, batch)
    history.append(before)
  grad = jax.tree.map(lambda a, b: a - b, history[-1], state.params)
  return history, batches, grad, metrics


@pytest.mark.parametrize("name", ["equal", "static"])
def test_gradient_matches_hand_written_fixed_weights(name):
  with jax.enable_x64(True):
    transform, w = {"equal": (W.equal(), [1.0, 1.0, 1.0]), "static": (W.static([0.2, 1.5, 0.7]), [0.2, 1.5, 0.7])}[name]
    (p0,), (batch,), grad, metrics = sgd_gradient(transform)
    want, want_losses = hand_gradient(p0, batch, jnp.asarray(w))
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12), grad, want)
    np.testing.assert_allclose([metrics[f"loss/{k}"] for k in NAMES], want_losses, rtol=1e-10)


def test_gradient_matches_hand_written_uncertainty():
  """Two steps of UW: the second uses log-variances after one hand-computed SGD step."""
  lr_s = 0.5
  with jax.enable_x64(True):
    (p0, p1), (b0, b1), grad, metrics = sgd_gradient(W.uncertainty(optimizer=optax.sgd(lr_s)), steps=2)
    # Kendall et al.: Σ ½exp(−s)L + ½s; at s=0, ∂/∂s = −½L + ½.
    _, l0 = hand_gradient(p0, b0, jnp.ones(3))
    s1 = 0.0 - lr_s * (-0.5 * jnp.exp(-0.0) * l0 + 0.5)
    w1 = 0.5 * jnp.exp(-s1)
    want, _ = hand_gradient(p1, b1, w1)
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12), grad, want)
    np.testing.assert_allclose([metrics[f"weight/{k}"] for k in NAMES], w1, rtol=1e-12)


class CountState(NamedTuple):
  calls: jax.Array  # int32 scalar


def inverse_loss() -> W.WeightingTransform:
  """A user's transform: weights 1/L, so every task contributes the same loss."""
  return W.WeightingTransform(
    init=lambda k: CountState(jnp.zeros((), jnp.int32)),
    update=lambda losses, s, **_: (1.0 / losses, CountState(s.calls + 1)),
  )


def test_user_transform_chains_with_builtin_under_jit():
  opt = optax.sgd(0.1)
  t = W.chain(W.uncertainty(optimizer=optax.sgd(0.3)), inverse_loss())
  step = jax.jit(jmtl.make_train_step(apply, TASKS))
  state = new_state(make_params(), opt, t)
  for s in range(3):
    state, m = step(state, make_batch(seed=s))
    # uncertainty gives w_a; the user's sees w_a·L and returns 1/(w_a·L): the product is 1/L.
    np.testing.assert_allclose([m[f"weight/{k}"] for k in NAMES], [1 / m[f"loss/{k}"] for k in NAMES], rtol=1e-5)
  assert int(state.weighting_state.inner[1].calls) == 3


def test_second_call_does_not_retrace():
  traces = []

  def counting_apply(p, x):
    traces.append(1)
    return apply(p, x)

  opt = optax.adam(1e-2)
  t = W.chain(W.famo(), W.static([1.0, 2.0, 3.0]))
  step = jax.jit(jmtl.make_train_step(counting_apply, TASKS, penalty=PENALTIES), donate_argnums=0)
  state = new_state(make_params(), opt, t)
  for s in range(3):
    state, _ = step(state, make_batch(seed=s))
  assert len(traces) == 1


def test_nan_loss_skips_the_update_and_is_reported():
  opt = optax.adam(1e-2)
  step = jax.jit(jmtl.make_train_step(apply, TASKS))
  state = new_state(make_params(), opt, W.uncertainty())
  state, _ = step(state, make_batch(seed=0))
  bad = make_batch(seed=1)
  bad["labels"]["b"] = bad["labels"]["b"].at[1].set(jnp.nan)  # a labelled example
  new, m = step(state, bad)
  assert bool(m["skipped"]) and int(m["num_skipped"]) == 1 and int(new.num_skipped) == 1
  assert not np.isfinite(float(m["loss/b"]))
  for before, after in zip(
    jax.tree.leaves((state.params, state.opt_state, state.weighting_state)),
    jax.tree.leaves((new.params, new.opt_state, new.weighting_state)),
  ):
    np.testing.assert_array_equal(before, after)
  assert int(new.step) == int(state.step) + 1
  # A NaN label on an unlabelled example is ignored, not skipped.
  masked = make_batch(seed=1)
  masked["labels"]["b"] = masked["labels"]["b"].at[0].set(jnp.nan)  # mask_b[0] == 0
  newer, m = step(new, masked)
  assert not bool(m["skipped"]) and int(newer.num_skipped) == 1
  assert not np.array_equal(newer.params["shared"]["w1"], new.params["shared"]["w1"])


def test_batch_errors_name_the_task_and_shapes():
  opt = optax.sgd(0.1)
  step = jax.jit(jmtl.make_train_step(apply, TASKS))
  state = new_state(make_params(), opt)
  missing = make_batch()
  del missing["labels"]["c"]
  with pytest.raises(ValueError, match=r"task 'c'.*no entry"):
    step(state, missing)
  wrong = make_batch()
  wrong["labels"]["a"] = jnp.zeros((8, 2), jnp.int32)
  with pytest.raises(ValueError, match=r"task 'a'.*\(8, 3\).*\(8, 2\)"):
    step(state, wrong)
  short = make_batch()
  short["labels"]["b"] = jnp.zeros((7,))
  with pytest.raises(ValueError, match=r"batch size"):
    step(state, short)
  bad_mask = make_batch()
  bad_mask["masks"]["b"] = jnp.ones((8, 1))
  with pytest.raises(ValueError, match=r"task 'b'.*masks.*\(8, 1\)"):
    step(state, bad_mask)


def test_gramian_general_path_reports_cosines():
  """A Gramian-level user transform: MGDA-like weights for 2 tasks in closed form."""

  def two_task_min_norm(losses, gramian, **_):
    g11, g22, g12 = gramian[0, 0], gramian[1, 1], gramian[0, 1]
    a = jnp.clip((g22 - g12) / (g11 + g22 - 2 * g12), 0, 1)
    return jnp.stack([a, 1 - a])

  tasks = TASKS[:2]
  two = lambda p, x: {k: v for k, v in apply(p, x).items() if k in ("a", "b")}
  t = W.stateless(two_task_min_norm, needs="gramian")
  opt = optax.sgd(1.0)
  with jax.enable_x64(True):
    state = new_state(make_params(jnp.float64), opt, t, num_tasks=2)
    batch = make_batch(dtype=jnp.float64)
    _, m = jax.jit(jmtl.make_train_step(two, tasks))(state, batch)
    ga, gb, pen = (hand_gradient(state.params, batch, jnp.array(w))[0] for w in ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 0.0]))
    ja = jax.tree.map(jnp.subtract, ga, pen)["shared"]
    jb = jax.tree.map(jnp.subtract, gb, pen)["shared"]
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
    cos = flat(ja) @ flat(jb) / jnp.linalg.norm(flat(ja)) / jnp.linalg.norm(flat(jb))
    np.testing.assert_allclose(m["grad_cosine"][0, 1], cos, rtol=1e-10)
    np.testing.assert_allclose(m["grad_norm/a"], jnp.linalg.norm(flat(ja)), rtol=1e-10)
    a = float(m["weight/a"])
    d = a * flat(ja) + (1 - a) * flat(jb)
    assert float(d @ flat(ja)) >= -1e-12 and float(d @ flat(jb)) >= -1e-12


def test_eval_step_accumulates_exact_metrics():
  tasks = [jmtl.Task("a", L.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()}), TASKS[1]]
  ev = jax.jit(jmtl.make_eval_step(apply, tasks))
  params = make_params()
  batches = [make_batch(seed=s) for s in range(3)]
  got = jmtl.evaluate(ev, params, batches, tasks)
  preds = [apply(params, b["inputs"]) for b in batches]
  acc = np.mean(np.concatenate([np.argmax(p["a"], -1) == b["labels"]["a"] for p, b in zip(preds, batches)]))
  sq = np.concatenate(
    [(np.asarray(p["b"] - b["labels"]["b"]) ** 2)[np.asarray(b["masks"]["b"]) > 0] for p, b in zip(preds, batches)]
  )
  assert got["a/acc"] == pytest.approx(acc)
  assert got["b/loss"] == pytest.approx(float(np.mean(sq)), rel=1e-5)


class ValState(NamedTuple):
  seen: jax.Array  # () float: the last validation loss sum it was given


def favour_validation() -> W.WeightingTransform:
  """A user's transform that reads a new input, ``val_losses``: weights ∝ the validation losses (mean 1)."""

  def update(losses, state, *, val_losses, **_):
    w = val_losses / jnp.mean(val_losses)
    return w.astype(losses.dtype), ValState(jnp.sum(val_losses))

  return W.WeightingTransform(lambda k: ValState(jnp.zeros(())), update)


def test_a_new_weighting_input_reaches_a_user_transform_chained_with_builtins():
  """weighting_inputs adds an input; the built-ins (static, dwa, upgrad) ignore it, the user's transform reads it."""
  opt = optax.sgd(0.1)
  val = jnp.array([1.0, 2.0, 3.0])
  t = W.named_chain(
    ("prior", W.static([1.0, 0.5, 2.0])), ("dwa", W.dwa()), ("val", favour_validation()), ("upgrad", W.upgrad())
  )
  step = jax.jit(jmtl.make_train_step(apply, TASKS, weighting_inputs=lambda state, batch: {"val_losses": val}))
  state = new_state(make_params(), opt, t)
  plain = jax.jit(jmtl.make_train_step(apply, TASKS))
  upgrad_only = new_state(make_params(), opt, W.chain(W.static([0.5, 0.5, 3.0]), W.upgrad()))
  for s in range(2):
    batch = make_batch(seed=s)
    state, m = step(state, batch)
    upgrad_only, ref = plain(upgrad_only, batch)
    # dwa gives ones in its first two periods: the chain is upgrad on the problem weighted by static · val/mean(val).
    np.testing.assert_allclose([m[f"weight/{k}"] for k in NAMES], [ref[f"weight/{k}"] for k in NAMES], rtol=1e-5)
  assert float(state.weighting_state["val"].seen) == 6.0
  assert int(state.weighting_state["dwa"].periods) == 2


def test_inject_hyperparams_anneals_a_builtin_inside_the_jitted_step():
  """CAGrad's c scheduled from 0 to 1 over 4 steps: each step's weights are those of cagrad(c) at that c."""
  opt = optax.sgd(0.0)  # the parameters stay put, so every step sees the same Gramian
  schedule = optax.linear_schedule(0.0, 1.0, 4)
  t = W.inject_hyperparams(W.cagrad)(c=schedule)
  step = jax.jit(jmtl.make_train_step(apply, TASKS))
  state = new_state(make_params(), opt, t)
  batch = make_batch()
  # The reference: the plain method cagrad(c), no inject_hyperparams; c an argument, so one program serves every c.
  fixed = jax.jit(lambda c: jmtl.make_train_step(apply, TASKS)(new_state(make_params(), opt, W.cagrad(c)), batch)[1])
  weights = []
  for i in range(4):
    state, m = step(state, batch)
    want = fixed(schedule(i))
    weights.append([m[f"weight/{k}"] for k in NAMES])
    np.testing.assert_allclose(weights[-1], [want[f"weight/{k}"] for k in NAMES], rtol=1e-5)
    assert float(state.weighting_state.hyperparams["c"]) == pytest.approx(float(schedule(i)))
  assert not np.allclose(weights[0], weights[-1], rtol=1e-3)  # c moves the weights
  assert step._cache_size() == 1 and fixed._cache_size() == 1
