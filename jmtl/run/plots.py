"""PNG plots of a run, from its ``metrics.jsonl``: per-task curves, task weights, task-gradient cosines, an
ensemble's members; task relations; a sweep's runs side by side (``sweep.png``).

Every figure carries a title naming the run (its directory, weighting and
model, :func:`run_title`) and what it shows.

Figures are drawn on :class:`matplotlib.figure.Figure` directly (the Agg
canvas), never through pyplot, so no global backend or window state is
touched and plotting works on a headless machine and inside a sweep.
"""

from __future__ import annotations

import json
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


def run_title(workdir: str) -> str:
  """``"<directory>: <weighting>, <model>"`` from the run's results.json (or config.json); the directory alone if
  neither is readable.

  Examples:
    >>> import json, os, tempfile
    >>> d = os.path.join(tempfile.mkdtemp(), "md")
    >>> os.makedirs(d)
    >>> with open(os.path.join(d, "results.json"), "w") as f:
    ...   json.dump({"weighting": "famo", "model": "mlp"}, f)
    >>> run_title(d)
    'md: famo, mlp'
  """
  name = os.path.basename(os.path.normpath(workdir))
  for file, get in (
    ("results.json", lambda r: (r.get("weighting"), r.get("model"))),
    ("config.json", lambda c: (c.get("weighting"), (c.get("model") or {}).get("name"))),
  ):
    try:
      with open(os.path.join(workdir, file)) as f:
        parts = [str(p) for p in get(json.load(f)) if p]
    except (OSError, ValueError, AttributeError):
      continue
    if parts:
      return f"{name}: {', '.join(parts)}"
  return name


def _curves(records: Sequence[dict], tasks: Sequence[str], metric: dict[str, str], path: str, title: str = "") -> None:
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
  fig.suptitle(f"{title} — training and validation per task".strip(" —"), fontsize=10)
  fig.savefig(path, dpi=90)


def _weights(records: Sequence[dict], tasks: Sequence[str], path: str, title: str = "") -> None:
  """The task weights the method chose over training (interval means)."""
  train = [r for r in records if r.get("kind") == "train"]
  fig = Figure(figsize=(6, 3.5), layout="constrained")
  ax = fig.add_subplot()
  for task in tasks:
    ax.plot(*_series(train, f"weight/{task}"), label=task, lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("task weight")
  ax.set_title(f"{title} — task weights (means over log intervals)".strip(" —"), fontsize=10)
  if len(tasks) <= 12:
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=90)


def _grad_cosine(records: Sequence[dict], tasks: Sequence[str], path: str, title: str = "") -> bool:
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
  ax.set_title(f"{title}\ntask-gradient cosine (mean of {len(mats)} logs)".strip(), fontsize=10)
  fig.colorbar(im, ax=ax)
  fig.savefig(path, dpi=90)
  return True


def _matrix(values) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row] for row in values], float)


def _heatmap(fig, ax, m: np.ndarray, names: Sequence[str], title: str, *, vmin, vmax, cmap, fmt: str) -> None:
  k = len(names)
  im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
  ax.set_xticks(range(k), names, rotation=90 if k > 4 else 0)
  ax.set_yticks(range(k), names)
  if k <= 10:
    span = max(abs(vmin), abs(vmax))
    for i in range(k):
      for j in range(k):
        if np.isfinite(m[i, j]):
          color = "white" if abs(m[i, j]) > 0.6 * span else "black"
          ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7, color=color)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, shrink=0.8)


def _relations(rel: dict, path: str, title: str = "") -> None:
  """Affinity, gradient cosine and conflict rate heatmaps, the tasks ordered by the suggested groups (boxed)."""
  names = list(rel["tasks"])
  grouping = rel.get("grouping")
  order = [names.index(n) for g in grouping["groups"] for n in g] if grouping else list(range(len(names)))
  shown = [names[i] for i in order]
  panels = [("affinity", "affinity Z(i→j): row source i, column target j", "RdBu_r", "{:+.3f}")]
  if rel.get("grad_cosine") is not None:
    panels.append(("grad_cosine", "task-gradient cosine (mean)", "RdBu_r", "{:+.2f}"))
  if rel.get("conflict_rate") is not None:
    panels.append(("conflict_rate", "conflict rate (cosine < 0)", "Reds", "{:.2f}"))
  k = len(names)
  side = 0.42 * k + 2.2
  fig = Figure(figsize=(side * len(panels) + 1, side), layout="constrained")
  for p, (key, label, cmap, fmt) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), p + 1)
    title = label
    m = _matrix(rel[key])[np.ix_(order, order)]
    if key == "affinity":
      span = float(np.nanmax(np.abs(m[~np.eye(k, dtype=bool)]))) if k > 1 else 1.0
      span = span if np.isfinite(span) and span > 0 else 1.0
      vmin, vmax = -span, span
      title = f"{title}\nmean of {rel.get('affinity_steps')} measurements"
    else:
      vmin, vmax = (-1, 1) if key == "grad_cosine" else (0, 1)
    _heatmap(fig, ax, m, shown, title, vmin=vmin, vmax=vmax, cmap=cmap, fmt=fmt)
    if grouping:
      start = 0
      for g in grouping["groups"]:
        n = len(g)
        ax.add_patch(_box(start, n))
        start += n
  if grouping:
    groups = "  ".join("{" + ", ".join(g) + "}" for g in grouping["groups"])
    how = "exact" if grouping["exact"] else "beam search"
    fig.suptitle(f"{title}\nsuggested groups (at most {grouping['max_groups']}, {how}): {groups}".strip(), fontsize=9)
  else:
    fig.suptitle(f"{title} — task relations".strip(" —"), fontsize=9)
  fig.savefig(path, dpi=90)


def _box(start: int, size: int):
  from matplotlib.patches import Rectangle

  return Rectangle((start - 0.5, start - 0.5), size, size, fill=False, lw=2, ec="black")


def _transfer(transfer: dict, conflict: dict[str, float], path: str, title: str = "") -> None:
  """Per task: the validation metric of the multi-task run and of its single-task baseline, the flag's first step."""
  tasks = transfer["tasks"]
  names = list(tasks)
  cols = min(len(names), 4)
  rows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
  for i, t in enumerate(names):
    v = tasks[t]
    ax = fig.add_subplot(rows, cols, i + 1)
    steps = np.asarray(v["steps"])
    ax.plot(steps, np.asarray(v["mtl"], float), "o-", ms=3, label="multi-task")
    ax.plot(steps, np.asarray(v["baseline"], float), "s--", ms=3, label="single-task")
    if v["first_step"] is not None:
      ax.axvline(v["first_step"], color="tab:red", lw=1, ls=":", label=f"behind from {v['first_step']}")
    title = t + (" — behind at the end" if v["behind"] else "")
    if t in conflict:
      title += f"\nconflict rate {conflict[t]:.2f}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("validation metric")
    ax.legend(fontsize=7)
  fig.suptitle(f"{title} — multi-task against single-task, validation".strip(" —"), fontsize=10)
  fig.savefig(path, dpi=90)


def relations_plots(workdir: str, analysis: dict, out: str | None = None) -> list[str]:
  """Writes ``plots/relations.png`` (affinity, cosine, conflict heatmaps with the suggested groups) and
  ``plots/transfer.png`` (per-task curves against the single-task baselines) from an analysis
  (:func:`jmtl.run.relations.analyze`); returns their paths.

  Examples:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> rel = {"tasks": ["a", "b"], "affinity": [[0.1, 0.2], [None, 0.1]], "affinity_steps": 3}
    >>> [os.path.basename(p) for p in relations_plots(d, {"relations": rel, "transfer": None})]
    ['relations.png']
  """
  out_dir = os.path.join(out or workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths, title = [], run_title(workdir)
  rel = analysis.get("relations")
  if rel is not None:
    paths.append(os.path.join(out_dir, "relations.png"))
    _relations(rel, paths[-1], title)
  transfer = analysis.get("transfer")
  if transfer is not None and transfer.get("tasks"):
    conflict = {}
    if rel is not None and rel.get("conflict_rate") is not None:
      m = _matrix(rel["conflict_rate"])
      for i, t in enumerate(rel["tasks"]):
        others = [m[i, j] for j in range(len(m)) if j != i and np.isfinite(m[i, j])]
        if others:
          conflict[t] = float(np.mean(others))
    paths.append(os.path.join(out_dir, "transfer.png"))
    _transfer(transfer, conflict, paths[-1], title)
  return paths


def _members(records: Sequence[dict], tasks: Sequence[str], metric: dict[str, str], path: str, title: str = "") -> bool:
  """An ensemble's validation metric per task: each member, their mean and the ensemble (``jmtl.run.cotrain``)."""
  val = [r for r in records if r.get("kind") == "validation"]
  keys = {k.split("/", 1)[0] for r in val for k in r if k.startswith("member") and k[6:7].isdigit()}
  if not keys:
    return False
  members = sorted(keys, key=lambda p: int(p[6:]))
  cols = min(len(tasks), 4)
  fig = Figure(figsize=(4.2 * cols, 3.2 * math.ceil(len(tasks) / cols)), layout="constrained")
  for i, task in enumerate(tasks):
    m = metric.get(task) or "loss"
    ax = fig.add_subplot(math.ceil(len(tasks) / cols), cols, i + 1)
    for j, p in enumerate(members):
      ax.plot(
        *_series(val, f"{p}/{task}/{m}"), lw=0.8, alpha=0.6, color="tab:gray", label="members" if j == 0 else None
      )
    ax.plot(*_series(val, f"member_mean/{task}/{m}"), "--", color="tab:blue", label="member mean")
    ax.plot(*_series(val, f"{task}/{m}"), "o-", ms=3, color="tab:red", label="ensemble")
    ax.set_title(f"{task}: validation {m}")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.suptitle(f"{title} — ensemble members".strip(" —"), fontsize=10)
  fig.savefig(path, dpi=90)
  return True


def write_all(workdir: str, tasks: Sequence[str], metric: dict[str, str], out: str | None = None) -> list[str]:
  """Writes the plots of a run into ``<workdir>/plots`` (``<out>/plots`` when given) and returns their paths.

  Examples:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    ...   _ = f.write(json.dumps({"step": 1, "kind": "train", "loss/a": 1.0, "weight/a": 1.0}) + "\\n")
    >>> [os.path.basename(p) for p in write_all(d, ["a"], {"a": "acc"})]
    ['curves.png', 'weights.png']
  """
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  out_dir = os.path.join(out or workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  title = run_title(workdir)
  paths = [os.path.join(out_dir, "curves.png"), os.path.join(out_dir, "weights.png")]
  _curves(records, tasks, metric, paths[0], title)
  _weights(records, tasks, paths[1], title)
  cos = os.path.join(out_dir, "grad_cosine.png")
  if _grad_cosine(records, tasks, cos, title):
    paths.append(cos)
  members = os.path.join(out_dir, "members.png")
  if _members(records, tasks, metric, members, title):
    paths.append(members)
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):  # a finished run's relations and transfer (jmtl.run.relations.finish)
    with open(results) as f:
      stored = json.load(f)
    analysis = {"relations": stored.get("relations"), "transfer": stored.get("transfer")}
    paths += relations_plots(workdir, analysis, out)
  return paths


def sweep_plot(workdir: str, rows: Sequence[dict], out: str | None = None) -> str | None:
  """Writes ``<workdir>/plots/sweep.png`` (``<out>/plots``): the runs of a sweep side by side; returns its path.

  One panel per task with each run's test metric (validation as a hollow
  marker), and one of Δm% on test (when the runs have baselines) or else the
  validation score that selects models. The run a static grid chose is
  starred. ``None`` when there are no finished runs.

  Examples:
    >>> import os, tempfile
    >>> res = lambda a: {"tasks": ["t"], "metric": {"t": "acc"}, "test": {"t/acc": a}, "validation": {"t/acc": a},
    ...   "val_score": a, "delta_m": 100 * (a - 0.5) / 0.5}
    >>> r = lambda w, a: {"label": f"weighting={w}", "chosen": False, "results": res(a)}
    >>> os.path.basename(sweep_plot(tempfile.mkdtemp(), [r("equal", 0.6), r("famo", 0.7)]))
    'sweep.png'
  """
  rows = [r for r in rows if isinstance(r.get("results"), dict) and r["results"].get("test")]
  if not rows:
    return None
  tasks = list(rows[0]["results"]["tasks"])
  metric = rows[0]["results"]["metric"]
  has_dm = all(r["results"].get("delta_m") is not None for r in rows)
  panels = len(tasks) + 1
  cols = min(panels, 4)
  n = len(rows)
  fig = Figure(figsize=(max(4.2, 0.5 * n + 1.5) * cols, 3.6 * math.ceil(panels / cols)), layout="constrained")
  labels = [("★ " if r.get("chosen") else "") + r["label"] for r in rows]
  x = np.arange(n)
  for i, task in enumerate(tasks):
    ax = fig.add_subplot(math.ceil(panels / cols), cols, i + 1)
    key = f"{task}/{metric[task]}"
    test = [r["results"]["test"].get(key, np.nan) for r in rows]
    val = [r["results"].get("validation", {}).get(key, np.nan) for r in rows]
    ax.plot(x, np.asarray(test, float), "o", ms=6, label="test")
    ax.plot(x, np.asarray(val, float), "o", ms=6, mfc="none", label="validation")
    ax.set_title(f"{task}: {metric[task]}", fontsize=9)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7)
  ax = fig.add_subplot(math.ceil(panels / cols), cols, panels)
  if has_dm:
    values, what = [r["results"]["delta_m"] for r in rows], "Δm% (test) against single-task baselines"
  else:
    values, what = [r["results"].get("val_score", np.nan) for r in rows], "validation score (model selection)"
  values = np.asarray(values, float)
  ax.bar(x, values, color=["tab:green" if v >= 0 else "tab:red" for v in values] if has_dm else "tab:blue")
  ax.axhline(0, color="black", lw=0.8)
  ax.set_title(what, fontsize=9)
  ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
  fig.suptitle(f"sweep {os.path.basename(os.path.normpath(workdir))}: {n} runs", fontsize=10)
  out_dir = os.path.join(out or workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "sweep.png")
  fig.savefig(path, dpi=90)
  return path
