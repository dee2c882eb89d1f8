"""MultiDigits: two overlapping 8×8 digits on a 16×16 canvas (MultiMNIST from scikit-learn's digits).

The MultiMNIST construction (Sabour, Frosst & Hinton, "Dynamic Routing Between
Capsules", NeurIPS 2017), in the two-task form of Sener & Koltun
("Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018), built
offline from the 1,797 8×8 digits bundled with scikit-learn
(``sklearn.datasets.load_digits``; values 0..16, scaled to uint8 0..255).

Construction:

* **Disjoint source pools.** The source digits are first split, per class
  (stratified) and with a fixed seed, into train / validation / test pools
  (70 / 10 / 20 %). An example only combines digits of its own pool, so no
  validation or test image shares a source digit with training. The source
  indices of both digits are stored (``left_index``, ``right_index``).
* **Placement.** The *left* (upper-left) digit's top-left corner is drawn
  uniformly in ``[0, 4]²``; the *right* (lower-right) digit is displaced from
  it by ``(dy, dx)`` drawn uniformly in ``[2, 4]²``, so it lies strictly lower
  and to the right and the two 8×8 boxes always overlap (from 4×4 to 6×6
  pixels, 25–56 % of a digit's box). The canvas is ``max(left, right)``
  pixel-wise. Offsets are stored as ``offsets = (left_y, left_x, right_y,
  right_x)``.
* **Pairs.** Both digits are drawn uniformly (with replacement across
  examples) from the split's pool, two different source images per example;
  their classes are independent (the same class may appear twice), so the two
  tasks' labels are independent.

Tasks: ``left`` and ``right``, 10 classes each. Inputs: uint8 ``(16, 16, 1)``
(NHWC-ready; the pipeline scales to float). Default sizes: 60,000 / 10,000 /
10,000 examples (train / validation / test).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jmtl.data import _tfds

DIGIT = 8
CANVAS = 16
#: The left digit's top-left corner is drawn in ``[0, MAX_LEFT_OFFSET]`` on each axis.
MAX_LEFT_OFFSET = 4
#: The right digit is displaced from the left one by ``[MIN_SHIFT, MAX_SHIFT]`` on each axis.
MIN_SHIFT, MAX_SHIFT = 2, 4
NUM_CLASSES = 10
#: The tasks of every MultiDigits source.
TASKS = {name: {"kind": "classification", "num_classes": NUM_CLASSES} for name in ("left", "right")}
_SPLITS = ("train", "validation", "test")


@functools.cache
def source_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 digits as uint8 images ``(1797, 8, 8)`` in 0..255 and int labels.

  Examples:
    >>> from jmtl.data import multi_digits
    >>> images, labels = multi_digits.source_digits()
    >>> images.shape, images.dtype, int(images.max()), sorted(set(labels.tolist())) == list(range(10))
    ((1797, 8, 8), dtype('uint8'), 255, True)
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images.setflags(write=False)
  labels = digits.target.astype(np.int32)
  labels.setflags(write=False)
  return images, labels


def split_pools(labels: np.ndarray, seed: int, fractions: tuple[float, float] = (0.1, 0.2)) -> dict[str, np.ndarray]:
  """Splits source indices into disjoint train / validation / test pools, stratified by class.

  Args:
    labels: class of every source digit.
    seed: fixes the split.
    fractions: the validation and test fractions of every class.

  Returns:
    split -> sorted source indices.

  Examples:
    >>> from jmtl.data import multi_digits
    >>> pools = multi_digits.split_pools(np.repeat(np.arange(10), 10), seed=0)
    >>> [len(pools[s]) for s in ("train", "validation", "test")]
    [70, 10, 20]
  """
  rng = np.random.default_rng([seed, 7])
  parts = {s: [] for s in _SPLITS}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_val, n_test = (round(f * len(idx)) for f in fractions)
    parts["validation"].append(idx[:n_val])
    parts["test"].append(idx[n_val : n_val + n_test])
    parts["train"].append(idx[n_val + n_test :])
  return {s: np.sort(np.concatenate(p)).astype(np.int32) for s, p in parts.items()}


def compose(images: np.ndarray, pool: np.ndarray, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Draws ``num`` overlapping pairs of digits from ``pool`` (vectorised).

  Args:
    images: source digits ``(M, 8, 8)`` uint8.
    pool: the source indices allowed in this split (at least 2).
    num: number of examples.
    rng: the random generator.

  Returns:
    ``{"image": uint8 (num, 16, 16, 1), "left_index", "right_index": int32 (num,),
    "offsets": int32 (num, 4)}``; offsets are ``(left_y, left_x, right_y, right_x)``.

  Examples:
    >>> from jmtl.data import multi_digits
    >>> images, _ = multi_digits.source_digits()
    >>> out = multi_digits.compose(images, np.arange(20), 3, np.random.default_rng(0))
    >>> out["image"].shape, bool((out["left_index"] != out["right_index"]).all())
    ((3, 16, 16, 1), True)
  """
  if len(pool) < 2:
    raise ValueError("a pool needs at least two source digits")
  left_pos = rng.integers(0, len(pool), num)
  # A different source image for the right digit: shift by 1..len(pool)-1.
  right_pos = (left_pos + rng.integers(1, len(pool), num)) % len(pool)
  left_off = rng.integers(0, MAX_LEFT_OFFSET + 1, (num, 2))
  right_off = left_off + rng.integers(MIN_SHIFT, MAX_SHIFT + 1, (num, 2))
  left, right = pool[left_pos], pool[right_pos]

  rows = np.arange(num)[:, None, None]
  grid = np.arange(DIGIT)
  canvas = np.zeros((num, CANVAS, CANVAS), np.uint8)
  for src, off in ((left, left_off), (right, right_off)):
    ys = off[:, 0, None, None] + grid[None, :, None]
    xs = off[:, 1, None, None] + grid[None, None, :]
    canvas[rows, ys, xs] = np.maximum(canvas[rows, ys, xs], images[src])
  return {
    "image": canvas[..., None],
    "left_index": left.astype(np.int32),
    "right_index": right.astype(np.int32),
    "offsets": np.concatenate([left_off, right_off], axis=1).astype(np.int32),
  }


def generate(num_train: int, num_validation: int, num_test: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """All three splits as numpy arrays (what the builder stores); a pure function of its arguments.

  Returns:
    split -> :func:`compose` arrays plus ``"left"``, ``"right"`` (int32 labels).

  Examples:
    >>> from jmtl.data import multi_digits
    >>> d = multi_digits.generate(5, 2, 2, seed=1)
    >>> d["train"]["image"].shape, d["test"]["left"].dtype
    ((5, 16, 16, 1), dtype('int32'))
  """
  images, labels = source_digits()
  pools = split_pools(labels, seed)
  out = {}
  for i, (split, num) in enumerate(zip(_SPLITS, (num_train, num_validation, num_test))):
    arrays = compose(images, pools[split], num, np.random.default_rng([seed, i]))
    arrays["left"] = labels[arrays["left_index"]]
    arrays["right"] = labels[arrays["right_index"]]
    out[split] = arrays
  return out


@functools.cache
def _builder_classes():
  """Defines the builder on first use: ``tensorflow_datasets`` is imported only then."""
  import tensorflow_datasets as tfds

  @dataclasses.dataclass(eq=False)
  class MultiDigitsConfig(tfds.core.BuilderConfig):
    """Split sizes and the seed that fixes pools, pairs and offsets."""

    num_train: int = 60_000
    num_validation: int = 10_000
    num_test: int = 10_000
    seed: int = 0

  class MultiDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Two overlapping scikit-learn digits per 16×16 image; tasks ``left`` and ``right`` (see the module doc)."""

    name = "multi_digits"
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up (TFDS's lookup needs importlib_resources)
    RELEASE_NOTES = {"1.0.0": "First release."}  # noqa: RUF012
    BUILDER_CONFIGS = [MultiDigitsConfig(name="default", description="60k / 10k / 10k pairs, seed 0.")]  # noqa: RUF012

    def _info(self):
      index = lambda: tfds.features.Scalar(dtype=np.int32, doc="source index in sklearn's load_digits")
      features = tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(CANVAS, CANVAS, 1), dtype=np.uint8),
          "left": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          "right": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          "left_index": index(),
          "right_index": index(),
          "offsets": tfds.features.Tensor(shape=(4,), dtype=np.int32),
        }
      )
      return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=features,
        citation="Sabour, Frosst & Hinton, Dynamic Routing Between Capsules, NeurIPS 2017.",
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      cfg = self.builder_config
      data = generate(cfg.num_train, cfg.num_validation, cfg.num_test, cfg.seed)
      return {split: self._generate_examples(data[split]) for split in _SPLITS}

    def _generate_examples(self, arrays):
      keys = ("image", "left", "right", "left_index", "right_index", "offsets")
      for i in range(len(arrays["image"])):
        yield i, {k: arrays[k][i] for k in keys}

  return _tfds.publish(__name__, MultiDigitsConfig=MultiDigitsConfig, MultiDigits=MultiDigits)


# The builder classes are made on first access, so importing this module loads no TFDS.
__getattr__ = _tfds.lazy_classes(__name__, _builder_classes)


def prepare(data_dir: str | None = None, config: str | None = None, **overrides):
  """Builds MultiDigits offline and returns its builder; a second call reuses the prepared files.

  Args:
    data_dir: root of prepared datasets; default :func:`jmtl.data._tfds.default_data_dir`.
    config: ``"default"`` (or ``None``) or a config instance.
    **overrides: ``num_train``, ``num_validation``, ``num_test``, ``seed``;
      such a set is stored under its own config name.

  Returns:
    The prepared ``tfds`` builder.

  Examples:
    >>> from jmtl.data import multi_digits
    >>> b = multi_digits.prepare()  # doctest: +SKIP
    >>> b.info.splits["train"].num_examples  # doctest: +SKIP
    60000
  """
  return _tfds.prepare_builder(_builder_classes()["MultiDigits"], data_dir, config, **overrides)


def to_example(features) -> dict:
  """Stored features -> ``{"inputs": uint8 (16, 16, 1), "labels": {"left", "right": int32 scalar}}``.

  Examples:
    >>> from jmtl.data import multi_digits
    >>> ex = multi_digits.to_example({"image": np.zeros((16, 16, 1), np.uint8), "left": 3, "right": 7})
    >>> ex["inputs"].dtype, ex["labels"]["right"]
    (dtype('uint8'), array(7, dtype=int32))
  """
  return {
    "inputs": np.asarray(features["image"], np.uint8),
    "labels": {
      "left": _tfds.as_scalar(features["left"], np.int32),
      "right": _tfds.as_scalar(features["right"], np.int32),
    },
  }


def load(split: str, data_dir: str | None = None, config: str | None = None, **overrides) -> _tfds.Source:
  """Prepares MultiDigits if needed and returns one split as a random-access source.

  Args:
    split: ``"train"``, ``"validation"`` or ``"test"``.
    data_dir: root of prepared datasets.
    config: see :func:`prepare`.
    **overrides: see :func:`prepare`.

  Returns:
    A :class:`jmtl.data._tfds.Source`; ``source.raw[i]`` also has the source
    indices and offsets of both digits.

  Examples:
    >>> from jmtl.data import multi_digits
    >>> src = multi_digits.load("test")  # doctest: +SKIP
    >>> src[0]["inputs"].shape, src.tasks["left"]  # doctest: +SKIP
    ((16, 16, 1), {'kind': 'classification', 'num_classes': 10})
  """
  builder = prepare(data_dir, config, **overrides)
  return _tfds.load_source(builder, split, to_example, TASKS)
