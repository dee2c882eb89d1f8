"""Steps of Gramian-based weightings against the jmtl ``equal`` step, in one run.

Reference workload (same as ``step_time``): MLP 784→512→512 (ReLU), K linear
heads 512→10, softmax cross-entropy, batch 256, SGD. For each K it times:

* ``equal`` -- the loss-level baseline;
* ``mgda_representation`` -- MGDA on the Gramian of ``∂L/∂z`` (MGDA-UB);
* ``upgrad``, ``mgda``, ``pcgrad`` at parameter level (the Gramian of the
  shared-parameter gradients, by the Dense-layer identity, no Jacobian);

and prints JSON with the median step time, examples/s, XLA's peak-memory
estimate of each compiled step (``peak_bytes``: arguments + outputs + temps
− aliased, and ``peak_memory_ratio_to_equal``), the step's FLOPs (XLA cost
analysis) and the fraction of this machine's measured matmul rate it reaches.

``--chunk-size C`` passes ``chunk_size=C`` to every step: at parameter level,
when C < K, the Dense-layer Gramian is then taken one layer at a time, C
tasks per trunk VJP (bounded memory); each row's ``chunked`` says whether
that happened (C ≥ K is the unchunked route). XLA's cost analysis counts a
loop body once, so a chunked step's FLOPs are those of the same step
unchunked (the same math).

    python -m benchmarks.gradient_step [--tasks 2 10 40] [--chunk-size 10]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import optax

import jmtl
from benchmarks import _timing
from benchmarks.step_time import BATCH
from benchmarks.step_time import CLASSES
from benchmarks.step_time import HIDDEN
from benchmarks.step_time import IN
from benchmarks.step_time import reference_batch

METHODS = {
  "equal": (jmtl.weighting.equal, {}),
  "mgda_representation": (jmtl.weighting.mgda, {"level": "representation"}),
  "upgrad": (jmtl.weighting.upgrad, {}),
  "mgda": (jmtl.weighting.mgda, {}),
  "pcgrad": (jmtl.weighting.pcgrad, {}),
}


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
  """This machine's float32 matmul rate (FLOP/s) on an n×n product, median of repeats."""
  x = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / sorted(times)[len(times) // 2]


def flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)) if cost else None


def build(k, method, **extra):
  names = [f"t{i}" for i in range(k)]
  model = jmtl.models.mlp(dict.fromkeys(names, CLASSES), hidden=(HIDDEN, HIDDEN))
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in names]
  factory, options = METHODS[method]
  params = model.init(jax.random.key(0), jnp.zeros((1, IN)))
  state = jmtl.TrainState.create(
    params=params, tx=optax.sgd(1e-2), weighting=factory(), num_tasks=k, rng=jax.random.key(1)
  )
  step = jmtl.parallel.jit(jmtl.make_train_step(model, tasks, **options, **extra))
  return step, state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
  ap.add_argument("--methods", nargs="+", default=list(METHODS))
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--chunk-size", type=int, default=None)
  args = ap.parse_args()
  rate = matmul_rate()
  rows = []
  for k in args.tasks:
    batch = reference_batch(k)
    chunked = args.chunk_size is not None and args.chunk_size < k
    runners, info = {}, {}
    for method in args.methods:
      step, state = build(k, method, chunk_size=args.chunk_size)
      compiled, compile_s, mem = _timing.compile_step(step, state, batch)
      # XLA's cost analysis counts a loop body once: a chunked step's FLOPs are those of the same math unchunked.
      unchunked = _timing.compile_step(*build(k, method), batch)[0] if chunked else compiled
      runners[method] = _timing.looper(compiled, state, batch)
      info[method] = {"compile_s": round(compile_s, 2), "flops": flops(unchunked), **mem}
    med = _timing.time_steps(runners, steps_per_repeat=args.steps, repeats=args.repeats)
    row = {"K": k, "batch": BATCH, "chunked": chunked}
    for method in runners:
      r = {"step_ms": round(1e3 * med[method], 2), "examples_per_s": round(BATCH / med[method], 1), **info[method]}
      if r["flops"]:
        r["fraction_of_matmul_rate"] = round(r["flops"] / med[method] / rate, 3)
      r["ratio_to_equal"] = round(med[method] / med["equal"], 2) if "equal" in med else None
      if "peak_bytes" in r and "peak_bytes" in info.get("equal", {}):
        r["peak_memory_ratio_to_equal"] = round(r["peak_bytes"] / info["equal"]["peak_bytes"], 2)
      row[method] = r
    rows.append(row)
  print(
    json.dumps(
      {
        "benchmark": "gradient_step",
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "matmul_gflops": round(rate / 1e9, 1),
        "chunk_size": args.chunk_size,
        "results": rows,
      },
      indent=1,
    )
  )


if __name__ == "__main__":
  main()
