"""Negative transfer while training: a task's validation curve against its single-task baseline's, step by step.

At every validation step ``s`` that both runs logged, the *gap* is how far the
multi-task model is behind the single-task one, in percent of the baseline
(the per-task term of Δm%, sign flipped)::

  gₛ = 100 · (baseline − MTL) / |baseline|    (a metric where higher is better)
  gₛ = 100 · (MTL − baseline) / |baseline|    (lower is better)

**The rule.** The noise of a gap curve is estimated from its own
step-to-step changes, robustly: ``σ̂ₛ = 1.4826 · median_{t≤s} |g_t − g_{t−1}| / √2``
(for a constant gap plus independent noise of standard deviation σ, the
differences have standard deviation σ√2 and the scaled median absolute value
estimates it; a trend makes ``σ̂`` larger, so the rule errs on the quiet
side). The task is *behind* at ``s`` when the gap exceeds
``τₛ = max(sigmas · σ̂ₛ, min_gap)`` at ``s`` and at the ``patience − 1``
validations before it, with at least 3 validations so far. ``min_gap`` stands
for the noise the curves do not show: every validation scores the same
examples, so the sampling error of the comparison is the same at every step
(the standard error of the difference of two accuracies near 0.75 on 1,000
examples is about 2.6 % of them; raise it for a smaller validation set).
Defaults: ``sigmas = 2``, ``min_gap = 2`` %, ``patience = 3``.

The task is **flagged** when it is behind at the last validation; the flag
*appeared* at the first step of the run of consecutive behind validations
that reaches the last one (a lag early in training that recovered is not a
flag at the end; the first step the rule ever held is reported too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

#: The scale of the median absolute deviation that estimates a normal standard deviation.
MAD_SCALE = 1.4826


class Transfer(NamedTuple):
  """One task's comparison with its baseline over training.

  Attributes:
    steps: the validation steps both runs logged.
    gap: gₛ in percent (positive: the multi-task model is behind).
    threshold: τₛ (``None`` before the third validation).
    behind: whether the rule holds at each step.
    first_step: the flag's first step: where the run of behind validations
      reaching the last one starts; ``None`` when not behind at the end.
    at_end: the flag: whether the rule holds at the last step.
    first_ever: the first step the rule held, or ``None``.
  """

  steps: list[int]
  gap: list[float]
  threshold: list[float | None]
  behind: list[bool]
  first_step: int | None
  at_end: bool
  first_ever: int | None


def gap_percent(mtl: float, baseline: float, higher_is_better: bool) -> float | None:
  """How far ``mtl`` is behind ``baseline``, in percent of ``|baseline|`` (``None`` if either is missing or 0).

  Examples:
    >>> gap_percent(0.9, 1.0, True), gap_percent(0.9, 1.0, False)
    (10.0, -10.0)
  """
  if mtl is None or baseline is None or not (math.isfinite(mtl) and math.isfinite(baseline)) or baseline == 0:
    return None
  sign = 1.0 if higher_is_better else -1.0
  return 100.0 * sign * (baseline - mtl) / abs(baseline)


def behind_baseline(
  steps: Sequence[int],
  mtl: Sequence[float | None],
  baseline: Sequence[float | None],
  higher_is_better: bool,
  *,
  sigmas: float = 2.0,
  min_gap: float = 2.0,
  patience: int = 3,
) -> Transfer:
  """Applies the rule of this module to one task's validation curves (aligned by ``steps``).

  Points where either value is missing, not finite or the baseline is 0 are
  left out.

  Examples:
    >>> steps = [100, 200, 300, 400, 500, 600]
    >>> base = [0.55, 0.70, 0.75, 0.76, 0.77, 0.77]
    >>> t = behind_baseline(steps, [0.50, 0.60, 0.62, 0.63, 0.63, 0.64], base, True)
    >>> t.at_end, t.first_step, [round(g, 1) for g in t.gap]
    (True, 300, [9.1, 14.3, 17.3, 17.1, 18.2, 16.9])
    >>> t = behind_baseline(steps, [0.50, 0.60, 0.62, 0.75, 0.77, 0.77], base, True)  # caught up: no flag
    >>> t.at_end, t.first_step, t.first_ever
    (False, None, 300)
  """
  if not (len(steps) == len(mtl) == len(baseline)):
    raise ValueError(f"behind_baseline: {len(steps)} steps, {len(mtl)} MTL and {len(baseline)} baseline values")
  if sigmas < 0 or min_gap < 0 or patience < 1:
    raise ValueError(
      f"behind_baseline: need sigmas >= 0, min_gap >= 0, patience >= 1; got {sigmas}, {min_gap}, {patience}"
    )
  kept_steps, gaps = [], []
  for s, m, b in zip(steps, mtl, baseline):
    g = gap_percent(m, b, higher_is_better)
    if g is not None:
      kept_steps.append(int(s))
      gaps.append(g)
  thresholds: list[float | None] = []
  behind: list[bool] = []
  for n in range(len(gaps)):
    if n < 2:
      thresholds.append(None)
      behind.append(False)
      continue
    sigma = MAD_SCALE * float(np.median(np.abs(np.diff(gaps[: n + 1])))) / math.sqrt(2)
    tau = max(sigmas * sigma, min_gap)
    thresholds.append(tau)
    recent = gaps[max(0, n - patience + 1) : n + 1]
    behind.append(len(recent) == patience and all(g > tau for g in recent))
  ever = next((s for s, b in zip(kept_steps, behind) if b), None)
  at_end = bool(behind[-1]) if behind else False
  first = None
  if at_end:
    n = len(behind) - 1
    while n > 0 and behind[n - 1]:
      n -= 1
    first = kept_steps[n]
  return Transfer(kept_steps, gaps, thresholds, behind, first, at_end, ever)
