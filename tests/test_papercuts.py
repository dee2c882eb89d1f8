"""Papercuts a new user met (issue 17): each fails clearly, or works, now.

(a) a transform returning weights of the wrong shape; (b) a donated state used again; (c) bad weighting arguments
before the data loads, no workdir left; (d) report/eval of a read-only run; (e) plot titles and a sweep's
comparison plot. (f) and (g), the benchmarks' commands: tests/test_benchmark_commands.py.
"""

import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.run import cli
from jmtl.run import inputs
from jmtl.run import plots
from tests._helpers import synthetic_train_args

TASKS = [jmtl.Task(t, jmtl.losses.softmax_cross_entropy) for t in ("a", "b")]


def _batch(seed=0, n=8):
  rng = np.random.default_rng(seed)
  return {
    "inputs": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
    "labels": {t.name: jnp.asarray(rng.integers(0, 3, n)) for t in TASKS},
  }


def _state(weighting):
  model = jmtl.models.mlp({"a": 3, "b": 3}, hidden=(4,))
  return jmtl.TrainState.from_model(
    model, _batch()["inputs"], tx=optax.sgd(0.1), weighting=weighting, rng=jax.random.key(0)
  ), model


def _returning(weights, needs="losses"):
  return jmtl.weighting.WeightingTransform(
    init=lambda k: jmtl.weighting.EmptyState(),
    update=lambda losses, state, **_: (jnp.asarray(weights, jnp.float32), state),
    needs=needs,
    label=f"mine(needs={needs})",
  )


# ----------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("needs", ["losses", "gramian", "jacobian"])
@pytest.mark.parametrize("weights", [np.ones((2, 2)), np.ones(3), np.float32(1.0)])
def test_weights_of_the_wrong_shape_name_the_transform_and_the_expected_shape(needs, weights):
  state, model = _state(_returning(weights, needs))
  step = jax.jit(jmtl.make_train_step(model, TASKS))
  shape = re.escape(str(tuple(np.shape(weights))))
  with pytest.raises(
    ValueError,
    match=rf"weighting mine\(needs={needs}\) returned weights of shape {shape}; "
    r"expected \(2,\).*one per task \['a', 'b'\]",
  ):
    step(state, _batch())


def test_weights_of_the_right_shape_and_element_wise_weights_still_train():
  state, model = _state(_returning([0.25, 1.75]))
  step = jax.jit(jmtl.make_train_step(model, TASKS))
  _, metrics = step(state, _batch())
  assert metrics["weight/a"] == pytest.approx(0.25) and metrics["weight/b"] == pytest.approx(1.75)
  # GradDrop returns element-wise weights shaped like the Jacobian: accepted as before.
  state, model = _state(jmtl.weighting.graddrop())
  _, metrics = jax.jit(jmtl.make_train_step(model, TASKS))(state, _batch())
  assert np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------- (b)


def test_a_donated_state_used_again_says_why_and_donate_false_keeps_it():
  state, model = _state(jmtl.weighting.equal())
  step = jmtl.parallel.jit(jmtl.make_train_step(model, TASKS))
  new, _ = step(state, _batch())
  assert jax.tree.leaves(state.params)[0].is_deleted()
  with pytest.raises(ValueError, match=r"donates the state it is given.*donate=False"):
    step(state, _batch())
  kept, _ = _state(jmtl.weighting.equal())
  keep = jmtl.parallel.jit(jmtl.make_train_step(model, TASKS), donate=False)
  a, _ = keep(kept, _batch())
  b, _ = keep(kept, _batch())  # the same state twice: the same result
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
  assert step.lower(new, _batch()) is not None  # the wrapped function's own attributes stay reachable


# ----------------------------------------------------------------------------- (c)


def test_bad_weighting_arguments_fail_before_the_data_loads_and_leave_no_workdir(tmp_path, monkeypatch, capsys):
  def no_data(config):
    raise AssertionError("the data was read before the config was checked")

  monkeypatch.setattr(inputs, "load_data", no_data)
  workdir = tmp_path / "run"
  argv = ["train", "--config", "synthetic", "--no-progress", "--workdir", str(workdir)]
  assert cli.main([*argv, "--config.weighting=dwa", "--config.weighting_args.dwa.temp=2.0"]) == 2
  err = capsys.readouterr().err
  assert "weighting 'dwa' with arguments" in err and "unexpected keyword argument 'temp'" in err, err
  assert cli.main([*argv, "--config.weighting=cagrad", "--config.weighting_args.cagrad.c=-1.0"]) == 2
  assert "weighting 'cagrad'" in capsys.readouterr().err
  assert not workdir.exists()


# ----------------------------------------------------------------------------- (d), (e)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny run (plots on)."""
  from jmtl.data import synthetic

  data, root = str(tmp_path_factory.mktemp("data")), tmp_path_factory.mktemp("runs")
  sizes = dict(num_tasks=2, num_train=256, num_validation=64, num_test=64)
  synthetic.prepare(data, "classification_k3", **sizes)
  argv = synthetic_train_args(data, sizes, num_steps=20, log_every=10, eval_every=10, checkpoint_every=10)
  argv = [a if a != "--config.plots=false" else "--config.plots=true" for a in argv]
  assert cli.main([*argv, "--workdir", str(root / "run")]) == 0
  return root / "run", argv


def _snapshot(path):
  return {
    os.path.relpath(os.path.join(d, f), path): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, files in os.walk(path)
    for f in files
  }


def test_report_and_eval_of_a_read_only_run(run, tmp_path, capsys):
  workdir, _ = run
  before = _snapshot(workdir)
  out = tmp_path / "out"
  # Whatever the permissions, with --out nothing is written into the run.
  assert cli.main(["report", "--workdir", str(workdir), "--out", str(out)]) == 0
  assert cli.main(["eval", "--workdir", str(workdir), "--out", str(out)]) == 0
  assert _snapshot(workdir) == before
  assert (out / "plots" / "curves.png").exists() and (out / "eval.json").exists()
  stored = json.loads((workdir / "results.json").read_text())
  assert json.loads((out / "eval.json").read_text())["test"] == stored["test"]
  capsys.readouterr()
  if os.geteuid() == 0:
    pytest.skip("running as root: chmod a-w does not stop root from writing (the --out check above ran)")
  subprocess.run(["chmod", "-R", "a-w", str(workdir)], check=True)
  try:
    assert cli.main(["report", "--workdir", str(workdir)]) == 0
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    err = capsys.readouterr().err
    assert "is read-only: plots not written" in err and "is read-only: eval.json not written" in err
    assert _snapshot(workdir) == before
  finally:
    subprocess.run(["chmod", "-R", "u+w", str(workdir)], check=True)


def test_plots_have_titles_and_a_sweep_writes_a_comparison_plot(run, tmp_path, monkeypatch):
  from matplotlib.figure import Figure

  workdir, argv = run
  titles = []
  savefig = Figure.savefig

  def recording(fig, path, **kwargs):
    texts = [fig._suptitle.get_text()] if fig._suptitle else []
    texts += [ax.get_title() for ax in fig.axes]
    titles.append((os.path.basename(path), " | ".join(t for t in texts if t)))
    return savefig(fig, path, **kwargs)

  monkeypatch.setattr(Figure, "savefig", recording)
  plots.write_all(str(workdir), ["task_0", "task_1"], {"task_0": "acc", "task_1": "acc"}, str(tmp_path))
  sweep_argv = ["sweep" if a == "train" else a for a in argv]
  over = ["--over", "weighting=equal,tests.byo_user.tilted"]
  assert cli.main([*sweep_argv, *over, "--config.num_steps=10", "--workdir", str(tmp_path / "sweep")]) == 0
  named = dict(reversed(titles))  # the first figure of each name: the run's own (the sweep's runs follow)
  assert named["curves.png"].startswith("run: equal, mlp — training and validation per task")
  assert named["weights.png"].startswith("run: equal, mlp — task weights")
  assert named["sweep.png"].startswith("sweep sweep: 2 runs")
  assert (tmp_path / "sweep" / "plots" / "sweep.png").exists()
  assert all(title for _, title in titles), titles
