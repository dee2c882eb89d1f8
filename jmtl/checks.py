"""An opt-in checked train step: bad labels, masks, inputs and non-finite values raise, naming the task.

The train step skips a step whose loss, weight or gradient is not finite
(:func:`jmtl.make_train_step`): one out-of-range class label, one NaN input
or a diverging task makes the *whole* update a no-op, for every task, and
says so only in ``metrics["skipped"]``. :func:`checked` wraps a step with
run-time checks (``jax.experimental.checkify``) that raise a
:class:`CheckError` naming the task, the value and the example instead:

* inputs: every floating value finite;
* masks (``batch["masks"][task]``): every value in ``[0, 1]``;
* labels of labelled examples (mask > 0): integer class indices in
  ``[0, C)`` where ``C`` is known (``num_classes``, or the class axis of the
  model's prediction when ``model`` is given), floating labels finite;
* after the step: each task's loss and weight, the penalty and the
  gradient norm finite.

The checks are small jitted programs of their own, run before the step (on
the batch) and after it (on its metrics); the step's own program is not
transformed, so a checked step computes exactly what the unchecked one does
(and works with every weighting, also those whose solvers ``checkify``
cannot transform). Each check reads its result back to the host -- two
host-device synchronisations per step -- so a checked step is slower: use it
to find why steps are skipped, not for every run. :func:`check_batch` and
:func:`check_metrics` are the two halves, for a loop of your own.

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> import jmtl
  >>> model = jmtl.models.mlp({"a": 3}, hidden=(4,))
  >>> tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy)]
  >>> state = jmtl.TrainState.from_model(model, jnp.ones((2, 5)), tx=optax.sgd(0.1), rng=jax.random.key(0))
  >>> step = jmtl.checked(jmtl.make_train_step(model, tasks), model=model)
  >>> state, metrics = step(state, {"inputs": jnp.ones((2, 5)), "labels": {"a": jnp.array([0, 2])}})
  >>> step(state, {"inputs": jnp.ones((2, 5)), "labels": {"a": jnp.array([1, 3])}})
  Traceback (most recent call last):
  jmtl.checks.CheckError: task 'a': label 3 at example 1 of the batch is outside 0..2 (3 classes), in step 2
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

__all__ = ["CheckError", "check_batch", "check_metrics", "checked"]


class CheckError(ValueError):
  """A failed check of :func:`checked`: its message names the task (or the inputs), the value and the example."""


def _escape(text: str) -> str:
  return text.replace("{", "{{").replace("}", "}}")


def _first(bad: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(example index, value)`` of the first ``True`` of ``bad`` (both of one shape, leading axis the batch)."""
  flat = bad.reshape(-1)
  i = jnp.argmax(flat)
  per_example = max(1, math.prod(bad.shape[1:]))
  return i // per_example, values.reshape(-1)[i]


def _check(pred, msg: str, *args) -> None:
  checkify.check(pred, msg, *args)


def _class_counts(model, state, batch) -> dict[str, int]:
  """Task -> number of classes, from the shape of the model's prediction (a class axis after the label's shape)."""
  from jmtl.models import as_model

  m = as_model(model)
  preds, _ = jax.eval_shape(
    lambda p, x, s: m.apply(p, x, s, train=False, axis_name=None), state.params, batch["inputs"], state.model_state
  )
  out = {}
  for name, y in batch["labels"].items():
    p = preds.get(name) if isinstance(preds, Mapping) else None
    if p is not None and jnp.issubdtype(y.dtype, jnp.integer) and tuple(p.shape[:-1]) == tuple(y.shape):
      out[name] = int(p.shape[-1])
  return out


def _batch_checks(batch: Mapping[str, Any], step, num_classes: Mapping[str, int]) -> None:
  for leaf in jax.tree.leaves(batch["inputs"]):
    x = jnp.asarray(leaf)
    if jnp.issubdtype(x.dtype, jnp.inexact) and x.size:
      i, v = _first(~jnp.isfinite(x), x)
      _check(
        jnp.all(jnp.isfinite(x)), "inputs: value {} at example {} of the batch is not finite, in step {}", v, i, step
      )
  masks = batch.get("masks") or {}
  for name, label in batch["labels"].items():
    y = jnp.asarray(label)
    task = _escape(repr(name))
    m = masks.get(name)
    if m is not None:
      m = jnp.asarray(m)
      bad = ~((m >= 0) & (m <= 1))
      i, v = _first(bad, m)
      _check(
        ~jnp.any(bad),
        f"task {task}: mask {{}} at example {{}} of the batch is outside [0, 1], in step {{}}",
        v,
        i,
        step,
      )
    if not y.size:
      continue
    labelled = jnp.ones(y.shape[:1], bool) if m is None else m > 0
    labelled = labelled.reshape((-1,) + (1,) * (y.ndim - 1))
    if jnp.issubdtype(y.dtype, jnp.integer) and name in num_classes:
      c = int(num_classes[name])
      bad = labelled & ((y < 0) | (y >= c))
      i, v = _first(bad, y)
      msg = f"task {task}: label {{}} at example {{}} of the batch is outside 0..{c - 1} ({c} classes), in step {{}}"
      _check(~jnp.any(bad), msg, v, i, step)
    elif jnp.issubdtype(y.dtype, jnp.inexact):
      bad = labelled & ~jnp.isfinite(y)
      i, v = _first(bad, y)
      _check(
        ~jnp.any(bad), f"task {task}: label {{}} at example {{}} of the batch is not finite, in step {{}}", v, i, step
      )


def _metric_checks(metrics, step) -> None:
  names = getattr(metrics, "names", ())
  per_task = getattr(metrics, "per_task", {})
  for what in ("loss", "weight"):
    values = per_task.get(what)
    for k, name in enumerate(names if values is not None else ()):
      v = values[..., k]
      _check(jnp.all(jnp.isfinite(v)), f"task {_escape(repr(name))}: {what} is {{}}, in step {{}}", v, step)
  for what, text in (("penalty", "the penalty"), ("grad_norm", "the norm of the update's gradient")):
    if what in metrics:
      v = metrics[what]
      _check(jnp.all(jnp.isfinite(v)), f"{text} is {{}} (every loss and weight finite), in step {{}}", v, step)


@functools.partial(jax.jit, static_argnums=2)
def _batch_errors(batch, step, classes: tuple) -> checkify.Error:
  error, _ = checkify.checkify(lambda: _batch_checks(batch, step, dict(classes)), errors=checkify.user_checks)()
  return error


@jax.jit
def _metric_errors(metrics, step) -> checkify.Error:
  error, _ = checkify.checkify(lambda: _metric_checks(metrics, step), errors=checkify.user_checks)()
  return error


def throw(error: checkify.Error) -> None:
  """Raises the first failed check of ``error`` (a ``checkify.Error``) as a :class:`CheckError`."""
  message = error.get()
  if message is not None:
    raise CheckError(message.split(" (`check` failed)")[0].strip())


def check_batch(batch: Mapping[str, Any], *, step: int = 0, num_classes: Mapping[str, int] | None = None) -> None:
  """Raises :class:`CheckError` at the first bad value of ``batch``: inputs, masks, labels (see the module).

  One small jitted program (compiled once per batch layout); ``step`` is
  only quoted in the message. Class labels of tasks in ``num_classes`` are
  range-checked, others are not.

  Examples:
    >>> import numpy as np
    >>> check_batch({"inputs": np.zeros((2, 3)), "labels": {"y": np.zeros(2)}, "masks": {"y": np.array([1.0, -1.0])}})
    Traceback (most recent call last):
    jmtl.checks.CheckError: task 'y': mask -1.0 at example 1 of the batch is outside [0, 1], in step 0
  """
  batch = {k: batch[k] for k in ("inputs", "labels", "masks") if k in batch}
  throw(_batch_errors(batch, step, tuple(sorted((num_classes or {}).items()))))


def check_metrics(metrics, *, step: int = 0) -> None:
  """Raises :class:`CheckError` when a task's loss or weight (``metrics``, a :class:`jmtl.StepMetrics` or sums of
  them), the penalty or the gradient norm is not finite."""
  throw(_metric_errors(metrics, step))


def checked(step: Callable, *, num_classes: Mapping[str, int] | None = None, model=None, donate: bool = True):
  """A jitted ``step(state, batch) -> (state, metrics)`` that raises :class:`CheckError` on bad values.

  See the module docstring for what is checked. Class counts come from
  ``num_classes`` (task -> C) or, with ``model``, from the shape of its
  prediction; a class label without either is not range-checked. The batch
  is checked before the step runs (a bad batch leaves ``state`` as it was),
  the metrics after. ``step`` itself runs as its own jitted program, exactly
  as :func:`jmtl.parallel.jit` would run it (``donate``: the state's buffers
  are donated).
  """
  jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
  counts: dict = {}

  def run(state, batch):
    layout = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), batch["labels"])
    key = str(layout)
    if key not in counts:
      counts[key] = {**(_class_counts(model, state, batch) if model is not None else {}), **(num_classes or {})}
    number = int(state.step) + 1  # the step's number as the runner counts it (1 for the first)
    check_batch(batch, step=number, num_classes=counts[key])
    state, metrics = jitted(state, batch)
    check_metrics(metrics, step=number)
    return state, metrics

  return run
