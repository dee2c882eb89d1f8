"""Bad input, skipped steps, signals during start-up and a full disk: each stops with one line, or is shown as it
happens; nothing is lost, and the same command resumes."""

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.data import ArraySource
from jmtl.run import cli
from jmtl.run import inputs
from jmtl.run import logs
from jmtl.run import loop
from tests._helpers import synthetic_train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
DATA = dict(num_tasks=2, num_train=512, num_validation=256, num_test=256)  # 4 classes per task


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jmtl.data import synthetic

  path = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(path, "classification_k3", **DATA)
  return path


def args(data_dir, workdir, *extra):
  fields = dict(num_steps=40, log_every=10, eval_every=20, checkpoint_every=20, eval_batch_size=256)
  return [*synthetic_train_args(data_dir, DATA, **fields), *extra, "--workdir", str(workdir)]


def _lines(text):
  return [line for line in text.splitlines() if line.strip()]


def _records(workdir, kind="train"):
  return [r for r in logs.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == kind]


def _copy(src: ArraySource) -> ArraySource:
  return ArraySource(
    {
      "inputs": src.inputs.copy(),
      "labels": {k: v.copy() for k, v in src.labels.items()},
      "masks": {k: v.copy() for k, v in src.masks.items()},
    },
    tasks=src.tasks,
  )


def _feed(monkeypatch, edit, *, unchecked=False):
  """Runs see the dataset as ``edit(split, source)`` leaves a copy of it; ``unchecked``: no host-side check."""
  load = inputs.load_data

  def load_edited(config):
    data = load(config)
    sources = {split: _copy(src) for split, src in data.sources.items()}
    for split, src in sources.items():
      edit(split, src)
    return data._replace(sources=sources)

  monkeypatch.setattr(inputs, "load_data", load_edited)
  if unchecked:
    monkeypatch.setattr(inputs, "check_data", lambda data, names: None)


# --- bad data: one line before training, nothing written ----------------------------------------------------------


def test_labels_encoded_one_to_c_fail_before_training(data_dir, tmp_path, monkeypatch, capsys):
  def shift(split, src):
    src.labels["task_1"] += 1  # 1..4 instead of 0..3

  _feed(monkeypatch, shift)
  assert cli.main(args(data_dir, tmp_path)) == 2
  [line] = _lines(capsys.readouterr().err)
  assert line.startswith("jmtl train: error: task 'task_1': train example ")
  assert "has label 4, outside 0..3 for its 4 classes" in line
  assert os.listdir(tmp_path) == []  # nothing written


def test_nan_input_fails_before_training(data_dir, tmp_path, monkeypatch, capsys):
  def poison(split, src):
    if split == "validation":
      src.inputs[7, 3] = np.nan

  _feed(monkeypatch, poison)
  assert cli.main(args(data_dir, tmp_path)) == 2
  [line] = _lines(capsys.readouterr().err)
  assert line == (
    "jmtl train: error: inputs: validation example 7 holds nan (1 validation example hold NaN or inf); "
    "the inputs must be finite"
  )


def test_negative_mask_fails_before_training(data_dir, tmp_path, monkeypatch, capsys):
  def mask(split, src):
    if split == "train":
      src.masks["task_0"] = np.ones(len(src), np.float32)
      src.masks["task_0"][1] = -7.0

  _feed(monkeypatch, mask)
  assert cli.main(args(data_dir, tmp_path)) == 2
  [line] = _lines(capsys.readouterr().err)
  assert line.startswith("jmtl train: error: task 'task_0': train example 1 has mask -7.0, outside [0, 1]")


# --- the checked step -------------------------------------------------------------------------------------------


def test_checked_step_raises_naming_the_task():
  model = jmtl.models.mlp({"digit": 3, "size": 1}, hidden=(8,))
  tasks = [jmtl.Task("digit", jmtl.losses.softmax_cross_entropy), jmtl.Task("size", jmtl.losses.mse)]
  x = jnp.ones((4, 5))
  state = jmtl.TrainState.from_model(model, x, tx=optax.sgd(0.1), rng=jax.random.key(0))
  step = jmtl.checked(jmtl.make_train_step(model, tasks), model=model, donate=False)
  ones = jnp.ones(4)

  def batch(digit=(0, 1, 2, 0), size_mask=ones, digit_mask=ones, inputs=x):  # one layout: the step compiles once
    labels = {"digit": jnp.array(digit), "size": jnp.zeros((4, 1))}
    return {"inputs": inputs, "labels": labels, "masks": {"digit": digit_mask, "size": size_mask}}

  state, metrics = step(state, batch())
  assert int(metrics["skipped"]) == 0

  def fails(b, state=state):
    with pytest.raises(jmtl.checks.CheckError) as e:
      step(state, b)
    return str(e.value)

  assert fails(batch(digit=(0, 3, 1, 2))) == (
    "task 'digit': label 3 at example 1 of the batch is outside 0..2 (3 classes), in step 2"
  )
  assert fails(batch(size_mask=ones.at[2].set(-7.0))) == (
    "task 'size': mask -7.0 at example 2 of the batch is outside [0, 1], in step 2"
  )
  assert fails(batch(inputs=x.at[3, 0].set(jnp.inf))).startswith("inputs: value inf at example 3 of the batch")
  # A loss that is not finite although the batch is valid (parameters that overflow the model).
  huge = state.replace(params=jax.tree.map(lambda p: p * 1e30, state.params))
  assert fails(batch(inputs=x * 1e10), huge).startswith("task 'digit': loss is nan, in step 2")
  # An unlabelled example's label is never read: mask 0 lets any label through.
  step(state, batch(digit=(0, 9, 1, 2), digit_mask=ones.at[1].set(0.0)))


def test_runner_checked_mode_stops_at_the_first_bad_batch(data_dir, tmp_path, monkeypatch, capsys):
  def shift(split, src):
    src.labels["task_0"] += 1

  _feed(monkeypatch, shift, unchecked=True)  # as data the host cannot read up front (not in memory)
  assert cli.main(args(data_dir, tmp_path, "--config.checks=true")) == 1
  [line] = _lines(capsys.readouterr().err)
  assert line.startswith("jmtl train: error: check failed: task 'task_0': label 4 at example ")
  assert line.endswith("is outside 0..3 (4 classes), in step 1 (the last checkpoint is kept)")


# --- skipped steps as they happen, and the stop rule ----------------------------------------------------------------


@pytest.fixture(scope="module")
def skipping_run(data_dir, tmp_path_factory):
  """A run where one training example's label is out of range (every batch holding it is skipped) and the
  validation and test splits hold one such label too: (workdir, exit code, stdout, stderr)."""

  def edit(split, src):
    src.labels["task_0"][5] = 4

  workdir = tmp_path_factory.mktemp("skipping") / "wd"
  with pytest.MonkeyPatch.context() as m:
    _feed(m, edit, unchecked=True)
    out, err = _capture(lambda: cli.main(args(data_dir, workdir, "--config.max_skipped_fraction=1.0")))
  return workdir, out, err


def _capture(fn):
  import contextlib
  import io

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    assert fn() == 0
  return out.getvalue(), err.getvalue()


def test_skipped_steps_show_in_the_log_and_on_stderr_as_they_happen(skipping_run):
  workdir, _, err = skipping_run
  records = _records(workdir)
  total = json.loads((workdir / "results.json").read_text())["num_skipped"]
  assert total > 0
  assert sum(r["skipped"] for r in records) == total
  assert [r["num_skipped"] for r in records] == list(np.cumsum([r["skipped"] for r in records]))
  first = next(r for r in records if r["skipped"])
  assert first["loss/task_0"] is None  # the interval's mean loss is NaN: null in the log
  warnings = [line for line in _lines(err) if line.startswith("jmtl: warning:")]
  assert warnings[0] == (
    f"jmtl: warning: step {first['step']}: {first['skipped']} of the last 10 steps skipped "
    f"(non-finite loss: task_0); {first['num_skipped']} skipped since step 0"
  )


def test_eval_marks_a_task_whose_loss_is_not_finite(skipping_run):
  workdir, out, _ = skipping_run
  results = json.loads((workdir / "results.json").read_text())
  assert results["non_finite"] == {"validation": ["task_0"], "test": ["task_0"]}
  assert results["test"]["task_0/loss"] is None and results["test"]["task_0/acc"] is None
  assert isinstance(results["test"]["task_1/acc"], float)
  row = next(line for line in out.splitlines() if line.startswith("task_0"))
  assert row.split()[-2:] == ["non-finite", "—"]
  assert all(r["task_0/acc"] is None for r in _records(workdir, "validation"))


def test_too_many_skips_stop_the_run_after_a_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
  def shift(split, src):
    src.labels["task_0"] += 1  # a label 4 in nearly every batch: every step skipped

  _feed(monkeypatch, shift, unchecked=True)
  assert cli.main(args(data_dir, tmp_path)) == 1  # defaults: more than 10 of 100 steps
  lines = _lines(capsys.readouterr().err)
  assert lines[-1] == (
    "jmtl train: error: 20 of the last 100 steps were skipped at step 20 (non-finite loss: task_0; the limit is "
    "max_skipped_fraction=0.1 of skip_window=100 steps); checkpoint saved; find the first bad batch with "
    "--config.checks=true (in a new --workdir)"
  )
  assert [line.split(":")[2] for line in lines[:-1]] == [" step 10", " step 20"]  # warned at 10, then at double
  assert os.listdir(tmp_path / "checkpoints") == ["20"]
  assert [(r["step"], r["skipped"], r["num_skipped"]) for r in _records(tmp_path)] == [(10, 10, 10), (20, 10, 20)]


# --- signals during start-up -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_loading_data_stops_with_one_line(signum, data_dir, tmp_path, monkeypatch, capsys):
  load = inputs.load_data

  def signalled(config):
    os.kill(os.getpid(), signum)
    return load(config)

  monkeypatch.setattr(inputs, "load_data", signalled)
  assert cli.main(args(data_dir, tmp_path)) == 128 + signum
  [line] = _lines(capsys.readouterr().err)
  name = signal.Signals(signum).name
  assert line == (
    f"jmtl train: interrupted by {name} while loading the data and building the model; nothing was lost; "
    "run the same command again to resume"
  )
  assert os.listdir(tmp_path) == []


def test_a_signal_while_compiling_stops_before_the_first_step(data_dir, tmp_path, monkeypatch, capsys):
  create = loop.create_train_state

  def signalled(run, example):
    os.kill(os.getpid(), signal.SIGTERM)
    return create(run, example)

  monkeypatch.setattr(loop, "create_train_state", signalled)
  assert cli.main(args(data_dir, tmp_path)) == 128 + signal.SIGTERM
  [line] = _lines(capsys.readouterr().err)
  assert line == (
    "jmtl train: interrupted by SIGTERM during start-up; nothing was lost; run the same command again to resume"
  )
  assert not _records(tmp_path)
  assert not os.path.exists(tmp_path / "checkpoints") or os.listdir(tmp_path / "checkpoints") == []


# A subprocess whose data loading receives SIGINT twice: the second one ends the process at once.
TWICE = """
import os, signal, sys, time
from jmtl.run import cli, inputs
def twice(config):
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(0.2)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(60)
inputs.load_data = twice
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_second_signal_stops_at_once(data_dir, tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  p = subprocess.run(
    [sys.executable, "-c", TWICE, *args(data_dir, tmp_path)],
    check=False,
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert p.returncode == 130
  assert _lines(p.stderr) == ["jmtl train: SIGINT again: stopped at once; the last checkpoint (if any) is kept"]


# --- a full disk -------------------------------------------------------------------------------------------------


class _FullFile:
  """An open file whose writes fail as on a full disk (the file itself was created, as it would be)."""

  def __init__(self, f, path):
    self.f, self.path = f, path

  def write(self, *_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

  writelines = write

  def __enter__(self):
    return self

  def __exit__(self, *_):
    self.f.close()

  def __getattr__(self, name):
    return getattr(self.f, name)


def _full_disk(monkeypatch, when):
  """``open(path, mode)`` for writing gives a :class:`_FullFile` while ``when(path)`` holds."""
  real = builtins.open

  def open_(file, mode="r", *a, **k):
    f = real(file, mode, *a, **k)
    if any(c in mode for c in "wa") and isinstance(file, str | os.PathLike) and when(os.fspath(file)):
      return _FullFile(f, os.fspath(file))
    return f

  monkeypatch.setattr(builtins, "open", open_)


@pytest.fixture(scope="module")
def full_at_start(data_dir, tmp_path_factory):
  """A fresh run on a full disk (config.json cannot be written), then the same command with space: its workdir,
  what the first attempt printed, and the workdir's files after it."""
  workdir = tmp_path_factory.mktemp("full_at_start") / "wd"
  with pytest.MonkeyPatch.context() as m:
    _full_disk(m, lambda path: os.path.basename(path).startswith("config.json"))
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      code = cli.main(args(data_dir, workdir))
  left = sorted(os.listdir(workdir))
  assert cli.main(args(data_dir, workdir)) == 0
  return workdir, code, err.getvalue(), left


def test_a_full_disk_at_the_start_leaves_nothing_that_blocks_the_next_start(full_at_start):
  workdir, code, err, left = full_at_start
  assert code == 1
  [line] = _lines(err)
  assert line.startswith(f"jmtl train: error: disk full writing {workdir}/config.json.tmp")
  assert f": workdir {workdir} (" in line and "MB free" in line
  assert line.endswith("; free some space and run the same command again to resume")
  assert left == []  # no 0-byte config.json.tmpNNNN
  assert json.loads((workdir / "results.json").read_text())["num_steps"] == 40


def test_a_full_disk_mid_run_stops_with_one_line_and_the_same_command_resumes(
  full_at_start, data_dir, tmp_path, monkeypatch, capsys
):
  with monkeypatch.context() as m:
    # The train record of step 30 cannot be appended (after train 10, train 20, validation 20; checkpoint 20 saved).
    _full_disk(m, lambda path: path.endswith("metrics.jsonl") and len(logs.read_jsonl(path)) == 3)
    assert cli.main(args(data_dir, tmp_path)) == 1
  [line] = _lines(capsys.readouterr().err)
  assert line.startswith(f"jmtl train: error: disk full writing {tmp_path}/metrics.jsonl: workdir {tmp_path} (")
  assert "a checkpoint of this run takes" in line
  assert cli.main(args(data_dir, tmp_path)) == 0
  reference = full_at_start[0]
  a, b = (json.loads((w / "results.json").read_text()) for w in (reference, tmp_path))
  for key in ("validation", "test", "selected_step", "num_skipped", "val_score"):
    assert a[key] == b[key], key
  drop = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rs]
  assert drop(logs.read_jsonl(str(reference / "metrics.jsonl"))) == drop(
    logs.read_jsonl(str(tmp_path / "metrics.jsonl"))
  )


# --- other bad input -----------------------------------------------------------------------------------------------


def test_an_empty_results_file_is_one_line_in_train_and_report(full_at_start, tmp_path, data_dir, capsys):
  workdir = tmp_path / "wd"
  shutil.copytree(full_at_start[0], workdir)
  (workdir / "results.json").write_text("{}\n")
  for argv in (["report", "--workdir", str(workdir)], args(data_dir, workdir)):
    assert cli.main(argv) == 2
    [line] = _lines(capsys.readouterr().err)
    assert f"error: {workdir}/results.json is not a jmtl results file (no 'tasks', 'metric', 'test')" in line
  os.remove(workdir / "results.json")  # as the message says: the same command evaluates the last checkpoint again
  assert cli.main(args(data_dir, workdir)) == 0
  assert (
    json.loads((workdir / "results.json").read_text())["test"]
    == json.loads((full_at_start[0] / "results.json").read_text())["test"]
  )


def test_an_empty_batch_is_a_clear_error():
  model = jmtl.models.mlp({"a": 3}, hidden=(4,))
  tasks = [jmtl.Task("a", jmtl.losses.softmax_cross_entropy)]
  state = jmtl.TrainState.from_model(model, jnp.ones((2, 5)), tx=optax.sgd(0.1), rng=jax.random.key(0))
  empty = {"inputs": np.ones((0, 5), np.float32), "labels": {"a": np.zeros((0,), np.int32)}}
  for fn, args_ in (
    (jmtl.make_train_step(model, tasks), (state, empty)),
    (jmtl.make_eval_step(model, tasks), (state.params, empty)),
  ):
    with pytest.raises(ValueError, match=r"the batch is empty \(inputs of shape \(0, 5\)\)"):
      jax.jit(fn)(*args_)
  assert jmtl.models._common.flatten_batch(jnp.ones((0, 2, 3))).shape == (0, 6)
