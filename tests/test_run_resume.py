"""A run killed with SIGKILL part-way and re-run ends exactly like an uninterrupted one; SIGTERM checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jmtl.run import cli
from tests._helpers import run_records
from tests._helpers import run_until_sigterm
from tests._helpers import synthetic_train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
DATA = dict(num_tasks=2, num_train=512, num_validation=256, num_test=256)

# A subprocess that pauses right after writing the train record of step PAUSE_AT (between two
# checkpoints), so the test can SIGKILL it at a known point; otherwise it is the jmtl command.
DRIVER = """
import os, sys, time
from jmtl.run import cli, logs
write = logs.MetricsLog.write
def pausing_write(self, step, kind, values):
  out = write(self, step, kind, values)
  if step == int(os.environ["PAUSE_AT"]) and kind == "train":
    open(os.environ["MARKER"], "w").close()
    time.sleep(600)
  return out
logs.MetricsLog.write = pausing_write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jmtl.data import synthetic

  path = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(path, "classification_k3", **DATA)  # once, before concurrent subprocesses read it
  return path


def args(data_dir, workdir, steps=300):
  # famo: a stateful weighting, whose state must be restored too.
  return [
    *synthetic_train_args(
      data_dir,
      DATA,
      weighting="famo",
      num_steps=steps,
      log_every=25,
      eval_every=100,
      checkpoint_every=100,
      eval_batch_size=256,
    ),
    "--workdir",
    str(workdir),
  ]


def test_sigkill_then_rerun_ends_exactly_like_an_uninterrupted_run(tmp_path, data_dir):
  env = {**os.environ, "PYTHONPATH": ROOT, "PAUSE_AT": "150", "MARKER": str(tmp_path / "paused")}
  full, killed = tmp_path / "full", tmp_path / "killed"
  # Both start at once (the machine has 2 cores; most of a start is single-threaded imports).
  reference = subprocess.Popen([sys.executable, "-m", "jmtl.run", *args(data_dir, full)], env=env, cwd=ROOT)
  victim = subprocess.Popen([sys.executable, "-c", DRIVER, *args(data_dir, killed)], env=env, cwd=ROOT)
  deadline = time.monotonic() + 120
  while not os.path.exists(env["MARKER"]) and victim.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert os.path.exists(env["MARKER"]), "the run to kill never reached step 150"
  victim.send_signal(signal.SIGKILL)
  assert victim.wait() == -signal.SIGKILL
  assert sorted(os.listdir(killed / "checkpoints")) == ["100"]
  assert max(r["step"] for r in run_records(killed)) == 150  # records past the checkpoint, to be redone
  assert not (killed / "results.json").exists()

  resumed = subprocess.run([sys.executable, "-m", "jmtl.run", *args(data_dir, killed)], env=env, cwd=ROOT, check=False)
  assert resumed.returncode == 0
  assert reference.wait() == 0
  a = json.loads((full / "results.json").read_text())
  b = json.loads((killed / "results.json").read_text())
  for key in ("validation", "test", "selected_step", "num_skipped", "val_score"):
    assert a[key] == b[key], key
  assert run_records(full) == run_records(killed)


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, data_dir, monkeypatch, capsys):
  assert run_until_sigterm(args(data_dir, tmp_path, steps=60), monkeypatch, 25) == 128 + signal.SIGTERM
  assert "interrupted by SIGTERM at step 25; checkpoint saved" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["25"]
  assert cli.main(args(data_dir, tmp_path, steps=60)) == 0
  assert json.loads((tmp_path / "results.json").read_text())["num_steps"] == 60


def test_batch_norm_model_resumes_exactly(tmp_path, monkeypatch):
  """A stateful model (running batch statistics) interrupted by SIGTERM and resumed ends like an uninterrupted run."""
  from jmtl.data import multi_digits

  data = str(tmp_path / "data")
  sizes = dict(num_train=256, num_validation=128, num_test=128)
  multi_digits.prepare(data, **sizes)
  argv = [
    "train",
    "--config",
    os.path.join(ROOT, "configs", "multi_digits.py"),
    f"--config.dataset.data_dir={data}",
    *(f"--config.dataset.options.{k}={v}" for k, v in sizes.items()),
    "--config.model.name=resnet",
    "--config.model.resnet.stage_features=(4,)",  # one stage: batch norm in the stem and the block
    "--config.batch_size=32",
    "--config.num_steps=40",
    "--config.log_every=10",
    "--config.eval_every=20",
    "--config.checkpoint_every=20",
    "--config.eval_batch_size=128",
    "--config.baselines=",
    "--config.plots=false",
    "--no-progress",
    "--workdir",
  ]
  assert cli.main([*argv, str(tmp_path / "full")]) == 0
  assert run_until_sigterm([*argv, str(tmp_path / "cut")], monkeypatch, 30) == 128 + signal.SIGTERM
  assert cli.main([*argv, str(tmp_path / "cut")]) == 0
  a = json.loads((tmp_path / "full" / "results.json").read_text())
  b = json.loads((tmp_path / "cut" / "results.json").read_text())
  for key in ("validation", "test", "selected_step", "val_score"):
    assert a[key] == b[key], key
  assert run_records(tmp_path / "full") == run_records(tmp_path / "cut")
  # jmtl eval restores the kept parameters *and* their batch statistics.
  assert cli.main(["eval", "--workdir", str(tmp_path / "full")]) == 0
  assert json.loads((tmp_path / "full" / "eval.json").read_text())["test"] == a["test"]


def test_data_parallel_run_matches_one_device_and_resumes(tmp_path, data_dir, monkeypatch):
  """--config.devices=4: a batch split over 4 devices gives the one-device metrics, interrupted or not."""
  assert cli.main(args(data_dir, tmp_path / "one", steps=60)) == 0
  four = [*args(data_dir, tmp_path / "four", steps=60), "--config.devices=4"]
  assert run_until_sigterm(four, monkeypatch, 25) == 128 + signal.SIGTERM
  assert cli.main(four) == 0
  a = json.loads((tmp_path / "one" / "results.json").read_text())
  b = json.loads((tmp_path / "four" / "results.json").read_text())
  for split in ("validation", "test"):
    for key, value in a[split].items():
      tol = 1e-3 if key.endswith("/loss") else 2 / 256  # an example on the decision boundary may flip
      assert abs(b[split][key] - value) <= tol * max(1.0, abs(value)), (split, key, value, b[split][key])
  assert cli.main(["eval", "--workdir", str(tmp_path / "four")]) == 0  # restores onto the mesh too
  assert json.loads((tmp_path / "four" / "eval.json").read_text())["test"] == b["test"]


def test_a_run_fed_validation_batches_resumes_exactly(tmp_path, data_dir, monkeypatch):
  """Auto-λ reads a validation batch every step: its pipeline's position is checkpointed with the training one, so a
  run interrupted by SIGTERM and resumed ends like an uninterrupted run."""
  argv = lambda w: [
    a if a != "--config.weighting=famo" else "--config.weighting=auto_lambda" for a in args(data_dir, w, 60)
  ]
  assert cli.main(argv(tmp_path / "full")) == 0
  assert run_until_sigterm(argv(tmp_path / "cut"), monkeypatch, 25) == 128 + signal.SIGTERM
  assert cli.main(argv(tmp_path / "cut")) == 0
  a, b = run_records(tmp_path / "full"), run_records(tmp_path / "cut")
  assert a == b
  weights = [r["weight/task_0"] for r in a if r["kind"] == "train"]
  assert weights[-1] != weights[0]  # λ learned from the validation batches
