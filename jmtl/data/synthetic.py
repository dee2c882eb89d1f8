"""Synthetic multi-task sets with a controlled task relatedness, as numpy arrays or a TFDS builder.

Every example has shared latent factors ``z_s`` and one private block
``z_k`` per task. Task ``k`` reads ``h_k = ρ z_s + √(1−ρ²) z_k``: with
relatedness ``ρ = 1`` all tasks read the same factors, with ``ρ = 0`` none. The
inputs are a fixed random nonlinear mixing of all factors plus noise, so a
model must recover the factors from ``x`` -- which is where a shared trunk
helps related tasks and where unrelated tasks compete for its capacity.

**Conflicting tasks** (``conflict=True``, regression). Task ``k`` reads the
shared factors through one common direction ``a`` with the sign
``s_k = (−1)^k``: ``t_k = s_k ρ a·z_s + √(1−ρ²) b_k·z_k`` and
``y_k = t_k + sin t_k`` (plus noise), so even and odd tasks want the same
feature with opposite signs; their targets are negatively correlated. An
opposite sign alone is absorbed by per-task heads (the heads of a shared trunk
learn opposite signs and the trunk gradients then *agree*); what makes the
trunk gradients disagree is a component that every task's residual shares with
the *same* sign while the heads have opposite signs: ``shared_noise`` adds one
target-noise draw ``ν`` common to all tasks. The trunk gradient of task ``k``
on that component is ``∝ s_k ν``, so even and odd tasks pull the shared
features in opposite directions at every step. Measured on the
``conflicting_k2`` config (8,192 examples; a 2-layer 64-unit ReLU trunk with
linear heads, Adam 1e-3, batch 256, 4 initialisations): the cosine of the two
tasks' trunk gradients is ≈ 0 at the start and settles at −0.13 to −0.16 from
about step 100 on, against +0.1 for ``regression_k3`` and +0.2 for the same
conflict without the shared nuisance; the two targets correlate at −0.43, and
the gradients of one shared linear predictor (tied heads) at zero have cosine
−0.91.

**Planted groups** (``group_sizes``). The tasks fall into groups of the
given sizes; group ``g`` has its own shared block ``z_g`` and read-out ``R_g``,
and task ``k`` of group ``g`` reads ``ρ z_g R_g + √(1−ρ²) z_k R_k``: tasks of
one group are related with strength ρ, tasks of different groups read
independent factors (unrelated) and compete for a shared trunk's capacity.
The ``planted_k6`` config has 6 tasks in 2 groups of 3, ``planted_k8`` 8 tasks
in groups of 3, 3 and 2 (ρ = 0.9): the sets on which task grouping
(:mod:`jmtl.relations`) must recover the groups.

The TFDS builder :class:`Synthetic` stores such sets (``prepare``/``load``,
see :mod:`jmtl.data._tfds`) with configs ``classification_k3``,
``regression_k3``, ``unrelated_k3``, ``classification_k8``,
``conflicting_k2``, ``planted_k6`` and ``planted_k8``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jmtl.data import _tfds


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskFamily:
  """A family of K synthetic tasks: everything :func:`make_tasks` needs but the examples' draw.

  Attributes:
    num_tasks: K.
    kind: ``"classification"`` (the label is the argmax of ``num_classes``
      random linear read-outs of ``h_k``) or ``"regression"`` (a standardised
      nonlinear read-out of ``h_k``).
    num_classes: classes per task for classification.
    input_dim: dimension of ``x``.
    latent_dim: size of the shared block and of each private block.
    relatedness: ρ in ``[0, 1]``.
    noise: standard deviation of the input noise.
    label_noise: for regression, target noise std; for classification, the
      fraction of labels replaced by uniform random classes.
    seed: draws the task definitions (mixing matrix, read-out directions).
    conflict: regression only; even and odd tasks read the shared factors
      through one common direction with opposite signs (see the module
      docstring).
    shared_noise: regression only; std of one target-noise draw added to
      every task's target (before standardisation; the noiseless target's std
      is about ``√latent_dim``).
    group_sizes: planted groups (see the module docstring): the sizes of
      the task groups, summing to ``num_tasks``; ``()`` for none.

  Examples:
    >>> from jmtl.data import synthetic
    >>> synthetic.TaskFamily(num_tasks=2, kind="regression").kind
    'regression'
  """

  num_tasks: int = 3
  kind: str = "classification"
  num_classes: int = 4
  input_dim: int = 32
  latent_dim: int = 8
  relatedness: float = 0.8
  noise: float = 0.1
  label_noise: float = 0.0
  seed: int = 0
  conflict: bool = False
  shared_noise: float = 0.0
  group_sizes: tuple[int, ...] = ()


def make_tasks(num_examples: int, family: TaskFamily | None = None, *, split_seed: int = 0) -> dict:
  """Draws a multi-label multi-task set: one input, one label per task.

  The task definitions (mixing matrix, read-out directions) depend only on
  the ``family`` (its ``seed`` draws them); ``split_seed`` draws the
  examples, so train and test sets of one task family are made by calling
  twice with the same ``family`` and different ``split_seed``.

  Args:
    num_examples: examples to draw.
    family: the tasks (:class:`TaskFamily`); ``None`` for its defaults,
      three related 4-class tasks.
    split_seed: draws the examples.

  Returns:
    ``{"inputs": float32 (N, input_dim), "labels": {"task_k": (N,)}}``.

  Examples:
    >>> from jmtl.data import synthetic
    >>> d = synthetic.make_tasks(100, synthetic.TaskFamily(num_tasks=2, num_classes=3))
    >>> d["inputs"].shape, sorted(d["labels"]), int(d["labels"]["task_0"].max())
    ((100, 32), ['task_0', 'task_1'], 2)
  """
  f = TaskFamily() if family is None else family
  num_tasks, kind, num_classes, input_dim, latent_dim = f.num_tasks, f.kind, f.num_classes, f.input_dim, f.latent_dim
  relatedness, noise, label_noise, seed = f.relatedness, f.noise, f.label_noise, f.seed
  conflict, shared_noise = f.conflict, f.shared_noise
  if not 0.0 <= relatedness <= 1.0:
    raise ValueError(f"relatedness must be in [0, 1], got {relatedness}")
  if kind not in ("classification", "regression"):
    raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
  if num_tasks < 1 or num_examples < 1:
    raise ValueError(f"need num_tasks >= 1 and num_examples >= 1, got {num_tasks}, {num_examples}")
  if kind != "regression" and (conflict or shared_noise):
    raise ValueError("conflict and shared_noise are defined for kind='regression' only")
  if f.group_sizes:
    return _planted(num_examples, f, split_seed)
  fam = np.random.default_rng(seed)
  total_latent = latent_dim * (num_tasks + 1)
  mix1 = fam.normal(size=(total_latent, input_dim)) / np.sqrt(total_latent)
  mix2 = fam.normal(size=(input_dim, input_dim)) / np.sqrt(input_dim)
  readout = fam.normal(size=(num_tasks, latent_dim, num_classes if kind == "classification" else 1))
  # Drawn after the other family parameters, so that sets without conflict
  # are unchanged by the option.
  common = fam.normal(size=latent_dim) if conflict else None

  rng = np.random.default_rng([seed, split_seed, 1])
  z = rng.normal(size=(num_examples, num_tasks + 1, latent_dim))
  h1 = np.tanh(z.reshape(num_examples, -1) @ mix1)
  x = h1 + 0.5 * np.tanh(h1 @ mix2) + noise * rng.normal(size=(num_examples, input_dim))
  nuisance = shared_noise * rng.normal(size=num_examples) if shared_noise else 0.0
  labels = {}
  for k in range(num_tasks):
    h = relatedness * z[:, 0] + np.sqrt(1.0 - relatedness**2) * z[:, k + 1]
    score = h @ readout[k]
    if conflict:
      sign = 1.0 if k % 2 == 0 else -1.0
      t = sign * relatedness * (z[:, 0] @ common) + np.sqrt(1.0 - relatedness**2) * (z[:, k + 1] @ readout[k, :, 0])
      score = t[:, None]
    if kind == "regression":
      y = score[:, 0] + np.sin(score[:, 0])
      y = y + label_noise * rng.normal(size=num_examples) + nuisance
      labels[f"task_{k}"] = ((y - y.mean()) / (y.std() + 1e-12)).astype(np.float32)
    else:
      # The class is the most responsive of num_classes random read-outs; a
      # random flip makes the Bayes error controllable.
      y = np.argmax(score, axis=1)
      flip = rng.random(num_examples) < label_noise
      y = np.where(flip, rng.integers(0, num_classes, size=num_examples), y)
      labels[f"task_{k}"] = y.astype(np.int32)
  return {"inputs": x.astype(np.float32), "labels": labels}


def _planted(num_examples: int, f: TaskFamily, split_seed: int) -> dict:
  """:func:`make_tasks` for a family with planted groups (``f.group_sizes``)."""
  sizes = tuple(int(n) for n in f.group_sizes)
  if any(n < 1 for n in sizes) or sum(sizes) != f.num_tasks:
    raise ValueError(f"group_sizes {sizes} must be positive and sum to num_tasks = {f.num_tasks}")
  if f.conflict or f.shared_noise:
    raise ValueError("conflict and shared_noise are not defined with group_sizes")
  k, g, d = f.num_tasks, len(sizes), f.latent_dim
  width = f.num_classes if f.kind == "classification" else 1
  fam = np.random.default_rng([f.seed, 7])
  total_latent = d * (g + k)
  mix1 = fam.normal(size=(total_latent, f.input_dim)) / np.sqrt(total_latent)
  mix2 = fam.normal(size=(f.input_dim, f.input_dim)) / np.sqrt(f.input_dim)
  group_readout = fam.normal(size=(g, d, width))
  task_readout = fam.normal(size=(k, d, width))
  group_of = np.repeat(np.arange(g), sizes)

  rng = np.random.default_rng([f.seed, split_seed, 2])
  z = rng.normal(size=(num_examples, g + k, d))
  h1 = np.tanh(z.reshape(num_examples, -1) @ mix1)
  x = h1 + 0.5 * np.tanh(h1 @ mix2) + f.noise * rng.normal(size=(num_examples, f.input_dim))
  rho = f.relatedness
  labels = {}
  for t in range(k):
    c = group_of[t]
    score = rho * z[:, c] @ group_readout[c] + np.sqrt(1.0 - rho**2) * z[:, g + t] @ task_readout[t]
    if f.kind == "regression":
      y = score[:, 0] + np.sin(score[:, 0]) + f.label_noise * rng.normal(size=num_examples)
      labels[f"task_{t}"] = ((y - y.mean()) / (y.std() + 1e-12)).astype(np.float32)
    else:
      y = np.argmax(score, axis=1)
      flip = rng.random(num_examples) < f.label_noise
      labels[f"task_{t}"] = np.where(flip, rng.integers(0, f.num_classes, size=num_examples), y).astype(np.int32)
  return {"inputs": x.astype(np.float32), "labels": labels}


_SPLIT_SIZES = ("num_train", "num_validation", "num_test")


@functools.cache
def _builder_classes():
  """Defines the builder on first use: ``tensorflow_datasets`` is imported only then."""
  import tensorflow_datasets as tfds

  @dataclasses.dataclass(eq=False)
  class SyntheticConfig(tfds.core.BuilderConfig):
    """A task family and its split sizes: the :class:`TaskFamily` fields and ``num_train`` etc."""

    num_tasks: int = 3
    kind: str = "classification"
    num_classes: int = 4
    input_dim: int = 32
    latent_dim: int = 8
    relatedness: float = 0.8
    noise: float = 0.1
    label_noise: float = 0.0
    conflict: bool = False
    shared_noise: float = 0.0
    group_sizes: tuple[int, ...] = ()
    seed: int = 0
    num_train: int = 20_000
    num_validation: int = 5_000
    num_test: int = 5_000

  class Synthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """K synthetic tasks from shared and private factors (:func:`make_tasks`), as array_record.

    The three splits are one :func:`make_tasks` draw (``split_seed=0``) cut
    into train / validation / test, so regression targets share one
    standardisation. Features: ``inputs`` float32 ``(input_dim,)`` and
    ``labels/task_k`` (class id or float32 target).
    """

    name = "synthetic"
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up (TFDS's lookup needs importlib_resources)
    RELEASE_NOTES = {"1.0.0": "First release."}  # noqa: RUF012
    BUILDER_CONFIGS = [  # noqa: RUF012
      SyntheticConfig(name="classification_k3", description="3 related 4-class tasks, ρ=0.8."),
      SyntheticConfig(name="regression_k3", kind="regression", description="3 related regression tasks, ρ=0.8."),
      SyntheticConfig(
        name="unrelated_k3", kind="regression", relatedness=0.0, description="3 unrelated regression tasks, ρ=0."
      ),
      SyntheticConfig(
        name="classification_k8", num_tasks=8, relatedness=0.6, description="8 moderately related 4-class tasks."
      ),
      SyntheticConfig(
        name="conflicting_k2",
        num_tasks=2,
        kind="regression",
        relatedness=0.9,
        conflict=True,
        shared_noise=2.0,
        description="2 regression tasks reading the shared factors with opposite signs, plus a shared nuisance.",
      ),
      SyntheticConfig(
        name="planted_k6",
        num_tasks=6,
        relatedness=0.9,
        group_sizes=(3, 3),
        description="6 4-class tasks in 2 planted groups of 3 (related within a group, ρ=0.9; unrelated across).",
      ),
      SyntheticConfig(
        name="planted_k8",
        num_tasks=8,
        relatedness=0.9,
        group_sizes=(3, 3, 2),
        description="8 4-class tasks in 3 planted groups of 3, 3 and 2 (ρ=0.9 within a group; unrelated across).",
      ),
    ]

    def _info(self):
      cfg = self.builder_config
      if cfg.kind == "classification":
        label = lambda: tfds.features.ClassLabel(num_classes=cfg.num_classes)
      else:
        label = lambda: tfds.features.Scalar(dtype=np.float32)
      features = tfds.features.FeaturesDict(
        {
          "inputs": tfds.features.Tensor(shape=(cfg.input_dim,), dtype=np.float32),
          "labels": tfds.features.FeaturesDict({f"task_{k}": label() for k in range(cfg.num_tasks)}),
        }
      )
      return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=features,
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      cfg = self.builder_config
      sizes = [getattr(cfg, k) for k in _SPLIT_SIZES]
      family = TaskFamily(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TaskFamily)})
      data = make_tasks(sum(sizes), family, split_seed=0)
      bounds = np.cumsum([0, *sizes])
      return {
        split: self._generate_examples(data, int(bounds[i]), int(bounds[i + 1]))
        for i, split in enumerate(("train", "validation", "test"))
      }

    def _generate_examples(self, data, start, stop):
      labels = data["labels"]
      for i in range(start, stop):
        yield i - start, {"inputs": data["inputs"][i], "labels": {k: v[i] for k, v in labels.items()}}

  return _tfds.publish(__name__, SyntheticConfig=SyntheticConfig, Synthetic=Synthetic)


# The builder classes are made on first access, so importing this module loads no TFDS.
__getattr__ = _tfds.lazy_classes(__name__, _builder_classes)


def prepare(data_dir: str | None = None, config: str | None = None, **overrides):
  """Builds a synthetic set offline (a few seconds) and returns its builder; reuses prepared files.

  Args:
    data_dir: root of prepared datasets; default :func:`jmtl.data._tfds.default_data_dir`.
    config: a config name (default ``"classification_k3"``) or a config.
    **overrides: config fields to change, e.g. ``num_train=1000``,
      ``relatedness=0.3``; such a set is stored under its own config name.

  Returns:
    The prepared ``tfds`` builder.

  Examples:
    >>> from jmtl.data import synthetic
    >>> b = synthetic.prepare(config="regression_k3")  # doctest: +SKIP
    >>> b.info.splits["train"].num_examples  # doctest: +SKIP
    20000
  """
  return _tfds.prepare_builder(_builder_classes()["Synthetic"], data_dir, config, **overrides)


def task_specs(builder_config) -> dict[str, dict]:
  """The ``tasks`` dict of a synthetic config: task name -> kind and size.

  Examples:
    >>> from jmtl.data import synthetic
    >>> cfg = synthetic.SyntheticConfig(name="x", num_tasks=2, kind="regression")
    >>> synthetic.task_specs(cfg)
    {'task_0': {'kind': 'regression', 'dim': 1}, 'task_1': {'kind': 'regression', 'dim': 1}}
  """
  if builder_config.kind == "classification":
    spec = {"kind": "classification", "num_classes": builder_config.num_classes}
  else:
    spec = {"kind": "regression", "dim": 1}
  return {f"task_{k}": dict(spec) for k in range(builder_config.num_tasks)}


def to_example(features) -> dict:
  """Stored features -> a jmtl example ``{"inputs": float32 (D,), "labels": {task: scalar}}``.

  Examples:
    >>> from jmtl.data import synthetic
    >>> ex = synthetic.to_example({"inputs": np.zeros(4, np.float32), "labels": {"task_0": 2}})
    >>> ex["inputs"].shape, ex["labels"]["task_0"].dtype
    ((4,), dtype('int32'))
  """
  labels = {}
  for k, value in features["labels"].items():
    v = np.asarray(value)
    labels[k] = v.astype(np.int32 if np.issubdtype(v.dtype, np.integer) else np.float32).reshape(())
  return {"inputs": np.asarray(features["inputs"], np.float32), "labels": labels}


def load(split: str, data_dir: str | None = None, config: str | None = None, **overrides) -> _tfds.Source:
  """Prepares the set if needed and returns one split as a random-access :class:`jmtl.data._tfds.Source`.

  Args:
    split: ``"train"``, ``"validation"`` or ``"test"``.
    data_dir: root of prepared datasets.
    config: a config name, see :func:`prepare`.
    **overrides: config fields to change.

  Returns:
    ``source[i] == {"inputs": float32 (input_dim,), "labels": {"task_k": int32 or float32 scalar}}``.

  Examples:
    >>> from jmtl.data import synthetic
    >>> src = synthetic.load("test", config="regression_k3")  # doctest: +SKIP
    >>> len(src), src.tasks["task_0"]  # doctest: +SKIP
    (5000, {'kind': 'regression', 'dim': 1})
  """
  builder = prepare(data_dir, config, **overrides)
  return _tfds.load_source(builder, split, to_example, task_specs(builder.builder_config))
