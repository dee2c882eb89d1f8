"""Synthetic multi-task sets with a controlled task relatedness (numpy only).

Every example has shared latent factors ``z_s`` and one private block
``z_k`` per task. Task ``k`` reads ``h_k = ρ z_s + √(1−ρ²) z_k``: with
relatedness ``ρ = 1`` all tasks read the same factors, with ``ρ = 0`` none. The
inputs are a fixed random nonlinear mixing of all factors plus noise, so a
model must recover the factors from ``x`` -- which is where a shared trunk
helps related tasks and where unrelated tasks compete for its capacity.
"""

from __future__ import annotations

import numpy as np


def make_tasks(
  num_examples: int,
  num_tasks: int = 3,
  *,
  kind: str = "classification",
  num_classes: int = 4,
  input_dim: int = 32,
  latent_dim: int = 8,
  relatedness: float = 0.8,
  noise: float = 0.1,
  label_noise: float = 0.0,
  seed: int = 0,
  split_seed: int = 0,
) -> dict:
  """Draws a multi-label multi-task set: one input, one label per task.

  The task definitions (mixing matrix, read-out directions) depend only on
  ``seed``; ``split_seed`` draws the examples, so train and test sets of one
  task family are made by calling twice with the same ``seed`` and different
  ``split_seed``.

  Args:
    num_examples: examples to draw.
    num_tasks: K.
    kind: ``"classification"`` (the label is the argmax of ``num_classes``
      random linear read-outs of ``h_k``) or ``"regression"`` (a standardised
      nonlinear read-out of ``h_k``).
    num_classes: classes per task for classification.
    input_dim: dimension of ``x``.
    latent_dim: size of the shared block and of each private block.
    relatedness: ρ in ``[0, 1]``.
    noise: standard deviation of the input noise.
    label_noise: for regression, target noise std; for classification, the
      fraction of labels replaced by uniform random classes.
    seed: defines the task family.
    split_seed: draws the examples.

  Returns:
    ``{"inputs": float32 (N, input_dim), "labels": {"task_k": (N,)}}``.

  Examples:
    >>> from jmtl.data import synthetic
    >>> d = synthetic.make_tasks(100, 2, num_classes=3)
    >>> d["inputs"].shape, sorted(d["labels"]), int(d["labels"]["task_0"].max())
    ((100, 32), ['task_0', 'task_1'], 2)
  """
  if not 0.0 <= relatedness <= 1.0:
    raise ValueError(f"relatedness must be in [0, 1], got {relatedness}")
  if kind not in ("classification", "regression"):
    raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
  if num_tasks < 1 or num_examples < 1:
    raise ValueError(f"need num_tasks >= 1 and num_examples >= 1, got {num_tasks}, {num_examples}")
  fam = np.random.default_rng(seed)
  total_latent = latent_dim * (num_tasks + 1)
  mix1 = fam.normal(size=(total_latent, input_dim)) / np.sqrt(total_latent)
  mix2 = fam.normal(size=(input_dim, input_dim)) / np.sqrt(input_dim)
  readout = fam.normal(size=(num_tasks, latent_dim, num_classes if kind == "classification" else 1))

  rng = np.random.default_rng([seed, split_seed, 1])
  z = rng.normal(size=(num_examples, num_tasks + 1, latent_dim))
  h1 = np.tanh(z.reshape(num_examples, -1) @ mix1)
  x = h1 + 0.5 * np.tanh(h1 @ mix2) + noise * rng.normal(size=(num_examples, input_dim))
  labels = {}
  for k in range(num_tasks):
    h = relatedness * z[:, 0] + np.sqrt(1.0 - relatedness**2) * z[:, k + 1]
    score = h @ readout[k]
    if kind == "regression":
      y = score[:, 0] + np.sin(score[:, 0])
      y = y + label_noise * rng.normal(size=num_examples)
      labels[f"task_{k}"] = ((y - y.mean()) / (y.std() + 1e-12)).astype(np.float32)
    else:
      # The class is the most responsive of num_classes random read-outs; a
      # random flip makes the Bayes error controllable.
      y = np.argmax(score, axis=1)
      flip = rng.random(num_examples) < label_noise
      y = np.where(flip, rng.integers(0, num_classes, size=num_examples), y)
      labels[f"task_{k}"] = y.astype(np.int32)
  return {"inputs": x.astype(np.float32), "labels": labels}


def batches(data: dict, batch_size: int, *, seed: int, epoch: int = 0, drop_remainder: bool = True):
  """Yields shuffled batches of a multi-label set; the order is a function of ``(seed, epoch)``.

  Examples:
    >>> from jmtl.data import synthetic
    >>> d = synthetic.make_tasks(10, 1)
    >>> [b["inputs"].shape[0] for b in synthetic.batches(d, 4, seed=0)]
    [4, 4]
  """
  n = data["inputs"].shape[0]
  order = np.random.default_rng([seed, epoch]).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  for i in range(0, stop, batch_size):
    idx = order[i : i + batch_size]
    yield {"inputs": data["inputs"][idx], "labels": {k: v[idx] for k, v in data["labels"].items()}}
