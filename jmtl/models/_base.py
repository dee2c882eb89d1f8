"""The model contract: ``apply`` always, ``encode``/``head`` when separable."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax

Array = jax.Array
Params = Any


class MultiTaskModel(NamedTuple):
  """A multi-task model as pure functions over ``{"shared": ..., "tasks": {...}}``.

  Attributes:
    init: ``init(key, inputs) -> params`` with the MTL convention
      ``{"shared": ..., "tasks": {name: ...}}``.
    apply: ``apply(params, inputs) -> {task: prediction}``.
    encode: ``encode(params["shared"], inputs) -> z`` or ``None``; together with
      ``head`` it unlocks the separable fast paths of the gradient engine.
    head: ``head(task, params["tasks"][task], z) -> prediction`` or ``None``.
    task_names: the tasks, in order.
    init_state: ``init_state(key, inputs) -> model_state`` for a model with
      state that is not trained by gradients (batch-norm statistics), else
      ``None``. A stateful model's ``apply`` and ``encode`` take the state and
      return the new one: ``apply(params, inputs, model_state, *, train,
      axis_name=None) -> (predictions, model_state)``, likewise ``encode``
      (``head`` stays stateless). ``train=True`` normalises with the batch's
      statistics (the global batch's, over ``axis_name`` under pmap) and
      updates the running ones; ``train=False`` uses the running ones.
  """

  init: Callable[[Array, Any], Params]
  apply: Callable[[Params, Any], Mapping[str, Array]]
  encode: Callable[[Params, Any], Any] | None
  head: Callable[[str, Params, Any], Array] | None
  task_names: tuple[str, ...]
  init_state: Callable[[Array, Any], Any] | None = None

  @property
  def stateful(self) -> bool:
    """Whether the model carries a ``model_state`` (see ``init_state``)."""
    return self.init_state is not None
