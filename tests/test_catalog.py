"""Catalog adapters under ``tfds.testing.mock_data`` (array_record data sources, no TensorFlow)."""

from __future__ import annotations

import io
import sys
from typing import NamedTuple

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.testing import mocking

from jmtl.data import catalog
from jmtl.data import pipeline as P


@pytest.fixture
def mock_tfds(monkeypatch):
  """``mock_data`` for ``tfds.data_source`` from the builders' feature specs (random examples).

  TFDS 4.9.10's mock binds ``__getitems__`` without ``self`` (``__getitem__``
  works: MagicMock binds magic methods, and ``__getitems__`` is not one), so a
  batched read raises TypeError. Patch the helper it binds; the fake examples
  are unchanged.
  """
  monkeypatch.setattr(
    mocking, "_getitems", lambda record_keys, generator, serialized=False: [generator[k] for k in record_keys]
  )
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


class Expected(NamedTuple):
  image_shape: tuple[int, ...]
  classes: dict  # task -> number of classes (None: celeb_a's 40 multilabel attributes)
  num_tasks: int


CASES = [
  ("celeb_a", {}, Expected((218, 178, 3), {"Smiling": 2, "Male": 2, "Young": 2}, 40)),
  ("celeb_a", {"attributes": "multilabel", "image_size": (64, 64)}, Expected((64, 64, 3), {"attributes": None}, 1)),
  (
    "smallnorb",
    {},
    Expected((96, 96, 1), {"category": 5, "instance": 10, "elevation": 9, "azimuth": 18, "lighting": 6}, 5),
  ),
  ("smallnorb", {"stereo": True, "image_size": (48, 48)}, Expected((48, 48, 2), {"category": 5}, 5)),
  ("dsprites", {}, Expected((64, 64, 1), {"shape": 3, "scale": 6, "orientation": 40, "x": 32, "y": 32}, 5)),
  (
    "shapes3d",
    {},
    Expected((64, 64, 3), {"floor_hue": 10, "wall_hue": 10, "object_hue": 10, "scale": 8, "shape": 4}, 6),
  ),
  ("cityscapes", {"tasks": ("segmentation",)}, Expected((128, 256, 3), {"segmentation": 19}, 1)),
]


@pytest.mark.parametrize(("name", "options", "expected"), CASES)
def test_adapter_examples_and_batches(mock_tfds, tmp_path, name, options, expected):
  image_shape, classes, num_tasks = expected
  src = catalog.load(name, "train", str(tmp_path), **options)
  assert len(src) == 6 and len(src.tasks) == num_tasks
  ex = src[0]
  assert ex["inputs"].shape == image_shape and ex["inputs"].dtype == np.uint8
  assert len(src.__getitems__([0, 3])) == 2
  batch = P.multi_label(src, 4, seed=0, transform=P.normalize_images(src.image_scale))[0]
  assert batch["inputs"].shape == (4, *image_shape) and batch["inputs"].dtype == np.float32
  assert set(batch["labels"]) == set(src.tasks) == set(batch["masks"])
  for task, c in classes.items():
    y = batch["labels"][task]
    assert y.dtype == np.int32 and batch["masks"][task].shape == (4,)
    if c is None:  # celeb_a multilabel: 40 0/1 labels
      assert y.shape == (4, 40) and set(np.unique(y)) <= {0, 1}
    elif name == "cityscapes":
      assert y.shape == (4, 128, 256) and y.min() >= -1 and y.max() < c
    else:
      assert y.shape == (4,) and src.tasks[task]["num_classes"] == c and y.min() >= 0 and y.max() < c


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


class _Records:
  def __init__(self, examples):
    self.examples = examples

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]

  def __getitems__(self, keys):
    return [self.examples[k] for k in keys]


def _cityscapes_records(builder, split, decoders=None, **kwargs):
  """What the two cityscapes configs return: decoded seg records; raw PNG bytes where the adapter skips decoding.

  The default mock cannot serve ``SkipDecoding`` features without TensorFlow
  (it encodes its fake images with TF), so these records are built by hand.
  Left half: labelId 7 (road), disparity 0 (invalid); right half: labelId 26
  (car), 16-bit disparity PNG value 25601 = 100 px.
  """
  h, w = 1024, 2048
  seg = np.zeros((h, w, 1), np.uint8)
  seg[:, : w // 2], seg[:, w // 2 :] = 7, 26
  disp = np.zeros((h, w), np.uint16)
  disp[:, w // 2 :] = 25601
  image = np.full((h, w, 3), 128, np.uint8)
  if builder.builder_config.name == "semantic_segmentation":
    examples = [{"image_id": f"c_{i}", "image_left": image, "segmentation_label": seg} for i in range(3)]
  else:
    assert set(decoders) == {"image_left", "image_right", "disparity_map"}
    png, disp_png = _png(image), _png(disp)
    examples = [
      {"image_id": f"c_{i}", "image_left": png, "image_right": png, "disparity_map": disp_png} for i in range(3)
    ]
  return _Records(examples)


@pytest.mark.parametrize(("num_classes", "road", "car"), [(19, 0, 13), (7, 0, 6)])
def test_cityscapes_label_mapping_and_disparity(tmp_path, num_classes, road, car):
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=_cityscapes_records):
    src = catalog.load("cityscapes", "validation", str(tmp_path), num_classes=num_classes)
    batch = P.multi_label(src, 2, seed=0, transform=P.normalize_images())[0]
  seg, disp = batch["labels"]["segmentation"], batch["labels"]["disparity"]
  assert seg.shape == disp.shape == (2, 128, 256) and seg.dtype == np.int32 and disp.dtype == np.float32
  assert (seg[:, :, :128] == road).all() and (seg[:, :, 128:] == car).all()
  assert (disp[:, :, :128] == 0).all() and np.allclose(disp[:, :, 128:], 100.0)
  assert src.tasks["segmentation"] == {"kind": "segmentation", "num_classes": num_classes, "ignore_label": -1}


def test_cityscapes_label_table_ignores_void_classes():
  table = catalog._city_table(19)
  assert table[0] == table[4] == table[9] == table[255] == -1
  assert sorted(set(table.tolist()) - {-1}) == list(range(19))
  assert sorted(set(catalog._city_table(7).tolist()) - {-1}) == list(range(7))


def test_missing_or_unprepared_data_dir_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build smallnorb --file_format=array_record"):
    catalog.load("smallnorb", "train", str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match=r"(?s)found no prepared 'dsprites'.*tfds build dsprites"):
    catalog.load("dsprites", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"cityscapes-dataset\.com"):
    catalog.load("cityscapes", "train", str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="unknown options"):
    catalog.load("dsprites", "train", str(tmp_path), stereo=True)
  assert "tensorflow" not in sys.modules
