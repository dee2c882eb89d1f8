"""A user's own model, dataset and weighting (tests/byo_user.py) train through ``jmtl train`` by import path.

Interrupted by SIGTERM and resumed, the run ends as an uninterrupted one; Δm% against single-task baselines of the
same user model and data is in the results. Also: any TFDS name as ``dataset.name`` with its tasks declared.
"""

import json
import signal

import numpy as np
import pytest

from jmtl.run import cli
from jmtl.run.config import ConfigError
from tests import byo_user
from tests._helpers import run_records
from tests._helpers import run_until_sigterm

CONFIG = "tests.byo_user"  # a module path: its get_config()
# Train and validation records (the cut run also tracks transfer against the baselines, there from the start).
KINDS = ("train", "validation")


def test_user_model_dataset_and_weighting_train_by_import_path_resume_and_report_delta_m(tmp_path, monkeypatch):
  full, cut = tmp_path / "full", tmp_path / "cut"
  argv = ["train", "--config", CONFIG, "--no-progress", "--workdir"]
  assert cli.main([*argv, str(full)]) == 0
  a = json.loads((full / "results.json").read_text())
  # Δm% against the user model's own single-task baselines, trained into <workdir>/baselines.
  (stored,) = json.loads((full / "baselines" / "baselines.json").read_text()).values()
  assert sorted(a["tasks"]) == ["first", "second"] and "delta_m" in a
  # Δm% = 100/K Σ (M_mtl - M_stl) / M_stl for accuracies (higher is better).
  stl = {t: stored["tasks"][t]["test"] for t in a["tasks"]}
  expected = 100 / 2 * sum((a["test"][f"{t}/acc"] - stl[t]) / stl[t] for t in a["tasks"])
  assert a["delta_m"] == pytest.approx(expected, abs=1e-6)
  # The user's weighting got its argument from weighting_args.tilted: weights (3, 1) * 2 / 4.
  train = [r for r in run_records(full, KINDS) if r["kind"] == "train"]
  assert train and all(
    r["weight/first"] == pytest.approx(1.5) and r["weight/second"] == pytest.approx(0.5) for r in train
  )

  # Interrupted at step 30 (a checkpoint at 20) and resumed: the same metrics as the uninterrupted run.
  shared = [f"--config.baselines={full / 'baselines'}"]
  assert run_until_sigterm([*argv, str(cut), *shared], monkeypatch, 30) == 128 + signal.SIGTERM
  assert cli.main([*argv, str(cut), *shared]) == 0
  b = json.loads((cut / "results.json").read_text())
  for key in ("validation", "test", "selected_step", "delta_m"):
    assert a[key] == b[key], key
  assert run_records(full, KINDS) == run_records(cut, KINDS)


def test_user_parts_with_bad_arguments_fail_before_the_data_loads(tmp_path, monkeypatch, capsys):
  called = []
  monkeypatch.setattr(byo_user, "two_tasks", lambda *a, **k: called.append(1))
  cases = [
    ("--config.weighting_args.tilted.slope=2.0", "weighting 'tests.byo_user.tilted' with arguments"),
    ("--config.weighting=tests.byo_user.nope", "weighting method 'tests.byo_user.nope': cannot import it"),
    ("--config.weighting=tests.byo_user.SIZES", "unknown weighting method 'tests.byo_user.SIZES'"),
  ]
  for flag, message in cases:
    workdir = tmp_path / "never"
    assert cli.main(["train", "--config", CONFIG, flag, "--no-progress", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not workdir.exists()  # nothing left behind
  assert not called  # the dataset was never read


def test_user_dataset_function_must_return_a_source_with_tasks(monkeypatch):
  from jmtl.run import config as config_lib
  from jmtl.run import inputs

  config = config_lib.load_config(CONFIG)
  config.dataset.options.seed = 12345  # a dataset config of its own (the loaded sets are cached per config)
  monkeypatch.setattr(byo_user, "two_tasks", lambda split, **options: np.zeros((4, 2)))
  with pytest.raises(ConfigError, match="without a 'tasks' attribute"):
    inputs.load_data(config)
  config.dataset.data_dir = "/somewhere"
  with pytest.raises(ConfigError, match="is for jmtl's and TFDS datasets"):
    inputs.load_data(config)


def test_any_tfds_name_reads_with_declared_tasks(tmp_path):
  """``dataset.name`` a TFDS name (here jmtl's synthetic set read as any TFDS dataset): the same examples as the
  built-in route, tasks from the declared features (ClassLabel -> classification with its classes)."""
  from jmtl.data import synthetic
  from jmtl.run import config as config_lib
  from jmtl.run import inputs

  sizes = dict(num_train=60, num_validation=20, num_test=20)
  builder = synthetic.prepare(str(tmp_path), "classification_k3", **sizes)
  config = config_lib.load_config("synthetic")
  config.dataset.data_dir = str(tmp_path)
  config.dataset.options = dict(sizes)
  builtin = inputs.load_data(config)
  # Not a built-in name: read through tfds.data_source (the config in the name).
  config.dataset.name, config.dataset.config = f"synthetic/{builder.builder_config.name}", ""
  config.dataset.options = {"tasks": ["labels/task_0", "labels/task_2"], "inputs": "inputs"}
  generic = inputs.load_data(config)
  assert generic.specs == {t: {"kind": "classification", "num_classes": 4} for t in ("task_0", "task_2")}
  for split in ("train", "test"):
    np.testing.assert_array_equal(generic.sources[split].inputs, builtin.sources[split].inputs)
    np.testing.assert_array_equal(generic.sources[split].labels["task_2"], builtin.sources[split].labels["task_2"])
  config.dataset.options = {"inputs": "inputs"}
  with pytest.raises(ConfigError, match="declare its tasks"):
    inputs.load_data(config)
  config.dataset.options = {"tasks": ["labels/task_9"], "inputs": "inputs"}
  with pytest.raises(ConfigError, match="no feature 'labels/task_9'"):
    inputs.load_data(config)
