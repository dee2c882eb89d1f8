"""Steps of Gramian-based weightings against the jmtl ``equal`` step, in one run.

Reference workload (same as ``step_time``): MLP 784→512→512 (ReLU), K linear
heads 512→10, softmax cross-entropy, batch 256, SGD. For each K it times:

* ``equal`` -- the loss-level baseline;
* ``mgda_representation`` -- MGDA on the Gramian of ``∂L/∂z`` (MGDA-UB);
* ``upgrad``, ``mgda``, ``pcgrad`` at parameter level (the Gramian of the
  shared-parameter gradients, by the Dense-layer identity, no Jacobian);

and, in the same interleaved run, ``fused_jax``: the hand-written JAX step of
the ``equal`` math for K same-shaped heads (stacked head kernels, one
``einsum``, one vectorised cross-entropy; ``benchmarks._reference``). It
prints JSON with the median step time, examples/s, XLA's peak-memory
estimate of each compiled step (``peak_bytes``: arguments + outputs + temps
− aliased, ``peak_memory_ratio_to_equal`` and ``peak_memory_ratio_to_fused``),
the step's FLOPs (XLA cost analysis), the fraction of this machine's measured
matmul rate it reaches (measured in the compute dtype), and every row's
``ratio_to_equal`` and ``ratio_to_fused``.

``--dtype bfloat16`` sets the compute dtype of every step (the jmtl model's
``dtype=``; the hand-written step casts inputs and kernels inside the step);
parameters, losses and updates stay float32.

``--chunk-size C`` passes ``chunk_size=C`` to every step: at parameter level,
when C < K, the Dense-layer Gramian is then taken one layer at a time, C
tasks per trunk VJP (bounded memory); each row's ``chunked`` says whether
that happened (C ≥ K is the unchunked route). XLA's cost analysis counts a
loop body once, so a chunked step's FLOPs are those of the same step
unchunked (the same math).

    python -m benchmarks.gradient_step [--tasks 2 10 40] [--chunk-size 10] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os

import jax

import jmtl
from benchmarks import _reference
from benchmarks import _timing
from benchmarks._reference import BATCH
from benchmarks._reference import reference_batch

METHODS = {
  "equal": (jmtl.weighting.equal, {}),
  "mgda_representation": (jmtl.weighting.mgda, {"level": "representation"}),
  "upgrad": (jmtl.weighting.upgrad, {}),
  "mgda": (jmtl.weighting.mgda, {}),
  "pcgrad": (jmtl.weighting.pcgrad, {}),
}
FUSED = "fused_jax"  # the hand-written equal step (benchmarks._reference.fused_step)


def build(k, method, *, dtype=_reference.DTYPES["float32"], **extra):
  """The jitted jmtl step of ``method`` at K tasks, and its state."""
  factory, options = METHODS[method]
  return _reference.jmtl_step(k, factory(), dtype=dtype, **options, **extra)


def ratios(r: dict, name: str, med: dict, info: dict, *, ref: str, suffix: str) -> None:
  """Adds row ``r``'s step-time and peak-memory ratios to row ``ref`` (``None`` when ``ref`` was not measured)."""
  r[f"ratio_to_{suffix}"] = round(med[name] / med[ref], 2) if ref in med else None
  if "peak_bytes" in r and "peak_bytes" in info.get(ref, {}):
    r[f"peak_memory_ratio_to_{suffix}"] = round(r["peak_bytes"] / info[ref]["peak_bytes"], 2)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
  ap.add_argument("--methods", nargs="+", default=list(METHODS))
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--chunk-size", type=int, default=None)
  ap.add_argument("--dtype", choices=list(_reference.DTYPES), default="float32", help="compute dtype")
  args = ap.parse_args()
  dtype = _reference.DTYPES[args.dtype]
  rate = _timing.matmul_rate(dtype=dtype)
  rows = []
  for k in args.tasks:
    batch = reference_batch(k)
    chunked = args.chunk_size is not None and args.chunk_size < k
    step, state = _reference.fused_step(k, dtype=dtype)
    compiled, compile_s, mem = _timing.compile_step(step, state, batch)
    runners = {FUSED: _timing.looper(compiled, state, batch)}
    info = {FUSED: {"compile_s": round(compile_s, 2), "flops": _timing.flops(compiled), **mem}}
    for method in args.methods:
      step, state = build(k, method, dtype=dtype, chunk_size=args.chunk_size)
      compiled, compile_s, mem = _timing.compile_step(step, state, batch)
      # XLA's cost analysis counts a loop body once: a chunked step's FLOPs are those of the same math unchunked.
      unchunked = _timing.compile_step(*build(k, method, dtype=dtype), batch)[0] if chunked else compiled
      runners[method] = _timing.looper(compiled, state, batch)
      info[method] = {"compile_s": round(compile_s, 2), "flops": _timing.flops(unchunked), **mem}
    med = _timing.time_steps(runners, steps_per_repeat=args.steps, repeats=args.repeats)
    row = {"K": k, "batch": BATCH, "chunked": chunked}
    for name in runners:
      r = {"step_ms": round(1e3 * med[name], 2), "examples_per_s": round(BATCH / med[name], 1), **info[name]}
      if r["flops"]:
        r["fraction_of_matmul_rate"] = round(r["flops"] / med[name] / rate, 3)
      ratios(r, name, med, info, ref="equal", suffix="equal")
      ratios(r, name, med, info, ref=FUSED, suffix="fused")
      row[name] = r
    rows.append(row)
  print(
    json.dumps(
      {
        "benchmark": "gradient_step",
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(),
        "dtype": args.dtype,
        "matmul_gflops": round(rate / 1e9, 1),
        "chunk_size": args.chunk_size,
        "results": rows,
      },
      indent=1,
    )
  )


if __name__ == "__main__":
  main()
