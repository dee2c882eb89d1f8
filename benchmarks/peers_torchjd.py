"""jmtl's parameter-level steps against torchjd 0.18 on the same workload, in one run.

torchjd (``mtl_backward`` + ``jac_to_grad`` with the same aggregator) is the
reference implementation of Jacobian descent for PyTorch. Workload: MLP
784→512→512 (ReLU), K linear heads 512→10, softmax cross-entropy, batch 256,
SGD, 2 threads. jmtl runs with ``heads="own"`` (each head follows its own
gradient), which is what ``mtl_backward`` does. Needs the ``peers`` extra
(``pip install torch==2.13.0 'torchjd[quadprog-projector]'``); without it the
script says so and exits 0.

The same run also times ``fused_jax``, the hand-written JAX step of the
``equal`` math for K same-shaped heads (stacked head kernels, one ``einsum``,
one vectorised cross-entropy; ``benchmarks._reference``): each K's
``fused_jax_ms``, and for every method ``ratio_to_fused`` of the jmtl and the
torch step.

``--chunk-size C`` passes ``chunk_size=C`` to jmtl's steps (the bounded-memory
parameter-level route when C < K; see ``benchmarks.gradient_step``).

    python -m benchmarks.peers_torchjd [--tasks 10 40] [--chunk-size 10]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

import jmtl
from benchmarks import _reference
from benchmarks import _timing
from benchmarks._reference import BATCH
from benchmarks._reference import CLASSES
from benchmarks._reference import HIDDEN
from benchmarks._reference import IN
from benchmarks._reference import reference_batch

JMTL = {"upgrad": jmtl.weighting.upgrad, "mgda": jmtl.weighting.mgda, "pcgrad": jmtl.weighting.pcgrad}


def torch_runner(k, method, batch):
  import torch
  from torchjd import aggregation
  from torchjd.autojac import jac_to_grad
  from torchjd.autojac import mtl_backward

  torch.set_num_threads(2)
  torch.manual_seed(0)
  trunk = torch.nn.Sequential(
    torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU()
  )
  heads = torch.nn.ModuleList([torch.nn.Linear(HIDDEN, CLASSES) for _ in range(k)])
  params = list(trunk.parameters()) + list(heads.parameters())
  opt = torch.optim.SGD(params, lr=1e-2)
  x = torch.from_numpy(np.array(batch["inputs"]))
  ys = [torch.from_numpy(np.array(batch["labels"][f"t{i}"])).long() for i in range(k)]
  aggregator = {"upgrad": aggregation.UPGrad, "mgda": aggregation.MGDA, "pcgrad": aggregation.PCGrad}.get(method)
  aggregator = aggregator() if aggregator else None
  ce = torch.nn.functional.cross_entropy

  def step():
    opt.zero_grad()
    z = trunk(x)
    losses = [ce(h(z), y) for h, y in zip(heads, ys)]
    if aggregator is None:  # equal weighting, plain autograd
      torch.stack(losses).sum().backward()
    else:
      mtl_backward(losses, features=z)
      jac_to_grad(trunk.parameters(), aggregator)
    opt.step()

  def run(n):
    for _ in range(n):
      step()

  return run


def jmtl_runner(k, method, batch, chunk_size=None):
  weighting = JMTL[method]() if method in JMTL else jmtl.weighting.equal()
  step, state = _reference.jmtl_step(k, weighting, heads="own", chunk_size=chunk_size)
  compiled, _, _ = _timing.compile_step(step, state, batch)
  return _timing.looper(compiled, state, batch)


def fused_runner(k, batch):
  step, state = _reference.fused_step(k)
  compiled, _, _ = _timing.compile_step(step, state, batch)
  return _timing.looper(compiled, state, batch)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, nargs="+", default=[10, 40])
  ap.add_argument("--methods", nargs="+", default=["equal", "upgrad", "mgda", "pcgrad"])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--chunk-size", type=int, default=None)
  args = ap.parse_args()
  try:
    import torch  # noqa: F401
    import torchjd  # noqa: F401
  except ImportError as e:
    print(json.dumps({"benchmark": "peers_torchjd", "skipped": f"needs the 'peers' extra ({e})"}))
    return 0
  from importlib.metadata import version

  rows = []
  for k in args.tasks:
    batch = reference_batch(k)
    runners = {"fused_jax": fused_runner(k, batch)}
    for method in args.methods:
      runners[f"jmtl_{method}"] = jmtl_runner(k, method, batch, args.chunk_size)
      runners[f"torch_{method}"] = torch_runner(k, method, batch)
    med = _timing.time_steps(runners, steps_per_repeat=args.steps, repeats=args.repeats)
    f = med["fused_jax"]
    row = {"K": k, "batch": BATCH, "chunked": args.chunk_size is not None and args.chunk_size < k}
    row["fused_jax_ms"] = round(1e3 * f, 2)
    for method in args.methods:
      j, t = med[f"jmtl_{method}"], med[f"torch_{method}"]
      row[method] = {
        "jmtl_ms": round(1e3 * j, 2),
        "torch_ms": round(1e3 * t, 2),
        "speedup": round(t / j, 2),
        "ratio_to_fused": {"jmtl": round(j / f, 2), "torch": round(t / f, 2)},
      }
    rows.append(row)
  out = {
    "benchmark": "peers_torchjd",
    "jax": jax.__version__,
    "chunk_size": args.chunk_size,
    "torch": version("torch"),
    "torchjd": version("torchjd"),
    "note": (
      "torch_equal is plain autograd on the summed loss; the others use mtl_backward + jac_to_grad; "
      "fused_jax is the hand-written JAX equal step (stacked heads, one einsum)"
    ),
    "results": rows,
  }
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
