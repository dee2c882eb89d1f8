"""The TFDS builders of jmtl.data: multi_digits, synthetic, qm9 (reduced sizes, prepared into a temp dir)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jmtl.data import _tfds
from jmtl.data import multi_digits
from jmtl.data import pipeline
from jmtl.data import qm9
from jmtl.data import synthetic

SPLITS = ("train", "validation", "test")
DIGITS = {"num_train": 2000, "num_validation": 300, "num_test": 300}
SYNTH = {"num_train": 300, "num_validation": 50, "num_test": 50}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(data_dir):
  return {split: multi_digits.load(split, data_dir, **DIGITS) for split in SPLITS}


def _raw(source, keys):
  records = source.raw.__getitems__(list(range(len(source))))
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


# ----------------------------------------------------------------------------- multi_digits


def test_multi_digits_splits_use_disjoint_source_digits(digits):
  used = {}
  for split, source in digits.items():
    raw = _raw(source, ("left_index", "right_index"))
    used[split] = set(raw["left_index"].tolist()) | set(raw["right_index"].tolist())
  assert not used["test"] & used["train"]
  assert not used["validation"] & used["train"]
  assert not used["test"] & used["validation"]
  pools = multi_digits.split_pools(multi_digits.source_digits()[1], seed=0)
  for split in SPLITS:
    assert used[split] <= set(pools[split].tolist())
  assert sum(len(p) for p in pools.values()) == len(multi_digits.source_digits()[0])


def test_multi_digits_examples_have_the_documented_layout(digits):
  source = digits["train"]
  assert [len(digits[s]) for s in SPLITS] == [DIGITS["num_train"], DIGITS["num_validation"], DIGITS["num_test"]]
  assert source.tasks == {t: {"kind": "classification", "num_classes": 10} for t in ("left", "right")}
  ex = source[3]
  assert set(ex) == {"inputs", "labels"}
  assert ex["inputs"].shape == (16, 16, 1) and ex["inputs"].dtype == np.uint8
  for task in ("left", "right"):
    assert ex["labels"][task].shape == () and ex["labels"][task].dtype == np.int32
  batch = source.__getitems__([0, 5, 7])
  for i, b in zip([0, 5, 7], batch):
    np.testing.assert_array_equal(b["inputs"], source[i]["inputs"])
  # Labels are the classes of the stored source digits.
  _, labels = multi_digits.source_digits()
  raw = _raw(source, ("left", "right", "left_index", "right_index"))
  np.testing.assert_array_equal(raw["left"], labels[raw["left_index"]])
  np.testing.assert_array_equal(raw["right"], labels[raw["right_index"]])
  assert len(np.unique(raw["left"])) == 10


def test_multi_digits_overlap_is_real(digits):
  images, _ = multi_digits.source_digits()
  raw = _raw(digits["test"], ("image", "left_index", "right_index", "offsets"))
  ink_overlap = 0
  for image, li, ri, off in zip(raw["image"], raw["left_index"], raw["right_index"], raw["offsets"]):
    left = np.zeros((16, 16), np.uint8)
    right = np.zeros((16, 16), np.uint8)
    left[off[0] : off[0] + 8, off[1] : off[1] + 8] = images[li]
    right[off[2] : off[2] + 8, off[3] : off[3] + 8] = images[ri]
    np.testing.assert_array_equal(image[..., 0], np.maximum(left, right))
    assert li != ri
    assert np.all(off[2:] - off[:2] >= 2) and np.all(off[2:] - off[:2] <= 4)  # right is lower-right, boxes overlap
    assert (left > right).any() and (right > left).any()  # both digits contribute pixels
    ink_overlap += bool(((left > 0) & (right > 0)).any())
  assert ink_overlap / len(raw["image"]) > 0.9


def test_multi_digits_same_seed_gives_the_same_dataset(digits, tmp_path):
  again = multi_digits.load("test", str(tmp_path), **DIGITS)
  keys = ("image", "left", "right", "left_index", "right_index", "offsets")
  a, b = _raw(digits["test"], keys), _raw(again, keys)
  for k in keys:
    np.testing.assert_array_equal(a[k], b[k])
  other = multi_digits.generate(DIGITS["num_train"], DIGITS["num_validation"], DIGITS["num_test"], seed=1)
  assert not np.array_equal(other["test"]["image"], a["image"])


def test_prepare_is_idempotent(data_dir):
  builder = multi_digits.prepare(data_dir, **DIGITS)
  files = sorted(os.listdir(builder.data_dir))
  stamps = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
  again = multi_digits.prepare(data_dir, **DIGITS)
  assert again.data_dir == builder.data_dir and builder.data_dir.startswith(data_dir)
  assert [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files] == stamps


def _assert_same_example(a, b):
  assert set(a) == set(b) and set(a["labels"]) == set(b["labels"])
  for x, y in [(a["inputs"], b["inputs"]), *((a["labels"][k], b["labels"][k]) for k in a["labels"])]:
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(("module", "sizes"), [(multi_digits, DIGITS), (synthetic, SYNTH)], ids=["digits", "synthetic"])
def test_sources_pickle(data_dir, module, sizes):
  source = module.load("validation", data_dir, **sizes)
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == len(source) and clone.tasks == source.tasks
  _assert_same_example(clone[0], source[0])


@pytest.mark.parametrize(
  ("module", "name"),
  [(multi_digits, "MultiDigits"), (synthetic, "Synthetic"), (qm9, "QM9")],
  ids=["digits", "synthetic", "qm9"],
)
def test_builders_with_built_in_configs_pickle(tmp_path, module, name):
  # Sources pickle their builder, which unpickles by calling its constructor again; TFDS takes a config
  # instance named like a built-in config only if it is that very object, so make_builder passes the name.
  cls = getattr(module, name)
  for cfg in cls.BUILDER_CONFIGS:
    for config in (cfg.name, cfg, copy.deepcopy(cfg)):
      clone = pickle.loads(pickle.dumps(_tfds.make_builder(cls, str(tmp_path), config)))
      assert clone.builder_config is cfg
  changed = dataclasses.replace(cfg, seed=cfg.seed + 1)
  with pytest.raises(ValueError, match="Cannot name a custom BuilderConfig"):
    _tfds.make_builder(cls, str(tmp_path), changed)


def test_sources_feed_grain_worker_processes(data_dir):
  source = synthetic.load("train", data_dir, **SYNTH)
  pipe = pipeline.multi_label(source, 50, seed=1, num_epochs=1)
  in_process = [pipe[s] for s in range(len(pipe))]
  workers = pipeline.multi_label(source, 50, seed=1, num_epochs=1, read=pipeline.ReadOptions(worker_count=2))
  it = iter(workers)
  got = [next(it) for _ in range(2)]
  restored = iter(workers)
  restored.set_state(it.get_state())
  got += list(restored)
  assert len(got) == len(in_process)
  for a, b in zip(got, in_process):
    _assert_same_example(a, b)
    for k, m in b["masks"].items():
      np.testing.assert_array_equal(a["masks"][k], m)


def test_default_data_dir_honours_the_environment(monkeypatch):
  monkeypatch.setenv("JMTL_DATA_DIR", "/somewhere/else")
  assert _tfds.default_data_dir() == "/somewhere/else"
  monkeypatch.delenv("JMTL_DATA_DIR")
  assert _tfds.default_data_dir() == os.path.expanduser("~/.cache/jmtl/tensorflow_datasets")


def test_unknown_config_fields_and_splits_are_rejected(data_dir):
  with pytest.raises(TypeError, match="unknown config fields"):
    multi_digits.prepare(data_dir, num_trian=5)
  with pytest.raises(ValueError, match="unknown split"):
    synthetic.load("dev", data_dir, **SYNTH)


# ----------------------------------------------------------------------------- synthetic


def _synthetic_config(name):
  return {c.name: c for c in synthetic.Synthetic.BUILDER_CONFIGS}[name]


@pytest.mark.parametrize(
  "config", ["classification_k3", "regression_k3", "unrelated_k3", "classification_k8", "conflicting_k2"]
)
def test_synthetic_configs_build_with_k_tasks(data_dir, config):
  source = synthetic.load("validation", data_dir, config, **SYNTH)
  cfg = _synthetic_config(config)
  assert len(source) == SYNTH["num_validation"]
  assert sorted(source.tasks) == [f"task_{k}" for k in range(cfg.num_tasks)]
  ex = source[0]
  assert ex["inputs"].shape == (cfg.input_dim,) and ex["inputs"].dtype == np.float32
  want = np.int32 if cfg.kind == "classification" else np.float32
  assert all(v.shape == () and v.dtype == want for v in ex["labels"].values())


def test_synthetic_builder_stores_make_tasks(data_dir):
  source = synthetic.load("validation", data_dir, "regression_k3", **SYNTH)
  cfg = _synthetic_config("regression_k3")
  n = sum(SYNTH.values())
  family = synthetic.TaskFamily(
    num_tasks=cfg.num_tasks, kind="regression", relatedness=cfg.relatedness, seed=cfg.seed, num_classes=cfg.num_classes
  )
  ref = synthetic.make_tasks(n, family)
  start = SYNTH["num_train"]
  for i in (0, 17, SYNTH["num_validation"] - 1):
    np.testing.assert_array_equal(source[i]["inputs"], ref["inputs"][start + i])
    assert source[i]["labels"]["task_2"] == ref["labels"]["task_2"][start + i]


def _linear_gradient_cosine(x, y0, y1):
  # Gradients at w = 0 of the squared losses of one shared linear predictor.
  g0, g1 = x.T @ y0, x.T @ y1
  return float(g0 @ g1 / np.linalg.norm(g0) / np.linalg.norm(g1))


def test_conflicting_tasks_pull_in_opposite_directions(data_dir):
  sizes = {"num_train": 4000, "num_validation": 10, "num_test": 10}
  results = {}
  for config in ("conflicting_k2", "regression_k3"):
    source = synthetic.load("train", data_dir, config, **sizes)
    batch = source.__getitems__(range(len(source)))
    x = np.stack([b["inputs"] for b in batch])
    y0, y1 = (np.array([b["labels"][t] for b in batch]) for t in ("task_0", "task_1"))
    results[config] = np.corrcoef(y0, y1)[0, 1], _linear_gradient_cosine(x, y0, y1)
  corr, cosine = results["conflicting_k2"]
  assert corr < -0.3 and cosine < -0.8
  corr, cosine = results["regression_k3"]
  assert corr > 0.2 and cosine > 0.0
  # The conflict option does not change sets made without it.
  a = synthetic.make_tasks(50, synthetic.TaskFamily(num_tasks=2, kind="regression"))
  b = synthetic.make_tasks(50, synthetic.TaskFamily(num_tasks=2, kind="regression", conflict=False, shared_noise=0.0))
  np.testing.assert_array_equal(a["labels"]["task_1"], b["labels"]["task_1"])
  with pytest.raises(ValueError, match="regression"):
    synthetic.make_tasks(10, synthetic.TaskFamily(num_tasks=2, conflict=True))


# ----------------------------------------------------------------------------- qm9

needs_qm9pack = pytest.mark.skipif(
  importlib.util.find_spec("qm9pack") is None, reason="qm9 needs the optional extra: pip install 'jmtl[qm9]' (qm9pack)"
)
QM9_SIZES = {"max_molecules": 3000, "num_validation": 300, "num_test": 300}


@needs_qm9pack
def test_qm9_targets_are_standardised_with_training_statistics(data_dir):
  train = qm9.load("train", data_dir, "descriptor", **QM9_SIZES)
  assert len(train) == 2400 and list(train.tasks) == list(qm9.TARGETS) and len(train.tasks) == 11
  batch = train.__getitems__(range(len(train)))
  y = np.stack([[b["labels"][t] for t in train.tasks] for b in batch])
  np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(y.std(axis=0), 1.0, atol=1e-4)
  assert batch[0]["inputs"].shape == (qm9.DESCRIPTOR_DIM,) and batch[0]["inputs"].dtype == np.float32
  # target_stats un-standardise to the physical values (atomization energies in eV).
  mols = qm9.read_molecules()
  row = {int(i): r for r, i in enumerate(mols["index"])}
  raw = train.raw[0]
  stats = train.target_stats
  assert stats["homo"]["unit"] == "eV" and stats["cv"]["unit"] == "cal/(mol K)"
  physical = [float(raw["targets"][j]) * stats[t]["std"] + stats[t]["mean"] for j, t in enumerate(qm9.TARGETS)]
  np.testing.assert_allclose(physical, mols["targets"][row[int(raw["index"])]], rtol=1e-4, atol=1e-4)
  test = qm9.load("test", data_dir, "descriptor", **QM9_SIZES)
  assert not {int(r["index"]) for r in test.raw.__getitems__(range(len(test)))} & {
    int(r["index"]) for r in train.raw.__getitems__(range(len(train)))
  }


@needs_qm9pack
def test_qm9_graph_form(data_dir):
  source = qm9.load("validation", data_dir, "graph", **QM9_SIZES)
  ex = source[0]
  g = ex["inputs"]  # packed rows (Z, x, y, z, mask)
  assert g.shape == (29, 5) and g.dtype == np.float32
  numbers, positions, mask = g[:, 0], g[:, 1:4], g[:, 4]
  np.testing.assert_array_equal(mask, numbers > 0)
  assert np.all(positions[mask == 0] == 0)
  assert set(np.unique(numbers[mask > 0])) <= {1, 6, 7, 8, 9}
  np.testing.assert_allclose(positions[mask > 0].mean(axis=0), 0.0, atol=1e-4)  # centred


# ----------------------------------------------------------------------------- no TensorFlow, no torch


def test_import_prepare_and_read_never_import_tensorflow_or_torch(tmp_path):
  script = textwrap.dedent(
    f"""
    import sys
    import jmtl
    from jmtl.data import multi_digits, synthetic
    src = multi_digits.load("test", {str(tmp_path)!r}, num_train=50, num_validation=20, num_test=20)
    src.__getitems__([0, 1, 2]); src[3]
    src = synthetic.load("train", {str(tmp_path)!r}, "regression_k3", num_train=50, num_validation=20, num_test=20)
    src.__getitems__([0, 1]); src[2]
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "torch"))
    print("BAD", bad)
    """
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "BAD []" in out.stdout, out.stdout


# ----------------------------------------------------------------------------- registered with TFDS by name


def test_registered_builders_load_by_name_through_tfds_in_a_fresh_interpreter(tmp_path):
  """``import jmtl.data.builders``: tfds.builder / tfds.data_source find jmtl's sets by name (``import jmtl`` does not
  import TFDS; without the import TFDS does not know them)."""
  script = textwrap.dedent(
    f"""
    import sys
    import jmtl, jmtl.data
    print("AFTER_IMPORT", sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow_datasets", "tensorflow")))
    from jmtl.data import multi_digits, synthetic
    d = {str(tmp_path)!r}
    md = multi_digits.load("test", d, num_train=40, num_validation=20, num_test=30)
    syn = synthetic.prepare(d, "regression_k3", num_train=40, num_validation=20, num_test=25)
    import tensorflow_datasets as tfds
    try:
      tfds.builder("multi_digits", data_dir=d)
      print("FOUND_BEFORE True")
    except Exception as e:
      print("FOUND_BEFORE False", type(e).__name__)
    import jmtl.data.builders
    print("REGISTERED", sorted(jmtl.data.builders.registered()))
    cfg = md.info.config_name
    src = tfds.data_source("multi_digits/" + cfg, split="test", data_dir=d)
    ex = src[3]
    same = (ex["image"] == md.raw[3]["image"]).all() and ex["left"] == md.raw[3]["left"]
    print("MULTI_DIGITS", len(src), bool(same))
    b = tfds.builder("synthetic/" + syn.builder_config.name, data_dir=d)
    print("SYNTHETIC", type(b).__module__, b.info.splits["test"].num_examples)
    tiny = synthetic.SyntheticConfig(name="tiny", num_train=30, num_validation=7, num_test=5)
    s = tfds.data_source("synthetic", split="validation", data_dir=d + "/fresh", builder_kwargs=dict(config=tiny))
    print("PREPARED_BY_TFDS", len(s), sorted(s[0]["labels"]))
    print("BUILDER_CLS", tfds.builder_cls("qm9").__module__, tfds.builder("synthetic").data_dir.startswith(
      jmtl.data.default_data_dir()))
    print("TF", "tensorflow" in sys.modules)
    """
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
  assert lines["AFTER_IMPORT"] == "[]"
  assert lines["FOUND_BEFORE"].startswith("False")
  assert lines["REGISTERED"] == "['multi_digits', 'qm9', 'synthetic']"
  assert lines["MULTI_DIGITS"] == "30 True"
  assert lines["SYNTHETIC"].endswith(" 25")  # a config made by overrides: TFDS reads it from its files
  assert lines["PREPARED_BY_TFDS"] == "7 ['task_0', 'task_1', 'task_2']"
  assert lines["BUILDER_CLS"] == "jmtl.data.builders True"
  assert lines["TF"] == "False"
