"""Step time of jmtl's loss-level steps against hand-written JAX steps of the same math, in one run.

Reference workload (``benchmarks._reference``): MLP trunk 784→512→512 (ReLU),
K linear heads 512→10, softmax cross-entropy, batch 256, SGD. For each K it
times, interleaved on the same batch (median of repeats, after compilation,
blocking on results):

* ``jmtl_equal`` -- the jmtl step with ``equal`` weighting;
* ``jmtl_uncertainty`` -- the jmtl step with the loss-level ``uncertainty`` weighting;
* ``loop_jax`` -- a hand-written step whose K heads are a Python loop;
* ``fused_jax`` -- the hand-written step for K same-shaped heads: stacked head
  kernels, one ``einsum``, one vectorised cross-entropy;
* ``jmtl_eval`` / ``fused_eval`` -- ``jmtl.make_eval_step`` (loss and accuracy
  per task, jitted) and a hand-written eval step of the same statistics.

Each row reports ``step_ms``, ``examples_per_s``, ``compile_s``, ``flops``
(XLA's cost analysis) and XLA's memory analysis (``peak_bytes``: arguments +
outputs + temps − aliased); then ``ratio_jmtl_over_fastest`` (jmtl ``equal``
over the faster of ``loop_jax`` and ``fused_jax``, named by
``fastest_reference``), ``ratio_jmtl_over_loop``, ``ratio_jmtl_over_fused``,
``ratio_uncertainty_over_fused``, ``ratio_uncertainty_over_fastest`` and
``ratio_eval_jmtl_over_fused``. ``--dtype bfloat16`` sets the compute dtype of
every step (parameters, losses and updates stay float32). Prints one JSON object.

Run from the repository root (``benchmarks`` is not installed with jmtl)::

    python -m benchmarks.step_time
    python -m benchmarks.step_time --tasks 2 10 40 --repeats 7 --steps 20 --dtype bfloat16
    python -m benchmarks.step_time --tasks 2 --repeats 1 --steps 2

(the defaults are ``--tasks 2 10 40 --repeats 7 --steps 20 --dtype float32``;
the last line is a check that takes seconds).
"""

from __future__ import annotations

import argparse
import json

import jmtl
from benchmarks import _reference
from benchmarks import _timing
from benchmarks._reference import BATCH
from benchmarks._reference import reference_batch


def measure_k(k, *, dtype, steps_per_repeat, repeats) -> dict:
  """One result row: every step of the module docstring at K tasks, timed interleaved."""
  batch = reference_batch(k)
  steps = {
    "jmtl_equal": _reference.jmtl_step(k, jmtl.weighting.equal(), dtype=dtype),
    "jmtl_uncertainty": _reference.jmtl_step(k, jmtl.weighting.uncertainty(), dtype=dtype),
    "loop_jax": _reference.loop_step(k, dtype=dtype),
    "fused_jax": _reference.fused_step(k, dtype=dtype),
  }
  evals = {"jmtl_eval": _reference.jmtl_eval(k, dtype=dtype), "fused_eval": _reference.fused_eval(k, dtype=dtype)}
  timed, med = _timing.measure(
    steps, batch, batch_size=BATCH, steps_per_repeat=steps_per_repeat, repeats=repeats, evals=evals
  )
  fastest = min(("loop_jax", "fused_jax"), key=med.__getitem__)
  ratio = lambda a, b: round(med[a] / med[b], 3)
  row = {"K": k, "batch": BATCH, **timed, "fastest_reference": fastest}
  row["ratio_jmtl_over_fastest"] = ratio("jmtl_equal", fastest)
  row["ratio_jmtl_over_loop"] = ratio("jmtl_equal", "loop_jax")
  row["ratio_jmtl_over_fused"] = ratio("jmtl_equal", "fused_jax")
  row["ratio_uncertainty_over_fused"] = ratio("jmtl_uncertainty", "fused_jax")
  row["ratio_uncertainty_over_fastest"] = ratio("jmtl_uncertainty", fastest)
  row["ratio_eval_jmtl_over_fused"] = ratio("jmtl_eval", "fused_eval")
  if "peak_bytes" in timed["jmtl_equal"] and "peak_bytes" in timed["fused_jax"]:
    row["peak_memory_ratio_jmtl_over_fused"] = round(
      timed["jmtl_equal"]["peak_bytes"] / timed["fused_jax"]["peak_bytes"], 3
    )
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--dtype", choices=list(_reference.DTYPES), default="float32", help="compute dtype")
  args = ap.parse_args()
  dtype = _reference.DTYPES[args.dtype]
  rows = [measure_k(k, dtype=dtype, steps_per_repeat=args.steps, repeats=args.repeats) for k in args.tasks]
  out = {"benchmark": "step_time", "dtype": args.dtype, **_timing.environment(), "results": rows}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
