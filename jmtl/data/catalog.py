"""Catalog datasets read from a prepared TFDS ``data_dir``, with the task definitions MTL papers use.

``load(name, split, data_dir)`` opens ``tfds.data_source`` (array_record, no
TensorFlow at run time) and returns a source in jmtl's multi-label layout, with
``tasks`` and ``image_scale`` (what :class:`jmtl.data.pipeline.normalize_images`
should divide by). Images stay uint8; labels are int32 (float32 for disparity).

=============  =====================================================================
``celeb_a``    40 binary attributes (Liu et al. 2015; the MGDA-UB / Sener & Koltun
               2018 setup): 40 two-class tasks named by attribute, or with
               ``attributes="multilabel"`` one task ``"attributes"`` of 40 0/1 labels.
``smallnorb``  ``category`` (5), ``instance`` (10), ``elevation`` (9), ``azimuth``
               (18), ``lighting`` (6); ``stereo=True`` stacks both cameras as 2
               channels.
``dsprites``   ``shape`` (3), ``scale`` (6), ``orientation`` (40), ``x`` (32),
               ``y`` (32): classification over the latent *class indices*
               (``label_*``), as in MTL uses of the set. Orientation has symmetric
               duplicates (a square repeats every 90°), so its accuracy is bounded
               below 1. Images are 0/1 (``image_scale`` 1). Only a ``train`` split;
               carve others with TFDS slicing, e.g. ``"train[:90%]"``.
``shapes3d``   ``floor_hue`` (10), ``wall_hue`` (10), ``object_hue`` (10), ``scale``
               (8), ``shape`` (4), ``orientation`` (15), over the factor indices.
               Only a ``train`` split.
``cityscapes`` ``segmentation`` and ``disparity`` (MTAN, Liu et al. 2019), images
               resized to 128×256 by default. Segmentation maps the gtFine
               ``labelIds`` to the 19 evaluation ``trainId`` classes (or, with
               ``num_classes=7``, to the 7 categories flat, construction, object,
               nature, sky, human, vehicle); everything else is ``-1``, the ignore
               label of :func:`jmtl.losses.pixel_cross_entropy`. Disparity comes
               from the ``disparity_map`` feature of the ``stereo_disparity``
               config, decoded here from its 16-bit PNG (TFDS's own numpy decoder
               would cast it to uint8) as ``(p − 1) / 256`` pixels for ``p > 0``
               and 0 (invalid, skipped by the depth losses) for ``p = 0``.
=============  =====================================================================
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DATASETS", "CatalogSource", "load", "load_tfds"]

DATASETS = ("celeb_a", "smallnorb", "dsprites", "shapes3d", "cityscapes")

# Cityscapes labelId -> trainId (19 classes) and -> category (7 classes); -1 = ignore.
_CITY_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12}
_CITY_TRAIN_IDS |= {26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITY_CATEGORY_BOUNDS = ((7, 11, 0), (11, 17, 1), (17, 21, 2), (21, 23, 3), (23, 24, 4), (24, 26, 5), (26, 34, 6))


def _city_table(num_classes: int) -> np.ndarray:
  table = np.full(256, -1, np.int32)
  if num_classes == 19:
    for label_id, train_id in _CITY_TRAIN_IDS.items():
      table[label_id] = train_id
  else:
    for lo, hi, cat in _CITY_CATEGORY_BOUNDS:
      table[lo:hi] = cat
  return table


def _prepare_hint(name: str, data_dir: str) -> str:
  if name == "cityscapes":
    return (
      "Cityscapes needs a manual download: register at https://www.cityscapes-dataset.com, put "
      "leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip, rightImg8bit_trainvaltest.zip and "
      f"disparity_trainvaltest.zip in {data_dir}/downloads/manual, then, on a machine with TensorFlow, run\n"
      f"  tfds build cityscapes --config semantic_segmentation --file_format=array_record --data_dir={data_dir}\n"
      f"  tfds build cityscapes --config stereo_disparity --file_format=array_record --data_dir={data_dir}"
    )
  return (
    "prepare it once, on a machine with TensorFlow (pip install tensorflow tensorflow-datasets), with\n"
    f"  tfds build {name} --file_format=array_record --data_dir={data_dir}\n"
    "and copy that data_dir here; reading it needs no TensorFlow."
  )


def _open(name: str, split: str, data_dir: str, decoders=None, download: bool = False):
  import tensorflow_datasets as tfds

  base = name.split("/", maxsplit=1)[0]
  if not download and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"{base}: data_dir {data_dir!r} does not exist; {_prepare_hint(base, data_dir)}")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download, decoders=decoders)
  except Exception as e:  # TFDS raises several types (AssertionError, NotImplementedError, ...)
    prepared = glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json"))
    if not prepared:  # TFDS's own message then wrongly blames the file format
      raise FileNotFoundError(
        f"{base}: found no prepared {name!r} in {data_dir!r}; {_prepare_hint(base, data_dir)}"
      ) from e
    raise FileNotFoundError(
      f"{base}: cannot read split {split!r} of {os.path.dirname(prepared[0])} as array_record "
      f"(TFDS: {type(e).__name__}: {e}); {_prepare_hint(base, data_dir)}"
    ) from e


def _resize(x: np.ndarray, size: tuple[int, int] | None, nearest: bool = False) -> np.ndarray:
  if size is None or tuple(x.shape[:2]) == tuple(size):
    return x
  from PIL import Image

  squeeze = x.ndim == 3 and x.shape[-1] == 1
  img = Image.fromarray(x[..., 0] if squeeze else x)
  out = np.asarray(img.resize((size[1], size[0]), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR))
  return out[..., None] if squeeze else out


def _decode_png16(data: Any) -> np.ndarray:
  from PIL import Image

  if isinstance(data, np.ndarray):
    data = data.item()
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img).astype(np.int64)


class CatalogSource:
  """A catalog split in the multi-label layout (the source contract of :mod:`jmtl.data.pipeline`).

  Attributes:
    tasks: task name -> ``{"kind": ..., "num_classes" | "dim": ...}``.
    image_scale: the scale of the raw uint8 images (255, or 1 for dSprites).
  """

  def __init__(self, name: str, sources: Sequence, convert, tasks: dict, image_scale: float):
    self.name, self._sources, self._convert = name, list(sources), convert
    self.tasks, self.image_scale = tasks, image_scale

  def __len__(self) -> int:
    return len(self._sources[0])

  def __getitem__(self, i: int) -> dict:
    return self._convert(*(s[int(i)] for s in self._sources))

  def __getitems__(self, indices) -> list[dict]:
    keys = [int(i) for i in indices]
    return [self._convert(*parts) for parts in zip(*(s.__getitems__(keys) for s in self._sources))]

  def __repr__(self) -> str:
    return f"CatalogSource({self.name!r}, {len(self)} examples, tasks={list(self.tasks)})"


def _classes(ds, feature: str, default: int) -> int:
  try:
    return int(ds.dataset_info.features[feature].num_classes)
  except (AttributeError, KeyError, TypeError):
    return default


def _factor_source(name, ds, factors: dict, *, image_size, image_scale, stereo: bool = False) -> CatalogSource:
  """Image + one classification task per (task name -> (feature, default classes))."""
  tasks = {t: {"kind": "classification", "num_classes": _classes(ds, f, n)} for t, (f, n) in factors.items()}

  def convert(ex):
    x = np.asarray(ex["image"])
    if stereo:
      x = np.concatenate([x, np.asarray(ex["image2"])], axis=-1)
    labels = {t: np.int32(ex[f]) for t, (f, _) in factors.items()}
    return {"inputs": _resize(x, image_size), "labels": labels}

  return CatalogSource(name, [ds], convert, tasks, image_scale)


def _celeb_a(split, data_dir, image_size=None, attributes: str = "binary") -> CatalogSource:
  if attributes not in ("binary", "multilabel"):
    raise ValueError(f"celeb_a: attributes must be 'binary' or 'multilabel', got {attributes!r}")
  ds = _open("celeb_a", split, data_dir)
  names = sorted(ds.dataset_info.features["attributes"].keys())
  if attributes == "binary":
    tasks = {a: {"kind": "classification", "num_classes": 2} for a in names}
  else:
    tasks = {"attributes": {"kind": "multilabel", "dim": len(names)}}

  def convert(ex):
    attrs = ex["attributes"]
    if attributes == "binary":
      labels = {a: np.int32(bool(attrs[a])) for a in names}
    else:
      labels = {"attributes": np.asarray([bool(attrs[a]) for a in names], np.int32)}
    return {"inputs": _resize(np.asarray(ex["image"]), image_size), "labels": labels}

  return CatalogSource("celeb_a", [ds], convert, tasks, 255.0)


def _cityscapes(split, data_dir, image_size=(128, 256), num_classes: int = 19, tasks=("segmentation", "disparity")):
  if num_classes not in (19, 7):
    raise ValueError(f"cityscapes: num_classes must be 19 (trainIds) or 7 (categories), got {num_classes}")
  tasks = tuple(tasks)
  if not tasks or set(tasks) - {"segmentation", "disparity"}:
    raise ValueError(f"cityscapes: tasks must be a non-empty subset of ('segmentation', 'disparity'), got {tasks}")
  import tensorflow_datasets as tfds

  skip = tfds.decode.SkipDecoding()
  seg = _open("cityscapes/semantic_segmentation", split, data_dir)
  sources = [seg]
  if "disparity" in tasks:
    no_decode = {k: skip for k in ("image_left", "image_right", "disparity_map")}  # raw PNG bytes
    sources.append(_open("cityscapes/stereo_disparity", split, data_dir, no_decode))
  table = _city_table(num_classes)
  spec = {"segmentation": {"kind": "segmentation", "num_classes": num_classes, "ignore_label": -1}}
  spec["disparity"] = {"kind": "depth", "dim": 1}

  def convert(ex, disp=None):
    labels = {}
    if "segmentation" in tasks:
      labels["segmentation"] = table[_resize(np.asarray(ex["segmentation_label"]), image_size, nearest=True)[..., 0]]
    if disp is not None:
      if disp["image_id"] != ex["image_id"]:
        raise ValueError(
          f"cityscapes: the semantic_segmentation and stereo_disparity records are not aligned "
          f"({ex['image_id']!r} vs {disp['image_id']!r}); were both configs prepared from the same files?"
        )
      p = _decode_png16(disp["disparity_map"])
      d = np.where(p > 0, (p - 1) / 256.0, 0.0).astype(np.float32)
      labels["disparity"] = _resize(d[..., 0] if d.ndim == 3 else d, image_size, nearest=True)
    return {"inputs": _resize(np.asarray(ex["image_left"]), image_size), "labels": labels}

  return CatalogSource("cityscapes", sources, convert, {t: spec[t] for t in tasks}, 255.0)


_FACTORS = {
  "smallnorb": {
    "category": ("label_category", 5),
    "instance": ("instance", 10),
    "elevation": ("label_elevation", 9),
    "azimuth": ("label_azimuth", 18),
    "lighting": ("label_lighting", 6),
  },
  "dsprites": {
    "shape": ("label_shape", 3),
    "scale": ("label_scale", 6),
    "orientation": ("label_orientation", 40),
    "x": ("label_x_position", 32),
    "y": ("label_y_position", 32),
  },
  "shapes3d": {
    t: (f"label_{t}", n)
    for t, n in zip(("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"), (10, 10, 10, 8, 4, 15))
  },
}


def load(name: str, split: str = "train", data_dir: str | None = None, **options) -> CatalogSource:
  """Opens a prepared catalog dataset as a jmtl source (see the module docstring for the tasks).

  Args:
    name: one of :data:`DATASETS`.
    split: a TFDS split, slicing allowed (``"train[:90%]"``).
    data_dir: the TFDS data directory holding the array_record files;
      default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
    **options: ``image_size=(H, W)`` (bilinear resize of images, nearest for
      label maps) for every dataset; ``attributes="binary" | "multilabel"``
      (celeb_a); ``stereo`` (smallnorb); ``num_classes=19 | 7`` and ``tasks``
      (cityscapes; default ``image_size`` (128, 256)).

  Returns:
    A :class:`CatalogSource`.

  Raises:
    FileNotFoundError: when ``data_dir`` is missing or the dataset is not
      prepared there as array_record; the message says how to prepare it.
    ValueError: on an unknown name or option.

  Examples:
    >>> load("mnist")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown catalog dataset 'mnist'; choose from ('celeb_a', 'smallnorb', ...)
  """
  if name not in DATASETS:
    raise ValueError(f"unknown catalog dataset {name!r}; choose from {DATASETS}")
  data_dir = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  if name == "celeb_a":
    return _celeb_a(split, data_dir, **options)
  if name == "cityscapes":
    return _cityscapes(split, data_dir, **options)
  allowed = {"image_size", "stereo"} if name == "smallnorb" else {"image_size"}
  if set(options) - allowed:
    raise ValueError(f"{name}: unknown options {sorted(set(options) - allowed)}; allowed: {sorted(allowed)}")
  ds = _open(name, split, data_dir)
  scale = 1.0 if name == "dsprites" else 255.0
  image_size, stereo = options.get("image_size"), options.get("stereo", False)
  return _factor_source(name, ds, _FACTORS[name], image_size=image_size, image_scale=scale, stereo=stereo)


_KINDS = ("classification", "multilabel", "regression")


def _feature(tree, path: str, where: str):
  """The entry of a nested mapping (features or an example) at ``"a/b"``."""
  node = tree
  for part in path.split("/"):
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError):
      raise ValueError(f"{where}: no feature {path!r}") from None
  return node


def _task_spec(features, task: str, given: Any, where: str) -> tuple[str, dict]:
  """``(feature path, spec)`` of one task: the kind and size from the TFDS feature unless given."""
  import tensorflow_datasets as tfds

  spec = dict(given) if isinstance(given, dict) else {"feature": given}
  path = str(spec.pop("feature", task))
  f = _feature(features, path, where)
  if isinstance(f, tfds.features.ClassLabel):
    inferred = {"kind": "classification", "num_classes": int(f.num_classes)}
  elif isinstance(f, tfds.features.Tensor) and np.issubdtype(np.dtype(f.np_dtype), np.floating):
    inferred = {"kind": "regression", "dim": int(np.prod(f.shape or (1,)))}
  else:
    inferred = {}
  spec = {**inferred, **spec}
  if spec.get("kind") not in _KINDS:
    raise ValueError(
      f"{where}: task {task!r} (feature {path!r}, {type(f).__name__}): give its kind, one of {_KINDS}, with "
      "num_classes or dim, e.g. tasks={'" + task + "': {'feature': '" + path + "', 'kind': 'classification', "
      "'num_classes': 10}}"
    )
  if spec["kind"] == "classification" and not spec.get("num_classes"):
    raise ValueError(f"{where}: task {task!r} is a classification; give its num_classes")
  return path, spec


def load_tfds(
  name: str,
  split: str = "train",
  data_dir: str | None = None,
  *,
  tasks: Any = None,
  inputs: str = "image",
  image_size: tuple[int, int] | None = None,
) -> CatalogSource:
  """Any prepared TFDS dataset as a jmtl source, the tasks declared by their features.

  The dataset is opened with ``tfds.data_source`` (array_record, no
  TensorFlow); jmtl's own builders are registered first
  (:mod:`jmtl.data.builders`), so ``"synthetic/regression_k3"`` works too
  (prepared on first use, as ``jmtl.data.synthetic.load`` would).

  Args:
    name: a TFDS name, ``"dataset"`` or ``"dataset/config"`` (with a version
      ``":1.0.0"`` if wanted).
    split: a TFDS split, slicing allowed (``"train[:90%]"``).
    data_dir: the TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``
      (jmtl's data directory for jmtl's own sets, where ``jmtl.data.<name>.load`` prepares them).
    tasks: the tasks: a feature path or a list of them (``"label"``,
      ``["labels/task_0", "labels/task_1"]``; the task is named by the last
      part), or a mapping task name -> feature path or ``{"feature": path,
      "kind": ..., "num_classes" | "dim": ...}``. A ``ClassLabel`` feature is a
      classification with its classes, a float tensor a regression of its size;
      anything else needs its kind given.
    inputs: the feature path of the inputs.
    image_size: ``(H, W)`` to resize image inputs to (bilinear).

  Returns:
    A :class:`CatalogSource` (``image_scale`` 255 for uint8 inputs, else 0).

  Raises:
    FileNotFoundError: when the dataset is not prepared in ``data_dir``.
    ValueError: on a missing ``tasks``, an unknown feature or an undeclared kind.

  Examples:
    >>> load_tfds("mnist", tasks=None)
    Traceback (most recent call last):
    ValueError: mnist: declare its tasks, e.g. tasks=['label'] (features of the TFDS dataset)
  """
  if not tasks:
    raise ValueError(f"{name}: declare its tasks, e.g. tasks=['label'] (features of the TFDS dataset)")
  from jmtl.data import builders  # jmtl's own sets by name

  own = name.split("/", maxsplit=1)[0].split(":", maxsplit=1)[0] in builders.registered()
  if own and not data_dir:
    data_dir = builders.default_data_dir()
  data_dir = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  ds = _open(name, split, data_dir, download=own)  # jmtl's own sets prepare offline, without TensorFlow
  features = ds.dataset_info.features
  if isinstance(tasks, str):
    tasks = [tasks]
  named = dict(tasks) if isinstance(tasks, dict) else {str(t).rsplit("/", 1)[-1]: t for t in tasks}
  specs = {t: _task_spec(features, t, given, name) for t, given in named.items()}
  x_feature = _feature(features, inputs, name)
  scale = 255.0 if np.dtype(getattr(x_feature, "np_dtype", np.float32)) == np.uint8 else 0.0

  def convert(ex):
    labels = {}
    for t, (path, spec) in specs.items():
      y = np.asarray(_feature(ex, path, name))
      if spec["kind"] == "classification":
        labels[t] = y.astype(np.int32).reshape(())
      elif spec["kind"] == "multilabel":
        labels[t] = y.astype(np.int32).reshape(-1)
      else:
        labels[t] = y.astype(np.float32).reshape(() if int(spec.get("dim", 1)) == 1 else (-1,))
    return {"inputs": _resize(np.asarray(_feature(ex, inputs, name)), image_size), "labels": labels}

  out_tasks = {t: {k: v for k, v in spec.items() if k != "feature"} for t, (_, spec) in specs.items()}
  return CatalogSource(name, [ds], convert, out_tasks, scale)
