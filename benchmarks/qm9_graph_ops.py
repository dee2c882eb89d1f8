"""SchNet's interactions three ways on the same parameters: dense masked pairs, all slot pairs, real pairs only.

* ``dense``: a ``(B, 29, 29, F)`` filter and an einsum over ``j`` with a mask
  (written here, on the model's parameters);
* ``all_pairs``: :func:`jmtl.models.schnet` with ``pair_budget=0``,
  ``jax.ops.segment_sum`` over every slot pair ``i ≠ j`` (padding weighed 0);
* ``compact``: :func:`jmtl.models.schnet` with ``pair_budget=0.5`` (the
  default), the real pairs compacted inside the step (``jnp.nonzero`` with a
  fixed size; ``lax.cond`` to all pairs on overflow).

All three give the same pooled representation (checked here to 1e-4).
Timing: median seconds per step of ``value_and_grad`` of a squared loss of the
predictions, compiled first, blocking, repeats interleaved. Prints one JSON
object.

    python -m benchmarks.qm9_graph_ops [--batch 32] [--features 32] [--interactions 2] [--rbf 16]

Molecules are real QM9 geometries when ``qm9pack`` is installed, else random
ones with QM9's size distribution (about 18 atoms of 29 slots).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing
from jmtl.models import graph


def molecules(batch: int, seed: int = 0) -> np.ndarray:
  """Packed ``(batch, 29, 5)`` molecules: QM9's own when available, else random of the same sizes."""
  try:
    from jmtl.data import qm9

    mols = qm9.read_molecules()
    rows = np.random.default_rng(seed).choice(len(mols["index"]), batch, replace=False)
    return qm9.pack_graph(mols["atomic_numbers"][rows], mols["positions"][rows])
  except ModuleNotFoundError:
    r = np.random.default_rng(seed)
    out = np.zeros((batch, 29, 5), np.float32)
    for b in range(batch):
      n = int(r.integers(12, 25))
      out[b, :n, 0] = r.choice([1, 6, 7, 8, 9], n, p=[0.51, 0.35, 0.06, 0.07, 0.01])
      out[b, :n, 1:4] = r.normal(size=(n, 3)) * 1.5
      out[b, :n, 4] = 1.0
    return out


def _dense(p, x):
  return x @ p["kernel"] + p["bias"] if "bias" in p else x @ p["kernel"]


def dense_trunk(trunk: graph.SchNetTrunk, params, packed):
  """The trunk's output with dense ``(B, N, N, F)`` filters and a masked einsum (same parameters)."""
  numbers, positions, mask = graph.unpack(packed)
  n = packed.shape[1]
  pair = mask[:, :, None] * mask[:, None, :] * (1.0 - jnp.eye(n))
  d2 = jnp.sum((positions[:, :, None] - positions[:, None, :]) ** 2, axis=-1)
  d = jnp.sqrt(jnp.where(pair > 0, d2, 1.0))
  weight = graph.cosine_cutoff(d, trunk.cutoff) * pair
  rbf = graph.gaussian_rbf(d, trunk.num_rbf, trunk.cutoff)
  h = params["embed"]["embedding"][jnp.clip(numbers, 0, trunk.max_atomic_number)] * mask[..., None]
  for t in range(trunk.num_interactions):
    p = params[f"interaction_{t}"]
    filt = _dense(p["filter_1"], graph.shifted_softplus(_dense(p["filter_0"], rbf))) * weight[..., None]
    conv = jnp.einsum("bijf,bjf->bif", filt, _dense(p["in2f"], h))
    h = (h + _dense(p["f2out_1"], graph.shifted_softplus(_dense(p["f2out_0"], conv)))) * mask[..., None]
  last = len(trunk.atom_features) - 1
  for t in range(len(trunk.atom_features)):
    h = _dense(params[f"atom_{t}"], h)
    if t < last:
      h = graph.shifted_softplus(h)
  phi = h * mask[..., None]
  count = jnp.sum(mask, axis=1, keepdims=True)
  total = jnp.sum(phi, axis=1)
  return jnp.concatenate([trunk.pool_scale * total, total / jnp.maximum(count, 1.0), trunk.pool_scale * count], -1)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--features", type=int, default=32)
  ap.add_argument("--interactions", type=int, default=2)
  ap.add_argument("--rbf", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args(argv)
  packed = jnp.asarray(molecules(args.batch))
  sizes = dict(features=args.features, num_interactions=args.interactions, num_rbf=args.rbf)
  models = {
    name: graph.schnet({"u0": 1, "homo": 1}, **sizes, atom_features=(args.features,), pair_budget=budget)
    for name, budget in (("all_pairs", 0.0), ("compact", 0.5))
  }
  params = models["compact"].init(jax.random.key(0), packed)
  trunk = graph.SchNetTrunk(**sizes, atom_features=(args.features,))
  heads = models["compact"]

  def dense_apply(p, x):
    z = dense_trunk(trunk, p["shared"], x)
    return {t: heads.head(t, p["tasks"][t], z) for t in ("u0", "homo")}

  applies = {"dense": dense_apply, **{n: (lambda p, x, m=m: m.apply(p, x, {})[0]) for n, m in models.items()}}
  reference = dense_trunk(trunk, params["shared"], packed)
  diffs = {}
  for name, m in models.items():
    z, _ = m.encode(params["shared"], packed, {})
    diffs[name] = float(jnp.max(jnp.abs(z - reference)))
    np.testing.assert_allclose(np.asarray(z), np.asarray(reference), rtol=1e-4, atol=1e-4)
  results, runners = {}, {}
  for name, apply in applies.items():
    loss = lambda p, x, apply=apply: sum(jnp.sum(v**2) for v in apply(p, x).values())
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, packed).compile()
    results[f"{name}_compile_s"] = round(time.perf_counter() - t0, 3)

    def run(n, compiled=compiled):
      out = None
      for _ in range(n):
        out = compiled(params, packed)
      jax.block_until_ready(out)

    runners[name] = run
  times = _timing.time_steps(runners, steps_per_repeat=args.steps, repeats=args.repeats)
  mask = np.asarray(packed[..., 4])
  atoms = mask.sum(1)
  print(
    json.dumps(
      {
        "benchmark": "qm9_graph_ops",
        "batch": args.batch,
        **sizes,
        "slot_pairs": int(args.batch * 29 * 28),
        "real_pairs": int((atoms * (atoms - 1)).sum()),
        **{f"{n}_ms_per_step": round(1e3 * t, 2) for n, t in times.items()},
        **results,
        "max_abs_diff_vs_dense": diffs,
        "devices": str(jax.devices()),
      }
    )
  )


if __name__ == "__main__":
  main()
