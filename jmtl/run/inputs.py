"""Datasets for a config: the three splits, their tasks (losses and metrics), and batch iterators.

``dataset.name`` is one of jmtl's builders (:data:`BUILDERS`), a catalog
dataset with published task definitions (:mod:`jmtl.data.catalog`), any other
TFDS name read with ``tfds.data_source`` (its tasks declared in
``dataset.options.tasks``, :func:`jmtl.data.catalog.load_tfds`), or a dotted
path to a user's function ``fn(split, **dataset.options) -> source``: a
random-access source (``len``, ``source[i] -> {"inputs", "labels": {task:
...}}``, optional ``"masks"``) with a ``tasks`` attribute, e.g. a
:class:`jmtl.data.ArraySource` (:func:`dataset_kind`).

Small sets are read into memory once (:class:`jmtl.data.ArraySource`); the
loaded splits are cached per dataset config, so a sweep reads them once.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import ml_collections
import numpy as np

import jmtl
from jmtl import data as data_lib
from jmtl.run.config import ConfigError

#: dataset name -> jmtl.data module with ``load(split, data_dir=None, config=None, **overrides)``.
BUILDERS = ("multi_digits", "synthetic", "qm9")
SPLITS = ("train", "validation", "test")


class Data(NamedTuple):
  """The splits of one dataset and how to feed them.

  Attributes:
    sources: split -> random-access source.
    specs: task name -> ``{"kind": ..., "num_classes" | "dim": ...}``.
    transform: the per-example input transform (a :class:`jmtl.data.normalize_images`) or ``None``.
    target_stats: task -> ``{"mean", "std", "unit"}`` for standardised regression targets, or ``None``.
  """

  sources: dict[str, Any]
  specs: dict[str, dict]
  transform: Any
  target_stats: dict[str, dict] | None


_CACHE: dict[str, Data] = {}


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Loads (or prepares, the first time) the dataset of ``config.dataset``; cached per dataset config.

  Examples:
    >>> from jmtl.run import config as config_lib
    >>> c = config_lib.load_config("configs/synthetic.py")  # doctest: +SKIP
    >>> sorted(load_data(c).specs)  # doctest: +SKIP
    ['task_0', 'task_1', 'task_2']
  """
  key = json.dumps(config.dataset.to_dict(), sort_keys=True, default=str)
  if key not in _CACHE:
    _CACHE[key] = _load(config.dataset)
  return _CACHE[key]


def dataset_kind(name: str) -> str:
  """How ``dataset.name`` is read: ``"builtin"`` (jmtl's builders), ``"catalog"`` (:mod:`jmtl.data.catalog`'s task
  definitions), ``"function"`` (a dotted path to a user's function) or ``"tfds"`` (any other TFDS name).

  A dotted path has a ``.`` and neither ``/`` nor ``:`` (which TFDS names use for configs and versions).

  Examples:
    >>> [dataset_kind(n) for n in ("synthetic", "celeb_a", "my_pkg.data.splits", "mnist", "cifar10:3.0.2")]
    ['builtin', 'catalog', 'function', 'tfds', 'tfds']
  """
  if name in BUILDERS:
    return "builtin"
  if name in data_lib.catalog.DATASETS:
    return "catalog"
  if "." in name and "/" not in name and ":" not in name:
    return "function"
  return "tfds"


def _load(d: ml_collections.ConfigDict) -> Data:
  import tensorflow_datasets as tfds  # no TensorFlow: jmtl reads array_record files

  tfds.disable_progress_bar()  # preparing a set once would print a bar per split and file
  options = d.options.to_dict()
  kind = dataset_kind(d.name)
  if not d.name:
    known = ", ".join(BUILDERS + data_lib.catalog.DATASETS)
    raise ConfigError(f"config field 'dataset.name' is empty; use one of {known}, a TFDS name or a dotted path")
  if kind == "function":
    user_fn = _dataset_function(d)
  sources, raw = {}, {}
  for split in SPLITS:
    name = d.splits[split]
    try:
      if kind == "catalog":
        src = data_lib.catalog.load(d.name, name, d.data_dir or None, **options)
      elif kind == "builtin":
        module = getattr(data_lib, d.name)
        src = module.load(name, d.data_dir or None, d.config or None, **options)
      elif kind == "tfds":
        full = f"{d.name}/{d.config}" if d.config and "/" not in d.name else d.name
        src = data_lib.catalog.load_tfds(full, name, d.data_dir or None, **options)
      else:
        src = _user_source(d.name, user_fn(name, **options), split)
    except (TypeError, ValueError, FileNotFoundError, ImportError) as e:
      if isinstance(e, ConfigError):
        raise
      raise ConfigError(f"dataset {d.name!r} (dataset.options {options}): {_one_line(e)}") from e
    raw[split] = src
    sources[split] = data_lib.ArraySource.from_source(src) if d.in_memory else src
  # The dataset's own attributes: an ArraySource keeps the arrays and tasks only.
  scale = float(getattr(raw["train"], "image_scale", 0) or 0)
  stats = getattr(raw["train"], "target_stats", None)
  return Data(sources, dict(raw["train"].tasks), _transform(d, sources["train"], scale), stats)


def _dataset_function(d: ml_collections.ConfigDict):
  """The user's ``fn(split, **dataset.options) -> source`` that ``dataset.name`` names."""
  from jmtl.run import registry  # the registry imports the models; only a user's dataset needs it

  if d.config or d.data_dir:
    field = "dataset.config" if d.config else "dataset.data_dir"
    raise ConfigError(
      f"config field {field!r} is for jmtl's and TFDS datasets; dataset {d.name!r} is your function: pass what it "
      "needs in dataset.options (its keyword arguments)"
    )
  return registry.resolve(d.name, {}, "dataset (config field 'dataset.name')")


def _user_source(name: str, src: Any, split: str) -> Any:
  """Checks what a user's dataset function returned for ``split``: a random-access source with ``tasks``."""
  where = f"dataset {name!r} returned {type(src).__name__} for split {split!r}"
  if not (hasattr(src, "__len__") and hasattr(src, "__getitem__")):
    raise ConfigError(f"{where}: not a random-access source (len(source), source[i]); see jmtl.data.ArraySource")
  tasks = getattr(src, "tasks", None)
  if not isinstance(tasks, Mapping) or not tasks:
    raise ConfigError(
      f"{where} without a 'tasks' attribute: a mapping task -> {{'kind': 'classification', 'num_classes': C}} "
      "(or 'regression' with 'dim', 'multilabel' with 'dim')"
    )
  return src


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _transform(d: ml_collections.ConfigDict, train, scale: float) -> Any:
  """Scales images to [0, 1]; with ``standardize_inputs``, standardises every input feature by training statistics."""
  if d.standardize_inputs:
    if not isinstance(train, data_lib.ArraySource):
      raise ConfigError("config field 'dataset.standardize_inputs' needs dataset.in_memory=True")
    x = train.inputs.astype(np.float64) / (scale or 1.0)
    return data_lib.normalize_images(scale or 1.0, mean=x.mean(0), std=x.std(0) + 1e-6)
  if scale or np.issubdtype(np.asarray(train[0]["inputs"]).dtype, np.integer):
    return data_lib.normalize_images(scale or 255.0)
  return None


def make_tasks(data: Data, names: list[str]) -> list[jmtl.Task]:
  """One :class:`jmtl.Task` per name: cross-entropy and accuracy, BCE and binary accuracy, or MSE and MAE.

  The MAE of a standardised regression target is reported in its physical
  unit (``target_stats``), the convention of the QM9 papers.

  Examples:
    >>> d = Data({}, {"a": {"kind": "classification", "num_classes": 3}, "b": {"kind": "regression", "dim": 1}},
    ...          None, {"b": {"mean": 0.0, "std": 2.0, "unit": "eV"}})
    >>> [(t.name, list(t.metrics)) for t in make_tasks(d, ["a", "b"])], units(d, ["a", "b"]), head_dims(d, ["a", "b"])
    ([('a', ['acc']), ('b', ['mae'])], {'a': '', 'b': 'eV'}, {'a': 3, 'b': 1})
  """
  tasks = []
  for name in names:
    kind = data.specs[name].get("kind")
    if kind == "classification":
      tasks.append(jmtl.Task(name, jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()}))
    elif kind == "multilabel":
      tasks.append(jmtl.Task(name, jmtl.losses.sigmoid_binary_cross_entropy, {"acc": jmtl.metrics.binary_accuracy()}))
    elif kind == "regression":
      std = float((data.target_stats or {}).get(name, {}).get("std", 1.0))
      tasks.append(jmtl.Task(name, jmtl.losses.mse, {"mae": _scaled(jmtl.metrics.mae(), std)}))
    else:
      raise ConfigError(f"task {name!r} has kind {kind!r}; the runner knows classification, multilabel, regression")
  return tasks


def _scaled(metric: jmtl.metrics.Metric, factor: float) -> jmtl.metrics.Metric:
  return jmtl.metrics.Metric(metric.stats, lambda s: metric.compute(s) * factor, metric.higher_is_better)


def units(data: Data, names: list[str]) -> dict[str, str]:
  """Task -> the unit of its MAE ("" where there is none)."""
  return {n: str((data.target_stats or {}).get(n, {}).get("unit", "")) for n in names}


def head_dims(data: Data, names: list[str]) -> dict[str, int]:
  """Task -> output size of its head."""
  return {n: int(data.specs[n].get("num_classes") or data.specs[n].get("dim") or 1) for n in names}


class DataError(ConfigError):
  """Bad values in a dataset (a label out of range, NaN or inf, a mask outside [0, 1]), found before training."""


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # source -> the fields checked already
_ROWS = 4096  # rows per chunk: the temporaries of a check stay small for large in-memory sets


def check_data(data: Data, names: list[str]) -> None:
  """Checks every in-memory split (:class:`jmtl.data.ArraySource`) once, on the host, before any training.

  A classification label of a labelled example (mask > 0) must be a class
  index in ``[0, num_classes)``, a multilabel label lie in ``[0, 1]``, a
  regression label be finite; inputs must be finite; masks must lie in
  ``[0, 1]``; a split must not be empty. The first violation raises a
  :class:`DataError` naming the task (or the inputs), the split, the first
  offending example and value, and how many there are -- a wrong encoding
  (labels 1..10 for 10 classes) fails here instead of skipping every
  training step. Splits not held in memory are not read here (the checked
  step, ``--config.checks=true``, checks each batch as it trains).

  Examples:
    >>> src = data_lib.ArraySource({"inputs": np.zeros((3, 2)), "labels": {"a": np.array([1, 2, 3])}},
    ...                            tasks={"a": {"kind": "classification", "num_classes": 3}})
    >>> check_data(Data({"train": src}, dict(src.tasks), None, None), ["a"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    jmtl.run.inputs.DataError: task 'a': train example 2 has label 3, outside 0..2 for its 3 classes ...
  """
  for split, src in data.sources.items():
    if not isinstance(src, data_lib.ArraySource):
      continue
    done = _CHECKED.setdefault(src, set())
    if not len(src):
      raise DataError(f"split {split!r} of the dataset has no examples")
    if "inputs" not in done:
      _check_inputs(src.inputs, split)
      done.add("inputs")
    for name in names:
      if name in done or name not in src.labels:
        continue
      mask = src.masks.get(name)
      if mask is not None:
        _check_mask(name, mask, split)
      _check_labels(name, data.specs.get(name, {}), src.labels[name], mask, split)
      done.add(name)


def _examples(count: int, split: str) -> str:
  return f"{count} {split} example{'s' if count != 1 else ''}"


def _chunks(n: int):
  for start in range(0, n, _ROWS):
    yield start, slice(start, min(start + _ROWS, n))


def _scan(values: np.ndarray, bad_of, labelled: np.ndarray | None = None) -> tuple[int, int, Any]:
  """``(count, first index, first value)`` of the examples where ``bad_of(chunk)`` holds somewhere (count 0: none)."""
  count, first, value = 0, -1, None
  for start, rows in _chunks(values.shape[0]):
    bad = bad_of(values[rows]).reshape(rows.stop - start, -1)
    per_row = bad.any(axis=1) if labelled is None else bad.any(axis=1) & labelled[rows]
    if first < 0 and per_row.any():
      i = int(np.argmax(per_row))
      first, value = start + i, values[start + i].reshape(-1)[int(np.argmax(bad[i]))]
    count += int(per_row.sum())
  return count, first, value


def _check_inputs(x: np.ndarray, split: str) -> None:
  if not np.issubdtype(x.dtype, np.inexact):
    return
  count, first, value = _scan(x, lambda c: ~np.isfinite(c))
  if count:
    raise DataError(
      f"inputs: {split} example {first} holds {value} ({_examples(count, split)} hold NaN or inf); "
      "the inputs must be finite"
    )


def _check_mask(name: str, mask: np.ndarray, split: str) -> None:
  count, first, value = _scan(mask, lambda c: ~((c >= 0) & (c <= 1)))
  if count:
    raise DataError(
      f"task {name!r}: {split} example {first} has mask {value}, outside [0, 1] ({_examples(count, split)}); "
      "a mask is 1 for a labelled example and 0 for a missing label"
    )


def _check_labels(name: str, spec: Mapping, y: np.ndarray, mask: np.ndarray | None, split: str) -> None:
  labelled = None if mask is None else mask > 0
  kind = spec.get("kind")
  if kind == "classification" and spec.get("num_classes") and np.issubdtype(y.dtype, np.number):
    c = int(spec["num_classes"])
    count, first, value = _scan(y, lambda v: ~((v >= 0) & (v < c)), labelled)
    if count:
      raise DataError(
        f"task {name!r}: {split} example {first} has label {value}, outside 0..{c - 1} for its {c} classes "
        f"({_examples(count, split)} out of range); a class label is an index 0..num_classes-1"
      )
  elif kind == "multilabel" and np.issubdtype(y.dtype, np.number):
    count, first, value = _scan(y, lambda v: ~((v >= 0) & (v <= 1)), labelled)
    if count:
      raise DataError(
        f"task {name!r}: {split} example {first} has label {value}, outside [0, 1] "
        f"({_examples(count, split)}); multilabel targets are 0 or 1 (or a probability)"
      )
  elif np.issubdtype(y.dtype, np.inexact):
    count, first, value = _scan(y, lambda v: ~np.isfinite(v), labelled)
    if count:
      raise DataError(
        f"task {name!r}: {split} example {first} has label {value} ({_examples(count, split)} with NaN or inf "
        "labels); a missing label is marked with mask 0, not a non-finite value"
      )


def _select(batch: dict, names: list[str]) -> dict:
  return {
    "inputs": batch["inputs"],
    "labels": {n: batch["labels"][n] for n in names},
    "masks": {n: batch["masks"][n] for n in names},
  }


class TrainBatches:
  """The training batches of a run; batch ``s`` is a function of ``(seed, s)`` and the iterator state saves.

  With ``validation`` (a weighting that requires it, such as Auto-λ) every
  batch also holds ``batch["validation"]``: a batch of the validation split,
  shuffled and repeated by a pipeline of its own (seed ``seed + 1``), saved
  and restored with the training one.

  Examples:
    >>> src = data_lib.ArraySource({"inputs": np.zeros((8, 2)), "labels": {"a": np.arange(8)}})
    >>> c = ml_collections.ConfigDict({"batch_size": 4, "seed": 0, "dataset": {"workers": 0}})
    >>> it = TrainBatches(Data({"train": src}, dict(src.tasks), None, None), ["a"], c)
    >>> first = next(it)["labels"]["a"]; state = it.get_state(); second = next(it)["labels"]["a"]
    >>> it.set_state(state); bool((next(it)["labels"]["a"] == second).all())
    True
  """

  def __init__(self, data: Data, names: list[str], config: ml_collections.ConfigDict, *, validation: bool = False):
    self.names = names
    pipeline = lambda split, seed: data_lib.multi_label(
      data.sources[split],
      config.batch_size,
      seed=seed,
      transform=data.transform,
      read=data_lib.ReadOptions(worker_count=config.dataset.workers),
    )
    self.pipeline = pipeline("train", config.seed)
    self.iterator = iter(self.pipeline)
    self.val_pipeline = pipeline("validation", config.seed + 1) if validation else None
    self.val_iterator = None if self.val_pipeline is None else iter(self.val_pipeline)

  def _with_validation(self, batch: dict, val) -> dict:
    return batch if val is None else {**batch, "validation": _select(val, self.names)}

  def example(self) -> dict:
    val = None if self.val_pipeline is None else self.val_pipeline[0]
    return self._with_validation(_select(self.pipeline[0], self.names), val)

  def __next__(self) -> dict:
    val = None if self.val_iterator is None else next(self.val_iterator)
    return self._with_validation(_select(next(self.iterator), self.names), val)

  def get_state(self) -> dict:
    if self.val_iterator is None:
      return self.iterator.get_state()
    return {"train": self.iterator.get_state(), "validation": self.val_iterator.get_state()}

  def set_state(self, state: Mapping) -> None:
    if self.val_iterator is None:
      self.iterator.set_state(dict(state))
    else:
      self.iterator.set_state(dict(state["train"]))
      self.val_iterator.set_state(dict(state["validation"]))


def eval_batches(data: Data, split: str, names: list[str], batch_size: int) -> Iterator[dict]:
  """The batches of a split in order; the last one is padded with masked-out rows, so one compile serves all.

  The batches are whole in every process (not split over ``jax.distributed``
  processes as training batches are): each process reads them and puts the
  rows of its own devices (:func:`jmtl.parallel.put_batch` with
  ``global_batch=True``), so the padding and the sums do not depend on the
  process count.

  Examples:
    >>> src = data_lib.ArraySource({"inputs": np.zeros((5, 2)), "labels": {"a": np.arange(5)}})
    >>> d = Data({"test": src}, dict(src.tasks), None, None)
    >>> [b["masks"]["a"].tolist() for b in eval_batches(d, "test", ["a"], 3)]
    [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
  """
  pipe = data_lib.multi_label(
    data.sources[split],
    batch_size,
    seed=0,
    shuffle=False,
    num_epochs=1,
    drop_remainder=False,
    transform=data.transform,
    shard=False,
  )
  for raw in pipe:
    batch = _select(raw, names)
    n = batch["inputs"].shape[0]
    yield _pad(batch, batch_size - n) if n < batch_size else batch


def _pad(batch: dict, extra: int) -> dict:
  def pad(x, fill=None):
    widths = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, widths, mode="edge" if fill is None else "constant")

  return {
    "inputs": pad(batch["inputs"]),
    "labels": {k: pad(v) for k, v in batch["labels"].items()},
    "masks": {k: pad(v, 0.0) for k, v in batch["masks"].items()},
  }
