"""Helpers shared by several test modules (import them from here, not from another test module)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normal(shape, seed=1, dtype=np.float32):
  """Standard-normal numpy inputs of ``shape``, reproducible from ``seed``."""
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def fill_params(model, x, seed=0, scale=0.5):
  """Parameters with the structure, shapes and dtypes of ``model.init``, without compiling it.

  Compiling random initializers dominates test time on XLA:CPU (~0.3 s per
  layer); ``jax.eval_shape`` gives the layout and numpy fills it.
  """
  rng = np.random.default_rng(seed)
  spec = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), spec)


def shapes(tree):
  """The shape of every leaf of ``tree``."""
  return jax.tree.map(lambda a: a.shape, tree)


ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def synthetic_train_args(data_dir, data: dict, **fields) -> list[str]:
  """``jmtl train`` arguments for a tiny run of ``configs/synthetic.py`` on data prepared in ``data_dir`` with the
  options ``data``: a (16,) MLP, batch 32, no baselines, no plots, no progress bar; ``fields`` set further config
  fields (``num_steps=40``, ``weighting="famo"``), in the order given. The workdir is for the caller to add."""
  config = __import__("os").path.join(ROOT, "configs", "synthetic.py")
  fields = {"model.mlp.hidden": "(16,)", "batch_size": 32, **fields, "baselines": "", "plots": "false"}
  return [
    "train",
    "--config",
    config,
    f"--config.dataset.data_dir={data_dir}",
    *(f"--config.dataset.options.{k}={v}" for k, v in data.items()),
    *(f"--config.{k}={v}" for k, v in fields.items()),
    "--no-progress",
  ]


def three_task_batch(seed: int, masks=None) -> dict:
  """Eight examples of 5 features with labels for tasks a, b (3 classes) and c (one regression target), as the
  weighting tests' tiny ``mlp({"a": 3, "b": 3, "c": 1})`` reads them; ``masks`` added when given."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  batch = {
    "inputs": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
    "labels": {
      "a": jnp.asarray(rng.integers(0, 3, 8)),
      "b": jnp.asarray(rng.integers(0, 3, 8)),
      "c": jnp.asarray(rng.normal(size=(8, 1)), jnp.float32),
    },
  }
  if masks is not None:
    batch["masks"] = masks
  return batch


def run_records(workdir, kinds=None) -> list[dict]:
  """The records of a run's ``metrics.jsonl`` without the wall-clock ``examples_per_s`` (the only field two runs
  of one command may differ in); only those of ``kinds`` when given."""
  import os

  from jmtl.run import logs

  return [
    {k: v for k, v in r.items() if k != "examples_per_s"}
    for r in logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if kinds is None or r["kind"] in kinds
  ]


def run_until_sigterm(argv, monkeypatch, step) -> int:
  """Runs ``jmtl`` in-process with ``argv``, sending SIGTERM after the train record of ``step``; the exit code."""
  import os
  import signal

  from jmtl.run import cli
  from jmtl.run import logs

  write = logs.MetricsLog.write

  def terminating_write(self, at, kind, values):
    out = write(self, at, kind, values)
    if at == step and kind == "train":
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  with monkeypatch.context() as m:
    m.setattr(logs.MetricsLog, "write", terminating_write)
    return cli.main(argv)
