"""What a run writes while it trains: ``metrics.jsonl``, TensorBoard event files and the progress bar.

``metrics.jsonl`` has one JSON object per line: ``{"step": s, "kind":
"train", ...}`` every ``log_every`` steps (means over the interval of the
step metrics: ``loss/<task>``, ``weight/<task>``, ``grad_norm``,
``grad_cosine`` when the method computes a Gramian, ``skipped`` as a count,
``examples_per_s``) and ``{"step": s, "kind": "validation", "<task>/<metric>":
...}`` every ``eval_every`` steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file (an empty list if it does not exist); a torn last line is ignored.

  Examples:
    >>> read_jsonl("/nonexistent.jsonl")
    []
  """
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a line cut by a kill mid-write; everything after it is gone too
  return out


def _plain(value: Any) -> Any:
  a = np.asarray(value)
  if a.ndim:
    return a.tolist()
  v = a.item()
  return None if isinstance(v, float) and not math.isfinite(v) else v


def _summary_writer(logdir: str, purge_step: int | None):
  # tensorboardX imports torch when it is installed, only to accept torch
  # tensors (2 s, and torch in the process); jmtl passes numbers, so hide it.
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(logdir, flush_secs=30, purge_step=purge_step)


class MetricsLog:
  """Appends records to ``metrics.jsonl`` and TensorBoard scalars to ``tensorboard/``.

  On resume from step ``s`` (``resume_step``), the records after ``s`` are
  dropped -- from ``metrics.jsonl`` here, from TensorBoard by its purge
  marker -- and the resumed run writes them again, identically.

  Examples:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> log = MetricsLog(d, tensorboard=False)
    >>> for s in (1, 2):
    ...   _ = log.write(s, "train", {"loss/a": np.float32(s)})
    >>> _ = MetricsLog(d, resume_step=1, tensorboard=False)  # resumed from the checkpoint of step 1
    >>> [r["step"] for r in read_jsonl(os.path.join(d, "metrics.jsonl"))]
    [1]
  """

  def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      self._truncate(resume_step)
    purge = None if resume_step is None else resume_step + 1
    self.tb = _summary_writer(os.path.join(workdir, "tensorboard"), purge) if tensorboard else None

  def _truncate(self, step: int) -> None:
    records = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, self.path)

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> dict:
    record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k in ("step", "kind") or v is None:
          continue
        if isinstance(v, list):
          self._matrix(f"{kind}/{k}", v, step)
        else:
          self.tb.add_scalar(f"{kind}/{k}", v, step)
    return record

  def _matrix(self, tag: str, value: list, step: int) -> None:
    m = np.asarray(value, float)
    if m.ndim == 2:  # the task-gradient cosines, one curve per pair of tasks
      for i in range(m.shape[0]):
        for j in range(i + 1, m.shape[1]):
          self.tb.add_scalar(f"{tag}/{i}_{j}", m[i, j], step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


class Progress:
  """A tqdm bar: step, per-task losses, examples/s; tqdm adds the rate and the ETA.

  Examples:
    >>> bar = Progress(100, 0, "equal", enabled=False)
    >>> bar.update(10, {"loss/a": 0.5, "examples_per_s": 1000.0})
    >>> bar.close()
  """

  def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
    self.bar = tqdm.tqdm(
      total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled, mininterval=0.5
    )

  def update(self, step: int, record: Mapping[str, Any] | None = None) -> None:
    self.bar.update(step - self.bar.n)
    if record:
      post = {k[5:]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/") and v is not None}
      if record.get("examples_per_s"):
        post["ex/s"] = f"{record['examples_per_s']:.0f}"
      self.bar.set_postfix(post, refresh=False)

  def close(self) -> None:
    self.bar.close()
