"""MULTI-PROCESS: 2 processes on jax.distributed (localhost, gloo, 2 CPU devices each) equal 1 process with 4 devices.

These tests start subprocesses (``-m "not multiprocess"`` leaves them out): at the same time, a 2-process run
(coordinator on a free localhost port; process 0 configured by flags, process 1 by ``JMTL_*`` environment
variables) and a 1-process run with 4 devices of the same driver. Each trains with ``jmtl train`` (``cli.main``, which
starts ``jax.distributed`` in the 2 processes) a loss-level method (equal) and a Gramian one (MGDA), runs the library
API (``make_mesh``, ``put_replicated``, ``put_batch``, ``mesh_jit``, ``evaluate``) for both, and then resumes the
*other* run's step-10 checkpoint: the 1-process run resumes the 2-process MGDA run, the 2 processes the 1-process
equal run. Every process has a deadline; at the first failure every process group is killed and the logs' tails
shown.
"""

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jmtl.run import logs
from tests._helpers import synthetic_train_args

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py")
DATA = dict(num_tasks=2, num_train=256, num_validation=64, num_test=64)
STEPS, CUT = 20, 10  # checkpoints at 10 and 20; the resumes start from 10
DEADLINE = 300  # seconds for all processes (about 40 s on 2 idle cores)

# Run by every process: argv[1] is a JSON spec (see the fixture).
DRIVER = r"""
import json, os, shutil, sys, time
spec = json.loads(sys.argv[1])
from jmtl.run import cli

def train(weighting, workdir):
  argv = [*spec["train"], f"--config.weighting={weighting}", "--workdir", workdir]
  code = cli.main(argv + spec["distributed"])
  if code:
    sys.exit(f"jmtl train --config.weighting={weighting} --workdir {workdir} exited with {code}")

train("equal", spec["workdirs"]["equal"])  # on 2 processes this starts jax.distributed, which the rest runs on

import jax, numpy as np, optax
import jmtl
from jmtl import weighting as W
from tests._engine import TASKS

model = jmtl.models.mlp({"a": 3, "b": 1, "c": 2}, hidden=(8,))
rng, B = np.random.default_rng(0), 16
def batch():
  return {
    "inputs": rng.normal(size=(B, 5)).astype(np.float32),
    "labels": {"a": rng.integers(0, 3, B).astype(np.int32), "b": rng.normal(size=(B, 1)).astype(np.float32),
               "c": rng.integers(0, 2, (B, 2)).astype(np.float32)},
    "masks": {"a": np.ones(B, np.float32), "b": (rng.random(B) > 0.3).astype(np.float32), "c": np.ones(B, np.float32)},
  }
batches = [batch() for _ in range(4)]  # global batches, the same in every process
P, p = jax.process_count(), jax.process_index()
mine = lambda b: jax.tree.map(lambda x: x[p * B // P : (p + 1) * B // P], b)  # this process's rows
mesh = jmtl.parallel.make_mesh()
eval_step = jax.jit(jmtl.make_eval_step(model, TASKS), out_shardings=jmtl.parallel.replicated(mesh))
ev = lambda params, b, model_state=None: eval_step(params, jmtl.parallel.put_batch(b, mesh, global_batch=True))
out, params = {}, jax.tree.map(np.asarray, model.init(jax.random.key(0), batches[0]["inputs"]))  # kept on the host
for name in ("equal", "mgda"):
  state = jmtl.TrainState.create(params=params, tx=optax.sgd(0.1), weighting=getattr(W, name)(), num_tasks=3,
                                 rng=jax.random.key(1))
  state = jmtl.parallel.put_replicated(state, mesh)
  step = jmtl.parallel.mesh_jit(jmtl.make_train_step(model, TASKS), mesh)
  for b in batches:
    state, _ = step(state, jmtl.parallel.put_batch(mine(b), mesh))
  metrics = jmtl.evaluate(ev, state.params, batches, TASKS)
  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    out[name + jax.tree_util.keystr(path)] = np.asarray(x)
  out[name + "/metrics"] = np.array([metrics[k] for k in sorted(metrics)])
if p == 0:
  np.savez(spec["api"], **out)

train("mgda", spec["workdirs"]["mgda"])

# Resume the other run (other process count) from its step-CUT checkpoint, as an interruption after CUT leaves it.
source, target, weighting = spec["resume"]
deadline = time.monotonic() + spec["deadline"]
while not os.path.exists(os.path.join(source, "results.json")):
  if time.monotonic() > deadline:
    sys.exit(f"{source} did not finish")
  time.sleep(0.2)
if p == 0:
  shutil.copytree(source, target, ignore=shutil.ignore_patterns("results.json", "jmtl.lock"))
  for s in os.listdir(os.path.join(target, "checkpoints")):
    if s.isdigit() and int(s) > spec["cut"]:
      shutil.rmtree(os.path.join(target, "checkpoints", s))
jmtl.parallel.sync("cut")
train(weighting, target)
"""


def _train_args(data_dir):
  # eval_batch_size 48 for 64 examples: a padded last batch, split over 4 devices; devices=0: all (4 on 1 process,
  # 2 + 2 on 2: the same config, so either resumes the other).
  fields = dict(num_steps=STEPS, log_every=5, eval_every=CUT, checkpoint_every=CUT, keep_checkpoints=5)
  return synthetic_train_args(data_dir, DATA, **fields, eval_batch_size=48, devices=0)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(root, devices, **extra):
  """The environment of a process with ``devices`` CPU devices; a persistent compilation cache under ``root`` lets
  the resumed runs load the programs their process compiled for its own runs."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JMTL_") and k != "JAX_COORDINATOR_ADDRESS"}
  env.update(JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
  env.update(XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]), JAX_PLATFORMS="cpu")
  env.update(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])), **extra)
  return env


def _launch(jobs, logdir):
  """Runs ``jobs`` (name -> (argv, env)) at once; kills every process group at the first failure or the deadline.

  Returns each job's output (stdout and stderr).
  """
  paths = {job: os.path.join(logdir, f"{job}.log") for job in jobs}
  procs, failed = {}, None
  with contextlib.ExitStack() as files:
    try:
      for job, (argv, env) in jobs.items():
        out = files.enter_context(open(paths[job], "w"))
        procs[job] = subprocess.Popen(
          argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
      deadline = time.monotonic() + DEADLINE
      while failed is None and any(p.poll() is None for p in procs.values()):
        failed = next((job for job, p in procs.items() if p.poll() not in (None, 0)), None)
        if failed is None and time.monotonic() > deadline:
          failed = f"the deadline of {DEADLINE} s"
        time.sleep(0.2)
      failed = failed or next((job for job, p in procs.items() if p.returncode != 0), None)
    finally:
      for p in procs.values():  # no process outlives the test, whatever happened
        if p.poll() is None:
          os.killpg(p.pid, signal.SIGKILL)
          p.wait()
  outputs = {}
  for job, path in paths.items():
    with open(path) as f:
      outputs[job] = f.read()
  if failed is not None:
    tails = []
    for job, text in outputs.items():
      lines = [line for line in text.splitlines() if "[Gloo]" not in line]
      tails.append(f"--- {job} (exit {procs[job].returncode if job in procs else None}):\n" + "\n".join(lines[-25:]))
    pytest.fail(f"the processes failed ({failed}):\n" + "\n".join(tails))
  return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from jmtl.data import synthetic

  root = tmp_path_factory.mktemp("multiprocess")
  data_dir = str(root / "data")
  synthetic.prepare(data_dir, "classification_k3", **DATA)
  port = _free_port()
  resume = {1: ("2p_mgda", "2to1_mgda", "mgda"), 2: ("1p_equal", "1to2_equal", "equal")}
  spec = lambda n, distributed: json.dumps(
    {
      "train": _train_args(data_dir),
      "workdirs": {w: str(root / f"{n}p_{w}") for w in ("equal", "mgda")},
      "api": str(root / f"{n}p_api.npz"),
      "distributed": distributed,
      "resume": [str(root / resume[n][0]), str(root / resume[n][1]), resume[n][2]],
      "cut": CUT,
      "deadline": DEADLINE,
    }
  )
  driver = lambda n, distributed: [sys.executable, "-c", DRIVER, spec(n, distributed)]
  by_env = dict(JMTL_COORDINATOR=f"localhost:{port}", JMTL_NUM_PROCESSES="2", JMTL_PROCESS_ID="1")
  start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
  out = _launch(
    {
      "1p": (driver(1, []), _env(root, 4)),
      "2p.0": (
        driver(2, ["--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", "0"]),
        _env(root, 2),
      ),
      "2p.1": (driver(2, []), _env(root, 2, **by_env)),
    },
    str(root),
  )
  used = resource.getrusage(resource.RUSAGE_CHILDREN)
  used = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
  print(f"multi-process runs: {time.monotonic() - start:.0f} s, {used:.0f} s of CPU")
  return {"root": root, "out": out}


def _saved_params(workdir, step=STEPS):
  """The ``params`` item of a checkpoint, as numpy arrays (whatever mesh wrote it)."""
  path = os.path.join(workdir, "checkpoints", str(step), "params")
  tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _assert_params_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)


def _records(workdir):
  return logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _assert_records_close(a, b):
  assert [(r["step"], r["kind"]) for r in a] == [(r["step"], r["kind"]) for r in b]
  for x, y in zip(a, b):
    for k, v in x.items():
      if k not in ("kind", "examples_per_s"):  # examples_per_s: wall clock
        np.testing.assert_allclose(np.asarray(y[k], float), np.asarray(v, float), rtol=1e-4, atol=1e-5, err_msg=k)


def _assert_results_close(a, b):
  for split in ("validation", "test"):
    for key, value in a[split].items():
      tol = 1e-4 if key.endswith("/loss") else 1 / 64  # an example on the decision boundary may flip
      assert abs(b[split][key] - value) <= tol * max(1.0, abs(value)), (split, key, value, b[split][key])


def test_library_api_on_two_processes_matches_one_process(runs):
  one, two = np.load(runs["root"] / "1p_api.npz"), np.load(runs["root"] / "2p_api.npz")
  assert sorted(one.files) == sorted(two.files) and any(k.startswith("mgda[") for k in one.files)
  for k in one.files:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("weighting", ["equal", "mgda"])
def test_jmtl_train_on_two_processes_matches_one_process(runs, weighting):
  one, two = runs["root"] / f"1p_{weighting}", runs["root"] / f"2p_{weighting}"
  _assert_params_close(_saved_params(two), _saved_params(one))
  _assert_records_close(_records(one), _records(two))
  _assert_results_close(*(json.loads((w / "results.json").read_text()) for w in (one, two)))
  # Process 0 wrote the log, the results and the checkpoints once; process 1 wrote and printed nothing of its own.
  records = _records(two)
  assert len({(r["step"], r["kind"]) for r in records}) == len(records)
  assert len(os.listdir(two / "tensorboard")) == 1
  assert sorted(os.listdir(two / "checkpoints")) == [str(CUT), str(STEPS)]
  left = [os.path.join(d, f) for d, _, files in os.walk(two) for f in files if ".tmp" in f or f == "jmtl.lock"]
  assert not left, left
  assert f"MTL ({weighting})" in runs["out"]["2p.0"] and f"MTL ({weighting})" not in runs["out"]["2p.1"]


@pytest.mark.parametrize(
  ("cut", "full", "other"), [("2to1_mgda", "2p_mgda", "1p_mgda"), ("1to2_equal", "1p_equal", "2p_equal")]
)
def test_a_checkpoint_resumes_on_another_process_count(runs, cut, full, other):
  """A run of 2 processes resumed on 1 (and one of 1 on 2) ends as the uninterrupted runs of either count."""
  cut, full, other = (runs["root"] / name for name in (cut, full, other))
  resumed, original = _records(cut), _records(full)
  # The records up to the checkpoint are the original's, wall-clock fields included: the run resumed, not restarted.
  assert [r for r in resumed if r["step"] <= CUT] == [r for r in original if r["step"] <= CUT]
  _assert_records_close(original, resumed)
  for reference in (full, other):
    _assert_params_close(_saved_params(cut), _saved_params(reference))
    _assert_results_close(*(json.loads((w / "results.json").read_text()) for w in (reference, cut)))
