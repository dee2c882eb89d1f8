"""An ensemble of M members in one vmapped step against M times one member's step (jmtl.cotrain).

The model of ``configs/multi_digits.py`` (the CNN, images 16×16×1, tasks
``left``/``right`` with 10 classes, batch 64, Adam) and a weighting
(``--weighting``, default ``equal``; ``upgrad`` takes the Gramian route).
Three steps are timed in one interleaved run (:func:`benchmarks._timing.measure`):
``one`` (one member's jmtl step), ``ensemble`` (``jax.vmap`` of that step over
M members, :func:`jmtl.cotrain.make_ensemble_step`), ``ensemble_unroll`` (the same
members one after the other in one program, ``loop="unroll"``) and, with ``--mutual``,
``mutual`` (deep mutual learning, :func:`jmtl.cotrain.make_mutual_step`).
The ratio ``ensemble / (M × one)`` is the issue's criterion (≤ 1.1). Prints one
JSON object; ``--out FILE`` also writes it.

    PYTHONPATH=. python -m benchmarks.ensemble [--members 4] [--weighting equal] [--mutual] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import jax
import optax

import jmtl
from benchmarks import _timing
from benchmarks.architectures import BATCH
from benchmarks.architectures import CLASSES
from benchmarks.architectures import NAMES
from benchmarks.architectures import make_batch
from configs import multi_digits
from jmtl.run import registry


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--members", type=int, default=4)
  ap.add_argument("--weighting", default="equal")
  ap.add_argument("--mutual", action="store_true", help="also time deep mutual learning (beta=0.5)")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  config = multi_digits.get_config()
  config.weighting = args.weighting
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
    mutual = jmtl.cotrain.make_mutual_step(model, tasks, beta=0.5)
    steps["mutual"] = (jmtl.parallel.jit(mutual), jax.tree.map(lambda a: a.copy(), members))
  rows, med = _timing.measure(steps, batch, batch_size=BATCH, steps_per_repeat=args.steps, repeats=args.repeats)
  out = {
    "benchmark": "ensemble",
    "model": "cnn (configs/multi_digits.py)",
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
