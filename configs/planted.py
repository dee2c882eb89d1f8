"""Planted task groups: 8 synthetic 4-class tasks in groups of 3, 3 and 2 (``planted_k8``), with the relations tracker.

Tasks of one group read one shared factor block through one read-out (ρ = 0.9); tasks of different groups read
independent factors. The train step measures TAG's lookahead affinity every 10 steps.

Commands::

  jmtl train   --config configs/planted.py --workdir /tmp/planted            # table with 'behind since', 'conflict'
  jmtl analyze --workdir /tmp/planted                                       # matrices, suggested groups, plots
  jmtl group   --config configs/planted.py --groups 3 --workdir /tmp/planted_groups

The measured result is in the README ("Task relations").
"""

import ml_collections

from jmtl.configs import synthetic


def get_config() -> ml_collections.ConfigDict:
  config = synthetic.get_config()
  config.dataset.config = "planted_k8"
  config.dataset.options = ml_collections.ConfigDict(dict(num_train=8000, num_validation=2000, num_test=4000))
  config.model.mlp.hidden = (64, 64)
  config.num_steps = 1500
  config.batch_size = 128
  config.eval_every = 250
  config.checkpoint_every = 500
  config.relations.every = 10
  config.relations.lookahead_lr = 0.1
  return config
