"""Metrics against brute-force loops; accumulation; Δm%."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmtl import losses
from jmtl import metrics


def jstats(metric, *args):
  """The metric's stats, jitted (fast to compile, and checks that they trace)."""
  return jax.jit(metric.stats)(*args)


def value(metric, *args):
  return float(metric.compute(jstats(metric, *args)))


# ----------------------------------------------------------------------------- brute-force references


def ref_class_counts(labels, preds, weights, num_classes):
  """Per-class (tp, fp, fn), by looping over the labelled elements."""
  tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
  for y, p, w in zip(np.ravel(labels), np.ravel(preds), np.ravel(weights), strict=True):
    if w == 0 or not 0 <= y < num_classes:
      continue
    if y == p:
      tp[y] += w
    else:
      fn[y] += w
      fp[p] += w
  return tp, fp, fn


def ref_macro_f1(labels, preds, weights, num_classes):
  tp, fp, fn = ref_class_counts(labels, preds, weights, num_classes)
  scores = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c] > 0]
  return sum(scores) / len(scores)


def ref_miou(labels, preds, weights, num_classes):
  tp, fp, fn = ref_class_counts(labels, preds, weights, num_classes)
  scores = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c] > 0]
  return sum(scores) / len(scores)


def pixel_weights(labels, mask, ignore):
  w = np.broadcast_to(mask.reshape((-1,) + (1,) * (labels.ndim - 1)), labels.shape).astype(float)
  return np.where(labels == ignore, 0.0, w)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ----------------------------------------------------------------------------- classification


def test_accuracy_with_mask(rng):
  logits = rng.normal(size=(20, 4))
  labels = rng.integers(0, 4, size=20)
  mask = (rng.uniform(size=20) < 0.7).astype(np.float32)
  labels[mask == 0] = 99  # garbage labels of unlabelled examples must not matter
  want = sum(m * (np.argmax(lg) == y) for lg, y, m in zip(logits, labels, mask, strict=True)) / mask.sum()
  assert value(metrics.accuracy(), jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)) == pytest.approx(want)
  assert metrics.accuracy().higher_is_better
  # No mask means every example counts; an all-zero mask gives NaN, not 0.
  want_all = np.mean(np.argmax(logits, 1) == labels)
  assert value(metrics.accuracy(), jnp.asarray(logits), jnp.asarray(labels)) == pytest.approx(want_all)
  assert math.isnan(value(metrics.accuracy(), jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(20)))


def test_accuracy_float64(rng):
  logits, labels = rng.normal(size=(6, 3)), rng.integers(0, 3, size=6)
  with jax.enable_x64(True):
    s = jstats(metrics.accuracy(), jnp.asarray(logits), jnp.asarray(labels))
    assert s["correct"].dtype == jnp.float64
    assert float(metrics.accuracy().compute(s)) == pytest.approx(np.mean(np.argmax(logits, 1) == labels))


def test_classification_shape_errors():
  with pytest.raises(ValueError, match=re.escape("logits (4, 3) and labels (4, 2)")):
    metrics.accuracy().stats(jnp.zeros((4, 3)), jnp.zeros((4, 2), jnp.int32))
  with pytest.raises(ValueError, match=re.escape("num_classes = 5") + ".*" + re.escape("(4, 3)")):
    metrics.macro_f1(5).stats(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=re.escape("mask has shape (3,), expected (4,)")):
    metrics.accuracy().stats(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32), jnp.ones(3))
  with pytest.raises(ValueError, match="num_classes"):
    metrics.miou(0)


def test_binary_accuracy(rng):
  logits = rng.normal(size=(8, 5))
  labels = rng.integers(0, 2, size=(8, 5))
  mask = np.array([1, 1, 0, 1, 1, 0, 1, 1], np.float32)
  correct = ((logits > 0) == (labels > 0.5)).sum(1)
  want = (correct * mask).sum() / (mask.sum() * 5)
  m = metrics.binary_accuracy()
  assert value(m, jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)) == pytest.approx(want)
  assert value(m, jnp.asarray(logits[:, :1]), jnp.asarray(labels[:, 0])) == pytest.approx(
    np.mean((logits[:, 0] > 0) == labels[:, 0])
  )


def test_macro_f1_matches_brute_force(rng):
  num_classes = 5
  logits = rng.normal(size=(40, num_classes))
  logits[:, 4] -= 100  # class 4 is never predicted ...
  labels = rng.integers(0, 4, size=40)  # ... nor labelled: excluded from the mean
  mask = (rng.uniform(size=40) < 0.8).astype(np.float32)
  want = ref_macro_f1(labels, np.argmax(logits, 1), mask, num_classes)
  got = value(metrics.macro_f1(num_classes), jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  assert got == pytest.approx(want, rel=1e-6)
  # Counting the absent class as F1 = 0 would give a different, lower number.
  assert got > want * 4 / 5 + 1e-3


def test_macro_f1_class_only_predicted_counts_as_zero():
  # labels 0 0, predictions 0 1: F1_0 = 2/3, F1_1 = 0 (predicted but never labelled), class 2 excluded.
  logits = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  assert value(metrics.macro_f1(3), logits, jnp.array([0, 0])) == pytest.approx((2 / 3 + 0) / 2)


def test_confusion_metrics_accumulate_exactly(rng):
  """Stats of two batches added == stats of the concatenated batch, for F1 and mIoU."""
  f1 = metrics.macro_f1(4)
  logits = rng.normal(size=(30, 4))
  labels = rng.integers(0, 4, size=30)
  mask = (rng.uniform(size=30) < 0.8).astype(np.float32)
  halves = (slice(0, 15), slice(15, 30))
  parts = [jstats(f1, jnp.asarray(logits[s]), jnp.asarray(labels[s]), jnp.asarray(mask[s])) for s in halves]
  whole = jstats(f1, jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(metrics.add_stats(*parts)["confusion"], whole["confusion"])
  assert float(f1.compute(metrics.add_stats(*parts))) == pytest.approx(float(f1.compute(whole)))
  # Averaging per-batch F1 is not the same thing, which is why the stats are a confusion matrix.
  per_batch = np.mean([float(f1.compute(p)) for p in parts])
  assert per_batch != pytest.approx(float(f1.compute(whole)))

  iou = metrics.miou(3)
  seg = rng.normal(size=(4, 3, 5, 3))
  seg_labels = rng.integers(-1, 3, size=(4, 3, 5))
  acc = None
  for s in (slice(0, 2), slice(2, 4)):
    acc = metrics.add_stats(acc, jstats(iou, jnp.asarray(seg[s]), jnp.asarray(seg_labels[s])))
  whole = jstats(iou, jnp.asarray(seg), jnp.asarray(seg_labels))
  np.testing.assert_allclose(acc["confusion"], whole["confusion"])
  assert float(iou.compute(acc)) == pytest.approx(float(iou.compute(whole)))


# ----------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("ignore", [-1, 255])
def test_miou_and_pixel_accuracy_match_brute_force(rng, ignore):
  num_classes = 4
  logits = rng.normal(size=(3, 4, 5, num_classes))
  labels = rng.integers(0, 3, size=(3, 4, 5))  # class 3 is rarely predicted and never labelled
  labels[rng.uniform(size=labels.shape) < 0.2] = ignore
  mask = np.array([1.0, 0.0, 1.0], np.float32)
  preds = np.argmax(logits, -1)
  w = pixel_weights(labels, mask, ignore)
  # 255 comes as a uint8 label map, the usual PNG encoding.
  args = jnp.asarray(logits), jnp.asarray(labels, jnp.uint8 if ignore == 255 else jnp.int32), jnp.asarray(mask)
  got = value(metrics.miou(num_classes, ignore_label=ignore), *args)
  assert got == pytest.approx(ref_miou(labels, preds, w, num_classes), rel=1e-6)
  want_acc = np.sum(w * (preds == labels)) / np.sum(w)
  assert value(metrics.pixel_accuracy(ignore_label=ignore), *args) == pytest.approx(want_acc, rel=1e-6)


def test_segmentation_out_of_range_labels_are_not_counted():
  logits = jnp.array([[[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]])  # predicts 0 1 1
  labels = jnp.array([[[0, 7, 1]]])  # 7 is neither a class nor the ignore label
  assert value(metrics.pixel_accuracy(), logits, labels) == 1.0
  assert value(metrics.miou(2), logits, labels) == 1.0


def test_miou_ignore_label_that_is_a_class_is_left_out_of_the_mean():
  # Labels 0 1 2 1, predictions 0 1 2 0, ignore_label=0 (background): the label-0 pixel is skipped, leaving
  # (1->1), (2->2), (1->0). IoU_1 = 1/2, IoU_2 = 1; class 0 only has a false positive (IoU 0) and, being the
  # ignored class, is left out: (1/2 + 1) / 2 = 0.75 (averaging it in would give 0.5).
  logits = jnp.asarray(np.eye(3)[[0, 1, 2, 0]][None, None])
  labels = jnp.array([[[0, 1, 2, 1]]])
  assert value(metrics.miou(3, ignore_label=0), logits, labels) == pytest.approx(0.75)
  # Nothing ignored: IoU_0 = 1/2 (TP 1, FP 1), IoU_1 = 1/2, IoU_2 = 1.
  assert value(metrics.miou(3, ignore_label=None), logits, labels) == pytest.approx(2 / 3)


def test_segmentation_shape_error():
  with pytest.raises(ValueError, match=re.escape("logits (2, 4, 4, 3) and labels (2, 4, 5)")):
    metrics.miou(3).stats(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 5), jnp.int32))
  with pytest.raises(ValueError, match=re.escape("(2, 4, 4, 3)")):
    metrics.pixel_accuracy().stats(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 1), jnp.int32))


# ----------------------------------------------------------------------------- regression and loss means


def test_mae_rmse_with_mask_and_nan_labels(rng):
  pred, target = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
  mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
  target[mask == 0] = np.nan  # unlabelled regression targets are often NaN
  keep = mask == 1
  args = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask)
  assert value(metrics.mae(), *args) == pytest.approx(np.abs(pred - target)[keep].mean(), rel=1e-6)
  assert value(metrics.rmse(), *args) == pytest.approx(np.sqrt(((pred - target) ** 2)[keep].mean()), rel=1e-6)
  assert not metrics.mae().higher_is_better and not metrics.rmse().higher_is_better
  with jax.enable_x64(True):
    s = jstats(metrics.rmse(), jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask, jnp.float64))
    assert s["sum"].dtype == jnp.float64
    assert float(metrics.rmse().compute(s)) == pytest.approx(np.sqrt(((pred - target) ** 2)[keep].mean()), rel=1e-12)


def test_mae_shape_rules():
  # (B, 1) against (B,) is squeezed; (B, 3) against (B,) is an error naming both shapes.
  assert value(metrics.mae(), jnp.array([[1.0], [3.0]]), jnp.array([0.0, 0.0])) == 2.0
  with pytest.raises(ValueError, match=re.escape("(2, 3)") + ".*" + re.escape("(2,)")):
    metrics.mae().stats(jnp.zeros((2, 3)), jnp.zeros(2))


def test_mean_of_sums_counts_is_mean_over_valid_pixels(rng):
  pred = rng.uniform(0.5, 3, size=(4, 3, 3))
  target = rng.uniform(0.5, 3, size=(4, 3, 3))
  target[rng.uniform(size=target.shape) < 0.4] = 0.0
  mask = np.array([1, 1, 0, 1], np.float32)
  valid = (target > 0) & (mask[:, None, None] == 1)
  args = jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask)
  got_abs = value(metrics.mean_of(losses.depth_abs_error), *args)
  got_rel = value(metrics.mean_of(losses.depth_rel_error), *args)
  assert got_abs == pytest.approx(np.abs(pred - target)[valid].mean(), rel=1e-6)
  assert got_rel == pytest.approx((np.abs(pred - target) / np.where(target > 0, target, 1))[valid].mean(), rel=1e-6)


def test_mean_of_array_loss_and_direction(rng):
  logits, labels = rng.normal(size=(5, 3)), rng.integers(0, 3, size=5)
  mask = np.array([1, 0, 1, 1, 1], np.float32)
  per = np.asarray(losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)))
  m = metrics.mean_of(losses.softmax_cross_entropy)
  assert value(m, jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask)) == pytest.approx(
    (per * mask).sum() / mask.sum(), rel=1e-6
  )
  assert not m.higher_is_better and metrics.mean_of(losses.l1, higher_is_better=True).higher_is_better


def test_mean_of_rejects_a_non_per_example_loss():
  with pytest.raises(ValueError, match=re.escape("gave shape (2, 3), expected (2,)")):
    metrics.mean_of(lambda p, y: p - y).stats(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# ----------------------------------------------------------------------------- eval-loop helpers


def test_eval_loop_helpers(rng):
  ce = metrics.mean_of(losses.softmax_cross_entropy)
  task_metrics = {"acc": metrics.accuracy(), "f1": metrics.macro_f1(3), "ce": ce}
  logits, labels = rng.normal(size=(12, 3)).astype(np.float32), rng.integers(0, 3, size=12)
  step = jax.jit(lambda p, y, m: metrics.metric_stats(task_metrics, p, y, m))
  acc = None
  for s in (slice(0, 6), slice(6, 12)):
    acc = metrics.add_stats(acc, step(jnp.asarray(logits[s]), jnp.asarray(labels[s]), jnp.ones(s.stop - s.start)))
  got = metrics.compute_metrics(task_metrics, acc)
  assert set(got) == {"acc", "f1", "ce"} and all(type(v) is float for v in got.values())
  assert got["acc"] == pytest.approx(np.mean(np.argmax(logits, 1) == labels))
  assert got["f1"] == pytest.approx(ref_macro_f1(labels, np.argmax(logits, 1), np.ones(12), 3), rel=1e-6)
  with pytest.raises(KeyError, match="f1"):
    metrics.compute_metrics(task_metrics, {"acc": acc["acc"]})


# ----------------------------------------------------------------------------- Δm%

HIB = {"seg/miou": True, "depth/abs_err": False}


def test_delta_m_hand_computed():
  # seg/miou (higher is better): 0.55 vs 0.50 -> +(0.55 - 0.50) / 0.50 = +0.10
  # depth/abs_err (lower is better): 0.60 vs 0.50 -> -(0.60 - 0.50) / 0.50 = -0.20
  # Δm = 100 / 2 * (0.10 - 0.20) = -5.0  (the multi-task model is worse on average)
  results = {"seg/miou": 0.55, "depth/abs_err": 0.60}
  baselines = {"seg/miou": 0.50, "depth/abs_err": 0.50, "normal/mean_err": 20.0}  # extra baselines are fine
  assert metrics.delta_m(results, baselines, HIB) == pytest.approx(-5.0)
  # Better on both: miou +0.10, abs_err -(0.45 - 0.50) / 0.50 = +0.10 -> Δm = +10.0
  assert metrics.delta_m({"seg/miou": 0.55, "depth/abs_err": 0.45}, baselines, HIB) == pytest.approx(10.0)
  assert metrics.negative_transfer(results, baselines, HIB) == {"seg/miou": False, "depth/abs_err": True}
  # Ties are not negative transfer, and give Δm = 0.
  assert metrics.negative_transfer(baselines | {}, baselines, HIB | {"normal/mean_err": False}) == {
    "seg/miou": False,
    "depth/abs_err": False,
    "normal/mean_err": False,
  }
  assert metrics.delta_m({"seg/miou": 0.5}, baselines, {"seg/miou": np.bool_(True)}) == 0.0


def test_delta_m_errors_name_the_metric():
  baselines = {"seg/miou": 0.5, "depth/abs_err": 0.0}
  with pytest.raises(ValueError, match=r"'depth/abs_err'.*zero"):
    metrics.delta_m({"seg/miou": 0.6, "depth/abs_err": 0.1}, baselines, HIB)
  with pytest.raises(ValueError, match=r"'normal/err'.*baseline"):
    metrics.delta_m({"normal/err": 0.1}, baselines, HIB)
  with pytest.raises(ValueError, match=r"'seg/miou'.*higher_is_better"):
    metrics.negative_transfer({"seg/miou": 0.6}, baselines, {})
  with pytest.raises(ValueError, match=r"'seg/miou'.*finite"):
    metrics.delta_m({"seg/miou": float("nan")}, baselines, HIB)
  with pytest.raises(ValueError, match="no results"):
    metrics.delta_m({}, baselines, HIB)
