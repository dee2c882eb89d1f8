"""Kill a ``jmtl train`` at random moments, resume it each time, and compare it with an uninterrupted run.

Run from the repository root::

  PYTHONPATH=. python -m benchmarks.kill_loop [--kills 24] [--steps 3000] [--seed 0]

A small run of ``configs/synthetic.py`` (data prepared once in a temporary directory) trains uninterrupted into one
workdir. Then episodes: the same command into a fresh workdir gets SIGKILL at a uniformly random moment of its
life (start-up, compilation, training, checkpoint writes, evaluation), and again after each restart of the same
command, until a start survives to the end; ``--kills`` kills in all. Prints JSON: the kills, where they landed (the
last step logged before each), and per episode whether ``results.json`` (validation and test metrics, selected
step, skipped steps, validation score) and ``metrics.jsonl`` equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(data_dir: str, workdir: str, steps: int) -> list[str]:
  config = os.path.join(ROOT, "configs", "synthetic.py")
  return [
    "train",
    "--config",
    config,
    f"--config.dataset.data_dir={data_dir}",
    "--config.dataset.options.num_train=2048",
    "--config.model.mlp.hidden=(16,)",
    "--config.batch_size=32",
    f"--config.num_steps={steps}",
    "--config.checkpoint_every=50",
    "--config.eval_every=500",
    "--config.log_every=25",
    "--config.baselines=",
    "--config.plots=false",
    "--no-progress",
    "--workdir",
    workdir,
  ]


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  # Wall-clock fields differ between any two runs.
  drop = ("examples_per_s", "step_ms", "elapsed_s", "time")
  return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=24)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  opts = parser.parse_args()
  rng = random.Random(opts.seed)
  env = {**os.environ, "PYTHONPATH": ROOT}
  with tempfile.TemporaryDirectory() as tmp:
    data, full = os.path.join(tmp, "data"), os.path.join(tmp, "full")
    run = lambda workdir: [sys.executable, "-m", "jmtl.run", *_args(data, workdir, opts.steps)]
    # Prepare the data once (a one-step run elsewhere), so that every timed start is the same command's.
    prepare = [sys.executable, "-m", "jmtl.run", *_args(data, os.path.join(tmp, "prepare"), 1)]
    subprocess.run(prepare, env=env, check=True, capture_output=True)
    start = time.monotonic()
    subprocess.run(run(full), env=env, check=True, capture_output=True)
    life = time.monotonic() - start  # the uninterrupted run's length, start-up included
    kills, episodes = [], []
    while len(kills) < opts.kills:
      # One episode: a fresh workdir, killed at random moments until a start survives to the end.
      workdir = os.path.join(tmp, f"killed{len(episodes)}")
      episode = []
      while True:
        proc = subprocess.Popen(run(workdir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, life))
        if proc.poll() is not None or len(kills) >= opts.kills:
          code = proc.wait()
          break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps = [r["step"] for r in _records(workdir)]
        episode.append(max(steps, default=None))
        kills.append(episode[-1])
      b = json.loads(pathlib.Path(workdir, "results.json").read_text()) if code == 0 else {}
      a = json.loads(pathlib.Path(full, "results.json").read_text())
      same = all(a.get(k) == b.get(k) for k in ("validation", "test", "selected_step", "num_skipped", "val_score"))
      episodes.append(
        {
          "kills": len(episode),
          "last_logged_step_at_each_kill": episode,
          "exit_code": code,
          "results_identical": same,
          "metrics_log_identical": _records(full) == _records(workdir),
        }
      )
    print(
      json.dumps(
        {
          "kills": len(kills),
          "kills_after_the_first_logged_step": sum(1 for k in kills if k is not None),
          "episodes": len(episodes),
          "episodes_identical": sum(1 for e in episodes if e["results_identical"] and e["metrics_log_identical"]),
          "uninterrupted_run_s": round(life, 1),
          "per_episode": episodes,
        },
        indent=1,
      )
    )


if __name__ == "__main__":
  main()
