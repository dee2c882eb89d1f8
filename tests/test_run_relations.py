"""Task relations through the runner: planted groups found and recovered by ``jmtl group``, the negative-transfer flag
on conflicting tasks and not where sharing helps, ``jmtl analyze``, the table and the plots."""

import contextlib
import io
import json
import os

import numpy as np
import pytest

from jmtl.run import cli
from tests._helpers import ROOT

PLANTED = os.path.join(ROOT, "configs", "planted.py")
SYNTHETIC = os.path.join(ROOT, "configs", "synthetic.py")


def _args(config, data_dir, data, **fields):
  fields = {"batch_size": 64, "log_every": 20, "eval_batch_size": 512, "plots": "false", **fields}
  return [
    "--config",
    config,
    f"--config.dataset.data_dir={data_dir}",
    *(f"--config.dataset.options.{k}={v}" for k, v in data.items()),
    *(f"--config.{k}={v}" for k, v in fields.items()),
    "--no-progress",
  ]


def _main(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(argv) == 0
  return out.getvalue()


def _read(path):
  with open(path) as f:
    return json.load(f)


def _records(path, kind):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def test_planted_groups_have_the_higher_affinity_and_jmtl_group_recovers_them(data_dir, tmp_path):
  # CI-sized planted_k6: 6 tasks in 2 groups of 3 (configs/planted.py runs planted_k8 at full size).
  data = {"num_train": 2048, "num_validation": 256, "num_test": 256}
  fields = {"dataset.config": "planted_k6", "model.mlp.hidden": "(32,)", "num_steps": 300, "eval_every": 300}
  fields |= {"checkpoint_every": 300, "relations.every": 5, "baselines": ""}
  printed = _main(["group", *_args(PLANTED, data_dir, data, **fields), "--groups", "2", "--workdir", str(tmp_path)])
  run = _read(tmp_path / "all" / "results.json")
  rel = run["relations"]
  z = np.array(rel["affinity"], float)
  planted = [[0, 1, 2], [3, 4, 5]]
  for g in planted:
    for j in g:
      within = np.mean([z[i, j] for i in g if i != j])
      across = np.mean([z[i, j] for h in planted if h is not g for i in h])
      assert within > across, (j, within, across)
  assert rel["affinity_steps"] == 60  # every 5 of 300 steps, each pair measured each time
  out = _read(tmp_path / "group.json")
  assert out["groups"] == [["task_0", "task_1", "task_2"], ["task_3", "task_4", "task_5"]] and out["exact"]
  assert out["runs"] == dict.fromkeys(["task_0", "task_1", "task_2"], "groups/task_0+task_1+task_2") | dict.fromkeys(
    ["task_3", "task_4", "task_5"], "groups/task_3+task_4+task_5"
  )
  for name in run["tasks"]:  # each task's grouped result is its group's run's
    group_run = _read(tmp_path / out["runs"][name] / "results.json")
    assert out["grouped"][name] == group_run["test"][f"{name}/acc"]
  assert "{task_0, task_1, task_2}  {task_3, task_4, task_5}" in printed
  assert "grouped n/a" in printed  # no baselines asked for: no Δm%
  # jmtl analyze on the all-tasks run: matrices, groups, plots
  text = _main(["analyze", "--workdir", str(tmp_path / "all"), "--groups", "2"])
  assert "suggested groups (at most 2; exact search" in text and "{task_0, task_1, task_2}" in text
  assert os.path.exists(tmp_path / "all" / "plots" / "relations.png")
  assert _read(tmp_path / "all" / "analysis.json")["relations"]["grouping"]["groups"] == out["groups"]


def test_the_flag_fires_on_conflicting_tasks_during_training(data_dir, tmp_path):
  # conflicting_k2 on a 4-unit trunk: the two tasks compete for it. jmtl group trains the baselines first, so the
  # all-tasks run writes its transfer records as it validates.
  data = {"num_train": 2048, "num_validation": 1024, "num_test": 1024}
  fields = {"dataset.config": "conflicting_k2", "select_metric": "loss", "model.mlp.hidden": "(4,)", "num_steps": 600}
  fields |= {"eval_every": 60, "checkpoint_every": 600, "relations.every": 5}
  printed = _main(["group", *_args(SYNTHETIC, data_dir, data, **fields), "--groups", "2", "--workdir", str(tmp_path)])
  run = _read(tmp_path / "all" / "results.json")
  flags = {t: v["behind"] for t, v in run["transfer"]["tasks"].items()}
  assert any(flags.values()), run["transfer"]
  live = _records(tmp_path / "all", "transfer")
  assert [r["step"] for r in live] == list(range(60, 601, 60))  # written while training: the baselines came first
  for t, v in run["transfer"]["tasks"].items():  # the records are the rule's verdicts step by step
    assert [bool(r[f"behind/{t}"]) for r in live] == v["flags"]
    if v["behind"]:  # the flag appeared where the run of behind validations reaching the end starts
      assert v["first_step"] == v["steps"][len(v["flags"]) - _streak(v["flags"])]
  # The tasks lag by competing for 4 units, not by opposite gradients: their affinity is positive, so one group.
  z = np.array(run["relations"]["affinity"], float)
  assert z[0, 1] + z[1, 0] > 0
  out = _read(tmp_path / "group.json")
  assert out["groups"] == [["task_0", "task_1"]] and out["runs"]["task_0"] == "groups/task_0+task_1"
  # That group's run is the all-tasks run without the tracker: measuring the affinity changed no parameter.
  assert out["grouped"] == pytest.approx(out["together"], rel=1e-5)
  assert f"all together {out['delta_m']['together']:+.2f}, grouped {out['delta_m']['grouped']:+.2f}" in printed


def _streak(flags):
  n = 0
  for f in reversed(flags):
    if not f:
      break
    n += 1
  return n


def test_no_flag_where_sharing_helps_and_the_table_and_analyze_show_it(data_dir, tmp_path):
  # Three noisy copies of one label (planted_k6's first group, ρ = 1, 30 % of labels flipped independently per task)
  # from 256 examples: the shared trunk learns from three times the labels. Baselines trained after the run: the
  # transfer records are added when it ends.
  data = {"num_train": 256, "num_validation": 1024, "num_test": 1024, "latent_dim": 2, "relatedness": 1.0}
  data |= {"label_noise": 0.3}
  fields = {"dataset.config": "planted_k6", "tasks": "task_0,task_1,task_2", "model.mlp.hidden": "(64,64)"}
  fields |= {"batch_size": 32, "num_steps": 400, "eval_every": 40, "checkpoint_every": 400, "relations.every": 10}
  printed = _main(["train", *_args(SYNTHETIC, data_dir, data, **fields), "--workdir", str(tmp_path)])
  run = _read(tmp_path / "results.json")
  assert run["delta_m"] > 0
  assert not any(v["behind"] for v in run["transfer"]["tasks"].values()), run["transfer"]
  assert [r["step"] for r in _records(tmp_path, "transfer")] == list(range(40, 401, 40))
  header = printed[printed.index("task ") :].splitlines()[0]
  assert header.split()[-3:] == ["behind", "since", "conflict"]
  assert all(line.split()[-2] == "no" for line in printed.splitlines() if line.startswith("task_"))
  text = _main(["analyze", "--workdir", str(tmp_path)])
  assert text.count("never behind") + text.count("then caught up") == 3
  assert sorted(os.listdir(tmp_path / "plots")) == ["relations.png", "transfer.png"]


def test_analyze_and_group_refuse_bad_input(data_dir, tmp_path, capsys):
  assert cli.main(["analyze", "--workdir", str(tmp_path / "missing")]) == 2
  assert "does not exist" in capsys.readouterr().err
  data = {"num_train": 256, "num_validation": 64, "num_test": 64}
  argv = ["group", *_args(SYNTHETIC, data_dir, data, **{"dataset.config": "conflicting_k2"}), "--groups", "3"]
  assert cli.main([*argv, "--workdir", str(tmp_path / "g")]) == 2
  assert "--groups must be an int from 1 to the number of tasks (2), got 3" in capsys.readouterr().err
