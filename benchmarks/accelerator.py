"""The reference workload on whatever ``jax.devices()[0]`` is: step time, memory, FLOPs and fraction of peak.

Workload (``benchmarks._reference``, as ``step_time``): MLP 784→512→512
(ReLU), K linear heads 512→10, softmax cross-entropy, batch 256, SGD. For each
K it times, interleaved in one run (median of repeats, after compilation,
blocking on results):

* ``fused_jax`` -- the hand-written JAX step (stacked heads, one ``einsum``,
  one vectorised cross-entropy);
* ``jmtl_equal`` -- the jmtl ``equal`` step;
* with ``--methods upgrad mgda``, ``jmtl_upgrad`` / ``jmtl_mgda`` at
  parameter level.

Prints one JSON object: the device's ``platform`` and ``device_kind``, the
``dtype`` (``--dtype bfloat16``: the compute dtype of every step; parameters,
losses and updates stay float32), the peak FLOP rate used and where it comes
from (``peak_source``), and per row ``step_ms``, ``examples_per_s``,
``peak_bytes`` (XLA's estimate: arguments + outputs + temps − aliased),
``device_peak_bytes_in_use`` (``device.memory_stats()``, when the backend
offers it; the process-wide high-water mark read after the row's first
steps, so it includes every row before it), ``flops`` (XLA's cost analysis),
``fraction_of_peak`` and ``ratio_to_fused``.

The peak rate is, in order: ``--peak-tflops X``; the device's entry in
``PEAKS`` (vendors' published dense peaks) for the compute dtype -- for
float32 at JAX's default matmul precision, the TF32 rate on GPUs that have
one and the bf16 rate on TPU, since that is how XLA runs float32 matmuls
there (``fraction_of_fp32_peak`` gives the strict-fp32 figure too); else
(CPU, unknown devices) the measured rate of an n×n matmul in the compute
dtype, as ``benchmarks.gradient_step`` measures it.

    python -m benchmarks.accelerator [--tasks 2 10 40] [--methods equal upgrad mgda] [--dtype bfloat16]
        [--peak-tflops X] [--repeats 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import re

import jax

import jmtl
from benchmarks import _reference
from benchmarks import _timing
from benchmarks._reference import BATCH
from benchmarks._reference import reference_batch

METHODS = {"equal": jmtl.weighting.equal, "upgrad": jmtl.weighting.upgrad, "mgda": jmtl.weighting.mgda}
FUSED = "fused_jax"

# Vendors' published dense (no structured sparsity) peak rates, TFLOP/s per device,
# matched against ``device_kind`` (lower-case regex; the first match wins).
# "half" is the bf16 rate where the device has bf16 matrix units; on V100 and T4
# (no bf16 tensor cores) it is the fp16 rate, an upper bound for bf16 there.
# ``None``: no entry (a device a broader pattern below would misname).
PEAKS = [
  (r"h100 nvl", None),
  (r"h100.*pcie", {"name": "H100 PCIe", "half": 756.0, "tf32": 378.0, "fp32": 51.0}),
  (r"h100", {"name": "H100 SXM", "half": 989.0, "tf32": 495.0, "fp32": 67.0}),
  (r"a100", {"name": "A100", "half": 312.0, "tf32": 156.0, "fp32": 19.5}),
  (r"v100", {"name": "V100", "half": 125.0, "half_type": "fp16", "fp32": 15.7}),
  (r"\bt4\b", {"name": "T4", "half": 65.0, "half_type": "fp16", "fp32": 8.1}),
  (r"\bl4\b", {"name": "L4", "half": 121.0, "tf32": 60.0, "fp32": 30.3}),
  (r"tpu v4 lite", None),
  (r"tpu v4", {"name": "TPU v4", "half": 275.0}),
  (r"tpu v5 lite|tpu v5e", {"name": "TPU v5e", "half": 197.0}),
  (r"tpu v5p?$", {"name": "TPU v5p", "half": 459.0}),
  (r"tpu v6 lite|tpu v6e", {"name": "TPU v6e", "half": 918.0}),
]


def table_entry(device_kind: str) -> dict | None:
  kind = device_kind.lower().strip()
  for pattern, entry in PEAKS:
    if re.search(pattern, kind):
      return entry
  return None


def peak_rate(device, dtype_name: str, override_tflops: float | None) -> tuple[float, str, float | None]:
  """``(peak FLOP/s, where it comes from, strict-fp32 peak FLOP/s or None)`` for ``device`` at ``dtype_name``."""
  entry = table_entry(device.device_kind)
  fp32 = 1e12 * entry["fp32"] if entry and "fp32" in entry else None
  if override_tflops is not None:
    return 1e12 * override_tflops, "--peak-tflops", fp32
  if entry is not None:
    if dtype_name == "bfloat16":
      return 1e12 * entry["half"], f"table: {entry['name']} {entry.get('half_type', 'bf16')}", fp32
    strict = jax.config.jax_default_matmul_precision in {"highest", "float32"}
    if device.platform == "tpu" and not strict:  # float32 matmuls run as bf16 passes at default precision
      return 1e12 * entry["half"], f"table: {entry['name']} bf16 (default matmul precision)", fp32
    if "tf32" in entry and not strict:  # float32 matmuls run in TF32 at default precision
      return 1e12 * entry["tf32"], f"table: {entry['name']} tf32 (default matmul precision)", fp32
    if fp32 is not None:
      return fp32, f"table: {entry['name']} fp32", fp32
  n = 2048 if device.platform == "cpu" else 8192
  rate = _timing.matmul_rate(n, dtype=_reference.DTYPES[dtype_name])
  return rate, f"measured: {n}x{n} {dtype_name} matmul", fp32


def device_peak_bytes(device) -> int | None:
  stats = device.memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure_k(k, *, methods, dtype, peak, fp32_peak, steps_per_repeat, repeats) -> dict:
  """One result row at K tasks: the fused reference and the jmtl steps of ``methods``, interleaved.

  ``peak`` (FLOP/s) gives ``fraction_of_peak``; ``fp32_peak``, when not ``None``, ``fraction_of_fp32_peak``.
  """
  device = jax.devices()[0]
  batch = reference_batch(k)
  steps = {FUSED: _reference.fused_step(k, dtype=dtype)}
  steps.update({f"jmtl_{m}": _reference.jmtl_step(k, METHODS[m](), dtype=dtype) for m in methods})
  runners, info = {}, {}
  for name, (step, state) in steps.items():
    compiled, compile_s, mem = _timing.compile_step(step, state, batch)
    runners[name] = _timing.looper(compiled, state, batch)
    runners[name](1)  # first steps of this row, so the device's high-water mark includes them
    info[name] = {
      "compile_s": round(compile_s, 3),
      "flops": _timing.flops(compiled),
      **mem,
      "device_peak_bytes_in_use": device_peak_bytes(device),
    }
  med = _timing.time_steps(runners, steps_per_repeat=steps_per_repeat, repeats=repeats)
  row = {"K": k, "batch": BATCH}
  for name in runners:
    r = {"step_ms": round(1e3 * med[name], 4), "examples_per_s": round(BATCH / med[name], 1), **info[name]}
    if r["flops"]:
      r["achieved_tflops"] = round(r["flops"] / med[name] / 1e12, 4)
      r["fraction_of_peak"] = round(r["flops"] / med[name] / peak, 4)
      if fp32_peak is not None:
        r["fraction_of_fp32_peak"] = round(r["flops"] / med[name] / fp32_peak, 4)
    r["ratio_to_fused"] = round(med[name] / med[FUSED], 3)
    if "peak_bytes" in r and "peak_bytes" in info[FUSED]:
      r["peak_memory_ratio_to_fused"] = round(r["peak_bytes"] / info[FUSED]["peak_bytes"], 3)
    row[name] = r
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
  ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["equal"], help="jmtl steps to time")
  ap.add_argument("--dtype", choices=list(_reference.DTYPES), default="float32", help="compute dtype")
  ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak rate, overriding the table")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()
  device = jax.devices()[0]
  peak, source, fp32_peak = peak_rate(device, args.dtype, args.peak_tflops)
  rows = [
    measure_k(
      k,
      methods=args.methods,
      dtype=_reference.DTYPES[args.dtype],
      peak=peak,
      fp32_peak=fp32_peak if args.dtype == "float32" else None,
      steps_per_repeat=args.steps,
      repeats=args.repeats,
    )
    for k in args.tasks
  ]
  out = {
    "benchmark": "accelerator",
    "platform": device.platform,
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "dtype": args.dtype,
    "default_matmul_precision": jax.config.jax_default_matmul_precision,
    "peak_tflops": round(peak / 1e12, 4),
    "peak_source": source,
    "fp32_peak_tflops": None if fp32_peak is None else round(fp32_peak / 1e12, 3),
    **_timing.environment(),
    "results": rows,
  }
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
