"""Input-pipeline throughput on MultiDigits next to the train step's consumption rate.

The pipeline (:func:`jmtl.data.pipeline.multi_label`, batch 256, uint8 16×16×1
images normalised to float32, tasks ``left`` and ``right``) is timed on the
prepared TFDS array_record files (``multi_digits.load``, with 0 and 2 grain
worker processes) and on the same split read into memory once
(:meth:`~jmtl.data.pipeline.ArraySource.from_source`). When MultiDigits cannot
be prepared, random uint8 arrays of its shape stand in (the JSON says so). The
train step is the ``equal`` step of the default CNN (``jmtl.models.cnn``) on a
batch of the same shape, timed as in ``benchmarks/step_time.py``; it is also
timed fed by the pipeline. The target: the pipeline delivers batches at least
10× faster than the step consumes them. Prints one JSON object on stdout and
nothing else (what TFDS, grain and XLA print while the set is prepared and
read goes to stderr). Run from the repository root::

    python -m benchmarks.input_pipeline
    python -m benchmarks.input_pipeline --data_dir DIR --batches 200 --repeats 5 --workers 0 2 --num_train 60000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmtl
from benchmarks import _timing
from jmtl.data import pipeline

BATCH, NUM_TRAIN = 256, 60_000


@contextlib.contextmanager
def stdout_to_stderr():
  """Sends everything written to stdout (file descriptor 1: Python, C libraries, child processes) to stderr."""
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def multi_digits_source(data_dir, num_train=NUM_TRAIN):
  """The prepared MultiDigits train split (array_record), or ``None`` and why not."""
  try:
    from jmtl.data import multi_digits

    t0 = time.perf_counter()
    sizes = {} if num_train == NUM_TRAIN else {"num_train": num_train, "num_validation": 100, "num_test": 100}
    src = multi_digits.load("train", data_dir, **sizes)
    return src, f"multi_digits.load('train') from {data_dir} (ready in {time.perf_counter() - t0:.1f} s)"
  except Exception as e:  # the builder module is developed separately; keep the benchmark usable
    return None, f"multi_digits unavailable ({type(e).__name__}: {e})"


def synthetic_source():
  r = np.random.default_rng(0)
  data = {
    "inputs": r.integers(0, 256, (NUM_TRAIN, 16, 16, 1), dtype=np.uint8),
    "labels": {"left": r.integers(0, 10, NUM_TRAIN), "right": r.integers(0, 10, NUM_TRAIN)},
  }
  return pipeline.ArraySource(data)


def make_pipeline(source, seed=0, workers=0):
  read = pipeline.ReadOptions(worker_count=workers)
  return pipeline.multi_label(source, BATCH, seed=seed, transform=pipeline.normalize_images(), read=read)


def pipeline_rate(source, *, batches: int, repeats: int, workers: int = 0) -> dict:
  """Median batches/s over ``repeats`` runs of ``batches`` consecutive batches, after a warm-up."""
  it = iter(make_pipeline(source, workers=workers))
  for _ in range(10):
    next(it)
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches / (time.perf_counter() - t0))
  it.close()
  rate = statistics.median(rates)
  return {"workers": workers, "batches_per_s": round(rate, 1), "examples_per_s": round(rate * BATCH, 1)}


def train_step(batch):
  names = list(batch["labels"])
  model = jmtl.models.cnn(dict.fromkeys(names, 10))
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in names]
  params = model.init(jax.random.key(0), jnp.zeros((1, *batch["inputs"].shape[1:])))
  state = jmtl.TrainState.create(params=params, tx=optax.sgd(1e-2), num_tasks=len(names), rng=jax.random.key(1))
  return jmtl.parallel.jit(jmtl.make_train_step(model, tasks)), state


def fed_looper(compiled, state, it):
  """Like ``_timing.looper``, but every step takes the next pipeline batch: the end-to-end loop."""
  box = [state]

  def run(n):
    s = box[0]
    for _ in range(n):
      s, m = compiled(s, next(it))
    jax.block_until_ready((s, m))
    box[0] = s

  return run


def time_train_step(memory, *, steps: int, repeats: int) -> dict:
  batch = jax.tree.map(jnp.asarray, make_pipeline(memory)[0])
  step, state = train_step(batch)
  compiled, compile_s, _ = _timing.compile_step(step, state, batch)
  twin = jax.tree.map(jnp.copy, state)  # the step donates its state: each runner needs its own
  it = iter(make_pipeline(memory, seed=1))
  runners = {"fixed_batch": _timing.looper(compiled, state, batch), "fed_by_pipeline": fed_looper(compiled, twin, it)}
  med = _timing.time_steps(runners, steps_per_repeat=steps, repeats=repeats)
  it.close()
  return {
    "model": "jmtl.models.cnn(features=(32, 64), dense=128), equal weighting, SGD",
    "compile_s": round(compile_s, 3),
    "step_ms": round(1e3 * med["fixed_batch"], 3),
    "steps_per_s": round(1.0 / med["fixed_batch"], 2),
    "step_ms_fed_by_in_memory_pipeline": round(1e3 * med["fed_by_pipeline"], 3),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", default=None, help="TFDS root to prepare/read MultiDigits (default: a temporary dir)")
  ap.add_argument("--batches", type=int, default=200)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="grain worker processes for array_record")
  ap.add_argument("--num_train", type=int, default=NUM_TRAIN, help="training examples of MultiDigits (a smaller set)")
  args = ap.parse_args()
  with stdout_to_stderr():
    out = measure(args)
  print(json.dumps(out, indent=1))


def measure(args) -> dict:
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    records, note = multi_digits_source(args.data_dir or tmp, args.num_train)
    if records is not None:
      for workers in args.workers:
        try:
          rate = pipeline_rate(records, batches=max(args.batches // 8, 10), repeats=args.repeats, workers=workers)
        except Exception as e:  # e.g. a source that does not pickle into worker processes
          rate = {"workers": workers, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        rows[f"array_record_workers_{workers}"] = {"source": note, **rate}
      t0 = time.perf_counter()
      memory = pipeline.ArraySource.from_source(records)
      note = f"ArraySource.from_source(multi_digits train): read in {time.perf_counter() - t0:.1f} s"
    else:
      memory, note = synthetic_source(), f"random uint8 arrays of MultiDigits' shape; {note}"
  rows["in_memory"] = {"source": note, **pipeline_rate(memory, batches=args.batches, repeats=args.repeats)}

  step = time_train_step(memory, steps=args.steps, repeats=args.repeats)
  for row in rows.values():
    if "batches_per_s" in row:
      row["ratio_pipeline_over_step"] = round(row["batches_per_s"] / step["steps_per_s"], 1)
  return {
    "benchmark": "input_pipeline",
    "batch": BATCH,
    "target_ratio": 10,
    **_timing.environment(),
    "pipeline": rows,
    "train_step": step,
  }


if __name__ == "__main__":
  main()
