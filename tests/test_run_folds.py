"""k-fold cross-validation (``--folds K``): the folds partition the training split, the scores are the mean and
sample std over the fold runs' records, and the chosen point is retrained on the whole split and tested once."""

import ast
import json
import os

import numpy as np
import pytest

from jmtl.run import cli
from jmtl.run import config as config_lib
from jmtl.run import inputs
from jmtl.run import trials
from jmtl.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = dict(num_tasks=2, num_train=300, num_validation=128, num_test=128)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jmtl.data import synthetic

  path = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(path, "classification_k3", **DATA)
  return path


def test_folds_partition_the_training_split():
  n, k = 300, 4
  held = [trials.fold_indices(n, k, i, seed=7) for i in range(k)]
  assert sorted(np.concatenate([h for _, h in held]).tolist()) == list(range(n))
  for train, out in held:
    assert len(out) == n // k and not set(train) & set(out) and len(train) + len(out) == n
  assert not np.array_equal(held[0][1], trials.fold_indices(n, k, 0, seed=8)[1])  # drawn by the seed


def test_sweep_folds_scores_equal_a_hand_computation(tmp_path, data_dir, capsys):
  workdir = tmp_path / "sweep"
  fields = dict(num_steps=20, log_every=10, eval_every=10, checkpoint_every=10, batch_size=32, plots="false")
  argv = [
    "sweep",
    "--config",
    os.path.join(ROOT, "configs", "synthetic.py"),
    f"--config.dataset.data_dir={data_dir}",
    *(f"--config.dataset.options.{k}={v}" for k, v in DATA.items()),
    "--config.model.mlp.hidden=(16,)",
    *(f"--config.{k}={v}" for k, v in fields.items()),
    "--over",
    "weighting=equal,uncertainty",
    "--folds",
    "3",
    "--workdir",
    str(workdir),
    "--no-progress",
  ]
  assert cli.main(argv) == 0
  assert "val score (3 folds)" in capsys.readouterr().out
  stored = workdir_lib.read_json(str(workdir / "sweep.json"), "sweep")
  store = workdir_lib.read_json(str(workdir / "baselines" / "baselines.json"), "baselines")
  means = []
  for row in stored["cv"]:
    scores, deltas = [], []
    for i in range(3):
      run = workdir / "runs" / row["label"] / f"fold_{i}"
      results = json.loads((run / "results.json").read_text())
      config = workdir_lib.load_run_config(str(run))
      assert config.fold.to_dict() == {"count": 3, "index": i, "seed": 0}
      assert results["test"] == results["validation"]  # the held-out fold is both; the test split is not read
      acc = [results["validation"][f"task_{t}/acc"] for t in range(2)]
      scores.append(np.mean(acc))  # the selection score: mean accuracy over tasks
      base = store[config_lib.baseline_key(config)]["tasks"]  # single-task runs trained on the same fold
      deltas.append(
        np.mean(
          [100 * (a - base[f"task_{t}"]["validation"]) / base[f"task_{t}"]["validation"] for t, a in enumerate(acc)]
        )
      )
    assert row["cv"]["mean"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert row["cv"]["std"] == pytest.approx(np.std(scores, ddof=1), abs=1e-12)
    assert row["cv_delta_m"]["mean"] == pytest.approx(np.mean(deltas), abs=1e-9)
    assert row["cv_delta_m"]["std"] == pytest.approx(np.std(deltas, ddof=1), abs=1e-9)
    means.append(row["cv"]["mean"])
  chosen = int(np.argmax(means))
  assert [r["chosen"] for r in stored["cv"]] == [i == chosen for i in range(2)]
  (final,) = stored["rows"]
  assert final["label"] == f"final: {stored['cv'][chosen]['label']}"
  config = workdir_lib.load_run_config(str(workdir / "final"))
  assert "fold" not in config and config.weighting == stored["cv"][chosen]["point"]["weighting"]
  results = json.loads((workdir / "final" / "results.json").read_text())
  assert results["test"] != results["validation"] and results["delta_m"] is not None
  # A fold run trains on the other folds (200 of 300 examples); the final run on the whole training split.
  fold_config = workdir_lib.load_run_config(str(workdir / "runs" / stored["cv"][chosen]["label"] / "fold_0"))
  assert len(trials.fold_data(inputs.load_data(fold_config), fold_config.fold).sources["train"]) == 200
  assert len(inputs.load_data(config).sources["train"]) == DATA["num_train"]


def test_tune_folds_value_is_the_mean_of_the_folds_delta_m(tmp_path, data_dir):
  """A trial's value is the mean over its fold runs of the validation Δm% against the base config's baselines of the
  same fold; the best trial is retrained on the whole training split."""
  import optuna

  workdir = tmp_path / "tune"
  fields = dict(num_steps=20, log_every=10, eval_every=10, checkpoint_every=10, batch_size=32, plots="false")
  argv = [
    "tune",
    "--config",
    os.path.join(ROOT, "configs", "synthetic.py"),
    f"--config.dataset.data_dir={data_dir}",
    *(f"--config.dataset.options.{k}={v}" for k, v in DATA.items()),
    "--config.model.mlp.hidden=(16,)",
    *(f"--config.{k}={v}" for k, v in fields.items()),
    "--space",
    "static_weights=simplex",
    "--trials",
    "2",
    "--folds",
    "2",
    "--no-prune",
    "--workdir",
    str(workdir),
    "--no-progress",
  ]
  assert cli.main(argv) == 0
  study = optuna.load_study(study_name="jmtl", storage=f"sqlite:///{workdir}/study.db")
  store = workdir_lib.read_json(str(workdir / "baselines" / "baselines.json"), "baselines")
  for trial in study.trials:
    deltas = []
    for i in range(2):
      run = workdir / "trials" / trial.user_attrs["directory"] / f"fold_{i}"
      config = workdir_lib.load_run_config(str(run))
      weights = config.static_weights
      assert config.weighting == "static" and sum(weights) == pytest.approx(2.0, abs=1e-5)
      results = json.loads((run / "results.json").read_text())
      base = store[config_lib.baseline_key(config)]["tasks"]  # the key leaves out the method and its weights
      acc = [results["validation"][f"task_{t}/acc"] for t in range(2)]
      deltas.append(
        np.mean(
          [100 * (a - base[f"task_{t}"]["validation"]) / base[f"task_{t}"]["validation"] for t, a in enumerate(acc)]
        )
      )
    assert trial.value == pytest.approx(np.mean(deltas), abs=1e-9)
    assert trial.user_attrs["std"] == pytest.approx(np.std(deltas, ddof=1), abs=1e-9)
  final = workdir_lib.load_run_config(str(workdir / "final"))
  best = ast.literal_eval(study.best_trial.user_attrs["overrides"]["static_weights"])
  assert "fold" not in final and final.static_weights == pytest.approx(best)
  assert json.loads((workdir / "final" / "results.json").read_text())["test"]  # the one run that read test
