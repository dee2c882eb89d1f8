"""Shared helpers of jmtl's TFDS builders: data dir, configs, preparation and a random-access source.

Every jmtl dataset module (``multi_digits``, ``synthetic``, ``qm9``) defines a
``tfds.core.GeneratorBasedBuilder`` that writes ``array_record`` files and is
read through ``builder.as_data_source`` -- neither step imports TensorFlow.
The module's ``prepare(data_dir, config, **overrides)`` and
``load(split, data_dir, config, **overrides)`` go through
:func:`prepare_builder` and :class:`Source` here.

``tensorflow_datasets`` is imported lazily, inside the functions that need it,
so that importing these helpers stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The default root of prepared datasets, unless ``$JMTL_DATA_DIR`` is set.
DEFAULT_DATA_DIR = "~/.cache/jmtl/tensorflow_datasets"
#: The file format every jmtl builder writes (readable without TensorFlow).
FILE_FORMAT = "array_record"
#: The splits every jmtl builder provides.
SPLITS = ("train", "validation", "test")

Example = dict[str, Any]
ToExample = Callable[[Mapping[str, Any]], Example]


def default_data_dir() -> str:
  """Returns ``$JMTL_DATA_DIR`` if set, else ``~/.cache/jmtl/tensorflow_datasets`` (user expanded).

  Examples:
    >>> import os
    >>> from jmtl.data import _tfds
    >>> _tfds.default_data_dir() == os.path.expanduser(os.environ.get("JMTL_DATA_DIR") or _tfds.DEFAULT_DATA_DIR)
    True
  """
  return os.path.expanduser(os.environ.get("JMTL_DATA_DIR") or DEFAULT_DATA_DIR)


def resolve_config(builder_cls: type, config: Any = None, **overrides: Any) -> Any:
  """Picks a builder config by name (or instance) and applies field overrides.

  A config with overrides gets a new name, ``"<name>_custom_<digest>"``, where
  the digest is a function of the overridden values only, so the same
  overrides always prepare into (and reuse) the same directory.

  Args:
    builder_cls: a builder class with ``BUILDER_CONFIGS`` (dataclass configs).
    config: a config name, a config instance, or ``None`` for the first one.
    **overrides: config fields to replace, e.g. ``num_train=1000``.

  Returns:
    The config instance to pass to the builder.

  Examples:
    >>> import dataclasses
    >>> from jmtl.data import _tfds
    >>> @dataclasses.dataclass
    ... class Cfg:
    ...   name: str
    ...   n: int = 10
    >>> class B:
    ...   BUILDER_CONFIGS = [Cfg("small"), Cfg("big", n=100)]
    >>> _tfds.resolve_config(B, "big").n
    100
    >>> c = _tfds.resolve_config(B, n=3)
    >>> c.n, c.name.startswith("small_custom_")
    (3, True)
  """
  configs = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  if config is None:
    base = builder_cls.BUILDER_CONFIGS[0]
  elif isinstance(config, str):
    if config not in configs:
      raise ValueError(f"unknown config {config!r} for {builder_cls.__name__}; known: {sorted(configs)}")
    base = configs[config]
  else:
    base = config
  if not overrides:
    return base
  fields = {f.name for f in dataclasses.fields(base)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown config fields {unknown} for {builder_cls.__name__}")
  text = repr(sorted((k, repr(v)) for k, v in overrides.items()))
  digest = hashlib.sha1(text.encode()).hexdigest()[:10]
  return dataclasses.replace(base, name=f"{base.name}_custom_{digest}", **overrides)


def make_builder(builder_cls: type, data_dir: str | None = None, config: Any = None, **overrides: Any):
  """Instantiates a builder (array_record, default data dir) without preparing it.

  Examples:
    >>> from jmtl.data import _tfds, synthetic
    >>> b = _tfds.make_builder(synthetic.Synthetic, "/tmp/nowhere", "regression_k3")
    >>> b.builder_config.num_tasks, str(b.info.version)
    (3, '1.0.0')
  """
  cfg = _picklable(builder_cls, resolve_config(builder_cls, config, **overrides))
  return builder_cls(data_dir=data_dir or default_data_dir(), config=cfg, file_format=FILE_FORMAT)


def _picklable(builder_cls: type, cfg: Any) -> Any:
  """A built-in config by its name, any other config as is: what the builder should be given.

  A TFDS builder pickles its constructor arguments, and so do the data sources
  and ``DatasetInfo`` that hold it; unpickling calls the constructor again. It
  accepts a config *instance* named like a built-in one only if it *is* that
  object (an identity check), which an unpickled copy never is: "Cannot name a
  custom BuilderConfig the same as an available BuilderConfig". Passing the
  name instead pickles as a string and finds the class's own instance again.
  A copy with the same name and fields (e.g. a config from an unpickled
  builder) counts as the built-in; one that differs stays an error.

  Examples:
    >>> import dataclasses
    >>> from jmtl.data import _tfds
    >>> @dataclasses.dataclass(eq=False)
    ... class Cfg:
    ...   name: str
    ...   n: int = 10
    >>> class B:
    ...   BUILDER_CONFIGS = [Cfg("small")]
    >>> _tfds._picklable(B, B.BUILDER_CONFIGS[0]), _tfds._picklable(B, Cfg("small")), _tfds._picklable(B, Cfg("x")).n
    ('small', 'small', 10)
  """
  builtin = {c.name: c for c in builder_cls.BUILDER_CONFIGS}.get(cfg.name)
  if builtin is not None and (builtin is cfg or dataclasses.asdict(builtin) == dataclasses.asdict(cfg)):
    return cfg.name
  return cfg


def prepare_builder(builder_cls: type, data_dir: str | None = None, config: Any = None, **overrides: Any):
  """Builds a dataset offline if it is not prepared yet, and returns its builder.

  A second call with the same arguments finds the prepared files and returns
  at once.

  Examples:
    >>> from jmtl.data import _tfds, synthetic
    >>> b = _tfds.prepare_builder(synthetic.Synthetic, config="regression_k3")  # doctest: +SKIP
  """
  builder = make_builder(builder_cls, data_dir, config, **overrides)
  if not builder.is_prepared():
    builder.download_and_prepare(download_dir=os.path.join(builder.data_dir_root, "downloads"), file_format=FILE_FORMAT)
  return builder


def info_metadata(builder) -> dict:
  """The builder's metadata as a plain dict (what ``_split_generators`` stored in ``info.metadata``)."""
  return dict(builder.info.metadata or {})


class Source:
  """A random-access view of one split, yielding jmtl multi-label examples as numpy.

  ``source[i]`` is ``{"inputs": array, "labels": {task: array}}`` (plus
  ``"masks"`` where labels can be missing), made by the dataset's
  ``to_example`` from the stored TFDS features. ``source.raw`` is the
  underlying TFDS data source (all stored features, e.g. provenance indices).

  Attributes:
    raw: the TFDS data source (``len`` and ``[i]`` over feature dicts).
    to_example: feature dict -> example; a module-level function (or a
      ``functools.partial`` of one), so that the source pickles for grain
      worker processes.
    tasks: task name -> ``{"kind": "classification"|"regression"|"multilabel",
      "num_classes" or "dim": int}``, to size model heads.
    info: the ``tfds.core.DatasetInfo``.
    split: the split name.
    target_stats: for standardised regression targets, task ->
      ``{"mean", "std", "unit"}`` in physical units; else ``None``.

  Examples:
    >>> from jmtl.data import _tfds
    >>> raw = [{"x": [1.0, 2.0], "y": 3}, {"x": [0.0, 1.0], "y": 1}]
    >>> to_ex = lambda f: {"inputs": np.asarray(f["x"], np.float32), "labels": {"t": np.int32(f["y"])}}
    >>> s = _tfds.Source(raw, to_ex, {"t": {"kind": "classification", "num_classes": 4}})
    >>> len(s), s[1]["labels"]["t"], [e["labels"]["t"] for e in s.__getitems__([1, 0])]
    (2, np.int32(1), [np.int32(1), np.int32(3)])
  """

  def __init__(
    self,
    raw: Sequence[Mapping[str, Any]],
    to_example: ToExample,
    tasks: Mapping[str, Mapping[str, Any]],
    *,
    info: Any = None,
    split: str | None = None,
    target_stats: Mapping[str, Mapping[str, Any]] | None = None,
  ):
    self.raw = raw
    self.to_example = to_example
    self.tasks = {k: dict(v) for k, v in tasks.items()}
    self.info = info
    self.split = split
    self.target_stats = None if target_stats is None else {k: dict(v) for k, v in target_stats.items()}

  def __len__(self) -> int:
    return len(self.raw)

  def __getitem__(self, index: int) -> Example:
    return self.to_example(self.raw[index])

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    """Fetches several examples at once (TFDS reads the records in one call)."""
    indices = [int(i) for i in indices]
    getitems = getattr(self.raw, "__getitems__", None)
    records = getitems(indices) if getitems is not None else [self.raw[i] for i in indices]
    return [self.to_example(r) for r in records]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    name = getattr(self.info, "full_name", None) or "?"
    return f"Source({name}, split={self.split!r}, len={len(self)}, tasks={list(self.tasks)})"


def load_source(
  builder: Any,
  split: str,
  to_example: ToExample,
  tasks: Mapping[str, Mapping[str, Any]],
  target_stats: Mapping[str, Mapping[str, Any]] | None = None,
) -> Source:
  """Wraps one split of a prepared builder in a :class:`Source`.

  Examples:
    >>> from jmtl.data import _tfds
    >>> _tfds.load_source(None, "dev", dict, {})
    Traceback (most recent call last):
    ValueError: unknown split 'dev'; jmtl builders have ['train', 'validation', 'test']
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; jmtl builders have {list(SPLITS)}")
  raw = builder.as_data_source(split)
  return Source(raw, to_example, tasks, info=builder.info, split=split, target_stats=target_stats)


def as_scalar(value: Any, dtype: Any) -> np.ndarray:
  """A 0-d numpy array of ``dtype`` (labels are stored per example as scalars).

  Examples:
    >>> from jmtl.data import _tfds
    >>> a = _tfds.as_scalar(3, np.int32)
    >>> a.shape, a.dtype
    ((), dtype('int32'))
  """
  return np.asarray(value, dtype=dtype).reshape(())


def publish(module_name: str, **classes: type) -> dict[str, type]:
  """Gives lazily defined classes a module-level identity (for ``pickle`` and reprs).

  jmtl's builder classes are defined inside a cached function, on first
  access through the module's ``__getattr__``, so that importing a dataset
  module does not import ``tensorflow_datasets``. Setting ``__module__`` and
  ``__qualname__`` lets ``pickle`` find them again by name.

  Examples:
    >>> from jmtl.data import _tfds
    >>> C = type("C", (), {})
    >>> _tfds.publish("jmtl.data.synthetic", Thing=C)["Thing"].__qualname__
    'Thing'
  """
  for name, cls in classes.items():
    cls.__module__ = module_name
    cls.__qualname__ = name
    cls.__name__ = name
  return dict(classes)


def lazy_classes(module_name: str, make):
  """A module ``__getattr__`` (PEP 562) that builds a module's TFDS classes on first access.

  Keeps ``import jmtl.data.<dataset>`` free of tensorflow_datasets until a
  builder class is actually needed.

  Examples:
    >>> getattr_ = lazy_classes("demo", lambda: {"Builder": int})
    >>> getattr_("Builder")
    <class 'int'>
  """

  def __getattr__(name: str):
    classes = make()
    if name in classes:
      return classes[name]
    raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

  return __getattr__
