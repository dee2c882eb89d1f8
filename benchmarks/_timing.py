"""Honest timing of compiled steps: compile first, block on results, median of repeats."""

from __future__ import annotations

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
