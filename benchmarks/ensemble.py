"""An ensemble of M members in one step against M times one member's step (jmtl.cotrain).

A model of ``configs/multi_digits.py`` (``--model cnn``, the default: images
16×16×1; or ``mlp``; tasks ``left``/``right`` with 10 classes, batch 64, Adam)
and a weighting (``--weighting``, default ``equal``; ``upgrad`` takes the
Gramian route). ``--scheduler sequential`` sets
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` before
JAX starts, as ``jmtl train`` does for an ensemble
(:func:`jmtl.run.cotrain.sequential_cpu_scheduler`); ``default`` leaves
XLA's own scheduler, which runs the members' independent kernels at once.
Three steps are timed in one interleaved run (:func:`benchmarks._timing.measure`):
``one`` (one member's jmtl step), ``ensemble`` (``jax.vmap`` of that step over
M members, :func:`jmtl.cotrain.make_ensemble_step`), ``ensemble_unroll`` (the same
members one after the other in one program, ``loop="unroll"``) and, with ``--mutual``,
``mutual`` (deep mutual learning, :func:`jmtl.cotrain.make_mutual_step`, unrolled).
The ratio ``ensemble / (M × one)`` is the issue's criterion (≤ 1.1). Prints one
JSON object; ``--out FILE`` also writes it.

    PYTHONPATH=. python -m benchmarks.ensemble [--members 4] [--model cnn|mlp] [--weighting equal]
        [--scheduler sequential|default] [--mutual] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import optax

import jmtl
from benchmarks import _timing
from benchmarks.architectures import BATCH
from benchmarks.architectures import CLASSES
from benchmarks.architectures import NAMES
from benchmarks.architectures import make_batch
from jmtl.configs import multi_digits
from jmtl.run import cotrain as run_cotrain
from jmtl.run import registry


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--members", type=int, default=4)
  ap.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
  ap.add_argument("--scheduler", default="sequential", choices=("sequential", "default"))
  ap.add_argument("--weighting", default="equal")
  ap.add_argument("--mutual", action="store_true", help="also time deep mutual learning (beta=0.5)")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  config = multi_digits.get_config()
  config.weighting = args.weighting
  config.model.name = args.model
  config.cotrain.members = args.members
  if args.scheduler == "sequential":
    run_cotrain.sequential_cpu_scheduler(config)  # before the first computation
  model = registry.make_model(config, {n: CLASSES for n in NAMES})
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy, {"acc": jmtl.metrics.accuracy()}) for n in NAMES]
  opt = optax.adam(1e-3)
  weighting = registry.make_weighting(config, len(NAMES))
  batch = make_batch()
  train_step = jmtl.make_train_step(model, tasks)
  one = jmtl.TrainState.from_model(model, batch["inputs"], tx=opt, weighting=weighting, rng=jax.random.key(0))
  seeds = list(range(args.members))
  members = jmtl.cotrain.ensemble_state(model, batch["inputs"], seeds=seeds, tx=opt, weighting=weighting)
  steps = {
    "one": (jmtl.parallel.jit(train_step), one),
    "ensemble": (jmtl.parallel.jit(jmtl.cotrain.make_ensemble_step(train_step)), members),
    "ensemble_unroll": (
      jmtl.parallel.jit(jmtl.cotrain.make_ensemble_step(train_step, loop="unroll")),
      jax.tree.map(lambda a: a.copy(), members),
    ),
  }
  if args.mutual:
    mutual = jmtl.cotrain.make_mutual_step(model, tasks, beta=0.5, loop="unroll")
    steps["mutual"] = (jmtl.parallel.jit(mutual), jax.tree.map(lambda a: a.copy(), members))
  rows, med = _timing.measure(steps, batch, batch_size=BATCH, steps_per_repeat=args.steps, repeats=args.repeats)
  out = {
    "benchmark": "ensemble",
    "model": f"{args.model} (configs/multi_digits.py)",
    "scheduler": args.scheduler,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "weighting": args.weighting,
    "members": args.members,
    "batch": BATCH,
    "ratio_ensemble_over_m_times_one": round(med["ensemble"] / (args.members * med["one"]), 3),
    "ratio_ensemble_unroll_over_m_times_one": round(med["ensemble_unroll"] / (args.members * med["one"]), 3),
    "rows": rows,
    "environment": _timing.environment(),
  }
  if args.mutual:
    out["ratio_mutual_over_m_times_one"] = round(med["mutual"] / (args.members * med["one"]), 3)
  text = json.dumps(out, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
