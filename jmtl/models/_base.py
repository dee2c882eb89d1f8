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
  """

  init: Callable[[Array, Any], Params]
  apply: Callable[[Params, Any], Mapping[str, Array]]
  encode: Callable[[Params, Any], Any] | None
  head: Callable[[str, Params, Any], Array] | None
  task_names: tuple[str, ...]
