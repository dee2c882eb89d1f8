"""The jmtl command end to end on a tiny synthetic set: files, table, report, baselines and Δm%, sweep, errors."""

import contextlib
import glob
import io
import json
import os
import subprocess
import sys

import pytest

import jmtl
from jmtl.run import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
DATA = dict(num_tasks=2, num_train=512, num_validation=256, num_test=256)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jmtl.data import synthetic

  path = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(path, "classification_k3", **DATA)
  return path


def tiny(data_dir, *extra):
  return [
    "--config",
    CONFIG,
    f"--config.dataset.data_dir={data_dir}",
    *(f"--config.dataset.options.{k}={v}" for k, v in DATA.items()),
    "--config.model.mlp.hidden=(16,)",
    "--config.batch_size=32",
    "--config.num_steps=60",
    "--config.log_every=10",
    "--config.eval_every=30",
    "--config.checkpoint_every=30",
    "--config.eval_batch_size=128",
    "--no-progress",
    *extra,
  ]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """One tiny run with a Gramian method and auto baselines: (workdir, what it printed)."""
  workdir = tmp_path_factory.mktemp("run") / "wd"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["train", *tiny(data_dir, "--config.weighting=pcgrad"), "--workdir", str(workdir)]) == 0
  return workdir, out.getvalue()


def _table(text):
  return text[text.index("task ") :].strip()


def test_train_writes_checkpoints_logs_events_plots_and_report_reprints_the_table(trained, capsys):
  workdir, printed = trained
  assert sorted(os.listdir(workdir / "checkpoints")) == ["30", "60"]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == [10, 20, 30, 40, 50, 60]
  assert [r["step"] for r in records if r["kind"] == "validation"] == [30, 60]
  assert {"loss/task_0", "weight/task_1", "grad_cosine", "examples_per_s"} <= set(records[0])
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  plots = ["curves.png", "grad_cosine.png", "transfer.png", "weights.png"]  # transfer: against the baselines
  assert sorted(os.listdir(workdir / "plots")) == plots
  for png in (workdir / "plots").iterdir():
    os.remove(png)
  assert cli.main(["report", "--workdir", str(workdir)]) == 0
  assert _table(capsys.readouterr().out) == _table(printed)
  assert sorted(os.listdir(workdir / "plots")) == plots


def test_auto_baselines_give_delta_m_and_negative_transfer(trained, capsys):
  workdir, printed = trained
  results = json.loads((workdir / "results.json").read_text())
  store = json.loads((workdir / "baselines" / "baselines.json").read_text())
  (entry,) = store.values()
  assert sorted(entry["tasks"]) == ["task_0", "task_1"]
  base = {t: e["test"] for t, e in entry["tasks"].items()}
  keys = [f"{t}/acc" for t in ("task_0", "task_1")]
  mt = {k: results["test"][k] for k in keys}
  st = {f"{t}/acc": v for t, v in base.items()}
  hib = dict.fromkeys(keys, True)
  assert results["delta_m"] == pytest.approx(jmtl.metrics.delta_m(mt, st, hib))
  assert results["negative_transfer"] == {t: mt[f"{t}/acc"] < base[t] for t in base}
  assert f"Δm% = {results['delta_m']:+.2f}" in printed
  assert cli.main(["eval", "--workdir", str(workdir)]) == 0  # the kept model of the last checkpoint
  assert json.loads((workdir / "eval.json").read_text())["test"] == results["test"]


def test_sweep_prints_one_row_per_method_and_reuses_baselines(trained, data_dir, tmp_path, capsys):
  workdir, _ = trained
  shared = workdir / "baselines"
  before = sorted(p for p in glob.glob(str(shared / "*" / "*")))
  over = ["--over", "weighting=equal,uncertainty"]
  argv = ["sweep", *tiny(data_dir, f"--config.baselines={shared}", "--config.plots=false"), *over]
  assert cli.main([*argv, "--workdir", str(tmp_path)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].split()[:3] == ["run", "task_0", "acc"]
  assert [line.split()[0] for line in lines[1:]] == ["weighting=equal", "weighting=uncertainty"]
  assert sorted(glob.glob(str(shared / "*" / "*"))) == before  # no baseline trained again
  assert cli.main(["report", "--workdir", str(tmp_path)]) == 0
  assert capsys.readouterr().out.strip().splitlines() == lines


def test_static_grid_is_chosen_on_validation():
  from jmtl.run import sweeps

  rows = [
    {
      "point": {"weighting": "static", "static_weights": w},
      "weighting": "static",
      "chosen": False,
      "results": {"val_score": v, "test": {"t/acc": -v}},
    }
    for w, v in (("(0.5, 1.5)", 0.7), ("(1.0, 1.0)", 0.9), ("(1.5, 0.5)", 0.8))
  ]
  sweeps._mark_static_winners(rows)
  assert [r["chosen"] for r in rows] == [False, True, False]  # the best validation score, whatever test says


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--config.weighting=nope"], "unknown weighting method 'nope'"),
    (["--config.weighting=equal+nope"], "unknown weighting method 'nope'"),
    (["--config.num_stepz=3"], "unknown config field 'num_stepz'"),
    (["--config.model.mlp.widths=(3,)"], "unknown config field 'model.mlp.widths'"),
    (["--config.num_steps=many"], "config field 'num_steps': cannot set 'many'"),
    (["--config.model.name=resnet"], "resnet: inputs must be images"),
    (["--config.dataset.options.num_trian=5"], "unknown config fields ['num_trian']"),
    (["--config.weighting=static", "--config.static_weights=(1.0,)"], "'static_weights' has 1 weights for 2 tasks"),
    (["--config.model.name=soft_mlp", "--config.weighting=mgda"], "model 'soft_mlp' has none"),
    (["--config.devices=5"], "config field 'devices' must be an int from 0 (all) to 4"),
    (["--config.devices=3"], "config field 'batch_size' (32) must be a multiple of devices (3)"),
  ],
)
def test_config_errors_are_one_line_exit_2_and_write_nothing(data_dir, tmp_path, capsys, extra, message):
  assert cli.main(["train", *tiny(data_dir, *extra), "--workdir", str(tmp_path / "wd")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
  assert not (tmp_path / "wd").exists() or not os.listdir(tmp_path / "wd")


def test_unusable_workdirs_fail_and_lose_nothing(data_dir, tmp_path, capsys):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("keep me")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text("{not json")
  other = tmp_path / "other"
  other.mkdir()
  (other / "data.csv").write_text("1,2")
  cases = [
    ("train", a_file, "exists and is not a directory"),
    ("train", broken, "cannot read"),
    ("train", other, "is not empty and holds no jmtl run"),
    ("eval", tmp_path / "missing", "does not exist"),
    ("report", other, "has no results.json"),
  ]
  for command, workdir, message in cases:
    argv = (
      [command, *tiny(data_dir), "--workdir", str(workdir)]
      if command == "train"
      else [command, "--workdir", str(workdir)]
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
  assert a_file.read_text() == "keep me"
  assert (broken / "config.json").read_text() == "{not json"
  assert os.listdir(other) == ["data.csv"]
  assert not (tmp_path / "missing").exists()


def test_rerun_with_another_config_is_refused(trained, data_dir, capsys):
  workdir, _ = trained
  stored = (workdir / "config.json").read_text()
  assert cli.main(["train", *tiny(data_dir, "--config.weighting=dwa"), "--workdir", str(workdir)]) == 2
  assert "holds a run with another config (weighting: 'pcgrad' -> 'dwa')" in capsys.readouterr().err
  assert (workdir / "config.json").read_text() == stored


def test_the_command_line_exits_2_without_a_traceback(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "jmtl.run", "train", "--config", CONFIG, "--config.weighting=nope", "--workdir", tmp_path],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT},
    check=False,
  )
  assert out.returncode == 2
  assert out.stderr.startswith("jmtl train: error: unknown weighting method 'nope'") and out.stderr.count("\n") == 1


def test_a_built_in_config_by_name_trains_from_outside_the_clone(data_dir, tmp_path):
  """``--config synthetic`` comes from the installed package (``jmtl.configs``), not the working directory."""
  args = tiny(data_dir, *(f"--config.{f}=4" for f in ("num_steps", "log_every", "eval_every", "checkpoint_every")))
  args[1] = "synthetic"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run(
    [sys.executable, "-m", "jmtl.run", "train", *args, "--workdir", str(tmp_path / "wd")],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=env,
    check=False,
  )
  assert out.returncode == 0, out.stderr
  assert json.loads((tmp_path / "wd" / "config.json").read_text())["dataset"]["name"] == "synthetic"


def test_config_variants_and_module_paths(tmp_path, monkeypatch):
  from jmtl.run import config as config_lib

  (tmp_path / "mine.py").write_text(
    "from jmtl.configs import synthetic\n\n"
    "def get_config(variant=None):\n"
    "  config = synthetic.get_config()\n"
    "  if variant not in (None, 'long'):\n"
    "    raise ValueError(f'unknown variant {variant!r}; known: long')\n"
    "  config.num_steps = 5000 if variant == 'long' else 10\n"
    "  return config\n"
  )
  assert config_lib.load_config(f"{tmp_path}/mine.py").num_steps == 10
  assert config_lib.load_config(f"{tmp_path}/mine.py:long").num_steps == 5000
  monkeypatch.syspath_prepend(str(tmp_path))
  assert config_lib.load_config("mine:long").num_steps == 5000
  with pytest.raises(config_lib.ConfigError, match=r"mine\.py:short failed: ValueError: unknown variant 'short'"):
    config_lib.load_config(f"{tmp_path}/mine.py:short")
  assert config_lib.load_config("configs/synthetic.py").to_dict() == config_lib.load_config("synthetic").to_dict()
