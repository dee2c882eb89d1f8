"""What a run writes while it trains: ``metrics.jsonl``, its trackers (TensorBoard event files, ...), the progress bar.

Every record also goes to the run's trackers (``config.trackers``, :mod:`jmtl.run.trackers`), as scalars
``<kind>/<name>``.

``metrics.jsonl`` has one JSON object per line: ``{"step": s, "kind":
"train", ...}`` every ``log_every`` steps (means over the interval of the
step metrics: ``loss/<task>``, ``weight/<task>``, ``grad_norm``,
``grad_cosine`` when the method computes a Gramian, ``skipped`` as a count,
``examples_per_s``) and ``{"step": s, "kind": "validation", "<task>/<metric>":
...}`` every ``eval_every`` steps.

Every start of a run rewrites ``metrics.jsonl`` before it appends to it: on a
resume from step ``s`` it keeps the records of steps ``<= s`` (a line that is
not a JSON record -- torn by a kill, or damaged -- is reported on stderr with
its line number and left out, never the records after it); on a start from step
0 it empties the file (saying so when it held records: a workdir whose
checkpoints were all removed is trained again from 0, and its log with it).
TensorBoard event files are never appended to: each start writes a new file
(the name ends in the start's nanosecond time), beginning with a purge marker
at step ``s + 1`` (1 for a start from 0), so TensorBoard hides the earlier
files' events from that step on; the older files stay on disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm

from jmtl.run import trackers


def read_jsonl(path: str, *, quiet: bool = False) -> list[dict]:
  """The records of a JSONL file (an empty list if it does not exist).

  A line that is not a JSON object with an integer ``step`` (torn by a kill,
  or damaged) is skipped, and reported in one line on stderr unless ``quiet``.

  Examples:
    >>> read_jsonl("/nonexistent.jsonl")
    []
  """
  if not os.path.exists(path):
    return []
  out, bad = [], []
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        record = None
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        out.append(record)
      elif line.strip():
        bad.append(number)
  if bad and not quiet:
    shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    noun = "line" if len(bad) == 1 else "lines"
    print(f"jmtl: {path}: {noun} {shown} not a JSON record; skipped", file=sys.stderr, flush=True)
  return out


def _plain(value: Any) -> Any:
  a = np.asarray(value)
  if a.ndim:
    return a.tolist()
  v = a.item()
  return None if isinstance(v, float) and not math.isfinite(v) else v


def _writes_files() -> bool:
  """Whether this process writes the run's logs: the only one, or process 0 of a ``jax.distributed`` run."""
  import jmtl.parallel

  return jmtl.parallel.is_primary()


class MetricsLog:
  """Appends records to ``metrics.jsonl`` and writes their values to the run's trackers (TensorBoard by default).

  On resume from step ``s`` (``resume_step``), the records after ``s`` are
  dropped -- from ``metrics.jsonl`` here, from TensorBoard by its purge
  marker -- and the resumed run writes them again, identically. A start from
  step 0 (``resume_step=None``) empties ``metrics.jsonl``, with a one-line
  notice on stderr when it held records.

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

  def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True, config=None):
    self.path, self.workdir = os.path.join(workdir, "metrics.jsonl"), workdir
    self.trackers, self.writes = [], _writes_files()
    if not self.writes:  # another process of a multi-process run: process 0 writes the log
      return
    if resume_step is None:
      self._restart(workdir)
    else:
      self._truncate(resume_step)
    self.trackers = trackers.open_all(config, workdir, resume_step=resume_step, tensorboard=tensorboard)

  def _restart(self, workdir: str) -> None:
    if os.path.exists(self.path) and os.path.getsize(self.path):
      print(
        f"jmtl: workdir {workdir} has a metrics.jsonl but no checkpoint: training from step 0, "
        "the log rewritten from the start",
        file=sys.stderr,
        flush=True,
      )
    self._rewrite([])

  def _truncate(self, step: int) -> None:
    self._rewrite([r for r in read_jsonl(self.path) if r["step"] <= step])

  def _rewrite(self, records: list[dict]) -> None:
    tmp = f"{self.path}.tmp{os.getpid()}"
    try:
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
      os.replace(tmp, self.path)
    except BaseException:  # a full disk, say: the log stays as it was, with no stray temporary file
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> dict:
    record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
    if not self.writes:
      return record
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.trackers:
      values = trackers.scalars_of(kind, {k: v for k, v in record.items() if k not in ("step", "kind")})
      for t in self.trackers:  # the task-gradient cosines as one curve per pair of tasks
        t.scalars(step, values)
    return record

  def close(self, trained: bool = False) -> None:
    """Closes the trackers; ``trained`` (all steps done): they stay open, flushed, for the results
    (:func:`jmtl.run.trackers.finish`)."""
    if trained and self.trackers:
      trackers.hold(self.workdir, self.trackers)
      return
    for t in self.trackers:
      t.close()


class Progress:
  """A tqdm bar: step, per-task losses, examples/s, skipped steps (once there are any); tqdm adds the rate and the ETA.

  Examples:
    >>> bar = Progress(100, 0, "equal", enabled=False)
    >>> bar.update(10, {"loss/a": 0.5, "examples_per_s": 1000.0})
    >>> bar.close()
  """

  def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
    self.bar = tqdm.tqdm(
      total=total,
      initial=initial,
      desc=desc,
      unit="step",
      dynamic_ncols=True,
      disable=not (enabled and _writes_files()),
      mininterval=0.5,
    )

  def update(self, step: int, record: Mapping[str, Any] | None = None) -> None:
    self.bar.update(step - self.bar.n)
    if record:
      post = {k[5:]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/") and v is not None}
      if record.get("examples_per_s"):
        post["ex/s"] = f"{record['examples_per_s']:.0f}"
      if record.get("num_skipped"):  # non-finite steps skipped since step 0, as they happen
        post["skipped"] = str(record["num_skipped"])
      self.bar.set_postfix(post, refresh=False)

  def close(self) -> None:
    self.bar.close()
