"""Honest timing of compiled steps: compile first, block on results, median of repeats."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time

import jax


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


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(steps: dict, batch, *, batch_size: int, steps_per_repeat: int, repeats: int) -> tuple[dict, dict]:
  """Compiles and times ``steps`` (name -> ``(jitted step, state)``) on one batch, interleaved.

  Returns ``(rows, median seconds)``: ``rows[name]`` holds ``step_ms``,
  ``examples_per_s``, ``compile_s`` and XLA's memory analysis.
  """
  runners, info = {}, {}
  for name, (step, state) in steps.items():
    compiled, compile_s, mem = compile_step(step, state, batch)
    runners[name] = looper(compiled, state, batch)
    info[name] = {"compile_s": round(compile_s, 3), **mem}
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
