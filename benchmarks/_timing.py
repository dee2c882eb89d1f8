"""Honest timing of compiled steps: compile first, block on results, median of repeats."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp


def compile_step(step, state, batch):
  """Compiles ``step`` for these arguments; returns (compiled, seconds, memory analysis dict)."""
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  info = {}
  if mem is not None:
    info = {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "peak_bytes": int(
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
      ),
    }
  return compiled, seconds, info


def time_steps(runners: dict, *, steps_per_repeat: int = 20, repeats: int = 7) -> dict:
  """Median seconds per step of each runner, repeats interleaved so noise hits all alike.

  Args:
    runners: name -> ``run(n)``, which takes ``n`` steps and blocks on the result.
  """
  for run in runners.values():
    run(2)  # warm caches and allocator
  samples = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run(steps_per_repeat)
      samples[name].append((time.perf_counter() - t0) / steps_per_repeat)
  return {name: statistics.median(s) for name, s in samples.items()}


def looper(compiled, state, batch):
  """A ``run(n)`` closure that advances ``state`` n steps and blocks."""
  box = [state]

  def run(n):
    s = box[0]
    for _ in range(n):
      s, m = compiled(s, batch)
    jax.block_until_ready((s, m))
    box[0] = s

  return run


def evaluator(compiled, params, batch):
  """A ``run(n)`` closure that calls an eval step ``compiled(params, batch)`` n times and blocks on every result."""

  def run(n):
    jax.block_until_ready([compiled(params, batch) for _ in range(n)])

  return run


def flops(compiled) -> float | None:
  """FLOPs of a compiled step by XLA's cost analysis (``None`` when the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0)) if cost else None


def matmul_rate(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """This machine's matmul rate (FLOP/s) on an n×n product in ``dtype``, median of repeats."""
  x = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(
  steps: dict, batch, *, batch_size: int, steps_per_repeat: int, repeats: int, evals=None
) -> tuple[dict, dict]:
  """Compiles and times ``steps`` (name -> ``(jitted step, state)``) on one batch, interleaved.

  ``evals`` (name -> ``(jitted eval step, params)``) are timed in the same
  interleaved run, each call ``eval_step(params, batch)`` counting as a step.

  Returns ``(rows, median seconds)``: ``rows[name]`` holds ``step_ms``,
  ``examples_per_s``, ``compile_s``, ``flops`` (XLA's cost analysis) and
  XLA's memory analysis.
  """
  runners, info = {}, {}
  for kind, make in ((steps, looper), (evals or {}, evaluator)):
    for name, (step, state) in kind.items():
      compiled, compile_s, mem = compile_step(step, state, batch)
      runners[name] = make(compiled, state, batch)
      info[name] = {"compile_s": round(compile_s, 3), "flops": flops(compiled), **mem}
  med = time_steps(runners, steps_per_repeat=steps_per_repeat, repeats=repeats)
  rows = {
    name: {"step_ms": round(1e3 * med[name], 3), "examples_per_s": round(batch_size / med[name], 1), **info[name]}
    for name in runners
  }
  return rows, med


def environment() -> dict:
  """What a result was measured on (printed with every benchmark's JSON)."""
  return {
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "cpus": os.cpu_count(),
    "python": platform.python_version(),
    "max_rss_bytes": max_rss_bytes(),
  }
