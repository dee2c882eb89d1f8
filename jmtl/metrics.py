"""Evaluation metrics as accumulable sufficient statistics, and Δm%.

A :class:`Metric` splits a metric into ``stats`` (per batch, summed over the
examples, so they add across batches and devices) and ``compute`` (from the
summed statistics to the value). Accuracy keeps (correct, count); macro-F1 and
mIoU keep a confusion matrix; so evaluation over many batches is exact.

Every ``stats`` takes ``(predictions, labels, mask=None)``; ``mask`` has shape
``(B,)`` and weights every statistic of an example (0 drops an unlabelled
example; its labels may then hold anything, NaN included). ``stats`` runs under
``jax.jit`` and checks shapes statically, raising ``ValueError`` with the
shapes. Stats are in the predictions' float dtype (float32 by default), whose
counts are exact up to 2^24 per entry; beyond that the relative error stays
around 1e-7. An eval loop looks like::

    acc = None
    for batch in data:
      acc = add_stats(acc, jitted_stats(params, batch))   # metric_stats(...) inside
    values = compute_metrics(metrics, acc)               # {name: float}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import losses as _losses

Array = jax.Array


class Metric(NamedTuple):
  """An accumulable metric.

  The built-in factories are cached (``accuracy() is accuracy()``), so tasks
  given the same metrics compare equal and the engine evaluates them as one
  batched op (``docs/design.md``, "Task groups").

  Attributes:
    stats: ``stats(predictions, labels, mask) -> pytree`` of arrays summed over
      the batch; ``mask`` has shape ``(B,)`` and is 0 for unlabelled examples.
    compute: ``compute(summed_stats) -> scalar``.
    higher_is_better: the metric's direction, needed for Δm%.
  """

  stats: Callable[[Array, Array, Array], Any]
  compute: Callable[[Any], Array]
  higher_is_better: bool


def _dtype(pred: Array):
  return jnp.promote_types(pred.dtype, jnp.float32)


def _mask(name: str, mask, b: int, dtype) -> Array:
  if mask is None:
    return jnp.ones((b,), dtype)
  mask = jnp.asarray(mask)
  if tuple(mask.shape) != (b,):
    raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, expected ({b},) for a batch of {b}")
  return mask.astype(dtype)


def _per_elem(m: Array, like: Array) -> Array:
  """The (B,) mask broadcast to ``like``'s shape."""
  return jnp.broadcast_to(m.reshape(m.shape + (1,) * (like.ndim - 1)), like.shape)


def _weighted_sum(m: Array, x: Array) -> Array:
  """``Σ m_b x_b…`` that ignores whatever (NaN included) sits where ``m == 0``."""
  w = _per_elem(m, x)
  return jnp.sum(jnp.where(w != 0, x.astype(m.dtype) * w, 0))


def _ratio(num: Array, den: Array) -> Array:
  """``num / den``, NaN when nothing was counted."""
  den = jnp.asarray(den)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.nan)


def _class_inputs(name: str, logits: Array, labels: Array, num_classes: int | None, dense: bool):
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  want = "(B, H, W, C) and labels (B, H, W)" if dense else "(B, C) and labels (B,)"
  ok = logits.ndim >= 2 and tuple(labels.shape) == tuple(logits.shape[:-1]) and (dense or logits.ndim == 2)
  ok = ok and (num_classes is None or logits.shape[-1] == num_classes)
  if not ok:
    c = f" with C = num_classes = {num_classes}" if num_classes is not None else ""
    raise ValueError(
      f"{name}: expected logits {want}{c}, got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
  return logits, labels.astype(jnp.int32)  # uint8 labels: 255 must not wrap onto -1


def _confusion(labels: Array, preds: Array, weights: Array, num_classes: int) -> Array:
  """``cm[t, p] = Σ weights`` over elements with label ``t`` and prediction ``p``.

  Labels outside ``[0, num_classes)`` are not counted.
  """
  labels, preds, weights = labels.reshape(-1), preds.reshape(-1), weights.reshape(-1)
  ok = (labels >= 0) & (labels < num_classes)
  idx = jnp.where(ok, labels * num_classes + preds, 0)
  cm = jnp.bincount(idx, weights=jnp.where(ok, weights, 0), length=num_classes * num_classes)
  return cm.reshape(num_classes, num_classes)


def _check_num_classes(name: str, num_classes) -> int:
  if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
    raise ValueError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
  return int(num_classes)


def _mean_over_present(scores: Array, present: Array) -> Array:
  n = jnp.sum(present)
  return jnp.where(n > 0, jnp.sum(jnp.where(present, scores, 0)) / jnp.maximum(n, 1), jnp.nan)


@functools.cache
def accuracy() -> Metric:
  """Top-1 accuracy of ``(B, C)`` logits against ``(B,)`` integer labels.

  ``Σ m_b [argmax logits_b = labels_b] / Σ m_b``; NaN when nothing was counted.
  Higher is better.

  Examples:
    >>> import jax.numpy as jnp
    >>> acc = accuracy()
    >>> s = acc.stats(jnp.array([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]]), jnp.array([0, 0, 1]), jnp.array([1, 1, 0]))
    >>> float(acc.compute(s))
    0.5
  """

  def stats(logits, labels, mask=None):
    logits, labels = _class_inputs("accuracy", logits, labels, None, dense=False)
    m = _mask("accuracy", mask, labels.shape[0], _dtype(logits))
    correct = jnp.argmax(logits, axis=-1) == labels
    return {"correct": _weighted_sum(m, correct), "count": jnp.sum(m)}

  return Metric(stats, lambda s: _ratio(s["correct"], s["count"]), True)


@functools.cache
def binary_accuracy() -> Metric:
  """Accuracy of multi-label sigmoid logits, averaged over all labels.

  A label is predicted positive when its logit is ``> 0`` and is positive when
  it is ``> 0.5`` (so 0/1, bool and probability labels all work). The value is
  ``Σ_b m_b Σ_j [ŷ_bj = y_bj] / (Σ_b m_b · C)``. Logits ``(B, C)`` (or ``(B,)``),
  labels of the same shape, or ``(B,)`` against ``(B, 1)``. Higher is better.

  Examples:
    >>> import jax.numpy as jnp
    >>> m = binary_accuracy()
    >>> float(m.compute(m.stats(jnp.array([[3.0, -1.0], [0.5, 2.0]]), jnp.array([[1, 1], [0, 1]]))))
    0.5
  """

  def stats(logits, labels, mask=None):
    logits, labels = _losses.match_shapes("binary_accuracy", logits, labels)
    m = _mask("binary_accuracy", mask, logits.shape[0], _dtype(logits))
    correct = (logits > 0) == (labels > 0.5)
    per_example = math.prod(logits.shape[1:])
    return {"correct": _weighted_sum(m, correct), "count": jnp.sum(m) * per_example}

  return Metric(stats, lambda s: _ratio(s["correct"], s["count"]), True)


@functools.cache
def macro_f1(num_classes: int) -> Metric:
  """Macro-averaged F1 of single-label ``(B, C)`` logits, from a confusion matrix.

  Per class ``c``: ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` with the top-1
  prediction. The macro average runs over the classes that occur among the
  labels or the predictions of the whole evaluation; a class that never
  occurs has an undefined F1 (0/0) and is left out of the average rather than
  counted as 0 or 1. Labels outside ``[0, C)`` are not counted. NaN when
  nothing was counted. The stats are the ``(C, C)`` mask-weighted confusion
  matrix, so summing over batches is exact. Higher is better.

  Args:
    num_classes: ``C``; logits must have ``C`` columns.

  Examples:
    >>> import jax.numpy as jnp
    >>> f1 = macro_f1(3)   # class 2 never occurs: the mean is over classes 0 and 1
    >>> logits = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> round(float(f1.compute(f1.stats(logits, jnp.array([0, 1, 1])))), 4)   # (2/3 + 2/3) / 2
    0.6667
  """
  num_classes = _check_num_classes("macro_f1", num_classes)

  def stats(logits, labels, mask=None):
    logits, labels = _class_inputs("macro_f1", logits, labels, num_classes, dense=False)
    m = _mask("macro_f1", mask, labels.shape[0], _dtype(logits))
    return {"confusion": _confusion(labels, jnp.argmax(logits, -1), m, num_classes)}

  def compute(s):
    cm = jnp.asarray(s["confusion"])
    tp = jnp.diagonal(cm)
    den = cm.sum(0) + cm.sum(1)  # = 2 TP + FP + FN
    return _mean_over_present(2 * tp / jnp.where(den > 0, den, 1), den > 0)

  return Metric(stats, compute, True)


@functools.cache
def miou(num_classes: int, ignore_label: int | None = -1) -> Metric:
  """Mean intersection-over-union for segmentation logits ``(B, H, W, C)``.

  Per class ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` over the pixels of the
  whole evaluation, then the mean over the classes present in the labels or
  the predictions (a class absent from both has IoU 0/0 and is left out).
  Pixels labelled ``ignore_label`` or outside ``[0, C)`` are not counted; if
  ``ignore_label`` is itself a class index (0 = background, say), that class
  is also left out of the mean. The stats are the ``(C, C)`` confusion matrix
  weighted by the mask. Higher is better.

  Args:
    num_classes: ``C``; logits must have ``C`` channels.
    ignore_label: the label of pixels to skip (``None``: skip nothing but
      out-of-range labels).

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]])  # predicts 0 0 1 1
    >>> m = miou(2)
    >>> float(m.compute(m.stats(logits, jnp.array([[[0, 1, 1, -1]]]))))  # (1/2 + 1/2) / 2
    0.5
  """
  num_classes = _check_num_classes("miou", num_classes)

  def stats(logits, labels, mask=None):
    logits, labels = _class_inputs("miou", logits, labels, num_classes, dense=True)
    m = _mask("miou", mask, labels.shape[0], _dtype(logits))
    w = _per_elem(m, labels)
    if ignore_label is not None:
      w = jnp.where(labels != ignore_label, w, 0)
    return {"confusion": _confusion(labels, jnp.argmax(logits, -1), w, num_classes)}

  def compute(s):
    cm = jnp.asarray(s["confusion"])
    tp = jnp.diagonal(cm)
    den = cm.sum(0) + cm.sum(1) - tp  # TP + FP + FN
    present = (den > 0) & (jnp.arange(num_classes) != (-1 if ignore_label is None else ignore_label))
    return _mean_over_present(tp / jnp.where(den > 0, den, 1), present)

  return Metric(stats, compute, True)


@functools.cache
def pixel_accuracy(ignore_label: int | None = -1) -> Metric:
  """Fraction of correctly classified pixels, for logits ``(B, H, W, C)``.

  Pixels labelled ``ignore_label`` or outside ``[0, C)`` are not counted;
  the rest are weighted by their example's mask. Higher is better.

  Args:
    ignore_label: the label of pixels to skip.

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])  # predicts 0 0 1
    >>> m = pixel_accuracy()
    >>> float(m.compute(m.stats(logits, jnp.array([[[0, 1, -1]]]))))
    0.5
  """

  def stats(logits, labels, mask=None):
    logits, labels = _class_inputs("pixel_accuracy", logits, labels, None, dense=True)
    m = _mask("pixel_accuracy", mask, labels.shape[0], _dtype(logits))
    valid = (labels >= 0) & (labels < logits.shape[-1])
    if ignore_label is not None:
      valid &= labels != ignore_label
    correct = valid & (jnp.argmax(logits, -1) == labels)
    return {"correct": _weighted_sum(m, correct), "count": _weighted_sum(m, valid)}

  return Metric(stats, lambda s: _ratio(s["correct"], s["count"]), True)


@functools.cache
def mean_of(loss_fn: Callable, higher_is_better: bool = False) -> Metric:
  """The batch mean of a per-example jmtl loss, as a metric.

  For a ``(B,)`` loss the value is ``Σ m_b loss_b / Σ m_b``; for a
  ``(sums, counts)`` loss it is ``Σ m_b sums_b / Σ m_b counts_b`` (the mean over
  valid pixels of the whole evaluation). NaN when nothing was counted. Use it
  for depth abs/rel error, the normal cosine loss, or a task's own loss.

  Args:
    loss_fn: ``loss_fn(predictions, labels)``, see :mod:`jmtl.losses`.
    higher_is_better: the direction (losses and errors: ``False``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jmtl import losses
    >>> m = mean_of(losses.depth_abs_error)
    >>> pred, target = jnp.array([[[1.0, 2.0]], [[0.0, 0.0]]]), jnp.array([[[2.0, 0.0]], [[3.0, 5.0]]])
    >>> float(m.compute(m.stats(pred, target)))   # (1 + 3 + 5) / 3 valid pixels
    3.0
  """
  name = getattr(loss_fn, "__name__", repr(loss_fn))

  def stats(predictions, labels, mask=None):
    out = loss_fn(predictions, labels)
    sums, counts = out if isinstance(out, tuple) else (out, None)
    b = jnp.shape(labels)[0] if jnp.ndim(labels) else -1
    if tuple(sums.shape) != (b,) or (counts is not None and tuple(counts.shape) != (b,)):
      raise ValueError(
        f"mean_of({name}): the loss gave shape {tuple(sums.shape)}, expected ({b},) for predictions "
        f"{tuple(jnp.shape(predictions))} and labels {tuple(jnp.shape(labels))}"
      )
    m = _mask(f"mean_of({name})", mask, b, _dtype(sums))
    count = jnp.sum(m) if counts is None else _weighted_sum(m, counts)
    return {"sum": _weighted_sum(m, sums), "count": count}

  return Metric(stats, lambda s: _ratio(s["sum"], s["count"]), bool(higher_is_better))


@functools.cache
def mae() -> Metric:
  """Mean absolute error over all elements: ``Σ_b m_b Σ_j |p_bj − t_bj| / (Σ_b m_b · n)``.

  Shapes as in :func:`jmtl.losses.l1` (a lone trailing axis of size 1 is
  squeezed). Lower is better.

  Examples:
    >>> import jax.numpy as jnp
    >>> m = mae()
    >>> float(m.compute(m.stats(jnp.array([[1.0], [3.0]]), jnp.array([0.0, 1.0]))))
    1.5
  """
  return mean_of(_losses.l1)


@functools.cache
def rmse() -> Metric:
  """Root mean squared error over all elements: ``sqrt(Σ_b m_b Σ_j (p_bj − t_bj)² / (Σ_b m_b · n))``.

  The stats are the summed squared errors, so the root is taken once, over
  the whole evaluation. Shapes as in :func:`jmtl.losses.mse`. Lower is better.

  Examples:
    >>> import jax.numpy as jnp
    >>> m = rmse()
    >>> round(float(m.compute(m.stats(jnp.array([[1.0], [3.0]]), jnp.array([0.0, 0.0])))), 4)   # sqrt((1 + 9) / 2)
    2.2361
  """
  inner = mean_of(_losses.mse)
  return Metric(inner.stats, lambda s: jnp.sqrt(inner.compute(s)), False)


def metric_stats(metrics: Mapping[str, Metric], predictions: Array, labels: Array, mask: Array | None = None) -> dict:
  """The batch stats of every metric of one task: ``{name: metric.stats(...)}``.

  Jit-compatible; sum the results over batches with :func:`add_stats`.

  Examples:
    >>> import jax.numpy as jnp
    >>> s = metric_stats({"acc": accuracy()}, jnp.array([[1.0, 0.0]]), jnp.array([0]))
    >>> float(s["acc"]["correct"])
    1.0
  """
  return {name: metric.stats(predictions, labels, mask) for name, metric in metrics.items()}


def compute_metrics(metrics: Mapping[str, Metric], summed_stats: Mapping[str, Any]) -> dict[str, float]:
  """The value of every metric from its summed stats, as Python floats (call outside ``jit``).

  Raises:
    KeyError: naming a metric that has no stats.

  Examples:
    >>> import jax.numpy as jnp
    >>> metrics = {"acc": accuracy()}
    >>> compute_metrics(metrics, metric_stats(metrics, jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.array([0, 1])))
    {'acc': 0.5}
  """
  missing = [n for n in metrics if n not in summed_stats]
  if missing:
    raise KeyError(f"no stats for metrics {missing}; stats present: {sorted(summed_stats)}")
  return {name: float(metric.compute(summed_stats[name])) for name, metric in metrics.items()}


def add_stats(a: Any, b: Any) -> Any:
  """Adds two stats pytrees leaf by leaf; ``a=None`` starts an accumulation.

  Examples:
    >>> import jax.numpy as jnp
    >>> acc = None
    >>> for s in [{"n": jnp.array(1.0)}, {"n": jnp.array(2.0)}]:
    ...   acc = add_stats(acc, s)
    >>> float(acc["n"])
    3.0
  """
  if a is None:
    return b
  return jax.tree.map(lambda x, y: x + y, a, b)


def _paired(
  fn: str, results: Mapping[str, float], baselines: Mapping[str, float], higher_is_better: Mapping[str, bool]
):
  if not results:
    raise ValueError(f"{fn}: no results given")
  out = []
  for name, value in results.items():
    if name not in baselines:
      raise ValueError(f"{fn}: metric {name!r} has no single-task baseline (baselines: {sorted(baselines)})")
    if name not in higher_is_better:
      raise ValueError(f"{fn}: metric {name!r} has no higher_is_better entry (given: {sorted(higher_is_better)})")
    mt, st, hib = float(value), float(baselines[name]), higher_is_better[name]
    if not isinstance(hib, (bool, np.bool_)):
      raise ValueError(f"{fn}: metric {name!r}: higher_is_better must be a bool, got {hib!r}")
    if not (math.isfinite(mt) and math.isfinite(st)):
      raise ValueError(f"{fn}: metric {name!r}: result {mt} and baseline {st} must both be finite")
    out.append((name, mt, st, bool(hib)))
  return out


def delta_m(
  results: Mapping[str, float], baselines: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> float:
  """Δm%: the mean relative gain of a multi-task model over single-task baselines.

  ``Δm = (100 / T) Σ_i (−1)^{l_i} (M_mt,i − M_st,i) / |M_st,i|`` over the ``T``
  entries of ``results``, with ``l_i = 1`` when lower is better (Maninis et
  al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; Vandenhende et
  al., "Multi-Task Learning for Dense Prediction Tasks: A Survey", TPAMI
  2021). Positive means the multi-task model is better on average. The papers
  divide by ``M_st,i``; the absolute value only differs for a negative
  baseline, where it keeps "positive = better".

  Args:
    results: flat ``{metric name: value}`` of the multi-task model, one entry
      per task metric (``{"left/acc": 0.9, "depth/abs_err": 0.4}``).
    baselines: the same names for the single-task models (extra names are
      ignored).
    higher_is_better: ``{metric name: bool}``.

  Returns:
    Δm in percent, a Python float.

  Raises:
    ValueError: naming the metric when a baseline or direction is missing, a
      baseline is zero, or a value is not finite.

  Examples:
    >>> delta_m({"cls/acc": 0.75, "reg/mae": 0.3125}, {"cls/acc": 0.5, "reg/mae": 0.25},
    ...         {"cls/acc": True, "reg/mae": False})   # (+50 − 25) / 2
    12.5
  """
  terms = []
  for name, mt, st, hib in _paired("delta_m", results, baselines, higher_is_better):
    if st == 0:
      raise ValueError(f"delta_m: metric {name!r} has a zero single-task baseline; its relative change is undefined")
    terms.append((1.0 if hib else -1.0) * (mt - st) / abs(st))
  return 100.0 * sum(terms) / len(terms)


def negative_transfer(
  results: Mapping[str, float], baselines: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> dict[str, bool]:
  """Which metrics the multi-task model does worse on than its single-task baseline.

  ``True`` where ``M_mt < M_st`` (higher is better) or ``M_mt > M_st`` (lower is
  better); ties are ``False``. Arguments as in :func:`delta_m`.

  Raises:
    ValueError: naming the metric when a baseline or direction is missing or
      a value is not finite.

  Examples:
    >>> negative_transfer({"cls/acc": 0.9, "reg/mae": 0.5}, {"cls/acc": 0.8, "reg/mae": 0.4},
    ...                   {"cls/acc": True, "reg/mae": False})
    {'cls/acc': False, 'reg/mae': True}
  """
  pairs = _paired("negative_transfer", results, baselines, higher_is_better)
  return {name: (mt < st) if hib else (mt > st) for name, mt, st, hib in pairs}
