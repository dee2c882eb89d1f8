"""Task groups: heads of the same kind, parameter shapes and loss, run as one batched op.

Used by the gradient engine (:mod:`jmtl.grads`) and by
:func:`jmtl.make_eval_step`; ``docs/design.md``, "Task groups".

Tasks whose heads the model declares to be the same function
(:attr:`jmtl.models.MultiTaskModel.head_kind`), whose head parameters have the
same structure, shapes and dtypes, and whose loss is the same function form a
group. A group's head parameters are stacked inside the step and its heads,
losses (and, for evaluation, metrics) run under one ``jax.vmap``: one
batched matmul per head layer instead of K small ones. The parameters users
see and checkpoint stay ``{"tasks": {name: ...}}``; a task that matches no
other is a group of one. Grouping never changes the result beyond float
rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmtl import metrics as metrics_lib
from jmtl import tasks as tasks_lib

Array = jax.Array


class Group(NamedTuple):
  """Tasks evaluated as one batched op."""

  names: tuple[str, ...]
  index: tuple[int, ...]  # their positions in the task order
  task: tasks_lib.Task  # the first; its loss and metrics serve the group


def _key(model, task, task_params, with_metrics: bool):
  if model.head_kind is None or model.head is None:
    return None
  leaves, treedef = jax.tree.flatten(task_params)
  shapes = tuple((tuple(x.shape), jnp.result_type(x)) for x in leaves)
  key = (model.head_kind(task.name), treedef, shapes, task.loss)
  if with_metrics:
    key += (tuple(task.metrics.items()),)
  try:
    hash(key)
  except TypeError:  # an unhashable head kind or metric: no grouping
    return None
  return key


def task_groups(model, tasks: Sequence[tasks_lib.Task], task_params, *, with_metrics: bool = False) -> list[Group]:
  """The groups of ``tasks`` (in order of first appearance), from the model's head kinds and the parameters.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jmtl
    >>> model = jmtl.models.mlp({"a": 10, "b": 10, "c": 1}, hidden=(8,))
    >>> tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in "ab"] + [jmtl.Task("c", jmtl.losses.mse)]
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> [g.names for g in task_groups(model, tasks, params["tasks"])]
    [('a', 'b'), ('c',)]
  """
  missing = [t.name for t in tasks if t.name not in task_params]
  if missing:
    raise ValueError(f"params['tasks'] has no entry for task(s) {missing}; it has {list(task_params)}")
  found: dict[Any, list[int]] = {}
  for i, t in enumerate(tasks):
    key = _key(model, t, task_params[t.name], with_metrics)
    found.setdefault(("alone", i) if key is None else key, []).append(i)
  return [Group(tuple(tasks[i].name for i in idx), tuple(idx), tasks[idx[0]]) for idx in found.values()]


def stack(trees: Sequence[Any]) -> Any:
  """Identically structured pytrees stacked on a new leading axis."""
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def unstack(tree: Any, names: Sequence[str]) -> dict[str, Any]:
  """``{name: tree[i]}``: the inverse of :func:`stack`."""
  return {n: jax.tree.map(lambda x, i=i: x[i], tree) for i, n in enumerate(names)}


def in_task_order(values: Sequence[Array], groups: Sequence[Group]) -> Array:
  """Per-group arrays ``(G, ...)`` concatenated and put back in the task order ``(K, ...)``."""
  order = np.concatenate([np.asarray(g.index) for g in groups])
  flat = jnp.concatenate(values) if len(values) > 1 else values[0]
  if np.array_equal(order, np.arange(len(order))):
    return flat
  return flat[np.argsort(order)]


class GroupBatch(NamedTuple):
  """One group's stacked head parameters, labels and masks."""

  params: Any  # head parameters, leaves (G, ...)
  labels: Array  # (G, B, ...)
  masks: Array  # (G, B)


def group_batch(group: Group, tasks: Sequence[tasks_lib.Task], task_params: Mapping, batch: Mapping) -> GroupBatch:
  return GroupBatch(
    stack([task_params[n] for n in group.names]),
    jnp.stack([batch["labels"][n] for n in group.names]),
    jnp.stack([tasks_lib.task_mask(tasks[i], batch) for i in group.index]),
  )


def head_fn(model, group: Group):
  """``heads(stacked_params, z) -> (G, B, ...)``: the group's heads as one vmapped call (``z`` shared)."""
  name = group.names[0]
  return jax.vmap(lambda tp, z: model.head(name, tp, z), in_axes=(0, None))


def terms_fn(group: Group):
  """``terms(preds, labels, masks) -> (sums (G,), counts (G,))``: the group's masked loss terms, vmapped."""
  return jax.vmap(lambda p, y, m: tasks_lib.masked_terms(group.task, p, y, m))


def metric_stats_fn(group: Group):
  """``stats(preds, labels, masks) -> {metric: stats with a leading (G,) axis}``, vmapped."""
  return jax.vmap(lambda p, y, m: metrics_lib.metric_stats(group.task.metrics, p, y, m))


@jax.tree_util.register_pytree_node_class
class GroupedStats(Mapping):
  """Per-task statistics kept stacked per task group; ``stats[name]`` is one task's view.

  :func:`jmtl.make_eval_step` returns it for a grouped model: a compiled step
  then has a few stacked outputs per group instead of a few scalars per task
  (at K = 40, 120 scalar outputs cost the call ~20 % of its time). It is a
  pytree (statistics add across batches with :func:`jmtl.metrics.add_stats`
  and across devices with ``psum``) and a read-only mapping from task name to
  that task's statistics, like the plain dict of an ungrouped model.

  Examples:
    >>> import jax.numpy as jnp
    >>> s = GroupedStats((("a", "b"),), ({"loss": (jnp.array([1.0, 2.0]), jnp.array([4.0, 4.0]))},))
    >>> float(s["b"]["loss"][0]), sorted(s)
    (2.0, ['a', 'b'])
  """

  def __init__(self, names: tuple[tuple[str, ...], ...], stacked: tuple[Any, ...]):
    self.names = names  # per group, its task names (static)
    self.stacked = stacked  # per group, its statistics with a leading group axis
    self._where = {n: (g, i) for g, group in enumerate(names) for i, n in enumerate(group)}

  def tree_flatten(self):
    return (self.stacked,), self.names

  @classmethod
  def tree_unflatten(cls, names, children):
    return cls(names, children[0])

  def __getitem__(self, name: str):
    g, i = self._where[name]
    return jax.tree.map(lambda x: x[i], self.stacked[g])

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __repr__(self) -> str:
    return f"GroupedStats({list(self._where)})"
