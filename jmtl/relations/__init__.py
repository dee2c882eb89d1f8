"""How tasks relate: TAG's inter-task affinity and the gradient cosine measured in the train step, task grouping,
negative transfer against single-task baselines.

* :func:`tracker` makes the spec :meth:`jmtl.TrainState.create` takes as
  ``relations=``; the train step then measures the lookahead affinity of Fifty
  et al. ("Efficiently Identifying Task Groupings for Multi-Task Learning",
  NeurIPS 2021) every ``every`` steps under ``lax.cond`` and keeps running sums
  in ``state.relations_state``; :func:`mean_affinity`, :func:`mean_cosine`
  and :func:`conflict_rate` read them.
* :func:`group_tasks` chooses the partition of the tasks into at most G
  groups with the highest total within-group affinity (exact for small K).
* :func:`behind_baseline` is the rule that flags a task whose validation
  curve falls behind its single-task baseline's beyond noise.

See ``docs/design.md``, "Task relations".
"""

from jmtl.relations._affinity import CHUNK_SIZE
from jmtl.relations._affinity import Lookahead
from jmtl.relations._affinity import Relations
from jmtl.relations._affinity import RelationsState
from jmtl.relations._affinity import conflict_rate
from jmtl.relations._affinity import init
from jmtl.relations._affinity import lookahead_affinity
from jmtl.relations._affinity import mean_affinity
from jmtl.relations._affinity import mean_cosine
from jmtl.relations._affinity import tracker
from jmtl.relations._affinity import update
from jmtl.relations._grouping import Grouping
from jmtl.relations._grouping import group_score
from jmtl.relations._grouping import group_tasks
from jmtl.relations._grouping import partition_score
from jmtl.relations._transfer import Transfer
from jmtl.relations._transfer import behind_baseline
from jmtl.relations._transfer import gap_percent

__all__ = [
  "CHUNK_SIZE",
  "Grouping",
  "Lookahead",
  "Relations",
  "RelationsState",
  "Transfer",
  "behind_baseline",
  "conflict_rate",
  "gap_percent",
  "group_score",
  "group_tasks",
  "init",
  "lookahead_affinity",
  "mean_affinity",
  "mean_cosine",
  "partition_score",
  "tracker",
  "update",
]
