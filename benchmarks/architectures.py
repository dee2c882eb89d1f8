"""Step time of every architecture on MultiDigits-shaped batches: jmtl steps against a bare JAX step.

For each model of ``jmtl.run.registry.model_constructors()`` built from the config groups of
``configs/multi_digits.py`` (images 16×16×1, tasks ``left``/``right`` with 10
classes, batch 64, Adam): the jmtl ``equal`` step, the jmtl ``mgda`` step
(parameter level: the fast separable path where the model has ``encode``/``head``,
the general path otherwise), and a bare step written directly in JAX on the same
``apply`` -- ``value_and_grad`` of the summed cross-entropies, the optax update,
nothing else (for a batch-norm model it also threads the statistics). Prints one
JSON object.

    python -m benchmarks.architectures [--models cnn mmoe ...] [--repeats 5] [--steps 10]
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
from jmtl.configs import multi_digits
from jmtl.run import registry

BATCH, NAMES, CLASSES = 64, ("left", "right"), 10


def make_batch(seed=0):
  r = np.random.default_rng(seed)
  return {
    "inputs": jnp.asarray(r.uniform(size=(BATCH, 16, 16, 1)), jnp.float32),
    "labels": {n: jnp.asarray(r.integers(0, CLASSES, BATCH), jnp.int32) for n in NAMES},
  }


def jmtl_step(config, model, tasks, opt, batch, *, method):
  config.weighting = method
  w = registry.make_weighting(config, len(NAMES))
  state = jmtl.TrainState.from_model(model, batch["inputs"], tx=opt, weighting=w, rng=jax.random.key(config.seed))
  return jmtl.parallel.jit(jmtl.make_train_step(model, tasks)), state


def bare_step(config, model, opt, batch):
  """The same model's update written directly: ∇ Σ_t CE_t, optax, (batch statistics)."""
  state = jmtl.TrainState.from_model(model, batch["inputs"], tx=opt, rng=jax.random.key(config.seed))
  params, mstate = state.params, state.model_state

  def loss(p, ms, x, labels):
    preds, new = model.apply(p, x, ms, train=True)
    total = sum(optax.softmax_cross_entropy_with_integer_labels(preds[n], labels[n]).mean() for n in NAMES)
    return total, new

  def step(carry, b):
    p, o, ms = carry
    (value, ms), g = jax.value_and_grad(loss, has_aux=True)(p, ms, b["inputs"], b["labels"])
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o, ms), value

  return jax.jit(step, donate_argnums=0), (params, opt.init(params), mstate)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument(
    "--models", nargs="+", default=[m for m in registry.model_constructors() if m not in ("soft_mlp", "schnet")]
  )
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=10)
  args = ap.parse_args()
  batch = make_batch()
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in NAMES]
  opt = optax.adam(1e-3)
  rows = []
  for name in args.models:
    config = multi_digits.get_config()
    config.model.name = name
    model = registry.make_model(config, dict.fromkeys(NAMES, CLASSES))
    steps = {
      "bare_jax": bare_step(config, model, opt, batch),
      "jmtl_equal": jmtl_step(config, model, tasks, opt, batch, method="equal"),
      "jmtl_mgda": jmtl_step(config, model, tasks, opt, batch, method="mgda"),
    }
    timed, med = _timing.measure(steps, batch, batch_size=BATCH, steps_per_repeat=args.steps, repeats=args.repeats)
    row = {"model": name, "separable": model.encode is not None, "stateful": model.stateful, **timed}
    row["ratio_equal_over_bare"] = round(med["jmtl_equal"] / med["bare_jax"], 3)
    row["ratio_mgda_over_equal"] = round(med["jmtl_mgda"] / med["jmtl_equal"], 3)
    rows.append(row)
    print(json.dumps({k: row[k] for k in ("model", "ratio_equal_over_bare", "ratio_mgda_over_equal")}), flush=True)
  print(json.dumps({"benchmark": "architectures", "batch": BATCH, **_timing.environment(), "results": rows}, indent=1))


if __name__ == "__main__":
  main()
