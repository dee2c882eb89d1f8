"""The runner's co-training (config group ``cotrain``): an ensemble with mutual learning resumes exactly after SIGTERM
and reports its members, their mean and the ensemble; a student distilled from the single-task baselines."""

import json
import signal

import jax
import jax.numpy as jnp
import pytest

import jmtl
from jmtl.run import cli
from tests._helpers import run_records
from tests._helpers import run_until_sigterm
from tests._helpers import synthetic_train_args

DATA = dict(num_tasks=2, num_train=256, num_validation=128, num_test=128)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jmtl.data import synthetic

  path = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(path, "classification_k3", **DATA)
  return path


def args(data_dir, workdir, **fields):
  fields = dict(num_steps=40, log_every=10, eval_every=20, checkpoint_every=20, eval_batch_size=128, **fields)
  return [*synthetic_train_args(data_dir, DATA, **fields), "--workdir", str(workdir)]


CO = {"cotrain.members": 3, "cotrain.beta": 0.5, "weighting": "famo"}  # famo: per-member weighting state too


@pytest.fixture(scope="module")
def ensemble(data_dir, tmp_path_factory):
  """The workdir of an uninterrupted mutual-learning ensemble of 3."""
  workdir = tmp_path_factory.mktemp("ens") / "full"
  assert cli.main(args(data_dir, workdir, **CO)) == 0
  return workdir


def test_mutual_ensemble_resumes_after_sigterm_like_an_uninterrupted_run(
  tmp_path, data_dir, ensemble, monkeypatch, capsys
):

  assert run_until_sigterm(args(data_dir, tmp_path / "cut", **CO), monkeypatch, 30) == 128 + signal.SIGTERM
  assert "interrupted by SIGTERM at step 30" in capsys.readouterr().err
  assert cli.main(args(data_dir, tmp_path / "cut", **CO)) == 0
  a = json.loads((ensemble / "results.json").read_text())
  b = json.loads((tmp_path / "cut" / "results.json").read_text())
  for key in ("validation", "test", "selected_step", "num_skipped", "val_score", "cotrain"):
    assert a[key] == b[key], key
  assert run_records(ensemble) == run_records(tmp_path / "cut")
  rows = a["cotrain"]["rows"]
  assert sorted(rows) == ["ensemble", "member 0", "member 1", "member 2", "member mean"]
  assert rows["ensemble"]["test"]["task_0/acc"] == a["test"]["task_0/acc"]
  members = [rows[f"member {i}"]["test"]["task_1/acc"] for i in range(3)]
  assert abs(rows["member mean"]["test"]["task_1/acc"] - sum(members) / 3) < 1e-9
  assert len(set(members)) > 1 or members[0] != rows["ensemble"]["test"]["task_1/acc"]  # distinct models
  record = next(r for r in run_records(ensemble) if r["kind"] == "train")
  assert {"member0/loss/task_0", "member2/loss/task_1"} <= set(record)
  validation = next(r for r in run_records(ensemble) if r["kind"] == "validation")
  assert {"member1/task_0/acc", "member_mean/task_0/acc", "task_0/acc"} <= set(validation)
  assert "member mean" in capsys.readouterr().out  # the table's co-training rows


def test_a_student_distilled_from_an_ensemble_workdir_and_the_members_plot(tmp_path, data_dir, ensemble, capsys):
  from jmtl.run import cotrain as run_cotrain
  from jmtl.run import loop
  from jmtl.run import workdir as workdir_lib

  argv = args(data_dir, tmp_path / "student", **{"cotrain.teachers": str(ensemble), "cotrain.temperature": 2.0})
  assert cli.main(argv) == 0
  assert json.loads((tmp_path / "student" / "results.json").read_text())["cotrain"]["fields"]["teachers"]
  # The teacher is the ensemble's combined prediction, from its kept (stacked) parameters.
  config = workdir_lib.load_run_config(str(tmp_path / "student"))
  run = loop.Run(config)
  teacher, variables = run_cotrain.teacher_of(config, str(tmp_path / "student"), run)
  x = run.data.sources["validation"][0]["inputs"][None]
  ens = workdir_lib.load_run_config(str(ensemble))
  preds = jmtl.cotrain.member_predictions(run.model, variables, jnp.asarray(x))
  want = jnp.log(jnp.mean(jax.nn.softmax(preds["task_0"], axis=-1), axis=0))
  assert ens.cotrain.members == 3 and jnp.allclose(teacher(variables, jnp.asarray(x))["task_0"], want, atol=1e-5)
  assert cli.main(["report", "--workdir", str(ensemble)]) == 0
  assert (ensemble / "plots" / "members.png").stat().st_size > 0


def test_student_distilled_from_the_baselines_with_teacher_annealing(tmp_path, data_dir, capsys):
  argv = [a if a != "--config.baselines=" else "--config.baselines=auto" for a in args(data_dir, tmp_path / "bam")]
  argv += ["--config.cotrain.teachers=baselines", "--config.cotrain.anneal=true", "--config.cotrain.temperature=2.0"]
  assert cli.main(argv) == 0
  results = json.loads((tmp_path / "bam" / "results.json").read_text())
  assert results["cotrain"]["fields"]["teachers"] == "baselines" and results["delta_m"] is not None
  assert sorted(results["baselines"]) == ["task_0", "task_1"]
  # The teachers are in the student's checkpoint state; an ensemble and a student cannot be one run.
  bad = [a if a != str(tmp_path / "bam") else str(tmp_path / "bad") for a in argv]
  assert cli.main([*bad, "--config.cotrain.members=2"]) == 2
  assert "distil into one student, not both" in capsys.readouterr().err
