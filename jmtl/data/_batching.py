"""Shared machinery of :mod:`jmtl.data.pipeline` and :mod:`jmtl.data.mixing`.

Both build batches in the multi-label layout (see :mod:`jmtl.data.pipeline`)
from per-example sources: :func:`probe` checks a source's first example,
:func:`spec` and :func:`input_dtype` fix the batch's dtypes, :class:`Reader`
reads a list of indices into a batch of fixed structure, :class:`Permutations`
gives each epoch's example order and :func:`process_slice` this process's rows
of a global batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import numpy as np

Example = dict[str, Any]


class Permutations:
  """``perm(stream, epoch, n)``: the order of ``range(n)`` in an epoch, from ``default_rng([seed, 1, stream, epoch])``.

  Cached (a few per stream) and rebuilt on demand, so it pickles small and is
  safe to share between grain's threads.
  """

  def __init__(self, seed: int, shuffle: bool, streams: int = 1):
    self.seed, self.shuffle, self.capacity = int(seed), shuffle, 2 * streams + 1
    self.__setstate__(dict(self.__dict__))

  def __getstate__(self):
    return {k: self.__dict__[k] for k in ("seed", "shuffle", "capacity")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock, self._cache = threading.Lock(), {}

  def __call__(self, stream: int, epoch: int, n: int) -> np.ndarray:
    key = (stream, epoch if self.shuffle else 0, n)
    with self._lock:
      if key not in self._cache:
        rng = np.random.default_rng([self.seed, 1, stream, epoch])
        self._cache[key] = rng.permutation(n) if self.shuffle else np.arange(n)
        if len(self._cache) > self.capacity:
          self._cache.pop(next(iter(self._cache)))
      return self._cache[key]


def label_dtype(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
    return np.dtype(np.int32)
  return np.dtype(np.float32) if np.issubdtype(dtype, np.floating) else dtype


def input_dtype(dtype) -> np.dtype:
  return np.dtype(np.float32) if np.dtype(dtype) == np.float64 else np.dtype(dtype)


class Reader:
  """Reads a list of indices from a source into a batch of fixed structure."""

  def __init__(self, source, specs: Mapping[str, tuple], transform: Callable | None):
    self.source, self.specs, self.transform = source, dict(specs), transform
    self._batched = transform is None or getattr(transform, "elementwise", False)

  def read(self, indices) -> Example:
    indices = [int(i) for i in indices]
    if self._batched and hasattr(self.source, "gather"):
      batch = self.source.gather(indices)
    else:
      getitems = getattr(self.source, "__getitems__", None)
      examples = getitems(indices) if getitems else [self.source[i] for i in indices]
      if not self._batched:
        examples = [self.transform(e) for e in examples]
      batch = self._stack(examples)
    if self._batched and self.transform is not None:
      batch = self.transform(batch)
    return self._finish(batch, len(indices))

  def _stack(self, examples) -> Example:
    labels, masks = {}, {}
    for k, (shape, dtype) in self.specs.items():
      have = [k in e["labels"] for e in examples]
      labels[k] = np.stack(
        [np.asarray(e["labels"][k]) if h else np.zeros(shape, dtype) for e, h in zip(examples, have)]
      )
      masks[k] = np.asarray([float((e.get("masks") or {}).get(k, 1.0)) * h for e, h in zip(examples, have)])
    return {"inputs": np.stack([np.asarray(e["inputs"]) for e in examples]), "labels": labels, "masks": masks}

  def _finish(self, batch: Example, n: int) -> Example:
    x = np.asarray(batch["inputs"])
    masks = batch.get("masks") or {}
    out = {"inputs": x.astype(input_dtype(x.dtype), copy=False), "labels": {}, "masks": {}}
    for k, (_, dtype) in self.specs.items():
      out["labels"][k] = np.asarray(batch["labels"][k]).astype(dtype, copy=False)
      out["masks"][k] = np.asarray(masks[k], np.float32) if k in masks else np.ones((n,), np.float32)
    return out


def probe(source, transform, where: str) -> Example:
  if len(source) == 0:
    raise ValueError(f"{where}: the source is empty")
  ex = source[0]
  if transform is not None:
    ex = transform(ex)
  if not isinstance(ex, Mapping) or "inputs" not in ex or not isinstance(ex.get("labels"), Mapping):
    raise ValueError(f"{where}: an example must be {{'inputs': ..., 'labels': {{task: ...}}}}, got {type(ex)}")
  return ex


def spec(y) -> tuple[tuple[int, ...], np.dtype]:
  return np.shape(y), label_dtype(np.asarray(y).dtype)


def process_slice(batch_size: int, shard: bool, drop_remainder: bool) -> tuple[int, int, int]:
  """(process index, process count, local batch size)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  p, count = 0, 1
  if shard:
    import jax

    p, count = jax.process_index(), jax.process_count()
  if batch_size % count or (count > 1 and not drop_remainder):
    raise ValueError(
      f"with {count} processes the global batch_size ({batch_size}) must be divisible by the process count and "
      f"drop_remainder must be True (got {drop_remainder}), so every process yields batches of one shape"
    )
  return p, count, batch_size // count
