"""Damaged checkpoints, damaged logs and a second writer: a run resumes from the newest checkpoint that verifies and
ends exactly like an uninterrupted one, or stops with one line naming the problem."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from jmtl.run import cli
from jmtl.run import inputs
from jmtl.run import logs
from jmtl.run import workdir as workdir_lib
from tests._helpers import synthetic_train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
DATA = dict(num_tasks=2, num_train=512, num_validation=256, num_test=256)
COMPARED = ("validation", "test", "selected_step", "num_skipped", "val_score")
CUT_AT = 70  # SIGTERM after this step: checkpoints 20, 40, 60 (regular) and 70 (on the signal) are kept
STEPS = ["20", "40", "60", str(CUT_AT)]


def args(data_dir, workdir):
  fields = dict(num_steps=80, log_every=10, eval_every=20, checkpoint_every=20, keep_checkpoints=4)
  # famo: a stateful weighting, whose state must be restored too.
  return [
    *synthetic_train_args(data_dir, DATA, weighting="famo", **fields, eval_batch_size=256),
    "--workdir",
    str(workdir),
  ]


def _records(workdir):
  drop = ("examples_per_s",)  # wall-clock, the only field allowed to differ
  path = os.path.join(workdir, "metrics.jsonl")
  return [{k: v for k, v in r.items() if k not in drop} for r in logs.read_jsonl(path)]


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _jmtl_lines(err):
  return [line for line in err.splitlines() if line.startswith("jmtl")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jmtl.data import synthetic

  path = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(path, "classification_k3", **DATA)
  return path


@pytest.fixture(scope="module")
def full(data_dir, tmp_path_factory):
  """An uninterrupted run."""
  path = tmp_path_factory.mktemp("full")
  assert cli.main(args(data_dir, path)) == 0
  return path


@pytest.fixture(scope="module")
def cut(data_dir, tmp_path_factory):
  """The same run stopped by SIGTERM after step CUT_AT (each test damages a copy of it)."""
  path = tmp_path_factory.mktemp("cut")
  write = logs.MetricsLog.write

  def terminating_write(self, step, kind, values):
    out = write(self, step, kind, values)
    if step == CUT_AT and kind == "train":
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  with pytest.MonkeyPatch.context() as m:
    m.setattr(logs.MetricsLog, "write", terminating_write)
    assert cli.main(args(data_dir, path)) == 128 + signal.SIGTERM
  assert sorted(os.listdir(path / "checkpoints"), key=int) == STEPS
  assert max(r["step"] for r in _records(path)) == CUT_AT
  return path


@pytest.fixture
def damaged(cut, tmp_path):
  path = tmp_path / "run"
  shutil.copytree(cut, path)
  return path


def _largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _resume_ends_like_the_full_run(data_dir, full, run, capsys):
  assert cli.main(args(data_dir, run)) == 0
  a, b = _results(full), _results(run)
  for key in COMPARED:
    assert a[key] == b[key], key
  records = _records(run)
  assert records == _records(full)  # the records after the checkpoint used, written once, again
  assert len({(r["step"], r["kind"]) for r in records}) == len(records)
  return capsys.readouterr().err


def test_flipped_byte_falls_back_to_the_previous_checkpoint(data_dir, full, damaged, capsys):
  """Also: ``jmtl eval`` takes the same fallback (and moves nothing); a garbage line in metrics.jsonl is reported
  with its line number and skipped, and the resumed log equals the uninterrupted run's."""
  latest = damaged / "checkpoints" / str(CUT_AT)
  _flip_byte(_largest_file(latest / "params" / "ocdbt.process_0" / "d"))
  log = damaged / "metrics.jsonl"
  lines = log.read_text().splitlines(keepends=True)
  log.write_text("".join([*lines[:2], '{"step": 1, "kind": "tr\x00\n', *lines[2:]]))  # line 3
  capsys.readouterr()
  assert cli.main(["eval", "--workdir", str(damaged)]) == 0
  notes = _jmtl_lines(capsys.readouterr().err)
  assert len(notes) == 1 and f"skipped checkpoint {CUT_AT} (params/" in notes[0], notes
  assert notes[0].endswith("using step 60")
  assert json.loads((damaged / "eval.json").read_text())["checkpoint_step"] == 60
  assert latest.is_dir()

  notes = _jmtl_lines(_resume_ends_like_the_full_run(data_dir, full, damaged, capsys))
  assert len(notes) == 2, notes
  assert f"skipped checkpoint {CUT_AT} (params/" in notes[0] and "does not match its recorded SHA-256" in notes[0]
  assert notes[0].endswith("resuming from step 60")
  assert notes[1] == f"jmtl: {log}: line 3 not a JSON record; skipped"
  assert (damaged / "rejected_checkpoints" / str(CUT_AT)).is_dir()  # kept for inspection, out of orbax's way
  assert len(os.listdir(damaged / "tensorboard")) == 2  # one event file per start, none overwritten


def _damage_three(checkpoints):
  """The latest step directory emptied, the one before with a truncated data file, the one before a truncated
  metadata JSON: the run resumes from the fourth."""
  shutil.rmtree(checkpoints / str(CUT_AT))
  (checkpoints / str(CUT_AT)).mkdir()
  _truncate(_largest_file(checkpoints / "60" / "train" / "ocdbt.process_0" / "d"))
  _truncate(checkpoints / "40" / "meta" / "metadata")


@pytest.mark.parametrize("digests", [True, False], ids=["digests", "no-digests"])
def test_damaged_checkpoints_fall_back_to_the_newest_good_one(data_dir, full, damaged, capsys, digests):
  """Without digests (checkpoints of an older jmtl) the failed restores are the evidence."""
  checkpoints = damaged / "checkpoints"
  if not digests:
    for step in STEPS:
      (checkpoints / step / "jmtl_digest.json").unlink()
  _damage_three(checkpoints)
  capsys.readouterr()
  notes = _jmtl_lines(_resume_ends_like_the_full_run(data_dir, full, damaged, capsys))
  assert len(notes) == 1 and notes[0].startswith(f"jmtl: skipped checkpoints {CUT_AT} (cannot be restored ("), notes
  assert notes[0].endswith(f"in {checkpoints}; set aside in {damaged / 'rejected_checkpoints'}; resuming from step 20")
  if digests:
    assert ", 60 (train/ocdbt.process_0/d/" in notes[0] and ", 40 (meta/metadata does not match" in notes[0]
  else:
    assert ", 60 (cannot be restored (" in notes[0] and ", 40 (cannot be restored (JSONDecodeError" in notes[0]
  assert sorted(os.listdir(damaged / "rejected_checkpoints"), key=int) == STEPS[1:]


def test_no_checkpoint_verifies_is_a_one_line_error(data_dir, damaged, capsys):
  _damage_three(damaged / "checkpoints")
  _flip_byte(damaged / "checkpoints" / "20" / "meta" / "metadata")
  log_before = (damaged / "metrics.jsonl").read_bytes()
  capsys.readouterr()
  assert cli.main(args(data_dir, damaged)) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith(f"jmtl train: error: no checkpoint in {damaged / 'checkpoints'} verifies (step {CUT_AT}: ")
  assert "step 20: meta/metadata does not match its recorded SHA-256" in err
  assert err.endswith(
    f"to start the run afresh, move {damaged / 'checkpoints'} away (or delete it) and run the same command again\n"
  )
  # Nothing changed: no silent restart, the log and the checkpoints as they were.
  assert sorted(os.listdir(damaged / "checkpoints"), key=int) == STEPS
  assert (damaged / "metrics.jsonl").read_bytes() == log_before
  assert not (damaged / workdir_lib.LOCK).exists()


def test_read_jsonl_keeps_the_records_after_a_bad_line(tmp_path, capsys):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1}\nnot json\n[2]\n{"step": 2}\n{"step": 3, "ki')  # the last line torn by a kill
  assert [r["step"] for r in logs.read_jsonl(str(path))] == [1, 2]
  assert capsys.readouterr().err == f"jmtl: {path}: lines 2, 3, 5 not a JSON record; skipped\n"


def test_deleted_checkpoints_restart_from_zero_without_duplicate_records(data_dir, full, damaged, capsys):
  shutil.rmtree(damaged / "checkpoints")
  capsys.readouterr()
  notes = _jmtl_lines(_resume_ends_like_the_full_run(data_dir, full, damaged, capsys))
  assert notes == [
    f"jmtl: workdir {damaged} has a metrics.jsonl but no checkpoint: training from step 0, "
    "the log rewritten from the start"
  ]


HOLDER = """
import sys
from jmtl.run import workdir
held = workdir.locked(sys.argv[1])
held.__enter__()
print("held", flush=True)
sys.stdin.read()
"""


def test_second_writer_fails_at_once_naming_the_owner(data_dir, tmp_path, capsys, monkeypatch):
  run = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": ROOT}
  popen = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT)
  with subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], **popen) as holder:
    try:
      assert holder.stdout.readline() == b"held\n"
      capsys.readouterr()
      with monkeypatch.context() as m:  # at once: before the data is loaded
        m.setattr(inputs, "load_data", lambda config: pytest.fail("loaded the data of a locked workdir"))
        assert cli.main(args(data_dir, run)) == 2
      err = capsys.readouterr().err
      assert len(err.strip().splitlines()) == 1, err
      owner = f"pid {holder.pid} on host {socket.gethostname()} (since "
      assert err.startswith(f"jmtl train: error: workdir {run} is in use by {owner}"), err
      assert sorted(os.listdir(run)) == [workdir_lib.LOCK]  # the second writer wrote nothing
    finally:
      holder.kill()  # SIGKILL: the lock file stays, the kernel drops the flock
  with workdir_lib.locked(str(run)):
    pass
  assert f"took over the stale lock of {owner}" in capsys.readouterr().err


def test_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
  # The lock file of a process killed with SIGKILL: its record stays, its flock went with it.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
  pid = int(dead.stdout)
  record = {"pid": pid, "host": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00"}
  (tmp_path / workdir_lib.LOCK).write_text(json.dumps(record) + "\n")
  with workdir_lib.locked(str(tmp_path)):
    owner = json.loads((tmp_path / workdir_lib.LOCK).read_text())
    assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
  assert capsys.readouterr().err == (
    f"jmtl: workdir {tmp_path}: took over the stale lock of pid {pid} on host {socket.gethostname()} "
    "(since 2025-01-01T00:00:00+00:00), which is gone\n"
  )
  assert not (tmp_path / workdir_lib.LOCK).exists()  # released at exit
