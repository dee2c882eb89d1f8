"""Input pipelines on grain: multi-label batches, deterministic and resumable.

A *source* is random access: ``len(source)`` and ``source[i]``, one example
``{"inputs": x, "labels": {task: y}, "masks": {task: m}}`` in numpy (``masks``
optional; a mask of 0 marks a missing label). It may also offer
``__getitems__(indices)`` (a list of examples, read in one go), ``gather(indices)``
(an already stacked batch, as :class:`ArraySource` does) and ``tasks`` (task
name -> ``{"kind": ..., "num_classes" | "dim": ...}``).

:func:`multi_label` (here) and :func:`jmtl.data.mixing.multi_input` (batches
mixed from per-task datasets, on this module's :class:`Pipeline`) yield numpy
batches ``{"inputs": (B, ...), "labels": {task: (B, ...)}, "masks": {task:
(B,)}}`` with a mask for every task, integer labels as int32 and float arrays
as float32, so every batch has the same structure and the train step compiles
once. Batch ``s`` is a pure function of ``(seed, s)``: iterators save
``{"pipeline": ..., "grain": {"next_index": s}}`` (JSON) and a restored
iterator yields exactly the batches the uninterrupted one would.

``batch_size`` is the *global* batch. With ``shard=True`` and several JAX
processes, process ``p`` of ``P`` yields rows ``[p B/P, (p+1) B/P)`` of each
global batch, so the global batches do not depend on the number of processes
(see :func:`jmtl.parallel.put_batch`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from jmtl.data._batching import Example
from jmtl.data._batching import Permutations
from jmtl.data._batching import Reader
from jmtl.data._batching import probe
from jmtl.data._batching import process_slice
from jmtl.data._batching import spec


class ArraySource:
  """A source over in-memory arrays in the multi-label layout.

  Args:
    data: ``{"inputs": (N, ...), "labels": {task: (N, ...)}}`` and optionally
      ``"masks": {task: (N,)}`` (0 = label missing).
    tasks: task name -> description; inferred when omitted (integer labels:
      ``{"kind": "classification", "num_classes": max + 1}``, float labels:
      ``{"kind": "regression", "dim": ...}``).

  Examples:
    >>> import numpy as np
    >>> src = ArraySource({"inputs": np.zeros((5, 3)), "labels": {"a": np.arange(5)}})
    >>> len(src), src.tasks, int(src[1]["labels"]["a"])
    (5, {'a': {'kind': 'classification', 'num_classes': 5}}, 1)
  """

  def __init__(self, data: Mapping[str, Any], *, tasks: Mapping[str, Mapping] | None = None):
    if not isinstance(data, Mapping) or "inputs" not in data or not data.get("labels"):
      raise ValueError("ArraySource needs {'inputs': array, 'labels': {task: array}}; got " + repr(type(data)))
    self.inputs = np.asarray(data["inputs"])
    self.labels = {k: np.asarray(v) for k, v in data["labels"].items()}
    self.masks = {k: np.asarray(v, np.float32) for k, v in (data.get("masks") or {}).items()}
    n = self.inputs.shape[0] if self.inputs.ndim else None
    bad = {f"labels[{k!r}]": v.shape for k, v in self.labels.items() if v.ndim == 0 or v.shape[0] != n}
    bad |= {f"masks[{k!r}]": v.shape for k, v in self.masks.items() if v.shape != (n,) or k not in self.labels}
    if n is None or bad:
      raise ValueError(f"ArraySource: every array needs the leading size of inputs {self.inputs.shape}; got {bad}")
    self.tasks = dict(tasks) if tasks is not None else {k: _infer_task(v) for k, v in self.labels.items()}

  @classmethod
  def from_source(cls, source, *, chunk: int = 1024) -> ArraySource:
    """Reads every example of ``source`` into memory once.

    For sets that fit in memory this is the fast path: TFDS decodes each
    record in Python (~0.2 ms per example), an :class:`ArraySource` gathers a
    batch with one indexing per array.

    Examples:
      >>> import numpy as np
      >>> examples = [{"inputs": np.zeros(3), "labels": {"a": np.int64(i)}} for i in range(5)]
      >>> src = ArraySource.from_source(examples, chunk=2)
      >>> len(src), src.labels["a"].tolist(), src.labels["a"].dtype
      (5, [0, 1, 2, 3, 4], dtype('int32'))
    """
    ex = probe(source, None, "ArraySource.from_source")
    reader = Reader(source, {k: spec(v) for k, v in ex["labels"].items()}, None)
    parts = [reader.read(range(i, min(i + chunk, len(source)))) for i in range(0, len(source), chunk)]
    cat = lambda key, k: np.concatenate([part[key][k] for part in parts])
    masks = {k: cat("masks", k) for k in ex["labels"]}
    data = {
      "inputs": np.concatenate([part["inputs"] for part in parts]),
      "labels": {k: cat("labels", k) for k in masks},
    }
    data["masks"] = {k: m for k, m in masks.items() if (m != 1).any()}
    out = cls(data, tasks=getattr(source, "tasks", None))
    # What a source knows about its values (the pixel scale of dSprites' 0/1
    # images, QM9's target statistics) must survive the copy into memory.
    for attr in ("image_scale", "target_stats"):
      if getattr(source, attr, None) is not None:
        setattr(out, attr, getattr(source, attr))
    return out

  def __len__(self) -> int:
    return self.inputs.shape[0]

  def __getitem__(self, i: int) -> Example:
    ex = {"inputs": self.inputs[i], "labels": {k: v[i] for k, v in self.labels.items()}}
    if self.masks:
      ex["masks"] = {k: v[i] for k, v in self.masks.items()}
    return ex

  def __getitems__(self, indices) -> list[Example]:
    return [self[int(i)] for i in indices]

  def gather(self, indices) -> Example:
    """The stacked batch of ``indices`` (one fancy-indexing read per array)."""
    idx = np.asarray(indices, np.int64)
    batch = {"inputs": self.inputs[idx], "labels": {k: v[idx] for k, v in self.labels.items()}}
    batch["masks"] = {k: v[idx] for k, v in self.masks.items()}
    return batch


def _infer_task(y: np.ndarray) -> dict:
  if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
    return {"kind": "classification", "num_classes": int(y.max()) + 1 if y.size else 0}
  return {"kind": "regression", "dim": int(np.prod(y.shape[1:], dtype=np.int64))}


class normalize_images:
  """A per-example transform: ``inputs -> (inputs / scale - mean) / std`` as float32.

  It is elementwise, so the pipelines apply it once to the stacked batch (same
  result, less Python per example). It is a class so that it pickles into
  grain worker processes.

  Args:
    scale: divides the raw inputs (255 for uint8 images, 1 for 0/1 masks).
    mean: subtracted after scaling (a scalar or a per-channel array).
    std: divides after that.

  Examples:
    >>> import numpy as np
    >>> ex = normalize_images()({"inputs": np.array([0, 255], np.uint8), "labels": {}})
    >>> ex["inputs"], ex["inputs"].dtype
    (array([0., 1.], dtype=float32), dtype('float32'))
  """

  elementwise = True

  def __init__(self, scale: float = 255.0, *, mean: Any = 0.0, std: Any = 1.0):
    self.scale = float(scale)
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def __call__(self, example: Example) -> Example:
    x = np.asarray(example["inputs"], np.float32) / np.float32(self.scale)
    return {**example, "inputs": (x - self.mean) / self.std}


class _EpochBatch:
  """Step -> the example indices of this process's rows of that global batch."""

  def __init__(self, n: int, batch: int, per_epoch: int, perms: Permutations, rows: tuple[int, int]):
    self.n, self.batch, self.per_epoch, self.perms, self.rows = n, batch, per_epoch, perms, rows

  def __call__(self, step: int) -> np.ndarray:
    epoch, b = divmod(int(step), self.per_epoch)
    return self.perms(0, epoch, self.n)[b * self.batch : (b + 1) * self.batch][self.rows[0] : self.rows[1]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadOptions:
  """How a :class:`Pipeline` reads batches ahead of the training step; none of it changes the batches.

  Attributes:
    num_threads: grain threads that build batches ahead.
    prefetch: batches buffered ahead.
    worker_count: grain worker processes (``mp_prefetch``); 0 for none. The
      source and transform must then pickle.

  Examples:
    >>> ReadOptions(worker_count=2)
    ReadOptions(num_threads=2, prefetch=4, worker_count=2)
  """

  num_threads: int = 2
  prefetch: int = 4
  worker_count: int = 0


class Pipeline:
  """An iterable of batches; each ``iter()`` starts at step 0 and can be restored.

  ``pipeline[s]`` is batch ``s`` itself (random access, no prefetch).
  ``len(pipeline)`` is the number of batches when it is finite.
  """

  def __init__(self, dataset, fingerprint: dict, tasks: dict, *, read: ReadOptions | None = None):
    self._ds, self.fingerprint, self.tasks = dataset, fingerprint, tasks
    read = ReadOptions() if read is None else read
    self._read = grain.ReadOptions(num_threads=read.num_threads, prefetch_buffer_size=read.prefetch)
    self._workers = read.worker_count

  def __iter__(self) -> _Iterator:
    ds = self._ds.to_iter_dataset(self._read)
    if self._workers > 0:
      from absl import flags

      if not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads an absl flag in mp_prefetch and fails in scripts that do not parse
        # flags (google/grain#1355, fixed upstream); the defaults are what we want anyway.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    return _Iterator(iter(ds), self.fingerprint)

  def __getitem__(self, step: int) -> Example:
    return self._ds[step]

  def __len__(self) -> int:
    if len(self._ds) >= sys.maxsize:
      raise TypeError("the pipeline repeats forever (num_epochs/num_steps is None)")
    return len(self._ds)


class _Iterator(grain.DatasetIterator):
  """Delegates to grain's iterator; its state carries the pipeline's settings to catch mismatched restores."""

  def __init__(self, parent, fingerprint: dict):
    super().__init__(parent)
    self._fingerprint = fingerprint

  def __next__(self) -> Example:
    return next(self._parent)

  def get_state(self) -> dict:
    return {"pipeline": dict(self._fingerprint), "grain": self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    """Restores a position saved by :meth:`get_state`, also one saved by another process or under another count.

    The position is a count of global batches, and which rows of them this
    process reads follows from this process (``process`` in the fingerprint
    is left out of the comparison), so a run saved by 2 processes resumes on 1
    and vice versa.
    """
    saved = state.get("pipeline") if isinstance(state, Mapping) else None
    mine = {k: v for k, v in self._fingerprint.items() if k != "process"}
    if not isinstance(saved, Mapping) or {k: v for k, v in saved.items() if k != "process"} != mine:
      diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v} if saved else state
      raise ValueError(f"the saved iterator state belongs to another pipeline: (saved, this) differ in {diff}")
    self._parent.set_state(state["grain"])


def multi_label(
  source,
  batch_size: int,
  *,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  transform: Callable[[Example], Example] | None = None,
  shard: bool = True,
  read: ReadOptions | None = None,
) -> Pipeline:
  """Shuffled batches of one multi-label source: one input, a label and a mask per task.

  Epoch ``e`` visits the examples in the order ``default_rng([seed, 1, 0,
  e]).permutation(N)``, cut into ``N // batch_size`` batches (one more,
  smaller, without ``drop_remainder``); batches never straddle epochs. Batch
  ``s`` is thus a pure function of ``(seed, s)``.

  Args:
    source: a source (see the module docstring), e.g. :class:`ArraySource`.
    batch_size: the global batch size.
    seed: the shuffle seed.
    shuffle: ``False`` keeps the source order (for evaluation).
    num_epochs: ``None`` repeats forever.
    drop_remainder: drop each epoch's last, smaller batch (static shapes).
    transform: a per-example function ``example -> example`` (e.g.
      :class:`normalize_images`); one marked ``elementwise`` is applied to the
      whole batch.
    shard: split each global batch across ``jax.process_count()`` processes.
    read: the threads, prefetch buffer and worker processes that read ahead,
      e.g. ``ReadOptions(worker_count=2)``; ``None`` for the defaults of
      :class:`ReadOptions`.

  Returns:
    A :class:`Pipeline`.

  Examples:
    >>> import numpy as np
    >>> src = ArraySource({"inputs": np.zeros((10, 2)), "labels": {"a": np.arange(10)}})
    >>> pipe = multi_label(src, 4, seed=0, num_epochs=1)
    >>> it = iter(pipe)
    >>> b = next(it)
    >>> len(pipe), b["inputs"].shape, b["labels"]["a"].dtype, b["masks"]["a"]
    (2, (4, 2), dtype('int32'), array([1., 1., 1., 1.], dtype=float32))
    >>> state = it.get_state()
    >>> it2 = iter(pipe); it2.set_state(state)
    >>> bool((next(it2)["labels"]["a"] == next(it)["labels"]["a"]).all())
    True
  """
  ex = probe(source, transform, "multi_label")
  names = list(getattr(source, "tasks", None) or ex["labels"])
  missing = [k for k in names if k not in ex["labels"]]
  if missing:
    raise ValueError(f"multi_label: example 0 has no label for tasks {missing}; cannot infer their label shapes")
  specs = {k: spec(ex["labels"][k]) for k in names}
  p, count, local = process_slice(batch_size, shard, drop_remainder)
  n = len(source)
  if (n // batch_size if drop_remainder else n) == 0:
    raise ValueError(f"multi_label: {n} examples make no batch of {batch_size} with drop_remainder={drop_remainder}")
  per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
  fn = _EpochBatch(n, batch_size, per_epoch, Permutations(seed, shuffle), (p * local, (p + 1) * local))
  ds = grain.MapDataset.range(sys.maxsize if num_epochs is None else per_epoch * num_epochs).map(fn)
  ds = ds.map(Reader(source, specs, transform).read)
  fingerprint = dict(layout="multi_label", seed=int(seed), num_examples=n, batch_size=batch_size, shuffle=shuffle)
  fingerprint |= dict(drop_remainder=drop_remainder, process=[p, count])
  tasks = {k: dict((getattr(source, "tasks", None) or {}).get(k) or {}) for k in names}
  return Pipeline(ds, fingerprint, tasks, read=read)
