"""PNG plots of a run, from its ``metrics.jsonl``: per-task curves, task weights, task-gradient cosines.

Figures are drawn on :class:`matplotlib.figure.Figure` directly (the Agg
canvas), never through pyplot, so no global backend or window state is
touched and plotting works on a headless machine and inside a sweep.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from jmtl.run.logs import read_jsonl


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pts)
  return np.asarray(steps), np.asarray(values, float)


def _curves(records: Sequence[dict], tasks: Sequence[str], metric: dict[str, str], path: str) -> None:
  """One panel per task: training loss and validation loss (left axis), validation metric (right axis)."""
  train = [r for r in records if r.get("kind") == "train"]
  val = [r for r in records if r.get("kind") == "validation"]
  cols = min(len(tasks), 4)
  rows = math.ceil(len(tasks) / cols)
  fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
  for i, task in enumerate(tasks):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.plot(*_series(train, f"loss/{task}"), label="train loss", lw=1)
    ax.plot(*_series(val, f"{task}/loss"), "o-", label="validation loss", ms=3)
    ax.set_title(task)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    handles = ax.get_lines()
    m = metric.get(task)
    if m and m != "loss":
      ax2 = ax.twinx()
      ax2.plot(*_series(val, f"{task}/{m}"), "s--", color="tab:green", label=f"validation {m}", ms=3)
      ax2.set_ylabel(m)
      handles = [*handles, *ax2.get_lines()]
    ax.legend(handles=handles, loc="center right", fontsize=7)
  fig.savefig(path, dpi=90)


def _weights(records: Sequence[dict], tasks: Sequence[str], path: str) -> None:
  """The task weights the method chose over training (interval means)."""
  train = [r for r in records if r.get("kind") == "train"]
  fig = Figure(figsize=(6, 3.5), layout="constrained")
  ax = fig.add_subplot()
  for task in tasks:
    ax.plot(*_series(train, f"weight/{task}"), label=task, lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("task weight")
  if len(tasks) <= 12:
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=90)


def _grad_cosine(records: Sequence[dict], tasks: Sequence[str], path: str) -> bool:
  """Heatmap of the task-gradient cosines averaged over training; ``False`` if the method computed none."""
  mats = [np.asarray(r["grad_cosine"], float) for r in records if r.get("kind") == "train" and r.get("grad_cosine")]
  if not mats:
    return False
  mean = np.mean(mats, axis=0)
  k = len(tasks)
  fig = Figure(figsize=(1.2 + 0.45 * k + 2, 0.45 * k + 2), layout="constrained")
  ax = fig.add_subplot()
  im = ax.imshow(mean, vmin=-1, vmax=1, cmap="RdBu_r")
  ax.set_xticks(range(k), tasks, rotation=90 if k > 4 else 0)
  ax.set_yticks(range(k), tasks)
  if k <= 10:
    for i in range(k):
      for j in range(k):
        color = "white" if abs(mean[i, j]) > 0.6 else "black"
        ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
  ax.set_title(f"task-gradient cosine (mean of {len(mats)} logs)")
  fig.colorbar(im, ax=ax)
  fig.savefig(path, dpi=90)
  return True


def write_all(workdir: str, tasks: Sequence[str], metric: dict[str, str]) -> list[str]:
  """Writes the plots of a run into ``<workdir>/plots`` and returns their paths.

  Examples:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    ...   _ = f.write(json.dumps({"step": 1, "kind": "train", "loss/a": 1.0, "weight/a": 1.0}) + "\\n")
    >>> [os.path.basename(p) for p in write_all(d, ["a"], {"a": "acc"})]
    ['curves.png', 'weights.png']
  """
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "curves.png"), os.path.join(out_dir, "weights.png")]
  _curves(records, tasks, metric, paths[0])
  _weights(records, tasks, paths[1])
  cos = os.path.join(out_dir, "grad_cosine.png")
  if _grad_cosine(records, tasks, cos):
    paths.append(cos)
  return paths
