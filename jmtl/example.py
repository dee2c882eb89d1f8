"""Train a hard-sharing MLP on a synthetic 3-task set and compare with single-task models.

Run ``python -m jmtl.example`` (``--help`` for options). It prints per-task test
accuracy of the multi-task model and of one single-task model per task trained
with the same budget, Δm% and the negative-transfer flags. It is the main job
until the experiment runner (``jmtl train``) lands.
"""

from __future__ import annotations

import argparse
import time

import jax
import optax

import jmtl
from jmtl import losses
from jmtl import metrics
from jmtl import models
from jmtl.data import synthetic

WEIGHTINGS = {
  "equal": lambda k: jmtl.weighting.equal(),
  "uncertainty": lambda k: jmtl.weighting.uncertainty(),
  "dwa": lambda k: jmtl.weighting.dwa(),
  "rlw": lambda k: jmtl.weighting.rlw(),
  "gls": lambda k: jmtl.weighting.gls(),
  "famo": lambda k: jmtl.weighting.famo(),
  "imtl_l": lambda k: jmtl.weighting.imtl_l(),
}


def train(task_names, data, test, *, weighting, steps, batch_size, lr, seed, hidden):
  """Trains one hard-sharing model on ``task_names``; returns its test metrics and the time per step."""
  tasks = [jmtl.Task(n, losses.softmax_cross_entropy, {"acc": metrics.accuracy()}) for n in task_names]
  num_classes = int(max(data["labels"][n].max() for n in task_names)) + 1
  model = models.mlp(dict.fromkeys(task_names, num_classes), hidden=hidden)
  params = model.init(jax.random.key(seed), data["inputs"][:1])
  opt = optax.adam(lr)
  state = jmtl.TrainState.create(params, opt, weighting, len(tasks), jax.random.key(seed + 1))
  step = jmtl.parallel.jit(jmtl.make_train_step(model, tasks, opt, weighting))
  sub = {"inputs": data["inputs"], "labels": {n: data["labels"][n] for n in task_names}}
  done, epoch, t0 = 0, 0, None
  while done < steps:
    for batch in synthetic.batches(sub, batch_size, seed=seed, epoch=epoch):
      state, m = step(state, batch)
      done += 1
      if done == 1:
        jax.block_until_ready(m)
        t0 = time.perf_counter()
      if done == steps:
        break
    epoch += 1
  jax.block_until_ready(state)
  per_step = (time.perf_counter() - t0) / max(steps - 1, 1)
  ev = jax.jit(jmtl.make_eval_step(model, tasks))
  test_sub = {"inputs": test["inputs"], "labels": {n: test["labels"][n] for n in task_names}}
  result = jmtl.evaluate(ev, state.params, synthetic.batches(test_sub, 1000, seed=0, drop_remainder=False), tasks)
  return result, per_step, int(state.num_skipped)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--weighting", default="equal", choices=sorted(WEIGHTINGS))
  p.add_argument("--tasks", type=int, default=3)
  p.add_argument("--relatedness", type=float, default=0.8)
  p.add_argument("--train-size", type=int, default=4000)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  kw = dict(num_tasks=args.tasks, relatedness=args.relatedness, num_classes=4, label_noise=0.05, seed=args.seed)
  data = synthetic.make_tasks(args.train_size, split_seed=0, **kw)
  test = synthetic.make_tasks(10_000, split_seed=1, **kw)
  names = sorted(data["labels"])
  common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, hidden=(128, 128))
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}; {len(names)} tasks, relatedness "
    f"{args.relatedness}, {args.train_size} training examples, {args.steps} steps"
  )

  mtl, per_step, skipped = train(names, data, test, weighting=WEIGHTINGS[args.weighting](len(names)), **common)
  single = {}
  for n in names:
    r, _, _ = train([n], data, test, weighting=jmtl.weighting.equal(), **common)
    single[f"{n}/acc"] = r[f"{n}/acc"]
  keys = [f"{n}/acc" for n in names]
  mt = {k: mtl[k] for k in keys}
  higher = dict.fromkeys(keys, True)
  dm = metrics.delta_m(mt, single, higher)
  neg = metrics.negative_transfer(mt, single, higher)

  print(f"\n{'task':<10}{'single-task acc':>17}{f'MTL ({args.weighting}) acc':>22}{'negative transfer':>20}")
  for n, k in zip(names, keys):
    print(f"{n:<10}{single[k]:>17.4f}{mt[k]:>22.4f}{'yes' if neg[k] else 'no':>20}")
  print(f"\nΔm% = {dm:+.2f}   (MTL step {1e3 * per_step:.2f} ms, {skipped} non-finite steps skipped)")
  return dm


if __name__ == "__main__":
  main()
