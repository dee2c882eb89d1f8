"""The cost of measuring task relations in the train step (TAG's lookahead affinity, Fifty et al., NeurIPS 2021).

Reference workload (``benchmarks._reference``): MLP trunk 784→512→512 (ReLU),
K linear heads, softmax cross-entropy, batch 256, SGD, ``equal`` weighting.
For each K it times, interleaved on the same batch (median of repeats, after
compilation, blocking on results):

* ``plain`` -- the step without a tracker;
* ``period_1`` -- with ``jmtl.relations.tracker(every=1)``: the lookahead every step (one forward, K VJPs and K
  lookahead forwards, each set batched with ``vmap``, plus the step);
* ``period_10`` -- ``every=10``: the mean over runs of 20 steps, two of which measure;
* ``no_update`` -- ``every`` larger than the run: every timed step takes the ``lax.cond`` branch that skips the
  lookahead (the steps between two measurements).

Ratios to ``plain``: ``overhead_period_1``, ``overhead_period_10`` and ``ratio_no_update`` (1.0 means the steps
without an update cost what the plain step costs). Prints one JSON object::

    python -m benchmarks.relations [--tasks 2 10 40] [--repeats 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import json

import jax
import optax

import jmtl
from benchmarks import _reference
from benchmarks import _timing
from benchmarks._reference import BATCH
from benchmarks._reference import reference_batch

#: ``every`` of the ``no_update`` step: no timed step is a multiple of it (step 0, which is, is a warm-up step).
NEVER = 10**9


def _step(k: int, tracker):
  state = jmtl.TrainState.create(
    params=_reference.init_params(k),
    tx=optax.sgd(_reference.LEARNING_RATE),
    num_tasks=k,
    rng=jax.random.key(1),
    relations=tracker,
  )
  return jmtl.parallel.jit(jmtl.make_train_step(_reference.model(k), _reference.tasks(k))), state


def measure_k(k: int, *, steps_per_repeat: int, repeats: int) -> dict:
  """One result row: the four steps of the module docstring at K tasks, timed interleaved."""
  if steps_per_repeat % 10:
    raise ValueError(f"--steps must be a multiple of 10 (the period), got {steps_per_repeat}")
  steps = {
    "plain": _step(k, None),
    "period_1": _step(k, jmtl.relations.tracker(every=1)),
    "period_10": _step(k, jmtl.relations.tracker(every=10)),
    "no_update": _step(k, jmtl.relations.tracker(every=NEVER)),
  }
  timed, med = _timing.measure(
    steps, reference_batch(k), batch_size=BATCH, steps_per_repeat=steps_per_repeat, repeats=repeats
  )
  ratio = lambda a: round(med[a] / med["plain"], 3)
  return {
    "K": k,
    "batch": BATCH,
    **timed,
    "overhead_period_1": ratio("period_1"),
    "overhead_period_10": ratio("period_10"),
    "ratio_no_update": ratio("no_update"),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=20, help="steps per timed repeat, a multiple of 10")
  args = ap.parse_args()
  rows = [measure_k(k, steps_per_repeat=args.steps, repeats=args.repeats) for k in args.tasks]
  print(json.dumps({"benchmark": "relations", **_timing.environment(), "results": rows}, indent=1))


if __name__ == "__main__":
  main()
