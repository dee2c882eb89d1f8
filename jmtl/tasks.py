"""Task specifications and the batch layout they read.

A batch is a dict ``{"inputs": x, "labels": {task: y}, "masks": {task: m}}``;
``masks`` and each task's entry in it are optional (``m`` has shape ``(B,)``,
1 for a labelled example and 0 for a missing label). A task's loss over a
batch is the masked mean of its per-example loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jmtl.metrics import Metric

Array = jax.Array
#: A per-example loss returns ``(B,)`` values, or a pair ``(sums, counts)`` of
#: ``(B,)`` arrays when an example holds a variable number of terms (valid
#: pixels, say); the batch loss is then ``Σ sums / Σ counts``.
LossFn = Callable[[Array, Array], "Array | tuple[Array, Array]"]


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its name, per-example loss and evaluation metrics.

  Attributes:
    name: the key of the task in predictions, ``labels`` and ``masks``.
    loss: ``loss(predictions, labels)`` per example, see :data:`LossFn`.
    metrics: name -> :class:`jmtl.metrics.Metric`; each metric knows whether
      higher is better.

  Examples:
    >>> import jmtl
    >>> t = jmtl.Task("digit", jmtl.losses.softmax_cross_entropy,
    ...               {"acc": jmtl.metrics.accuracy()})
    >>> t.name, list(t.metrics)
    ('digit', ['acc'])
  """

  name: str
  loss: LossFn
  metrics: Mapping[str, Metric] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"a task name must be a non-empty string, got {self.name!r}")
    if not callable(self.loss):
      raise TypeError(f"task {self.name!r}: loss must be callable, got {type(self.loss).__name__}")


def check_tasks(tasks: Sequence[Task]) -> tuple[Task, ...]:
  """Validates a task list: non-empty, Task instances, unique names."""
  tasks = tuple(tasks)
  if not tasks:
    raise ValueError("at least one task is needed")
  for t in tasks:
    if not isinstance(t, Task):
      raise TypeError(f"expected jmtl.Task, got {type(t).__name__}: {t!r}")
  names = [t.name for t in tasks]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"task names must be unique; repeated: {dup}")
  return tasks


def _shape(x) -> str:
  return str(tuple(getattr(x, "shape", ()))) if hasattr(x, "shape") else type(x).__name__


def check_batch(tasks: Sequence[Task], batch: Mapping[str, Any]) -> int:
  """Checks a multi-label batch against the tasks; returns the batch size.

  Runs on shapes only, so inside a jitted step it costs nothing after tracing.

  Raises:
    ValueError: naming the task, the field and the shapes when a label is
      missing, a leading dimension disagrees or a mask has the wrong shape;
      when the batch is empty.
  """
  if not isinstance(batch, Mapping) or "labels" not in batch or "inputs" not in batch:
    keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"a batch is a dict with 'inputs' and 'labels' (and optionally 'masks'); got keys {keys}")
  labels = batch["labels"]
  masks = batch.get("masks") or {}
  inputs = jax.tree.leaves(batch["inputs"])
  if not inputs or any(not hasattr(x, "shape") or len(x.shape) == 0 for x in inputs):
    raise ValueError(f"batch['inputs'] must hold arrays with a batch axis, got shapes {[_shape(x) for x in inputs]}")
  b = inputs[0].shape[0]
  if any(x.shape[0] != b for x in inputs):
    raise ValueError(f"batch['inputs'] leaves disagree on the batch size: {[_shape(x) for x in inputs]}")
  if b == 0:
    raise ValueError(
      f"the batch is empty (inputs of shape {_shape(inputs[0])}); a batch needs at least one example "
      "(an empty split, or a batch size larger than the data with drop_remainder, gives none)"
    )
  for t in tasks:
    if t.name not in labels:
      raise ValueError(
        f"task {t.name!r}: batch['labels'] has no entry for it (labels present: {sorted(labels)}); "
        "mark unlabelled examples with batch['masks'][task] = 0 instead of dropping the key"
      )
    y = labels[t.name]
    if not hasattr(y, "shape") or len(y.shape) == 0 or y.shape[0] != b:
      raise ValueError(
        f"task {t.name!r}: batch['labels'][{t.name!r}] has shape {_shape(y)}, but the batch size is {b} "
        f"(inputs of shape {_shape(inputs[0])})"
      )
    if t.name in masks and tuple(getattr(masks[t.name], "shape", ())) != (b,):
      raise ValueError(
        f"task {t.name!r}: batch['masks'][{t.name!r}] has shape {_shape(masks[t.name])}, expected ({b},) "
        f"to match labels of shape {tuple(y.shape)}"
      )
  return b


def task_mask(task: Task, batch: Mapping[str, Any]) -> Array:
  """The ``(B,)`` float mask of labelled examples (ones when none is given)."""
  y = batch["labels"][task.name]
  masks = batch.get("masks") or {}
  if task.name in masks:
    return jnp.asarray(masks[task.name], jnp.float32)
  return jnp.ones((y.shape[0],), jnp.float32)


def loss_terms(task: Task, predictions: Mapping[str, Array], batch: Mapping[str, Any]) -> tuple[Array, Array]:
  """Masked ``(Σ loss, Σ count)`` of one task over the batch.

  The task's batch loss is ``sum / max(count, 1)``; keeping the two apart lets
  data-parallel steps divide by the *global* count, so the loss is the mean
  over the global batch, exactly.

  Raises:
    ValueError: naming the task and the shapes when the model gives no
      prediction for the task or the loss rejects the shapes.
  """
  if task.name not in predictions:
    raise ValueError(f"task {task.name!r}: the model returned no prediction for it (it returned {sorted(predictions)})")
  return masked_terms(task, predictions[task.name], batch["labels"][task.name], task_mask(task, batch))


def masked_terms(task: Task, pred: Array, y: Array, m: Array) -> tuple[Array, Array]:
  """:func:`loss_terms` on one task's prediction ``pred``, labels ``y`` and ``(B,)`` mask ``m``.

  Pure in its array arguments, so a group of tasks with the same loss runs it
  as one ``jax.vmap`` over their stacked predictions, labels and masks.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jmtl
    >>> t = jmtl.Task("r", jmtl.losses.mse)
    >>> [float(v) for v in masked_terms(t, jnp.array([1.0, 3.0]), jnp.zeros(2), jnp.array([1.0, 0.0]))]
    [1.0, 1.0]
  """
  if hasattr(y, "ndim"):
    # An unlabelled example may carry a garbage label (a NaN target, say). Zero
    # it before the loss: masking the loss alone still leaks NaN into the
    # gradient (0 · NaN), and a NaN gradient would skip the whole step.
    y = jnp.where(m.reshape((-1,) + (1,) * (y.ndim - 1)) > 0, y, jnp.zeros((), y.dtype))
  if jnp.issubdtype(pred.dtype, jnp.floating) and jnp.finfo(pred.dtype).bits < 32:
    pred = pred.astype(jnp.float32)  # a bfloat16 model still has float32 losses (and loss gradients)
  try:
    out = task.loss(pred, y)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"task {task.name!r}: loss {getattr(task.loss, '__name__', task.loss)!r} failed on predictions of shape "
      f"{_shape(pred)} and labels of shape {_shape(y)}: {e}"
    ) from e
  sums, counts = out if isinstance(out, tuple) else (out, None)
  b = y.shape[0]
  if sums.shape != (b,) or (counts is not None and counts.shape != (b,)):
    raise ValueError(
      f"task {task.name!r}: the per-example loss has shape {_shape(sums)}, expected ({b},) for predictions of "
      f"shape {_shape(pred)} and labels of shape {_shape(y)}"
    )
  total = jnp.sum(jnp.where(m > 0, sums * m.astype(sums.dtype), 0))
  count = jnp.sum(m) if counts is None else jnp.sum(jnp.where(m > 0, counts * m.astype(counts.dtype), 0))
  return total, count.astype(total.dtype)
