"""The train step: exact gradients, skipping non-finite steps, errors, no retrace."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl import losses as L
from jmtl import sharing
from jmtl import weighting as W

NAMES = ("a", "b", "c")


def apply(p, x):
  h = jnp.tanh(x @ p["shared"]["w1"] + p["shared"]["b1"])
  t = p["tasks"]
  return {
    "a": jnp.tanh(h @ t["a"]["tower"]) @ t["a"]["w"],
    "b": (jnp.tanh(h @ t["b"]["tower"]) @ t["b"]["w"])[:, 0],
    "c": jnp.tanh(h @ t["c"]["tower"]) @ t["c"]["w"],
  }


TASKS = [
  jmtl.Task("a", L.softmax_cross_entropy),
  jmtl.Task("b", L.mse),
  jmtl.Task("c", L.sigmoid_binary_cross_entropy),
]


def make_params(dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  n = lambda k, s: (0.5 * jax.random.normal(k, s)).astype(dtype)
  return {
    "shared": {"w1": n(ks[0], (5, 4)), "b1": n(ks[1], (4,))},
    "tasks": {
      "a": {"tower": n(ks[2], (4, 4)), "w": n(ks[3], (4, 3))},
      "b": {"tower": n(ks[4], (4, 4)), "w": n(ks[5], (4, 1))},
      "c": {"tower": n(ks[6], (4, 4)), "w": n(ks[7], (4, 2))},
    },
  }


def make_batch(b=8, dtype=jnp.float32, seed=1):
  r = np.random.default_rng(seed)
  mask_b = np.ones(b, np.float32)
  mask_b[::3] = 0  # partially labelled: every third example has no label for "b"
  return {
    "inputs": jnp.asarray(r.normal(size=(b, 5)), dtype),
    "labels": {
      "a": jnp.asarray(r.integers(0, 3, size=b)),
      "b": jnp.asarray(r.normal(size=b), dtype),
      "c": jnp.asarray(r.integers(0, 2, size=(b, 2)), dtype),
    },
    "masks": {"b": jnp.asarray(mask_b)},
  }


WD, SOFT = 1e-2, 0.3
PENALTIES = (
  sharing.weight_decay(WD, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
  sharing.soft_sharing(SOFT, lambda p: [p["tasks"][k]["tower"] for k in NAMES]),
)


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


def sgd_gradient(transform, steps=1):
  """Runs `steps` SGD(lr=1) steps; returns (params before, batch, gradient of last step)."""
  opt = optax.sgd(1.0)
  step = jax.jit(jmtl.make_train_step(apply, TASKS, opt, transform, penalty=PENALTIES))
  state = jmtl.TrainState.create(make_params(jnp.float64), opt, transform, 3, jax.random.key(0))
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
    want = jax.grad(lambda p: hand_objective(p, batch, jnp.asarray(w))[0])(p0)
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12), grad, want)
    _, want_losses = hand_objective(p0, batch, jnp.asarray(w))
    np.testing.assert_allclose([metrics[f"loss/{k}"] for k in NAMES], want_losses, rtol=1e-10)


def test_gradient_matches_hand_written_uncertainty():
  """Two steps of UW: the second uses log-variances after one hand-computed SGD step."""
  lr_s = 0.5
  with jax.enable_x64(True):
    (p0, p1), (b0, b1), grad, metrics = sgd_gradient(W.uncertainty(optimizer=optax.sgd(lr_s)), steps=2)
    # Kendall et al.: Σ ½exp(−s)L + ½s; at s=0, ∂/∂s = −½L + ½.
    _, l0 = hand_objective(p0, b0, jnp.ones(3))
    s1 = 0.0 - lr_s * (-0.5 * jnp.exp(-0.0) * l0 + 0.5)
    w1 = 0.5 * jnp.exp(-s1)
    want = jax.grad(lambda p: hand_objective(p, b1, w1)[0])(p1)
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
  step = jax.jit(jmtl.make_train_step(apply, TASKS, opt, t))
  state = jmtl.TrainState.create(make_params(), opt, t, 3, jax.random.key(0))
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
  step = jax.jit(jmtl.make_train_step(counting_apply, TASKS, opt, t, penalty=PENALTIES), donate_argnums=0)
  state = jmtl.TrainState.create(make_params(), opt, t, 3, jax.random.key(0))
  for s in range(3):
    state, _ = step(state, make_batch(seed=s))
  assert len(traces) == 1


def test_nan_loss_skips_the_update_and_is_reported():
  opt = optax.adam(1e-2)
  step = jax.jit(jmtl.make_train_step(apply, TASKS, opt, W.uncertainty()))
  state = jmtl.TrainState.create(make_params(), opt, W.uncertainty(), 3, jax.random.key(0))
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
  step = jax.jit(jmtl.make_train_step(apply, TASKS, opt))
  state = jmtl.TrainState.create(make_params(), opt, W.equal(), 3, jax.random.key(0))
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
    state = jmtl.TrainState.create(make_params(jnp.float64), opt, t, 2, jax.random.key(0))
    batch = make_batch(dtype=jnp.float64)
    _, m = jax.jit(jmtl.make_train_step(two, tasks, opt, t))(state, batch)
    ga = jax.grad(lambda p: hand_objective(p, batch, jnp.array([1.0, 0, 0]))[0] - 0)(state.params)
    gb = jax.grad(lambda p: hand_objective(p, batch, jnp.array([0, 1.0, 0]))[0])(state.params)
    pen = jax.grad(lambda p: hand_objective(p, batch, jnp.zeros(3))[0])(state.params)
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
