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

Verification. Once orbax has finalised a step directory, :meth:`Checkpoints.save`
records the SHA-256 of every file in it (``<step>/jmtl_digest.json``, written
through a temporary file and a rename). orbax 0.12 checks no data on restore
(tensorstore's zarr3 ``crc32c`` covers only the shard index, and a flipped byte
in a data chunk restores silently), so :meth:`Checkpoints.resume` and
:meth:`Checkpoints.restore_kept` walk back from the newest step to the newest
one whose files match their digests, that restores without error and whose
parameters are finite, and say in one line on stderr which steps they skipped
and why. A step without a digest (written by an older jmtl, or a kill between
orbax's commit and the digest's rename) is used if it restores and is finite.
When no step serves, :class:`NoUsableCheckpoint` (a :class:`ConfigError`: one
line, exit code 2) names the directory and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jmtl.parallel
from jmtl.run.config import ConfigError

DIGEST = "jmtl_digest.json"
REJECTED = "rejected_checkpoints"  # beside the checkpoints directory: the steps a resume skipped


class NoUsableCheckpoint(ConfigError):
  """The directory holds checkpoints and none of them verifies."""


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
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's (jax.distributed)

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


def _file_digests(step_dir: str) -> dict[str, str]:
  """``{relative path: SHA-256 hex}`` of every file under ``step_dir`` but the digest file itself."""
  out = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel == DIGEST or rel.startswith(DIGEST + ".tmp"):
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[rel] = h.hexdigest()
  return out


def write_digest(step_dir: str) -> None:
  """Records the digests of ``step_dir``'s files in ``<step_dir>/jmtl_digest.json`` (atomically)."""
  data = {"format": "sha256", "files": _file_digests(step_dir)}
  path = os.path.join(step_dir, DIGEST)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def check_digest(step_dir: str) -> str | None:
  """Why ``step_dir`` does not match its recorded digests, or ``None`` (also when it has none).

  Examples:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "x"), "w") as f:
    ...   _ = f.write("data")
    >>> write_digest(d); check_digest(d) is None
    True
    >>> with open(os.path.join(d, "x"), "w") as f:
    ...   _ = f.write("dbta")
    >>> check_digest(d)
    'x does not match its recorded SHA-256'
  """
  path = os.path.join(step_dir, DIGEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its digest file {DIGEST} is unreadable ({type(e).__name__})"
  try:
    actual = _file_digests(step_dir)
  except OSError as e:
    return f"a file cannot be read ({e.strerror or e})"
  for rel, digest in sorted(recorded.items()):
    if rel not in actual:
      return f"{rel} is missing"
    if actual[rel] != digest:
      return f"{rel} does not match its recorded SHA-256"
  return None


def _finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def _why(e: Exception) -> str:
  text = " ".join(str(e).split())
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"cannot be restored ({type(e).__name__}: {text})" if text else f"cannot be restored ({type(e).__name__})"


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

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def save(self, step: int, params: Any, best_params: Any, train: Any, meta: dict) -> None:
    """Saves one step. ``params``/``best_params`` are a pytree, or ``(params, model_state)`` for a stateful model."""
    items = {"train": ocp.args.StandardSave(_to_savable(train)), "meta": ocp.args.JsonSave(meta)}
    for name, value in (("params", params), ("best_params", best_params)):
      for item, tree in zip(_item_names(name, value), _parts(value)):
        items[item] = ocp.args.StandardSave(tree)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()
    if jmtl.parallel.is_primary():  # one writer; every process's files are committed by now
      write_digest(self.step_dir(step))

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

  def resume(self, params_like: Any, train_like: Any):
    """:meth:`restore` of the newest step that verifies, or ``None`` when there is no checkpoint.

    The steps skipped on the way are moved to ``<workdir>/rejected_checkpoints``
    (so the resumed run can write those steps again), and one line on stderr
    says which and why.

    Raises:
      NoUsableCheckpoint: when there are checkpoints and none verifies.
    """
    found = self._newest_good(lambda s: self.restore(params_like, train_like, s), lambda r: r[:2])
    if found is None:
      return None
    step, restored, skipped = found
    if skipped:
      moved = self._set_aside([s for s, _ in skipped])
      self._say(skipped, f"set aside in {moved}; resuming from step {step}")
    return restored

  def restore_kept(self, params_like: Any, which: str = "best_params"):
    """``(step, params, meta)``: :meth:`restore_params` of the newest step that verifies (nothing is moved).

    Raises:
      NoUsableCheckpoint: when there are checkpoints and none verifies (``ConfigError`` when there are none).
    """
    found = self._newest_good(lambda s: self.restore_params(params_like, which, s), lambda r: r[0])
    if found is None:
      raise ConfigError(f"{self.directory} holds no checkpoint yet")
    step, (params, meta), skipped = found
    if skipped:
      self._say(skipped, f"using step {step}")
    return step, params, meta

  def _newest_good(self, load: Callable[[int], Any], params_of: Callable[[Any], Any]):
    """``(step, load(step), skipped)`` of the newest step that verifies; ``skipped`` lists ``(step, why)``."""
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      why = check_digest(self.step_dir(step))
      if why is None:
        try:
          restored = load(step)
        except Exception as e:  # whatever orbax, tensorstore or json raise on a damaged step
          why = _why(e)
        else:
          why = None if _finite(params_of(restored)) else "its parameters are not finite"
      if why is None:
        return step, restored, skipped
      skipped.append((step, why))
    if skipped:
      listed = "; ".join(f"step {s}: {why}" for s, why in skipped)
      raise NoUsableCheckpoint(
        f"no checkpoint in {self.directory} verifies ({listed}); to start the run afresh, move {self.directory} "
        "away (or delete it) and run the same command again"
      )
    return None

  def _set_aside(self, steps: list[int]) -> str:
    target = os.path.join(os.path.dirname(self.directory), REJECTED)
    os.makedirs(target, exist_ok=True)
    for step in steps if jmtl.parallel.is_primary() else ():  # one mover under jax.distributed
      dest, n = os.path.join(target, str(step)), 1
      while os.path.exists(dest):
        dest, n = os.path.join(target, f"{step}.{n}"), n + 1
      shutil.move(self.step_dir(step), dest)
    jmtl.parallel.sync("checkpoints set aside")
    self.manager.reload()
    return target

  def _say(self, skipped: list[tuple[int, str]], then: str) -> None:
    listed = ", ".join(f"{s} ({why})" for s, why in skipped)
    noun = "checkpoint" if len(skipped) == 1 else "checkpoints"
    if jmtl.parallel.is_primary():
      print(f"jmtl: skipped {noun} {listed} in {self.directory}; {then}", file=sys.stderr, flush=True)

  def close(self) -> None:
    self.manager.close()
