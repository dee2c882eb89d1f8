"""Orbax checkpoints of a run: everything the rest of the run depends on, so a resumed run is exact.

One checkpoint (a step directory under ``<workdir>/checkpoints``) holds these
items:

* ``params`` and ``best_params`` -- the model parameters now and the ones
  model selection keeps (standard pytrees any orbax user can read), and for a
  stateful model (batch norm) ``model_state`` and ``best_model_state`` beside
  them;
* ``train`` -- the rest of the device state, flattened into numbered leaves:
  step, optimizer and weighting state, rng (as raw key data), number of skipped
  steps, and the running sums of the metrics being logged;
* ``meta`` (JSON) -- the data iterator state and the host-side state (best
  validation score and step, time spent).

Saves are synchronous: they are small, and a finished save is a committed
directory, so a kill at any moment leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(tree: Any) -> dict[str, Any]:
  leaves = jax.tree.leaves(tree)
  return {f"{i:05d}": jax.random.key_data(x) if _is_key(x) else x for i, x in enumerate(leaves)}


def _from_saved(saved: dict[str, Any], like: Any) -> Any:
  leaves, treedef = jax.tree.flatten(like)
  out = []
  for i, ref in enumerate(leaves):
    x = saved[f"{i:05d}"]
    out.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if _is_key(ref) else x)
  return jax.tree.unflatten(treedef, out)


def _abstract(tree: Any) -> Any:
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def spec(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    sharding = x.sharding if isinstance(x, jax.Array) else default
    x = np.asarray(x) if not hasattr(x, "shape") else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(spec, tree)


def _parts(value: Any) -> tuple:
  return value if isinstance(value, tuple) else (value,)


def _item_names(name: str, value: Any) -> tuple[str, ...]:
  """``params`` -> ``("params",)``, or ``("params", "model_state")`` for a ``(params, model_state)`` pair."""
  if not isinstance(value, tuple):
    return (name,)
  return (name, name.replace("params", "model_state"))


def _join(restored, name: str, like: Any) -> Any:
  names = _item_names(name, like)
  return tuple(restored[n] for n in names) if isinstance(like, tuple) else restored[name]


class Checkpoints:
  """Saves and restores the state of one run under ``directory``.

  Examples:
    >>> import tempfile, jax.numpy as jnp
    >>> ck = Checkpoints(tempfile.mkdtemp(), keep=2)
    >>> ck.save(3, {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, {"n": jnp.int32(3)}, {"data": {"next_index": 3}})
    >>> ck.latest_step()
    3
    >>> p, best, rest, meta = ck.restore({"w": jnp.ones(2)}, {"n": jnp.int32(0)})
    >>> float(best["w"][0]), int(rest["n"]), meta["data"]
    (0.0, 3, {'next_index': 3})
  """

  def __init__(self, directory: str, keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), enable_async_checkpointing=False, create=True)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, best_params: Any, train: Any, meta: dict) -> None:
    """Saves one step. ``params``/``best_params`` are a pytree, or ``(params, model_state)`` for a stateful model."""
    items = {"train": ocp.args.StandardSave(_to_savable(train)), "meta": ocp.args.JsonSave(meta)}
    for name, value in (("params", params), ("best_params", best_params)):
      for item, tree in zip(_item_names(name, value), _parts(value)):
        items[item] = ocp.args.StandardSave(tree)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore(self, params_like: Any, train_like: Any, step: int | None = None):
    """Returns ``(params, best_params, train, meta)`` of ``step`` (default: the latest).

    ``params_like`` (and so what comes back) is a pytree, or a tuple
    ``(params, model_state)`` for a stateful model.
    """
    step = self.latest_step() if step is None else step
    items = {"train": ocp.args.StandardRestore(_abstract(_to_savable(train_like))), "meta": ocp.args.JsonRestore()}
    for name in ("params", "best_params"):
      for item, tree in zip(_item_names(name, params_like), _parts(params_like)):
        items[item] = ocp.args.StandardRestore(_abstract(tree))
    r = self.manager.restore(step, args=ocp.args.Composite(**items))
    params, best = (_join(r, name, params_like) for name in ("params", "best_params"))
    return params, best, _from_saved(r.train, train_like), r.meta

  def restore_params(self, params_like: Any, which: str = "best_params", step: int | None = None):
    """One parameter item (``(params, model_state)`` like ``params_like``) and the meta of ``step``.

    ``step`` defaults to the latest, e.g. to evaluate a finished run.
    """
    step = self.latest_step() if step is None else step
    items = {"meta": ocp.args.JsonRestore()}
    for item, tree in zip(_item_names(which, params_like), _parts(params_like)):
      items[item] = ocp.args.StandardRestore(_abstract(tree))
    r = self.manager.restore(step, args=ocp.args.Composite(**items))
    return _join(r, which, params_like), r.meta

  def close(self) -> None:
    self.manager.close()
