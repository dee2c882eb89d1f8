"""Step time of every weighting method on the default MultiDigits model, against a bare JAX step.

The model of ``configs/multi_digits.py`` (the CNN, images 16×16×1, tasks
``left``/``right`` with 10 classes, batch 64, Adam); for each name of
``jmtl.weighting.methods()`` defined at K = 2 the jmtl step the runner builds
(``--config.weighting=NAME``), and the bare step of
:mod:`benchmarks.architectures` (``value_and_grad`` of the summed
cross-entropies and the optax update). Every batch carries a
``"validation"`` batch (Auto-λ reads it; the others ignore it). All steps are
timed in one interleaved run. Prints one JSON object.

    PYTHONPATH=. python -m benchmarks.methods [--methods equal mgda ...] [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import json

import optax

import jmtl
from benchmarks import _timing
from benchmarks.architectures import BATCH
from benchmarks.architectures import CLASSES
from benchmarks.architectures import NAMES
from benchmarks.architectures import bare_step
from benchmarks.architectures import jmtl_step
from benchmarks.architectures import make_batch
from jmtl.configs import multi_digits
from jmtl.run import registry

UNDEFINED_AT_K2 = ("krum", "trimmed_mean")  # need K ≥ 3


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--methods", nargs="+", default=[m for m in jmtl.weighting.methods() if m not in UNDEFINED_AT_K2])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=10)
  args = ap.parse_args()
  batch = {**make_batch(), "validation": make_batch(seed=1)}
  tasks = [jmtl.Task(n, jmtl.losses.softmax_cross_entropy) for n in NAMES]
  opt = optax.adam(1e-3)
  config = multi_digits.get_config()
  model = registry.make_model(config, dict.fromkeys(NAMES, CLASSES))
  steps = {"bare_jax": bare_step(config, model, opt, batch)}
  for name in args.methods:
    c = multi_digits.get_config()
    c.static_weights = (1.0, 1.0)  # what `static` is timed with (its step is equal's)
    steps[name] = jmtl_step(c, model, tasks, opt, batch, method=name)
  timed, med = _timing.measure(steps, batch, batch_size=BATCH, steps_per_repeat=args.steps, repeats=args.repeats)
  ratios = {name: round(med[name] / med["bare_jax"], 3) for name in args.methods}
  out = {"benchmark": "methods", "model": config.model.name, "batch": BATCH, **_timing.environment()}
  print(json.dumps({**out, "ratio_over_bare": ratios, "results": timed}, indent=1))


if __name__ == "__main__":
  main()
