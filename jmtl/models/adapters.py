"""Adapters for models written with flax.nnx or equinox: a trunk and one head per task.

Both return a :class:`~jmtl.models.MultiTaskModel` with ``encode`` and
``head``, so the gradient engine runs the trunk once and each head once (the
separable route, never one full-model VJP per task). The trunk of such a
model has no ``flax.linen.Dense`` layer, so at parameter level the Gramian
comes from Jacobian rows of the trunk rather than the Dense-layer identity;
:func:`jmtl.grads.route` says so ("Jacobian rows of the trunk ... no
flax.linen.Dense layer found"), and ``chunk_size`` bounds its memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jmtl.models._base import MultiTaskModel


def _check_heads(heads: Mapping[str, Any], where: str) -> tuple[str, ...]:
  if not isinstance(heads, Mapping) or not heads:
    raise ValueError(f"{where}: heads must be a non-empty mapping task name -> module, got {heads!r}")
  bad = [k for k in heads if not isinstance(k, str) or not k]
  if bad:
    raise ValueError(f"{where}: task names must be non-empty strings, got {bad}")
  return tuple(heads)


def from_nnx(trunk, heads: Mapping[str, Any]) -> MultiTaskModel:
  """A :class:`~jmtl.models.MultiTaskModel` from a flax.nnx trunk and one nnx head per task.

  ``trunk(x) -> z`` and ``heads[name](z) -> prediction`` are called on the
  batch as nnx modules are. The modules arrive initialised (nnx builds
  parameters at construction), so ``init`` returns their parameters as plain
  dicts, ``{"shared": trunk's nnx.Param, "tasks": {name: head's nnx.Param}}``,
  and ignores its key. Batch statistics (``nnx.BatchStat``, from
  ``nnx.BatchNorm``) are the model state, ``{"shared": ..., "tasks": {...}}``:
  with ``train=True`` the modules run in training mode (``module.train()``)
  and the new statistics are returned; ``train=False`` runs
  ``module.eval()``. To synchronise statistics across a pmap axis, build the
  ``nnx.BatchNorm`` with that ``axis_name``. Other nnx state (an ``nnx.Rngs``
  for dropout) is kept as it was at construction.

  Args:
    trunk: the shared nnx module.
    heads: task name -> nnx module, in task order.

  Returns:
    A separable :class:`~jmtl.models.MultiTaskModel`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jmtl import models
    >>> rngs = nnx.Rngs(0)
    >>> trunk = nnx.Sequential(nnx.Linear(5, 8, rngs=rngs), nnx.relu)
    >>> model = models.from_nnx(trunk, {"a": nnx.Linear(8, 3, rngs=rngs), "b": nnx.Linear(8, 1, rngs=rngs)})
    >>> x = jnp.ones((4, 5))
    >>> params = model.init(jax.random.key(0), x)
    >>> params["tasks"]["a"]["kernel"].shape
    (8, 3)
    >>> preds, _ = model.apply(params, x, model.init_state(jax.random.key(0), x), train=True)
    >>> {k: v.shape for k, v in preds.items()}
    {'a': (4, 3), 'b': (4, 1)}
  """
  from flax import nnx

  names = _check_heads(heads, "from_nnx")
  modules = {"shared": trunk, **{f"task:{n}": heads[n] for n in names}}
  parts = {}
  for key, module in modules.items():
    graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    parts[key] = (graphdef, params, stats, rest)
  stateful = any(jax.tree.leaves(stats) for _, _, stats, _ in parts.values())

  def run(key, params, stats, x, train):
    graphdef, p0, s0, rest = parts[key]
    p, s = jax.tree.map(lambda v: v, p0), jax.tree.map(lambda v: v, s0)  # fresh copies to fill
    nnx.replace_by_pure_dict(p, params)
    if jax.tree.leaves(s0):
      nnx.replace_by_pure_dict(s, stats)
    module = nnx.merge(graphdef, p, s, rest)
    if stateful:
      module.train() if train else module.eval()
    y = module(x)
    new_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)) if jax.tree.leaves(s0) else stats
    return y, new_stats

  def split_state(model_state):
    return model_state.get("shared", {}), model_state.get("tasks", {})

  def encode(shared, inputs, model_state, *, train=False, axis_name=None):
    del axis_name  # nnx.BatchNorm carries its own
    s_shared, s_tasks = split_state(model_state)
    z, s_shared = run("shared", shared, s_shared, inputs, train)
    return z, ({"shared": s_shared, "tasks": s_tasks} if stateful else model_state)

  def head_with_state(task, task_params, z, stats, train):
    return run(f"task:{task}", task_params, stats, z, train)

  def head(task, task_params, z):
    if task not in heads:
      raise ValueError(f"from_nnx: unknown task {task!r}; tasks are {list(names)}")
    return head_with_state(task, task_params, z, {}, False)[0]

  def apply(params, inputs, model_state, *, train=False, axis_name=None):
    z, model_state = encode(params["shared"], inputs, model_state, train=train, axis_name=axis_name)
    preds, task_stats = {}, {}
    for n in names:
      stats = model_state.get("tasks", {}).get(n, {}) if stateful else {}
      preds[n], task_stats[n] = head_with_state(n, params["tasks"][n], z, stats, train)
    return preds, ({"shared": model_state["shared"], "tasks": task_stats} if stateful else model_state)

  def init(key, inputs):
    del key, inputs
    return {
      "shared": nnx.to_pure_dict(parts["shared"][1]),
      "tasks": {n: nnx.to_pure_dict(parts[f"task:{n}"][1]) for n in names},
    }

  def init_state(key, inputs):
    del key, inputs
    if not stateful:
      return {}
    return {
      "shared": nnx.to_pure_dict(parts["shared"][2]),
      "tasks": {n: nnx.to_pure_dict(parts[f"task:{n}"][2]) for n in names},
    }

  # Heads with batch statistics are not separable in jmtl's sense (head stays stateless): encode/head
  # are offered only when the heads have no state.
  heads_stateless = not any(jax.tree.leaves(parts[f"task:{n}"][2]) for n in names)
  return MultiTaskModel(
    init=init,
    apply=apply,
    encode=encode if heads_stateless else None,
    head=head if heads_stateless else None,
    task_names=names,
    init_state=init_state,
    stateful=stateful,
  )


def from_equinox(trunk, heads: Mapping[str, Any], *, batched: bool = False) -> MultiTaskModel:
  """A :class:`~jmtl.models.MultiTaskModel` from an equinox trunk and one equinox head per task.

  Equinox modules are pytrees; the parameters are their inexact-array leaves
  (``eqx.partition(module, eqx.is_inexact_array)``), kept in the module's own
  structure: ``{"shared": trunk's arrays, "tasks": {name: head's arrays}}``.
  The modules arrive initialised, so ``init`` returns those and ignores its
  key. Equinox layers act on one example (``eqx.nn.Linear`` maps ``(in,)`` to
  ``(out,)``), so by default the trunk and heads are ``jax.vmap``-ed over the
  batch axis; ``batched=True`` calls them on the whole batch. The model is
  stateless (``init_state`` gives ``{}``); equinox's own ``eqx.nn.State``
  (batch norm) is not carried.

  Args:
    trunk: the shared equinox module.
    heads: task name -> equinox module, in task order.
    batched: whether the modules take a batch (else each is vmapped).

  Returns:
    A separable :class:`~jmtl.models.MultiTaskModel`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import equinox as eqx
    >>> from jmtl import models
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> trunk = eqx.nn.MLP(5, 8, width_size=8, depth=1, key=k[0])
    >>> model = models.from_equinox(trunk, {"a": eqx.nn.Linear(8, 3, key=k[1]), "b": eqx.nn.Linear(8, 1, key=k[2])})
    >>> x = jnp.ones((4, 5))
    >>> preds, _ = model.apply(model.init(k[0], x), x, {})
    >>> {t: v.shape for t, v in preds.items()}
    {'a': (4, 3), 'b': (4, 1)}
  """
  import equinox as eqx

  names = _check_heads(heads, "from_equinox")
  trunk_params, trunk_static = eqx.partition(trunk, eqx.is_inexact_array)
  head_parts = {n: eqx.partition(heads[n], eqx.is_inexact_array) for n in names}

  def call(params, static, x):
    module = eqx.combine(params, static)
    return module(x) if batched else jax.vmap(module)(x)

  def encode(shared, inputs, model_state, *, train=False, axis_name=None):
    del train, axis_name
    return call(shared, trunk_static, inputs), model_state

  def head(task, task_params, z):
    if task not in head_parts:
      raise ValueError(f"from_equinox: unknown task {task!r}; tasks are {list(names)}")
    return call(task_params, head_parts[task][1], z)

  def apply(params, inputs, model_state, *, train=False, axis_name=None):
    z, model_state = encode(params["shared"], inputs, model_state, train=train, axis_name=axis_name)
    return {n: head(n, params["tasks"][n], z) for n in names}, model_state

  def init(key, inputs):
    del key, inputs
    return {"shared": trunk_params, "tasks": {n: head_parts[n][0] for n in names}}

  return MultiTaskModel(
    init=init,
    apply=apply,
    encode=encode,
    head=head,
    task_names=names,
    init_state=lambda key, inputs: {},
  )
