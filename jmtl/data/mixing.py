"""Multi-input batches: one global batch mixed from per-task datasets, with a task-sampling rule.

:func:`multi_input` draws, for every position of a global batch, a task by
:func:`task_probabilities` and then the next example of that task's source
(without replacement within an epoch of that source). It returns the
multi-label layout of :mod:`jmtl.data.pipeline` (the other tasks' labels masked
out) and shares its reading and sharding machinery (:mod:`jmtl.data._batching`)
and its resumable iterator (:class:`jmtl.data.pipeline.Pipeline`), so batch
``s`` is a pure function of ``(seed, s)`` here too.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from jmtl.data._batching import Example
from jmtl.data._batching import Permutations
from jmtl.data._batching import Reader
from jmtl.data._batching import input_dtype
from jmtl.data._batching import probe
from jmtl.data._batching import process_slice
from jmtl.data._batching import spec
from jmtl.data.pipeline import Pipeline
from jmtl.data.pipeline import ReadOptions

_RULES = ("proportional", "uniform", "temperature")


def task_probabilities(sizes: Mapping[str, int], rule: str = "proportional", temperature: float = 2.0) -> dict:
  """The task-sampling probabilities of :func:`multi_input`.

  ``proportional``: ``p_k = N_k / Σ_j N_j``; ``uniform``: ``p_k = 1/K``;
  ``temperature``: ``p_k ∝ N_k^{1/T}`` (``T = 1`` is proportional, ``T → ∞``
  uniform).

  Examples:
    >>> task_probabilities({"a": 100, "b": 25}, "temperature", temperature=2.0)
    {'a': 0.6666666666666666, 'b': 0.3333333333333333}
  """
  if rule not in _RULES:
    raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
  if rule == "temperature" and not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  n = np.asarray([float(v) for v in sizes.values()])
  if not len(n) or (n <= 0).any():
    raise ValueError(f"every task needs a non-empty dataset, got sizes {dict(sizes)}")
  w = {"proportional": n, "uniform": np.ones_like(n), "temperature": n ** (1.0 / temperature)}[rule]
  return {k: float(v) for k, v in zip(sizes, w / w.sum())}


class _TaskPlan:
  """Which task and which example fills each position of each global batch.

  Task draws come in chunks of ``_CHUNK`` steps from ``default_rng([seed, 2,
  chunk])``; the r-th draw of task k (over the whole run) reads position ``r
  mod N_k`` of the permutation of epoch ``r // N_k`` of task k. ``r`` needs
  the draws of all earlier steps: chunk totals are cached (prefix sums), so
  jumping to step ``s`` costs one pass of draws over steps ``< s``.
  """

  _CHUNK = 128

  def __init__(self, probs, batch: int, seed: int, sizes, shuffle: bool):
    self.cdf = np.cumsum(probs)
    self.batch, self.seed, self.sizes = batch, int(seed), [int(s) for s in sizes]
    self.perms = Permutations(seed, shuffle, streams=len(sizes))
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.RLock()
    self._starts = [np.zeros(len(self.sizes), np.int64)]
    self._chunks: dict[int, tuple] = {}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_starts", "_chunks")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    with self._lock:
      if c not in self._chunks:
        u = np.random.default_rng([self.seed, 2, c]).random((self._CHUNK, self.batch))
        draws = np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.sizes) - 1)
        counts = np.stack([(draws == k).sum(1) for k in range(len(self.sizes))], 1)
        if len(self._chunks) >= 4:
          self._chunks.pop(next(iter(self._chunks)))
        self._chunks[c] = (draws, np.cumsum(counts, 0) - counts)
      return self._chunks[c]

  def _start(self, c: int) -> np.ndarray:
    with self._lock:
      while len(self._starts) <= c:
        draws, before = self._chunk(len(self._starts) - 1)
        self._starts.append(self._starts[-1] + before[-1] + np.bincount(draws[-1], minlength=len(self.sizes)))
      return self._starts[c]

  def draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(task index, rank of the draw within its task) for the positions of global batch ``step``."""
    c, r = divmod(int(step), self._CHUNK)
    draws, before = self._chunk(c)
    tasks = draws[r]
    order = np.argsort(tasks, kind="stable")
    first = np.searchsorted(tasks[order], tasks[order])  # first sorted position of each group
    within = np.empty_like(order)
    within[order] = np.arange(len(order)) - first
    return tasks, (self._start(c) + before[r])[tasks] + within

  def examples(self, k: int, ranks: np.ndarray) -> np.ndarray:
    """The example indices of task ``k`` for its draws number ``ranks``."""
    epochs, pos = np.divmod(ranks, self.sizes[k])
    out = np.empty_like(pos)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.perms(1 + k, int(e), self.sizes[k])[pos[sel]]
    return out


class _MultiInputBatch:
  def __init__(self, plan: _TaskPlan, readers: list[Reader], rows: tuple[int, int], x_spec, specs):
    self.plan, self.readers, self.rows, self.x_spec, self.specs = plan, readers, rows, x_spec, specs

  def __call__(self, step: int) -> Example:
    tasks, ranks = self.plan.draw(step)
    tasks, ranks = tasks[self.rows[0] : self.rows[1]], ranks[self.rows[0] : self.rows[1]]
    n = len(tasks)
    out = {
      "inputs": np.zeros((n, *self.x_spec[0]), self.x_spec[1]),
      "labels": {name: np.zeros((n, *shape), dtype) for name, (shape, dtype) in self.specs.items()},
      "masks": {name: np.zeros((n,), np.float32) for name in self.specs},
    }
    for k, (name, reader) in enumerate(zip(self.specs, self.readers)):
      pos = np.flatnonzero(tasks == k)
      if len(pos):
        part = reader.read(self.plan.examples(k, ranks[pos]))
        out["inputs"][pos] = part["inputs"]
        out["labels"][name][pos] = part["labels"][name]
        out["masks"][name][pos] = part["masks"][name]
    return out


def multi_input(
  sources: Mapping[str, Any],
  batch_size: int,
  *,
  seed: int,
  rule: str = "proportional",
  temperature: float = 2.0,
  num_steps: int | None = None,
  shuffle: bool = True,
  transform: Callable[[Example], Example] | None = None,
  shard: bool = True,
  read: ReadOptions | None = None,
) -> Pipeline:
  """Batches mixing per-task datasets ``D_k`` of sizes ``N_k``, in the multi-label layout.

  The rule: every position ``j`` of global batch ``s`` draws its task
  independently, ``k ~ Categorical(p)`` with ``p`` from
  :func:`task_probabilities` (``proportional`` ``p_k ∝ N_k``, ``uniform``
  ``1/K``, ``temperature`` ``p_k ∝ N_k^{1/T}``), so a batch holds a
  multinomial ``(B, p)`` number of examples of each task (possibly none: the
  task's masked loss is then 0 with count 0). The draws are
  ``default_rng([seed, 2, s // 128])``: a pure function of ``(seed, s)``. Each
  task reads its source without replacement: the ``r``-th example drawn for
  task ``k`` is entry ``r mod N_k`` of ``default_rng([seed, 1, k + 1, r //
  N_k]).permutation(N_k)``. The example carries only its own task's label;
  the other tasks' labels are zeros of the right shape and dtype, mask 0.

  Args:
    sources: task name -> source whose examples hold a label for that task.
      All sources must give inputs of one shape and dtype (after ``transform``).
    batch_size: the global batch size.
    seed: the sampling seed.
    rule: ``"proportional"``, ``"uniform"`` or ``"temperature"``.
    temperature: ``T`` of the temperature rule.
    num_steps: the number of batches; ``None`` for an endless stream.
    shuffle: ``False`` reads each task's source in order.
    transform, shard, read: as in :func:`jmtl.data.pipeline.multi_label`.

  Returns:
    A :class:`jmtl.data.pipeline.Pipeline`.

  Raises:
    ValueError: naming the tasks and shapes when the input shapes differ, and
      on a bad rule, empty sources or missing labels.

  Examples:
    >>> import numpy as np
    >>> from jmtl.data.pipeline import ArraySource
    >>> srcs = {t: ArraySource({"inputs": np.zeros((n, 2)), "labels": {t: np.zeros(n, int)}})
    ...         for t, n in [("a", 30), ("b", 10)]}
    >>> b = multi_input(srcs, 8, seed=0, rule="uniform")[0]
    >>> b["inputs"].shape, sorted(b["labels"]), bool((b["masks"]["a"] + b["masks"]["b"] == 1).all())
    ((8, 2), ['a', 'b'], True)
  """
  if not sources:
    raise ValueError("multi_input needs at least one task source")
  names = list(sources)
  probs = task_probabilities({k: len(s) for k, s in sources.items()}, rule, temperature)
  probes = {k: probe(s, transform, f"multi_input, task {k!r}") for k, s in sources.items()}
  for k, ex in probes.items():
    if k not in ex["labels"]:
      raise ValueError(f"multi_input: the source of task {k!r} gives no label {k!r} (labels: {sorted(ex['labels'])})")
  x_specs = {k: (np.shape(ex["inputs"]), input_dtype(np.asarray(ex["inputs"]).dtype)) for k, ex in probes.items()}
  if len(set(x_specs.values())) > 1:
    shown = {k: f"{s} {d}" for k, (s, d) in x_specs.items()}
    raise ValueError(f"multi_input: all tasks must share one input shape and dtype, got {shown}")
  specs = {k: spec(probes[k]["labels"][k]) for k in names}
  p, _, local = process_slice(batch_size, shard, True)
  plan = _TaskPlan(list(probs.values()), batch_size, seed, [len(sources[k]) for k in names], shuffle)
  readers = [Reader(sources[k], {k: specs[k]}, transform) for k in names]
  fn = _MultiInputBatch(plan, readers, (p * local, (p + 1) * local), x_specs[names[0]], specs)
  ds = grain.MapDataset.range(sys.maxsize if num_steps is None else num_steps).map(fn)
  fingerprint = dict(layout="multi_input", seed=int(seed), sizes={k: len(sources[k]) for k in names}, rule=rule)
  fingerprint |= dict(temperature=float(temperature) if rule == "temperature" else None, batch_size=batch_size)
  fingerprint |= dict(shuffle=shuffle, process=[p, batch_size // local])
  tasks = {k: dict((getattr(sources[k], "tasks", None) or {}).get(k) or {}) for k in names}
  return Pipeline(ds, fingerprint, tasks, read=read)
