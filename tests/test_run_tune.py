"""``jmtl tune``: a 6-trial search on synthetic finishes, prunes, resumes after SIGTERM without repeating a trial."""

import os
import signal

import optuna
import pytest

from jmtl.run import cli
from jmtl.run import config as config_lib
from jmtl.run import logs
from jmtl.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = dict(num_tasks=2, num_train=384, num_validation=128, num_test=128)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jmtl.data import synthetic

  path = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(path, "classification_k3", **DATA)
  return path


def tune_args(data_dir, workdir):
  fields = dict(
    num_steps=40, log_every=10, eval_every=10, checkpoint_every=10, batch_size=32, eval_batch_size=128, plots="false"
  )
  return [
    "tune",
    "--config",
    os.path.join(ROOT, "configs", "synthetic.py"),
    f"--config.dataset.data_dir={data_dir}",
    *(f"--config.dataset.options.{k}={v}" for k, v in DATA.items()),
    "--config.model.mlp.hidden=(16,)",
    *(f"--config.{k}={v}" for k, v in fields.items()),
    # Adam from 1e-6 (learns nothing in 40 steps) to 0.1: the bad half is pruned at its first validations.
    "--space",
    "optimizer.learning_rate=loguniform(1e-6,0.1)",
    "--trials",
    "6",
    "--prune_startup",
    "3",  # trial 2 (the one interrupted below) is never pruned
    "--workdir",
    str(workdir),
    "--no-progress",
  ]


def test_tune_finishes_prunes_and_resumes_after_sigterm(tmp_path, data_dir, monkeypatch):
  workdir = tmp_path / "tune"
  write = logs.MetricsLog.write

  def terminating_write(self, step, kind, values):  # SIGTERM in the middle of trial 2
    out = write(self, step, kind, values)
    if f"{os.sep}trials{os.sep}0002{os.sep}" in self.path and step == 20 and kind == "train":
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  with monkeypatch.context() as m:
    m.setattr(logs.MetricsLog, "write", terminating_write)
    assert cli.main(tune_args(data_dir, workdir)) == 128 + signal.SIGTERM
  finished = {d: os.stat(workdir / "trials" / d / "results.json").st_mtime_ns for d in ("0000", "0001")}
  assert not (workdir / "trials" / "0002" / "results.json").exists()

  assert cli.main(tune_args(data_dir, workdir)) == 0
  study = optuna.load_study(study_name="jmtl", storage=f"sqlite:///{workdir}/study.db")
  states = optuna.trial.TrialState
  failed = [t for t in study.trials if t.state == states.FAIL]
  done = [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
  assert [(t.number, t.user_attrs["interrupted"]) for t in failed] == [(2, True)]
  assert len(done) == 6 and any(t.state == states.PRUNED for t in done)
  directories = [t.user_attrs["directory"] for t in done]
  assert sorted(directories) == sorted(set(directories))  # no trial ran twice
  (retry,) = [t for t in done if t.user_attrs["directory"] == "0002"]
  assert retry.number == 3 and retry.params == failed[0].params  # the interrupted trial, trained on
  # ... from its checkpoint of step 20: one record per step in its log, the steps after 20 written once.
  steps = [
    r["step"] for r in logs.read_jsonl(str(workdir / "trials" / "0002" / "metrics.jsonl")) if r["kind"] == "train"
  ]
  assert steps == [10, 20, 30, 40]
  for d, mtime in finished.items():  # the trials finished before the signal were not run again
    assert os.stat(workdir / "trials" / d / "results.json").st_mtime_ns == mtime
  for t in done:  # every trial an ordinary run directory
    stored = workdir_lib.load_run_config(str(workdir / "trials" / t.user_attrs["directory"]))
    assert stored.optimizer.learning_rate == pytest.approx(t.params["optimizer.learning_rate"])
    assert (workdir / "trials" / t.user_attrs["directory"] / "results.json").exists() == (t.state == states.COMPLETE)

  best = workdir_lib.read_json(str(workdir / "tune.json"), "tune")["best"]
  assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
  rerun = config_lib.load_config(str(workdir / "best_config.py"))
  assert rerun.optimizer.learning_rate == pytest.approx(study.best_params["optimizer.learning_rate"])
  assert rerun.baselines == str(workdir / "baselines")
