"""Per-example losses for the usual multi-task heads.

Every loss is ``loss(predictions, labels)`` and returns, for a batch of ``B``
examples, either

* a ``(B,)`` array (one value per example), or
* a pair ``(sums, counts)`` of ``(B,)`` arrays, for dense tasks where an
  example holds a variable number of valid terms (valid pixels). The batch loss
  is then ``Σ sums / Σ counts``: the mean over the valid pixels of the whole
  batch, not a mean of per-image means.

:func:`jmtl.tasks.loss_terms` reduces either form with the task's label mask.

Conventions shared by all losses:

* Shapes are checked up front (on static shapes, so it is free under
  ``jax.jit``); a mismatch raises ``ValueError`` naming the loss and both
  shapes.
* Results are computed in ``promote_types(predictions.dtype, float32)``:
  float64 predictions give float64 losses, float32 stay float32, and half
  precision (bfloat16, float16) is computed and returned in float32 so that
  log-probabilities and pixel sums keep their precision.
* Integer class labels outside ``[0, C)`` (other than a declared
  ``ignore_label``) give a NaN loss, so a wrong label encoding fails loudly
  instead of training silently on fewer terms. Unlabelled examples belong in
  the task mask, which selects them out before any NaN can spread.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
  "depth_abs_error",
  "depth_rel_error",
  "l1",
  "match_shapes",
  "mse",
  "normal_cosine_loss",
  "pixel_cross_entropy",
  "sigmoid_binary_cross_entropy",
  "softmax_cross_entropy",
]


def _compute_dtype(x: Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def _rest_axes(x: Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim))


def _int_labels(name: str, logits: Array, labels: Array) -> Array:
  """Checks for integer labels and widens them to int32 (so uint8 255 never equals -1)."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"{name}: labels must be integer class indices, got dtype {labels.dtype} "
      f"(logits {tuple(logits.shape)}, labels {tuple(labels.shape)})"
    )
  return labels.astype(jnp.int32)


def _label_log_prob(logits: Array, labels: Array) -> Array:
  """log softmax(logits)[label] along the last axis; NaN for labels outside [0, C)."""
  logp = jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)
  picked = jnp.take_along_axis(
    logp, labels[..., None], axis=-1, mode="fill", fill_value=jnp.nan, wrap_negative_indices=False
  )
  return picked[..., 0]


def match_shapes(name: str, pred: Array, target: Array) -> tuple[Array, Array]:
  """Aligns a prediction with its target, allowing one trailing axis of size 1.

  The two shapes must be equal, except that one of them may carry one extra
  trailing axis of size 1 (a ``(B, 1)`` regression head against ``(B,)``
  targets, or a ``(B, H, W, 1)`` depth map against ``(B, H, W)``); that axis
  is squeezed. Any other mismatch raises, so a ``(B, 3)`` prediction is never
  broadcast against a ``(B,)`` target.

  Args:
    name: the caller's name, for the error message.
    pred: predictions with a leading batch axis.
    target: targets with a leading batch axis.

  Returns:
    ``(pred, target)`` of equal shape.

  Raises:
    ValueError: with both shapes, when they do not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> p, t = match_shapes("mse", jnp.zeros((4, 1)), jnp.zeros(4))
    >>> p.shape, t.shape
    ((4,), (4,))
  """
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  ps, ts = tuple(pred.shape), tuple(target.shape)
  if ps != ts:
    if len(ps) == len(ts) + 1 and ps[-1] == 1 and ps[:-1] == ts:
      pred = pred[..., 0]
    elif len(ts) == len(ps) + 1 and ts[-1] == 1 and ts[:-1] == ps:
      target = target[..., 0]
    else:
      raise ValueError(
        f"{name}: predictions of shape {ps} do not match targets of shape {ts}; the shapes must be equal, "
        "up to one trailing axis of size 1"
      )
  if pred.ndim == 0:
    raise ValueError(f"{name}: predictions and targets need a leading batch axis, got shapes {ps} and {ts}")
  return pred, target


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy with integer labels, per example.

  ``loss_b = −log softmax(logits_b)[labels_b] = logsumexp(logits_b) − logits_b[labels_b]``,
  computed with ``log_softmax`` so large logits do not overflow.

  Args:
    logits: ``(B, C)`` unnormalised scores.
    labels: ``(B,)`` integer class indices in ``[0, C)``.

  Returns:
    ``(B,)`` losses.

  Raises:
    ValueError: when the shapes are not ``(B, C)`` and ``(B,)`` (one-hot
      labels, say) or the labels are not integers.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = softmax_cross_entropy(jnp.array([[0.0, 0.0], [10.0, 0.0]]), jnp.array([1, 0]))
    >>> [round(float(v), 4) for v in loss]
    [0.6931, 0.0]
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.ndim != 2 or tuple(labels.shape) != tuple(logits.shape[:1]):
    hint = " (pass class indices, e.g. labels.argmax(-1), not one-hot labels)" if labels.shape == logits.shape else ""
    raise ValueError(
      f"softmax_cross_entropy: expected logits (B, C) and integer labels (B,), got logits {tuple(logits.shape)} "
      f"and labels {tuple(labels.shape)}{hint}"
    )
  labels = _int_labels("softmax_cross_entropy", logits, labels)
  return -_label_log_prob(logits, labels)


def sigmoid_binary_cross_entropy(logits: Array, labels: Array) -> Array:
  """Multi-label sigmoid cross-entropy, averaged over the labels of an example.

  Per label, ``ℓ = −[y log σ(x) + (1 − y) log(1 − σ(x))] = softplus(x) − y·x``,
  the form that stays finite for any logit; ``loss_b`` is the mean of ``ℓ``
  over the non-batch axes (the ``C`` labels). ``y`` may be 0/1 or a
  probability in ``[0, 1]``.

  Args:
    logits: ``(B, C)`` (or ``(B,)``) logits.
    labels: the same shape (bool, int or float); a ``(B,)`` label against
      ``(B, 1)`` logits is accepted, see :func:`match_shapes`.

  Returns:
    ``(B,)`` losses.

  Raises:
    ValueError: when the shapes differ.

  Examples:
    >>> import jax.numpy as jnp
    >>> loss = sigmoid_binary_cross_entropy(jnp.array([[0.0, 100.0]]), jnp.array([[1, 1]]))
    >>> round(float(loss[0]), 4)  # (log 2 + 0) / 2
    0.3466
  """
  logits, labels = match_shapes("sigmoid_binary_cross_entropy", logits, labels)
  x = logits.astype(_compute_dtype(logits))
  y = labels.astype(x.dtype)
  return jnp.mean(jax.nn.softplus(x) - y * x, axis=_rest_axes(x))


def mse(pred: Array, target: Array) -> Array:
  """Mean squared error per example: ``loss_b = mean_j (pred_bj − target_bj)²``.

  The mean runs over all non-batch axes. A trailing axis of size 1 on either
  side is squeezed when that is the only difference (``(B, 1)`` against
  ``(B,)``); any other mismatch raises.

  Args:
    pred: ``(B, ...)`` predictions.
    target: targets of the same shape.

  Returns:
    ``(B,)`` losses.

  Raises:
    ValueError: with both shapes, when they do not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> mse(jnp.array([[1.0], [3.0]]), jnp.array([0.0, 1.0])).tolist()
    [1.0, 4.0]
  """
  p, t = match_shapes("mse", pred, target)
  p = p.astype(_compute_dtype(p))
  return jnp.mean(jnp.square(p - t.astype(p.dtype)), axis=_rest_axes(p))


def l1(pred: Array, target: Array) -> Array:
  """Mean absolute error per example: ``loss_b = mean_j |pred_bj − target_bj|``.

  Shapes follow :func:`mse` (a lone trailing axis of size 1 is squeezed).

  Args:
    pred: ``(B, ...)`` predictions.
    target: targets of the same shape.

  Returns:
    ``(B,)`` losses.

  Raises:
    ValueError: with both shapes, when they do not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> l1(jnp.array([[1.0, -1.0]]), jnp.array([[0.0, 1.0]])).tolist()
    [1.5]
  """
  p, t = match_shapes("l1", pred, target)
  p = p.astype(_compute_dtype(p))
  return jnp.mean(jnp.abs(p - t.astype(p.dtype)), axis=_rest_axes(p))


def pixel_cross_entropy(logits: Array, labels: Array, *, ignore_label: int | None = -1) -> tuple[Array, Array]:
  """Per-pixel softmax cross-entropy for semantic segmentation, as ``(sums, counts)``.

  ``sums_b = Σ_{valid p} −log softmax(logits_bp)[labels_bp]`` and ``counts_b`` is
  the number of valid pixels, i.e. those whose label is not ``ignore_label``;
  the batch loss ``Σ sums / Σ counts`` is the mean over all valid pixels of
  the batch, the standard segmentation loss of dense multi-task benchmarks
  (e.g. Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR
  2019, on NYUv2 and CityScapes).

  Used as is, it ignores label ``-1``. For another ignore label (CityScapes'
  ``255``, say), bind the keyword::

      functools.partial(pixel_cross_entropy, ignore_label=255)

  and pass that as the task's loss. ``ignore_label=None`` ignores nothing.

  Args:
    logits: ``(B, H, W, C)`` scores (any ``(B, ..., C)`` works).
    labels: ``(B, H, W)`` integer labels: ``logits.shape[:-1]``.
    ignore_label: the label of pixels that do not count (keyword only).

  Returns:
    ``(sums, counts)``, two ``(B,)`` arrays in the loss dtype.

  Raises:
    ValueError: when ``labels.shape != logits.shape[:-1]`` or the labels are
      not integers.

  Examples:
    >>> import functools
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 1, 3, 2))           # uniform: −log(1/2) per pixel
    >>> labels = jnp.array([[[0, 1, 255]]])
    >>> sums, counts = functools.partial(pixel_cross_entropy, ignore_label=255)(logits, labels)
    >>> round(float(sums[0]), 4), float(counts[0])
    (1.3863, 2.0)
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.ndim < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
    raise ValueError(
      f"pixel_cross_entropy: expected logits (B, H, W, C) and integer labels (B, H, W) = logits.shape[:-1], "
      f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
    )
  labels = _int_labels("pixel_cross_entropy", logits, labels)
  valid = jnp.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
  nll = -_label_log_prob(logits, jnp.where(valid, labels, 0))
  nll = jnp.where(valid, nll, 0)
  axes = _rest_axes(labels)
  return jnp.sum(nll, axis=axes), jnp.sum(valid, axis=axes).astype(nll.dtype)


def _depth_inputs(name: str, pred: Array, target: Array) -> tuple[Array, Array, Array]:
  p, t = match_shapes(name, pred, target)
  p = p.astype(_compute_dtype(p))
  t = t.astype(p.dtype)
  valid = t > 0  # False for NaN too
  # Replace invalid targets before any arithmetic so NaNs cannot reach gradients.
  return p, jnp.where(valid, t, 1), valid


def depth_abs_error(pred: Array, target: Array) -> tuple[Array, Array]:
  """Absolute depth error over valid pixels, as ``(sums, counts)``.

  ``sums_b = Σ_{p: t_bp > 0} |pred_bp − t_bp|`` and ``counts_b`` is the number of
  pixels with a positive target depth (missing depth is stored as 0). The batch
  value ``Σ sums / Σ counts`` is the L1 depth loss and the "abs err" metric of
  Liu et al., "End-to-End Multi-Task Learning with Attention" (MTAN), CVPR
  2019.

  Args:
    pred: ``(B, H, W)`` or ``(B, H, W, 1)`` predicted depth.
    target: ``(B, H, W)`` or ``(B, H, W, 1)`` depth, ``<= 0`` (or NaN) where
      missing.

  Returns:
    ``(sums, counts)``, two ``(B,)`` arrays.

  Raises:
    ValueError: when the shapes differ by more than a trailing axis of size 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> sums, counts = depth_abs_error(jnp.array([[[1.0, 2.0, 5.0]]]), jnp.array([[[2.0, 2.5, 0.0]]]))
    >>> float(sums[0]), float(counts[0])
    (1.5, 2.0)
  """
  p, t, valid = _depth_inputs("depth_abs_error", pred, target)
  axes = _rest_axes(p)
  err = jnp.where(valid, jnp.abs(p - t), 0)
  return jnp.sum(err, axis=axes), jnp.sum(valid, axis=axes).astype(p.dtype)


def depth_rel_error(pred: Array, target: Array) -> tuple[Array, Array]:
  """Relative depth error over valid pixels, as ``(sums, counts)``.

  ``sums_b = Σ_{p: t_bp > 0} |pred_bp − t_bp| / t_bp``; ``counts_b`` as in
  :func:`depth_abs_error`. The batch value is the "rel err" metric of Liu et
  al. (MTAN), CVPR 2019.

  Args:
    pred: ``(B, H, W)`` or ``(B, H, W, 1)`` predicted depth.
    target: ``(B, H, W)`` or ``(B, H, W, 1)`` depth, ``<= 0`` (or NaN) where
      missing.

  Returns:
    ``(sums, counts)``, two ``(B,)`` arrays.

  Raises:
    ValueError: when the shapes differ by more than a trailing axis of size 1.

  Examples:
    >>> import jax.numpy as jnp
    >>> sums, counts = depth_rel_error(jnp.array([[[1.0, 3.0, 5.0]]]), jnp.array([[[2.0, 2.0, 0.0]]]))
    >>> float(sums[0]), float(counts[0])
    (1.0, 2.0)
  """
  p, t, valid = _depth_inputs("depth_rel_error", pred, target)
  axes = _rest_axes(p)
  err = jnp.where(valid, jnp.abs(p - t) / t, 0)
  return jnp.sum(err, axis=axes), jnp.sum(valid, axis=axes).astype(p.dtype)


def normal_cosine_loss(pred: Array, target: Array, *, eps: float = 1e-8) -> tuple[Array, Array]:
  """Surface-normal loss ``1 − cos(pred, target)`` over valid pixels, as ``(sums, counts)``.

  ``sums_b = Σ_{p: ‖t_bp‖ > 0} (1 − ⟨pred_bp, t_bp⟩ / (‖pred_bp‖_ε ‖t_bp‖))`` with
  ``‖v‖_ε = sqrt(max(‖v‖², ε²))`` so a zero prediction neither divides by zero
  nor has a NaN gradient; ``counts_b`` is the number of pixels whose target
  normal is non-zero (missing normals are stored as 0). This is the normal
  loss of Liu et al., "End-to-End Multi-Task Learning with Attention" (MTAN),
  CVPR 2019 (one minus the dot product of unit normals); its batch mean is
  ``1 − mean cos``, from which the usual angle-error metrics follow.

  Args:
    pred: ``(B, H, W, 3)`` predicted normals, not necessarily unit length.
    target: ``(B, H, W, 3)`` target normals, all-zero (or NaN) where missing.
    eps: the norm floor for predictions (keyword only).

  Returns:
    ``(sums, counts)``, two ``(B,)`` arrays, each term in ``[0, 2]``.

  Raises:
    ValueError: when the shapes differ or the last axis is not 3.

  Examples:
    >>> import jax.numpy as jnp
    >>> pred = jnp.array([[[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]])
    >>> target = jnp.array([[[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]]])
    >>> sums, counts = normal_cosine_loss(pred, target)   # 0 + 1, third pixel missing
    >>> float(sums[0]), float(counts[0])
    (1.0, 2.0)
  """
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  if pred.shape != target.shape or pred.ndim < 2 or pred.shape[-1] != 3:
    raise ValueError(
      f"normal_cosine_loss: expected pred and target of equal shape (B, H, W, 3), got pred {tuple(pred.shape)} "
      f"and target {tuple(target.shape)}"
    )
  p = pred.astype(_compute_dtype(pred))
  t = target.astype(p.dtype)
  t_sq = jnp.sum(jnp.square(t), axis=-1)
  valid = t_sq > 0  # False for NaN too
  t = jnp.where(valid[..., None], t, 0)
  t_norm = jnp.sqrt(jnp.where(valid, t_sq, 1))
  p_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(p), axis=-1), jnp.asarray(eps, p.dtype) ** 2))
  cos = jnp.sum(p * t, axis=-1) / (p_norm * t_norm)
  terms = jnp.where(valid, 1 - cos, 0)
  axes = _rest_axes(terms)
  return jnp.sum(terms, axis=axes), jnp.sum(valid, axis=axes).astype(p.dtype)
