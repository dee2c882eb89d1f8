"""The default experiment: a hard-sharing CNN on MultiDigits (tasks ``left`` and ``right``), equal weighting.

Command (the first run prepares MultiDigits, ~20 s, and trains the two
single-task baselines with the same budget for Δm%)::

  jmtl train --config configs/multi_digits.py --workdir /tmp/md

Measured on this machine (2 shared CPU cores, load average ~4 from other
jobs; jax 0.10 CPU), from an empty data dir: 110 s wall in all (preparing
MultiDigits ~20 s, three 3,000-step trainings, evaluations, plots)::

  task    metric   single-task   MTL (equal)   negative transfer  behind since
  left    acc           0.9517        0.9226                 yes            no
  right   acc           0.9410        0.9156                 yes          2000

  Δm% = -2.88   (test split; model of step 3000, best validation acc; 8.52 ms/step; 0 non-finite steps skipped)

(``behind since``, added later: the step from which the validation curve trails the single-task one beyond noise;
measured on a later run of the same command, identical otherwise but for ms/step under load.)

The two digits are independent labels, so a trunk shared at equal capacity
costs each task a little (the single-task models each have a whole trunk).
``jmtl sweep --config configs/multi_digits.py --config.baselines=/tmp/md/baselines
--over weighting=METHODS --workdir /tmp/md_sweep`` compares the methods, reusing those baselines; the README's
table lists the methods run (30 of them, 47 min at load average 5-9; IMTL-L and uncertainty were best here,
Δm% = -1.71 and -1.73).

Every field can be changed on the command line, e.g.
``--config.weighting=uncertainty``, ``--config.model.name=mlp``,
``--config.num_steps=500``, ``--config.dataset.options.num_train=20000``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "multi_digits"  # multi_digits | synthetic | qm9 | a catalog name (celeb_a, ...)
  config.dataset.config = ""  # the TFDS builder config ("" = its default)
  config.dataset.data_dir = ""  # "" = $JMTL_DATA_DIR or ~/.cache/jmtl/tensorflow_datasets
  config.dataset.options = ml_collections.ConfigDict()  # builder overrides, e.g. num_train=20000
  config.dataset.in_memory = True  # read each split into memory once (fast for small sets)
  config.dataset.standardize_inputs = False  # standardise every input feature by training statistics
  config.dataset.workers = 0  # grain worker processes reading training batches (for sets not in memory)
  config.dataset.splits = ml_collections.ConfigDict(dict(train="train", validation="validation", test="test"))
  config.tasks = ""  # comma-separated subset of the dataset's tasks; "" = all

  config.model = ml_collections.ConfigDict()
  # cnn | resnet | mtan | mlp | soft_mlp | cross_stitch | mmoe | cgc | ple | dselect_k | ltb;
  # the model's arguments are the group of the same name.
  config.model.name = "cnn"
  # The computation dtype ("bfloat16" on accelerators); parameters, losses and the update stay float32.
  config.model.dtype = "float32"
  config.model.cnn = ml_collections.ConfigDict(dict(features=(16, 32), dense=64))
  config.model.resnet = ml_collections.ConfigDict(dict(stage_features=(16, 32), blocks_per_stage=1, norm="batch"))
  config.model.mtan = ml_collections.ConfigDict(dict(features=(16, 32), trunk="cnn"))
  config.model.cross_stitch = ml_collections.ConfigDict(dict(hidden=(256, 256), init_self=0.9))
  config.model.mmoe = ml_collections.ConfigDict(dict(num_experts=4, expert_hidden=(256, 128), tower_hidden=(64,)))
  config.model.cgc = ml_collections.ConfigDict(
    dict(num_shared_experts=2, num_task_experts=1, expert_hidden=(256, 128), tower_hidden=(64,))
  )
  config.model.ple = ml_collections.ConfigDict(
    dict(num_levels=2, num_shared_experts=2, num_task_experts=1, expert_hidden=(128,), tower_hidden=(64,))
  )
  config.model.dselect_k = ml_collections.ConfigDict(
    dict(num_experts=4, k=2, expert_hidden=(256, 128), tower_hidden=(64,), gamma=1.0)
  )
  # Learning to Branch; None: warm-up and temperature decay laid out over config.num_steps (see jmtl.models.ltb).
  config.model.ltb = ml_collections.ConfigDict(
    dict(hidden=(256, 256), temperature=5.0, warmup_steps=None, decay_steps=None)
  )
  config.model.mlp = ml_collections.ConfigDict(dict(hidden=(256, 256), head_hidden=()))
  config.model.soft_mlp = ml_collections.ConfigDict(dict(hidden=(256, 256)))

  # A method name from jmtl.weighting (equal, static, uncertainty, dwa, rlw, gls, famo, imtl_l, pcgrad,
  # imtl_g, aligned_mtl, gradvac, gradnorm, graddrop, mgda, upgrad, cagrad, nash_mtl, ...), or a chain
  # "uncertainty+static"; weighting_args.<method> holds its keyword arguments.
  config.weighting = "equal"
  config.static_weights = ()  # for "static": one weight per task
  config.static_grid = 4  # sweeps: steps per task of the static-weight grid on the simplex
  config.weighting_args = ml_collections.ConfigDict()
  config.weighting_args.dwa = ml_collections.ConfigDict(dict(temperature=2.0))
  config.weighting_args.famo = ml_collections.ConfigDict(dict(learning_rate=0.025, weight_decay=1e-3))
  config.grad = ml_collections.ConfigDict(dict(level="parameter", heads="weighted", chunk_size=0, cross_device="exact"))
  config.sharing = ml_collections.ConfigDict(dict(soft=0.0, kind="pairwise", weight_decay=0.0))

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # adam | adamw | sgd
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"  # constant | cosine
  config.optimizer.warmup_steps = 0
  config.optimizer.momentum = 0.9  # sgd
  config.optimizer.weight_decay = 1e-4  # adamw (decoupled)

  config.devices = 1  # data parallelism: the global batch split over this many devices (0 = all); see README
  config.num_steps = 3000
  config.batch_size = 64
  config.eval_batch_size = 1000
  config.log_every = 50
  config.eval_every = 500  # validation curves and model selection
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  # A step whose loss, weight or gradient is not finite is skipped (nothing changes); skips are warned about on
  # stderr as they happen, and the run stops (exit 1, after a checkpoint) when more than max_skipped_fraction of
  # the last skip_window steps (at least log_every) were skipped. 1.0: never stop.
  config.max_skipped_fraction = 0.1
  config.skip_window = 100
  # Check every batch and step on the device (labels in range, masks in [0, 1], finite inputs, losses, weights):
  # the first bad one stops the run naming the task and the example. Slower (two host syncs per step): to debug.
  config.checks = False
  config.select = "best"  # "best": the parameters with the best validation select_metric; "final"
  config.select_metric = "acc"  # a metric every task has (mean over tasks), or "loss"
  config.baselines = "auto"  # "auto": train into <workdir>/baselines; a directory to share; "" for none
  # Task relations (jmtl.relations; README "Task relations"): TAG's lookahead affinity every `every` steps (0: off)
  # with an SGD step of lookahead_lr (0: optimizer.learning_rate) on the tasks `tasks` ("" = all), chunk_size of them
  # at once (0: all), and the gradient cosine; `groups` caps the suggested grouping (0: K). A task is flagged behind
  # its single-task baseline when its validation gap exceeds max(transfer_sigmas x noise, transfer_min_gap %) at
  # transfer_patience validations in a row, to the end.
  config.relations = ml_collections.ConfigDict(
    dict(
      every=0,
      lookahead_lr=0.1,
      tasks="",
      chunk_size=2,
      groups=0,
      transfer_sigmas=2.0,
      transfer_min_gap=2.0,
      transfer_patience=3,
    )
  )
  # Co-training (jmtl.cotrain; README "Co-training"): an ensemble of `members` (>= 2; seeds seed, seed+1, ...) in one
  # vmapped step, predicting the mean probability (or majority `vote`), with mutual learning of weight `beta` > 0; or
  # a student distilled from `teachers` ("baselines": the single-task baselines; or a run workdir) with weight
  # `weight` on the distillation loss at `temperature`, annealed to 0 over the run with `anneal` (BAM); the members'
  # `loop`: "vmap", "unroll" or "auto" (unroll on CPU, where vmapped convolutions are slow; vmap on accelerators).
  config.cotrain = ml_collections.ConfigDict(
    dict(members=0, vote=False, beta=0.0, temperature=1.0, teachers="", weight=1.0, anneal=False, loop="auto")
  )
  config.plots = True
  # Where every logged value also goes (jmtl.run.trackers; README "Search and tracking"), comma separated:
  # tensorboard | mlflow (SQLite store in the workdir, or $MLFLOW_TRACKING_URI) | wandb (offline unless $WANDB_MODE).
  config.trackers = "tensorboard"
  return config
