"""Step time of the jmtl ``equal`` step against a hand-written JAX step of the same math.

Reference workload: MLP trunk 784→512→512 (ReLU), K linear heads 512→10,
softmax cross-entropy, batch 256, SGD. Prints one JSON object.

    python benchmarks/step_time.py [--tasks 2 10 40] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmtl
from benchmarks import _timing

BATCH, IN, HIDDEN, CLASSES = 256, 784, 512, 10


def reference_batch(k, seed=0):
  r = np.random.default_rng(seed)
  return {
    "inputs": jnp.asarray(r.normal(size=(BATCH, IN)), jnp.float32),
    "labels": {f"t{i}": jnp.asarray(r.integers(0, CLASSES, BATCH), jnp.int32) for i in range(k)},
  }


def jmtl_step(k, weighting=None):
  names = [f"t{i}" for i in range(k)]
  model = jmtl.models.mlp(dict.fromkeys(names, CLASSES), hidden=(HIDDEN, HIDDEN))
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in names]
  params = model.init(jax.random.key(0), jnp.zeros((1, IN)))
  state = jmtl.TrainState.create(
    params=params, tx=optax.sgd(1e-2), weighting=weighting, num_tasks=k, rng=jax.random.key(1)
  )
  return jmtl.parallel.jit(jmtl.make_train_step(model, tasks)), state


def bare_step(k):
  """The same model and update written directly in JAX: the bar jmtl must meet."""
  keys = jax.random.split(jax.random.key(0), 4)
  glorot = jax.nn.initializers.lecun_normal()
  params = {
    "w1": glorot(keys[0], (IN, HIDDEN)),
    "b1": jnp.zeros(HIDDEN),
    "w2": glorot(keys[1], (HIDDEN, HIDDEN)),
    "b2": jnp.zeros(HIDDEN),
    "wh": glorot(keys[2], (k, HIDDEN, CLASSES)),
    "bh": jnp.zeros((k, CLASSES)),
  }
  opt = optax.sgd(1e-2)

  def loss(p, x, ys):
    h = jax.nn.relu(jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])
    total = 0.0
    for i in range(k):
      logits = h @ p["wh"][i] + p["bh"][i]
      total += -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ys[i][:, None], 1))
    return total

  def step(state, batch):
    p, o = state
    ys = [batch["labels"][f"t{i}"] for i in range(k)]
    value, g = jax.value_and_grad(loss)(p, batch["inputs"], ys)
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), value

  return jax.jit(step, donate_argnums=0), (params, opt.init(params))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()
  rows = []
  for k in args.tasks:
    batch = reference_batch(k)
    steps = {"jmtl_equal": jmtl_step(k), "bare_jax": bare_step(k)}
    timed, med = _timing.measure(steps, batch, batch_size=BATCH, steps_per_repeat=args.steps, repeats=args.repeats)
    row = {"K": k, "batch": BATCH, **timed}
    row["ratio_jmtl_over_bare"] = round(med["jmtl_equal"] / med["bare_jax"], 3)
    rows.append(row)
  print(json.dumps({"benchmark": "step_time", **_timing.environment(), "results": rows}, indent=1))


if __name__ == "__main__":
  main()
