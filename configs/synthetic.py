"""Three related 4-class synthetic tasks (``classification_k3``, ρ = 0.8) with a hard-sharing MLP.

Command::

  jmtl train --config configs/synthetic.py --workdir /tmp/syn

Other task families: ``--config.dataset.config=regression_k3`` (set
``--config.select_metric=loss``), ``unrelated_k3``, ``classification_k8``,
``conflicting_k2``; sizes and relatedness through
``--config.dataset.options.num_train=2000``, ``...relatedness=0.3``.

Measured on this machine (2 shared CPU cores, load average ~4), 26 s wall
including the three single-task baselines::

  task     metric   single-task   MTL (equal)   negative transfer
  task_0   acc           0.7046        0.7024                 yes
  task_1   acc           0.6874        0.6862                 yes
  task_2   acc           0.6644        0.6712                  no

  Δm% = +0.18   (test split; model of step 1000, best validation acc; 0.75 ms/step; 0 non-finite steps skipped)
"""

import ml_collections

from jmtl.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.dataset.name = "synthetic"
  config.dataset.config = "classification_k3"
  config.dataset.options = ml_collections.ConfigDict(dict(num_train=8000, num_validation=2000, num_test=5000))
  config.model.name = "mlp"
  config.model.mlp.hidden = (128, 128)
  config.model.mtan.update(features=(128, 128), trunk="mlp")
  config.model.cross_stitch.hidden = (128, 128)
  config.model.mmoe.update(num_experts=6, expert_hidden=(64,), tower_hidden=(32,))
  config.model.cgc.update(expert_hidden=(64,), tower_hidden=(32,))
  config.model.ple.update(expert_hidden=(64,), tower_hidden=(32,))
  config.model.dselect_k.update(num_experts=6, expert_hidden=(64,), tower_hidden=(32,))
  config.model.ltb.hidden = (128, 128)
  config.num_steps = 1500
  config.batch_size = 128
  return config
