"""CelebA: 40 binary attribute tasks (the MGDA-UB setup) with a hard-sharing CNN on 64×64 images.

Needs CelebA prepared as array_record in a TFDS data dir (TFDS cannot
download it unattended; see ``jmtl.data.catalog``)::

  jmtl train --config configs/celeba.py --config.dataset.data_dir=~/tensorflow_datasets --workdir /tmp/celeba

The images are read and resized per batch by grain worker processes (162k
images do not fit in memory at full size). Baselines are 40 single-task
models, so ``baselines`` is off by default; set ``--config.baselines=auto``
(40× the budget) or point it at a directory of stored baselines.

Not measured here: this machine has no prepared CelebA.
"""

import ml_collections

from jmtl.configs import multi_digits


def get_config() -> ml_collections.ConfigDict:
  config = multi_digits.get_config()
  config.dataset.name = "celeb_a"
  config.dataset.options = ml_collections.ConfigDict(dict(image_size=(64, 64)))
  config.dataset.in_memory = False
  config.dataset.workers = 2
  config.model.name = "cnn"
  config.model.cnn = ml_collections.ConfigDict(dict(features=(32, 64, 64), dense=256))
  config.num_steps = 20_000
  config.batch_size = 128
  config.eval_batch_size = 500
  config.log_every = 100
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.baselines = ""
  return config
