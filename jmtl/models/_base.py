"""The model contract: one calling convention for every model, and :func:`as_model` for plain functions."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax

Array = jax.Array
Params = Any
ModelState = Any


def no_state(key: Array, inputs: Any) -> dict:
  """The ``init_state`` of a stateless model: ``{}`` whatever the key and inputs.

  >>> no_state(None, None)
  {}
  """
  del key, inputs
  return {}


def stateless(fn: Callable[[Params, Any], Any]) -> Callable[..., tuple[Any, ModelState]]:
  """Lifts ``fn(params, inputs) -> out`` to the model convention.

  The result is ``lifted(params, inputs, model_state, *, train=False,
  axis_name=None) -> (fn(params, inputs), model_state)``: the state is passed
  through unchanged and ``train``/``axis_name`` are ignored. Used for the
  ``apply`` and ``encode`` of every model without batch statistics.

  >>> lifted = stateless(lambda p, x: p * x)
  >>> lifted(2, 3, {})
  (6, {})
  """

  def lifted(params: Params, inputs: Any, model_state: ModelState, *, train: bool = False, axis_name=None):
    del train, axis_name
    return fn(params, inputs), model_state

  return lifted


class MultiTaskModel(NamedTuple):
  """A multi-task model as pure functions over ``{"shared": ..., "tasks": {...}}``.

  Every model has the same calling convention, stateful or not: ``apply`` and
  ``encode`` take a ``model_state`` (state that is not trained by gradients,
  such as batch-norm statistics) and return the new one. A stateless model's
  state is ``{}`` and comes back unchanged.

  Attributes:
    init: ``init(key, inputs) -> params`` with the MTL convention
      ``{"shared": ..., "tasks": {name: ...}}``; ``None`` only for a model
      made by :func:`as_model` from a plain function.
    apply: ``apply(params, inputs, model_state, *, train=False,
      axis_name=None) -> (predictions, model_state)`` with ``predictions =
      {task: prediction}``. ``train=True`` normalises with the batch's
      statistics (the global batch's, over ``axis_name`` under pmap) and
      updates the running ones; ``train=False`` uses the running ones. A
      stateless model ignores ``train`` and ``axis_name``.
    encode: ``encode(params["shared"], inputs, model_state, *, train=False,
      axis_name=None) -> (z, model_state)``, or ``None`` when the model has no
      single shared representation; together with ``head`` it unlocks the
      separable fast paths of the gradient engine.
    head: ``head(task, params["tasks"][task], z) -> prediction`` (stateless),
      or ``None``.
    task_names: the tasks, in order.
    init_state: ``init_state(key, inputs) -> model_state``; always callable.
      A stateless model returns ``{}`` (the default, :func:`no_state`).
    stateful: ``True`` when the model carries a non-empty state (batch norm's
      running statistics), so that a training step must thread
      ``model_state`` through; ``False`` (the default) when ``init_state``
      returns ``{}``.
    head_kind: ``head_kind(task) -> key`` (hashable) or ``None``: tasks whose
      keys are equal have the same ``head`` function, so that the engine may
      run heads of the same parameter shapes (and the same loss) as one
      batched op over their stacked parameters (``docs/design.md``, "Task
      groups"). ``None``: every head is run on its own.

  >>> import jax, jax.numpy as jnp
  >>> m = MultiTaskModel(
  ...   init=lambda key, x: {"shared": {}, "tasks": {"a": jnp.ones(())}},
  ...   apply=stateless(lambda p, x: {"a": x * p["tasks"]["a"]}),
  ...   encode=None,
  ...   head=None,
  ...   task_names=("a",),
  ... )
  >>> x = jnp.ones(2)
  >>> state = m.init_state(jax.random.key(0), x)
  >>> preds, state = m.apply(m.init(jax.random.key(0), x), x, state)
  >>> preds["a"].shape, state, m.stateful
  ((2,), {}, False)
  """

  init: Callable[[Array, Any], Params] | None
  apply: Callable[..., tuple[Mapping[str, Array], ModelState]]
  encode: Callable[..., tuple[Any, ModelState]] | None
  head: Callable[[str, Params, Any], Array] | None
  task_names: tuple[str, ...]
  init_state: Callable[[Array, Any], ModelState] = no_state
  stateful: bool = False
  head_kind: Callable[[str], Any] | None = None


def as_model(model_or_apply: Any, task_names: Sequence[str] | None = None) -> MultiTaskModel:
  """A :class:`MultiTaskModel` from a model, or from a plain ``apply(params, inputs) -> {task: prediction}``.

  * A :class:`MultiTaskModel` is returned unchanged (``task_names`` is ignored).
  * An object with a callable ``.apply`` attribute (say a user's own model
    class) is treated as its ``.apply``, a plain function.
  * A plain callable ``fn(params, inputs) -> {task: prediction}`` becomes a
    stateless model: ``apply(params, inputs, model_state, *, train=False,
    axis_name=None) -> (fn(params, inputs), model_state)``, ``init_state``
    returns ``{}``, ``encode`` and ``head`` are ``None`` (the gradient
    engine takes its general path) and ``task_names`` is
    ``tuple(task_names)``, ``()`` when not given. A plain function says
    nothing about its parameters, so ``init`` is ``None``: create the
    parameters yourself (and the train state with
    ``jmtl.TrainState.create(params=..., ...)``).

  Args:
    model_or_apply: a :class:`MultiTaskModel`, an object with ``.apply``, or
      a callable.
    task_names: the tasks of a plain function, in order.

  Returns:
    A :class:`MultiTaskModel` in the single calling convention.

  Raises:
    TypeError: when ``model_or_apply`` is none of the above (the message
      names its type).

  >>> import jax.numpy as jnp
  >>> model = as_model(lambda p, x: {"a": x * p}, task_names=["a"])
  >>> preds, state = model.apply(2.0, jnp.ones(3), {})
  >>> preds["a"].tolist(), state, model.task_names, model.init, model.encode
  ([2.0, 2.0, 2.0], {}, ('a',), None, None)
  >>> as_model(model) is model
  True
  >>> as_model(42)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  TypeError: as_model: expected a MultiTaskModel, an object with .apply or a function ..., got int
  """
  if isinstance(model_or_apply, MultiTaskModel):
    return model_or_apply
  fn = getattr(model_or_apply, "apply", None)
  if not callable(fn):
    fn = model_or_apply
  if not callable(fn):
    raise TypeError(
      "as_model: expected a MultiTaskModel, an object with .apply or a function apply(params, inputs) -> "
      f"{{task: prediction}}, got {type(model_or_apply).__name__}"
    )
  if isinstance(task_names, str):
    raise TypeError(f"as_model: task_names must be a sequence of task names, got the string {task_names!r}")
  names = () if task_names is None else tuple(task_names)
  return MultiTaskModel(init=None, apply=stateless(fn), encode=None, head=None, task_names=names)
