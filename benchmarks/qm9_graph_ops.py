"""SchNet's interactions as dense masked pairs (jmtl.models.schnet) or as segment sums over an edge list.

Both compute the same pooled representation from the same parameters (checked
here to 1e-4): the dense form runs every interaction over all ``N × N`` slot
pairs of the packed ``(B, 29, 5)`` input with a mask; the edge form gathers the
real pairs ``i ≠ j`` (both atoms present) of the batch into a list padded to a
fixed length (so that it compiles once), runs the filter network on those
only and scatters the messages with ``jax.ops.segment_sum``. The edge list is
built on the host with NumPy for each batch (its time is reported apart).
Timing: median seconds per step of ``value_and_grad`` of a squared loss of the
pooled representation, compiled first, blocking, repeats interleaved. Prints
one JSON object.

    python -m benchmarks.qm9_graph_ops [--batch 32] [--features 64] [--interactions 2] [--rbf 16]

Molecules are real QM9 geometries when ``qm9pack`` is installed (the first
``batch`` molecules of the CSVs), else random ones with QM9's size
distribution (about 18 atoms of 29 slots).
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


def edge_list(packed: np.ndarray, budget: int) -> dict[str, np.ndarray]:
  """The real pairs ``i ≠ j`` of a batch as flat atom indices, padded with weight-0 edges to ``budget``."""
  n = packed.shape[1]
  mask = packed[..., 4] > 0
  pair = mask[:, :, None] & mask[:, None, :] & ~np.eye(n, dtype=bool)
  b, i, j = np.nonzero(pair)
  if len(b) > budget:
    raise ValueError(f"edge_list: {len(b)} pairs exceed the budget {budget}")
  pad = budget - len(b)
  dst = np.concatenate([b * n + i, np.zeros(pad, np.int64)]).astype(np.int32)
  src = np.concatenate([b * n + j, np.zeros(pad, np.int64)]).astype(np.int32)
  valid = np.concatenate([np.ones(len(b)), np.zeros(pad)]).astype(np.float32)
  return {"dst": dst, "src": src, "valid": valid}


def _dense(p, x):
  return x @ p["kernel"] + p["bias"] if "bias" in p else x @ p["kernel"]


def edge_trunk(trunk: graph.SchNetTrunk, params, packed, edges):
  """The trunk's output computed with segment sums over ``edges`` (same parameters as the dense trunk)."""
  numbers, positions, mask = graph.unpack(packed)
  bsz, n = packed.shape[:2]
  flat_pos = positions.reshape(-1, 3)
  d2 = jnp.sum((flat_pos[edges["dst"]] - flat_pos[edges["src"]]) ** 2, axis=-1)
  d = jnp.sqrt(jnp.where(edges["valid"] > 0, d2, 1.0))
  weight = graph.cosine_cutoff(d, trunk.cutoff) * edges["valid"]
  rbf = graph.gaussian_rbf(d, trunk.num_rbf, trunk.cutoff)
  atom_mask = mask.reshape(-1, 1)
  h = params["embed"]["embedding"][jnp.clip(numbers, 0, trunk.max_atomic_number).reshape(-1)] * atom_mask
  for t in range(trunk.num_interactions):
    p = params[f"interaction_{t}"]
    filt = _dense(p["filter_1"], graph.shifted_softplus(_dense(p["filter_0"], rbf))) * weight[:, None]
    x = _dense(p["in2f"], h)
    conv = jax.ops.segment_sum(filt * x[edges["src"]], edges["dst"], num_segments=bsz * n)
    h = (h + _dense(p["f2out_1"], graph.shifted_softplus(_dense(p["f2out_0"], conv)))) * atom_mask
  last = len(trunk.atom_features) - 1
  for t in range(len(trunk.atom_features)):
    h = _dense(params[f"atom_{t}"], h)
    if t < last:
      h = graph.shifted_softplus(h)
  phi = (h * atom_mask).reshape(bsz, n, -1)
  count = jnp.sum(mask, axis=1, keepdims=True)
  total = jnp.sum(phi, axis=1)
  return jnp.concatenate([trunk.pool_scale * total, total / jnp.maximum(count, 1.0), trunk.pool_scale * count], -1)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--features", type=int, default=64)
  ap.add_argument("--interactions", type=int, default=2)
  ap.add_argument("--rbf", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args(argv)
  packed_np = molecules(args.batch)
  budget = args.batch * 29 * 28 // 2  # half of all slot pairs: QM9's real pairs are ~40 %
  t0 = time.perf_counter()
  edges_np = edge_list(packed_np, budget)
  host_edges_s = time.perf_counter() - t0
  trunk = graph.SchNetTrunk(
    features=args.features,
    num_interactions=args.interactions,
    num_rbf=args.rbf,
    atom_features=(args.features,),
  )
  packed = jnp.asarray(packed_np)
  edges = {k: jnp.asarray(v) for k, v in edges_np.items()}
  params = trunk.init(jax.random.key(0), packed)["params"]
  dense_out = trunk.apply({"params": params}, packed)
  edge_out = edge_trunk(trunk, params, packed, edges)
  np.testing.assert_allclose(np.asarray(edge_out), np.asarray(dense_out), rtol=1e-4, atol=1e-4)

  def loss_dense(p, x):
    return jnp.sum(trunk.apply({"params": p}, x) ** 2)

  def loss_edges(p, x, e):
    return jnp.sum(edge_trunk(trunk, p, x, e) ** 2)

  results, runners = {}, {}
  for name, fn, extra in (("dense", loss_dense, ()), ("segment_sum", loss_edges, (edges,))):
    step = jax.jit(jax.value_and_grad(fn))
    t0 = time.perf_counter()
    compiled = step.lower(params, packed, *extra).compile()
    results[f"{name}_compile_s"] = round(time.perf_counter() - t0, 3)

    def run(n, compiled=compiled, extra=extra):
      out = None
      for _ in range(n):
        out = compiled(params, packed, *extra)
      jax.block_until_ready(out)

    runners[name] = run
  times = _timing.time_steps(runners, steps_per_repeat=args.steps, repeats=args.repeats)
  real_pairs = int(edges_np["valid"].sum())
  print(
    json.dumps(
      {
        "benchmark": "qm9_graph_ops",
        "batch": args.batch,
        "features": args.features,
        "interactions": args.interactions,
        "rbf": args.rbf,
        "dense_pairs": args.batch * 29 * 29,
        "real_pairs": real_pairs,
        "edge_budget": budget,
        "dense_ms_per_step": round(1e3 * times["dense"], 2),
        "segment_sum_ms_per_step": round(1e3 * times["segment_sum"], 2),
        "host_edge_list_ms": round(1e3 * host_edges_s, 2),
        **results,
        "max_abs_diff": float(np.max(np.abs(np.asarray(edge_out) - np.asarray(dense_out)))),
        "devices": str(jax.devices()),
      }
    )
  )


if __name__ == "__main__":
  main()
