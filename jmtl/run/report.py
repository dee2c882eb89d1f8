"""The tables a run and a sweep print (and ``jmtl report`` prints again from the files)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

NON_FINITE = "non-finite"
NO_EXAMPLES = "no examples"


def _fmt(value: Any, width: int, digits: int = 4) -> str:
  if value is None:
    return f"{'—':>{width}}"
  return f"{value:>{width}.{digits}f}"


def _cell(results: Mapping[str, Any], task: str, width: int) -> str:
  """A task's test value; "non-finite" for a task whose test loss was not finite, "no examples" for one without a
  labelled test example (the metrics of both are null)."""
  value = results["test"].get(f"{task}/{results['metric'][task]}")
  if value is None and task in (results.get("non_finite") or {}).get("test", ()):
    return f"{NON_FINITE:>{width}}"
  if value is None and task in (results.get("no_examples") or {}).get("test", ()):
    return f"{NO_EXAMPLES:>{width}}"
  return _fmt(value, width)


def _metric_label(results: Mapping[str, Any], task: str) -> str:
  unit = (results.get("units") or {}).get(task) or ""
  return results["metric"][task] + (f" ({unit})" if unit else "")


def _model_label(results: Mapping[str, Any]) -> str:
  """``MTL``, ``ensemble of M`` or ``student`` (a co-training run, :mod:`jmtl.run.cotrain`)."""
  co = (results.get("cotrain") or {}).get("fields") or {}
  if co.get("members"):
    return f"ensemble of {co['members']}"
  return "student" if co.get("teachers") else "MTL"


def run_table(results: Mapping[str, Any]) -> str:
  """Per-task test metrics of a run next to its single-task baselines, then Δm%.

  Examples:
    >>> r = {"tasks": ["a"], "metric": {"a": "acc"}, "test": {"a/acc": 0.9}, "weighting": "equal",
    ...      "baselines": {"a": 0.8}, "negative_transfer": {"a": False}, "delta_m": 12.5, "selected_step": 10,
    ...      "select": "best", "select_metric": "acc", "num_skipped": 0, "step_ms": 1.5}
    >>> print(run_table(r))
    task   metric       single-task   MTL (equal)   negative transfer
    a      acc               0.8000        0.9000                  no
    <BLANKLINE>
    Δm% = +12.50   (test split; model of step 10, best validation acc; 1.50 ms/step; 0 non-finite steps skipped)
  """
  names = results["tasks"]
  base = results.get("baselines") or {}
  neg = results.get("negative_transfer") or {}
  tw = max(4, *(len(n) for n in names)) + 3
  mw = max(6, *(len(_metric_label(results, n)) for n in names)) + 3
  head = f"{_model_label(results)} ({results['weighting']})"
  hw = max(len(head), 10) + 3
  since, conflict = _relations_columns(results)
  more = (f"{'behind since':>14}" if since else "") + (f"{'conflict':>10}" if conflict else "")
  lines = [f"{'task':<{tw}}{'metric':<{mw}}{'single-task':>11}{head:>{hw}}{'negative transfer':>20}{more}"]
  for n in names:
    flag = {True: "yes", False: "no"}.get(neg.get(n), "—")
    cells = (f"{since.get(n, '—'):>14}" if since else "") + (f"{conflict.get(n, '—'):>10}" if conflict else "")
    lines.append(
      f"{n:<{tw}}{_metric_label(results, n):<{mw}}{_fmt(base.get(n), 11)}{_cell(results, n, hw)}{flag:>20}{cells}"
    )
  lines.append("")
  lines.append(f"{_delta(results)}   ({_footer(results)})")
  notes = []
  if since:
    notes.append(
      "behind since: the validation step from which the task has trailed its single-task baseline beyond noise, to "
      'the end (README, "Task relations")'
    )
  if conflict:
    notes.append("conflict: the fraction of measured steps with a negative gradient cosine, mean over the other tasks")
  lines += notes
  rows = _cotrain_table(results)  # an ensemble's members, their mean and the ensemble (jmtl.run.cotrain)
  if rows:
    lines += ["", rows]
  return "\n".join(lines)


def _cotrain_table(results: Mapping[str, Any]) -> str:
  from jmtl.run import cotrain  # report.py itself imports no JAX module

  return cotrain.table(dict(results))


def _relations_columns(results: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
  """Per task, the step its negative-transfer flag appeared ("no" when it is not behind at the end) and its mean
  conflict rate with the other tracked tasks (:mod:`jmtl.run.relations`); both empty for a run without them."""
  since = {}
  for n, v in ((results.get("transfer") or {}).get("tasks") or {}).items():
    since[n] = str(v["first_step"]) if v.get("behind") and v.get("first_step") is not None else "no"
  conflict = {}
  rel = results.get("relations") or {}
  rates = rel.get("conflict_rate")
  if rates:
    names = rel["tasks"]
    for i, n in enumerate(names):
      others = [rates[i][j] for j in range(len(names)) if j != i and rates[i][j] is not None]
      if others:
        conflict[n] = f"{sum(others) / len(others):.2f}"
  return since, conflict


def _delta(results: Mapping[str, Any]) -> str:
  dm = results.get("delta_m")
  if dm is None:
    if not results.get("baselines"):
      return "Δm% = n/a (no single-task baselines)"
    if (results.get("no_examples") or {}).get("test"):
      return "Δm% = n/a (a task has no labelled test example)"
    return "Δm% = n/a (a metric is not finite)"
  return f"Δm% = {dm:+.2f}"


def _footer(results: Mapping[str, Any]) -> str:
  how = "final model" if results.get("select") == "final" else f"best validation {results.get('select_metric')}"
  ms = results.get("step_ms")
  speed = f"{ms:.2f} ms/step" if ms else "step time not measured"
  parts = [f"test split; model of step {results.get('selected_step')}, {how}", speed]
  if results.get("num_skipped") is not None:
    parts.append(f"{results['num_skipped']} non-finite steps skipped")
  splits: dict[str, list[str]] = {}
  for split, names in (results.get("non_finite") or {}).items():
    for n in names:
      splits.setdefault(n, []).append(split)
  if splits:
    parts.append("non-finite loss, metrics null: " + ", ".join(f"{n} ({' and '.join(s)})" for n, s in splits.items()))
  empty: dict[str, list[str]] = {}
  for split, names in (results.get("no_examples") or {}).items():
    for n in names:
      empty.setdefault(n, []).append(split)
  if empty:
    parts.append("no labelled examples: " + ", ".join(f"{n} ({' and '.join(s)})" for n, s in empty.items()))
  return "; ".join(parts)


def sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """One row per run: per-task test metrics, Δm%, ms/step and the validation criterion; ``*`` marks grid winners.

  Examples:
    >>> r = {"tasks": ["a"], "metric": {"a": "acc"}, "test": {"a/acc": 0.9}, "delta_m": 1.0, "step_ms": 2.0,
    ...      "val_score": 0.85}
    >>> print(sweep_table([{"label": "weighting=equal", "results": r, "chosen": False}]))
    run                  a acc       Δm%   ms/step   val score
    weighting=equal     0.9000     +1.00      2.00      0.8500
  """
  if not rows:
    return "(no runs)"
  first = rows[0]["results"]
  names = first["tasks"]
  lw = max(4, *(len(r["label"]) for r in rows)) + 3
  cols = [f"{n} {_metric_label(first, n)}" for n in names]
  marked = {
    n for row in rows for key in ("non_finite", "no_examples") for n in (row["results"].get(key) or {}).get("test", ())
  }
  cw = [max(len(c), 8, len(NO_EXAMPLES) if n in marked else 0) + 2 for c, n in zip(cols, names)]
  lines = [
    f"{'run':<{lw}}" + "".join(f"{c:>{w}}" for c, w in zip(cols, cw)) + f"{'Δm%':>10}{'ms/step':>10}{'val score':>12}"
  ]
  for row in rows:
    r = row["results"]
    cells = "".join(_cell(r, n, w) for n, w in zip(names, cw))
    dm = r.get("delta_m")
    dm_s = f"{dm:>+10.2f}" if dm is not None else f"{'—':>10}"
    ms = r.get("step_ms")
    ms_s = f"{ms:>10.2f}" if ms else f"{'—':>10}"
    mark = "  * best on validation" if row.get("chosen") else ""
    lines.append(f"{row['label']:<{lw}}{cells}{dm_s}{ms_s}{_fmt(r.get('val_score'), 12)}{mark}")
  return "\n".join(lines)


def baselines_table(entries: Mapping[str, Mapping[str, Any]]) -> str:
  """The stored single-task baselines: per task, its metric on validation and test.

  Examples:
    >>> print(baselines_table({"a": {"metric": "acc", "validation": 0.8, "test": 0.79, "step_ms": 1.0}}))
    task   metric    validation        test   ms/step
    a      acc           0.8000      0.7900      1.00
  """
  tw = max(4, *(len(n) for n in entries)) + 3
  lines = [f"{'task':<{tw}}{'metric':<8}{'validation':>12}{'test':>12}{'ms/step':>10}"]
  for n, e in entries.items():
    ms = e.get("step_ms")
    ms_s = f"{ms:>10.2f}" if ms else f"{'—':>10}"
    lines.append(f"{n:<{tw}}{e['metric']:<8}{_fmt(e['validation'], 12)}{_fmt(e['test'], 12)}{ms_s}")
  return "\n".join(lines)
