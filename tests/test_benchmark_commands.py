"""The benchmarks' documented commands work as written (issue 17, papercuts f and g); speed is not asserted here.

(f) ``python -m benchmarks.input_pipeline`` prints one JSON object and nothing else on stdout (TFDS's lines go to
stderr); (g) the quick command in ``benchmarks/step_time.py``'s docstring runs from the repository root.
"""

import json
import os
import shlex
import subprocess
import sys

from tests._helpers import ROOT

ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _documented_commands(module: str) -> list[str]:
  with open(os.path.join(ROOT, "benchmarks", f"{module}.py")) as f:
    doc = f.read().split('"""')[1]
  return [line.strip() for line in doc.splitlines() if line.strip().startswith(f"python -m benchmarks.{module}")]


def test_input_pipeline_prints_only_json_on_stdout(tmp_path):
  assert any("--num_train" in c for c in _documented_commands("input_pipeline"))
  argv = ["--data_dir", str(tmp_path), "--batches", "10", "--repeats", "1", "--steps", "2"]
  argv += ["--workers", "0", "--num_train", "300"]  # MultiDigits prepared here: TFDS prints while it prepares
  out = subprocess.run(
    [sys.executable, "-m", "benchmarks.input_pipeline", *argv],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)  # the whole of stdout
  assert result["benchmark"] == "input_pipeline" and "array_record_workers_0" in result["pipeline"]
  assert "Downloading and preparing" in out.stderr  # TFDS's line went to stderr


def test_step_time_documented_command_works_as_written():
  commands = _documented_commands("step_time")
  quick = [c for c in commands if "--repeats 1" in c]
  assert len(commands) >= 2 and len(quick) == 1, commands
  argv = shlex.split(quick[0])
  out = subprocess.run(
    [sys.executable, *argv[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)
  assert result["benchmark"] == "step_time" and [r["K"] for r in result["results"]] == [2]
