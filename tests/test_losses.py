"""Losses against hand-written numpy references."""

from __future__ import annotations

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmtl import losses
from jmtl import tasks

# Jitted once per shape: an order of magnitude faster to compile than op-by-op eager dispatch,
# and it checks that every loss (shape validation included) traces.
_STATIC = {"pixel_cross_entropy": ("ignore_label",), "normal_cosine_loss": ("eps",)}
jl = types.SimpleNamespace(
  **{
    name: jax.jit(getattr(losses, name), static_argnames=_STATIC.get(name, ()))
    for name in losses.__all__
    if name != "match_shapes"
  }
)

# ----------------------------------------------------------------------------- numpy references (float64 loops)


def ref_softmax_ce(logits, labels):
  out = []
  for row, y in zip(np.asarray(logits, np.float64), labels, strict=True):
    mx = row.max()
    out.append(mx + np.log(np.sum(np.exp(row - mx))) - row[y])
  return np.array(out)


def ref_bce(logits, labels):
  x, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
  # -[y log σ(x) + (1-y) log(1-σ(x))], with log σ(x) = -log(1 + e^-x)
  per = y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)
  return per.reshape(len(x), -1).mean(1)


def ref_pixel_ce(logits, labels, ignore):
  logits = np.asarray(logits, np.float64)
  b = logits.shape[0]
  sums, counts = np.zeros(b), np.zeros(b)
  for i in range(b):
    for idx in np.ndindex(labels.shape[1:]):
      y = labels[(i, *idx)]
      if ignore is not None and y == ignore:
        continue
      row = logits[(i, *idx)]
      sums[i] += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[y]
      counts[i] += 1
  return sums, counts


def ref_depth(pred, target, rel):
  b = pred.shape[0]
  sums, counts = np.zeros(b), np.zeros(b)
  for i in range(b):
    for p, t in zip(np.ravel(pred[i]).astype(np.float64), np.ravel(target[i]).astype(np.float64), strict=True):
      if t > 0:
        sums[i] += abs(p - t) / t if rel else abs(p - t)
        counts[i] += 1
  return sums, counts


def ref_normal(pred, target):
  b = pred.shape[0]
  sums, counts = np.zeros(b), np.zeros(b)
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  for i in range(b):
    for p, t in zip(pred[i].reshape(-1, 3), target[i].reshape(-1, 3), strict=True):
      if np.linalg.norm(t) > 0:
        sums[i] += 1 - p @ t / (np.linalg.norm(p) * np.linalg.norm(t))
        counts[i] += 1
  return sums, counts


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ----------------------------------------------------------------------------- classification


def test_softmax_cross_entropy_matches_reference(rng):
  logits = rng.normal(size=(5, 4)) * 3
  labels = rng.integers(0, 4, size=5)
  got = jl.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  assert got.shape == (5,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_softmax_ce(logits, labels), rtol=1e-5)


def test_softmax_cross_entropy_float64_and_stable(rng):
  logits = rng.normal(size=(4, 3)) * 1000  # exp would overflow without log_softmax
  labels = rng.integers(0, 3, size=4)
  with jax.enable_x64(True):
    got = jl.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, ref_softmax_ce(logits, labels), rtol=1e-12)
  assert np.all(np.isfinite(got))


def test_softmax_cross_entropy_shape_errors():
  with pytest.raises(ValueError, match=re.escape("logits (4, 10) and labels (4, 2)")):
    jl.softmax_cross_entropy(jnp.zeros((4, 10)), jnp.zeros((4, 2), jnp.int32))
  with pytest.raises(ValueError, match="one-hot"):
    jl.softmax_cross_entropy(jnp.zeros((4, 10)), jnp.zeros((4, 10), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    jl.softmax_cross_entropy(jnp.zeros((4, 10)), jnp.zeros((4,)))


def test_out_of_range_label_is_nan_but_masked_example_is_harmless():
  logits = jnp.array([[1.0, 2.0], [0.5, 0.0]])
  labels = jnp.array([1, -1])
  assert np.isnan(jl.softmax_cross_entropy(logits, labels)[1])
  task = tasks.Task("t", losses.softmax_cross_entropy)
  batch = {"inputs": jnp.zeros((2, 1)), "labels": {"t": labels}, "masks": {"t": jnp.array([1.0, 0.0])}}

  def loss(lg):
    total, count = tasks.loss_terms(task, {"t": lg}, batch)
    return total / count

  value, grad = jax.jit(jax.value_and_grad(loss))(logits)
  np.testing.assert_allclose(value, ref_softmax_ce(np.asarray(logits[:1]), [1])[0], rtol=1e-6)
  assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0)


def test_sigmoid_bce_matches_reference(rng):
  logits = rng.normal(size=(6, 3)) * 5
  hard = rng.integers(0, 2, size=(6, 3))
  soft = rng.uniform(size=(6, 3))
  for labels in (hard, soft, hard.astype(bool)):
    got = jl.sigmoid_binary_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(got, ref_bce(logits, labels), rtol=1e-5)
  with jax.enable_x64(True):
    big = logits * 200  # |x| up to ~thousands: log σ must not underflow to -inf
    got = jl.sigmoid_binary_cross_entropy(jnp.asarray(big), jnp.asarray(hard))
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, ref_bce(big, hard), rtol=1e-12)


def test_sigmoid_bce_shapes():
  assert jl.sigmoid_binary_cross_entropy(jnp.zeros((4, 1)), jnp.ones(4)).shape == (4,)
  with pytest.raises(ValueError, match=re.escape("(4, 3)") + ".*" + re.escape("(4, 2)")):
    jl.sigmoid_binary_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 2)))


# ----------------------------------------------------------------------------- regression


@pytest.mark.parametrize("fn,ref", [("mse", lambda d: d**2), ("l1", np.abs)])
def test_regression_losses_match_reference(rng, fn, ref):
  fn = getattr(jl, fn)
  p, t = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 2, 3))
  got = fn(jnp.asarray(p, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, [ref(p[i] - t[i]).mean() for i in range(4)], rtol=1e-5)
  with jax.enable_x64(True):
    got64 = fn(jnp.asarray(p), jnp.asarray(t))
    assert got64.dtype == jnp.float64
  np.testing.assert_allclose(got64, ref(p - t).reshape(4, -1).mean(1), rtol=1e-12)


@pytest.mark.parametrize("fn", ["mse", "l1"])
def test_regression_trailing_one_squeeze_and_errors(rng, fn):
  fn = getattr(jl, fn)
  p, t = rng.normal(size=(5, 1)), rng.normal(size=5)
  want = fn(jnp.asarray(p[:, 0]), jnp.asarray(t))
  np.testing.assert_allclose(fn(jnp.asarray(p), jnp.asarray(t)), want)  # (B,1) vs (B,)
  np.testing.assert_allclose(fn(jnp.asarray(t), jnp.asarray(p)), want)  # (B,) vs (B,1)
  with pytest.raises(ValueError, match=re.escape("(5, 3)") + ".*" + re.escape("(5,)")):
    fn(jnp.zeros((5, 3)), jnp.zeros(5))  # would broadcast to (5, 3) silently
  with pytest.raises(ValueError, match=re.escape("(5, 1)") + ".*" + re.escape("(4,)")):
    fn(jnp.zeros((5, 1)), jnp.zeros(4))
  with pytest.raises(ValueError, match="batch axis"):
    fn(jnp.zeros(()), jnp.zeros(()))


def test_half_precision_is_computed_in_float32():
  got = jl.mse(jnp.ones((2, 3), jnp.bfloat16), jnp.zeros((2, 3)))
  assert got.dtype == jnp.float32


# ----------------------------------------------------------------------------- dense


def test_pixel_cross_entropy_matches_reference(rng):
  logits = rng.normal(size=(3, 4, 5, 6)) * 4
  labels = rng.integers(0, 6, size=(3, 4, 5))
  labels[rng.uniform(size=labels.shape) < 0.3] = -1
  labels[2] = -1  # an example with no valid pixel: counts 0, sums 0
  sums, counts = jl.pixel_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  ws, wc = ref_pixel_ce(logits, labels, -1)
  np.testing.assert_allclose(sums, ws, rtol=1e-5)
  np.testing.assert_array_equal(counts, wc)
  assert counts[2] == 0 and sums[2] == 0
  with jax.enable_x64(True):
    sums64, _ = jl.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert sums64.dtype == jnp.float64
  np.testing.assert_allclose(sums64, ws, rtol=1e-12)


def test_pixel_cross_entropy_ignore_label_variants(rng):
  logits = rng.normal(size=(2, 3, 3, 4))
  labels = rng.integers(0, 4, size=(2, 3, 3))
  labels[0, 0] = 255
  loss255 = functools.partial(losses.pixel_cross_entropy, ignore_label=255)
  sums, counts = loss255(jnp.asarray(logits), jnp.asarray(labels))
  ws, wc = ref_pixel_ce(logits, labels, 255)
  np.testing.assert_allclose(sums, ws, rtol=1e-5)
  np.testing.assert_array_equal(counts, wc)
  # The default (ignore -1) treats 255 as a wrong encoding: NaN, not silently dropped ...
  assert np.isnan(jl.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))[0][0])
  # ... also for uint8 label maps, where 255 must not wrap around onto -1.
  u8 = jnp.asarray(labels, jnp.uint8)
  assert np.isnan(jl.pixel_cross_entropy(jnp.asarray(logits), u8)[0][0])
  np.testing.assert_allclose(jl.pixel_cross_entropy(jnp.asarray(logits), u8, ignore_label=255)[0], ws, rtol=1e-5)
  # ignore_label=None counts every pixel.
  clean = np.where(labels == 255, 0, labels)
  sums, counts = jl.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(clean), ignore_label=None)
  np.testing.assert_allclose(sums, ref_pixel_ce(logits, clean, None)[0], rtol=1e-5)
  np.testing.assert_array_equal(counts, [9, 9])


def test_pixel_cross_entropy_as_task_loss_is_mean_over_valid_pixels(rng):
  logits = rng.normal(size=(2, 2, 2, 3))
  labels = np.array([[[0, 1], [-1, -1]], [[2, -1], [-1, -1]]])  # 2 + 1 valid pixels
  task = tasks.Task("seg", losses.pixel_cross_entropy)
  batch = {"inputs": jnp.zeros((2, 1)), "labels": {"seg": jnp.asarray(labels)}}
  total, count = jax.jit(lambda lg: tasks.loss_terms(task, {"seg": lg}, batch))(jnp.asarray(logits, jnp.float32))
  ws, wc = ref_pixel_ce(logits, labels, -1)
  np.testing.assert_allclose(total / count, ws.sum() / wc.sum(), rtol=1e-5)  # not mean of per-image means


def test_pixel_cross_entropy_shape_errors():
  with pytest.raises(ValueError, match=re.escape("logits (2, 4, 4, 3) and labels (2, 4, 3)")):
    jl.pixel_cross_entropy(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 3), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    jl.pixel_cross_entropy(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4)))


@pytest.mark.parametrize("rel", [False, True])
def test_depth_errors_match_reference(rng, rel):
  fn = jl.depth_rel_error if rel else jl.depth_abs_error
  pred = rng.uniform(0.5, 5, size=(3, 4, 5, 1))
  target = rng.uniform(0.5, 5, size=(3, 4, 5))
  target[rng.uniform(size=target.shape) < 0.3] = 0.0
  target[0, 0, 0] = np.nan  # missing depth stored as NaN is invalid too
  ws, wc = ref_depth(pred[..., 0], target, rel)
  sums, counts = fn(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32))
  np.testing.assert_allclose(sums, ws, rtol=1e-5)
  np.testing.assert_array_equal(counts, wc)
  with jax.enable_x64(True):
    sums64, _ = fn(jnp.asarray(pred), jnp.asarray(target[..., None]))  # (B,H,W,1) both
    assert sums64.dtype == jnp.float64
    grad = jax.jit(jax.grad(lambda p: fn(p, jnp.asarray(target))[0].sum()))(jnp.asarray(pred[..., 0]))
  np.testing.assert_allclose(sums64, ws, rtol=1e-12)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~(target > 0)] == 0)


def test_depth_shape_error():
  with pytest.raises(ValueError, match=re.escape("(2, 4, 4, 2)") + ".*" + re.escape("(2, 4, 4)")):
    jl.depth_abs_error(jnp.zeros((2, 4, 4, 2)), jnp.ones((2, 4, 4)))


def test_normal_cosine_loss_matches_reference(rng):
  pred = rng.normal(size=(2, 3, 4, 3))
  target = rng.normal(size=(2, 3, 4, 3))
  target[rng.uniform(size=(2, 3, 4)) < 0.3] = 0.0
  ws, wc = ref_normal(pred, target)
  sums, counts = jl.normal_cosine_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32))
  np.testing.assert_allclose(sums, ws, rtol=1e-5)
  np.testing.assert_array_equal(counts, wc)
  with jax.enable_x64(True):
    sums64, _ = jl.normal_cosine_loss(jnp.asarray(pred), jnp.asarray(target))
    assert sums64.dtype == jnp.float64
  np.testing.assert_allclose(sums64, ws, rtol=1e-12)


def test_normal_cosine_loss_zero_prediction_and_nan_target_have_finite_gradients():
  pred = jnp.array([[[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]]])
  target = jnp.array([[[[0.0, 0.0, 1.0], [jnp.nan, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
  sums, counts = jl.normal_cosine_loss(pred, target)
  np.testing.assert_allclose(sums, [1.0])  # zero prediction: cos = 0; NaN and zero targets skipped
  np.testing.assert_array_equal(counts, [1.0])
  grad = jax.jit(jax.grad(lambda p: jl.normal_cosine_loss(p, target)[0].sum()))(pred)
  assert np.all(np.isfinite(grad))


def test_normal_cosine_loss_shape_error():
  with pytest.raises(ValueError, match=re.escape("pred (2, 4, 4, 3) and target (2, 4, 4)")):
    jl.normal_cosine_loss(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match=re.escape("(2, 4, 4, 2)")):
    jl.normal_cosine_loss(jnp.zeros((2, 4, 4, 2)), jnp.zeros((2, 4, 4, 2)))


# ----------------------------------------------------------------------------- jit


def test_jitted_equals_eager(rng):
  """Everything above runs jitted; check once that it agrees with op-by-op execution."""
  pred, target = jnp.ones((2, 2, 2, 1)), jnp.asarray(rng.uniform(size=(2, 2, 2)), jnp.float32)
  for a, b in zip(jl.depth_rel_error(pred, target), losses.depth_rel_error(pred, target), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
