"""MLflow and W&B (offline) runs of a short ``jmtl train`` hold its config, every logged scalar, the final metrics,
the results table and the plots, read back with MLflow's client and W&B's own record format."""

import glob
import json
import os
import struct

import pytest

from jmtl.run import cli
from jmtl.run import logs
from jmtl.run import trackers
from tests._helpers import synthetic_train_args

DATA = dict(num_tasks=2, num_train=256, num_validation=128, num_test=128)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from jmtl.data import synthetic

  data_dir = str(tmp_path_factory.mktemp("data"))
  synthetic.prepare(data_dir, "classification_k3", **DATA)
  workdir = tmp_path_factory.mktemp("run") / "tracked"
  fields = dict(num_steps=20, log_every=10, eval_every=10, checkpoint_every=10, trackers="tensorboard,mlflow,wandb")
  argv = [*synthetic_train_args(data_dir, DATA, **fields), "--config.plots=true", "--workdir", str(workdir)]
  os.environ.pop("MLFLOW_TRACKING_URI", None)
  os.environ.pop("WANDB_MODE", None)
  assert cli.main(argv) == 0
  records = logs.read_jsonl(str(workdir / "metrics.jsonl"))
  results = json.loads((workdir / "results.json").read_text())
  return workdir, records, results


def expected_scalars(records):
  """(name, step) -> value of every number the run logged, named as the trackers name them."""
  out = {}
  for r in records:
    for k, v in trackers.scalars_of(r["kind"], {k: v for k, v in r.items() if k not in ("step", "kind")}).items():
      out[k, r["step"]] = v
  return out


def test_mlflow_run_holds_params_scalars_table_and_artifacts(run, tmp_path):
  from mlflow.tracking import MlflowClient

  workdir, records, results = run
  state = json.loads((workdir / "trackers.json").read_text())
  assert state["finished"] and state["mlflow"]["uri"] == f"sqlite:///{workdir}/mlflow.db"  # in the workdir
  client = MlflowClient(tracking_uri=state["mlflow"]["uri"])
  got = client.get_run(state["mlflow"]["run_id"])
  assert got.info.status == "FINISHED" and got.info.run_name == "tracked"
  assert got.data.params["optimizer.learning_rate"] == "0.001" and got.data.params["num_steps"] == "20"
  assert got.data.params["model.mlp.hidden"] == "[16]" and got.data.params["trackers"] == "tensorboard,mlflow,wandb"
  expected = expected_scalars(records)
  assert ("train/loss/task_0", 10) in expected and ("validation/task_1/acc", 20) in expected
  for name in {k for k, _ in expected}:
    history = {m.step: m.value for m in client.get_metric_history(got.info.run_id, name)}
    assert history == pytest.approx({s: v for (k, s), v in expected.items() if k == name}), name
  assert got.data.metrics["final/test/task_0/acc"] == pytest.approx(results["test"]["task_0/acc"])
  assert got.data.metrics["final/validation/task_1/loss"] == pytest.approx(results["validation"]["task_1/loss"])
  paths = {a.path for a in client.list_artifacts(got.info.run_id)}
  assert {"results.json", "results_table.json", "plots"} <= paths
  assert {a.path for a in client.list_artifacts(got.info.run_id, "plots")} >= {"plots/curves.png"}
  with open(client.download_artifacts(got.info.run_id, "results_table.json", str(tmp_path))) as f:
    table = json.load(f)
  assert table["data"] == trackers.results_table(results)[1]


def tensorboard_scalars(directory):
  """(tag, step) -> value of every scalar in the TFRecord event files of ``directory`` (uint64 length, uint32
  masked CRC, an ``Event`` protobuf, uint32 masked CRC), parsed with tensorboardX's own protobuf."""
  from tensorboardX.proto import event_pb2

  out = {}
  for file in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    with open(file, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out[v.tag, event.step] = v.simple_value
  return out


def test_tensorboard_gets_every_scalar_and_the_final_metrics(run):
  workdir, records, results = run
  got = tensorboard_scalars(str(workdir / "tensorboard"))
  for key, value in expected_scalars(records).items():
    assert got[key] == pytest.approx(value, rel=1e-6), key
  assert got["final/test/task_0/acc", 20] == pytest.approx(results["test"]["task_0/acc"])


def wandb_records(path):
  """The records of a W&B ``.wandb`` file: W&B's LevelDB-style log of ``wandb_internal_pb2.Record`` messages
  (a 7-byte header, then 32 KiB blocks of chunks: CRC-32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, chunk = 7, b""
  while pos + 7 <= len(data):
    room = 32768 - pos % 32768
    if room < 7:  # a block's tail too short for a chunk header: padding
      pos += room
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    if kind == 0 and length == 0:
      pos += room
      continue
    chunk += data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      yield record
      chunk = b""


def test_wandb_offline_run_holds_params_scalars_table_and_artifacts(run):
  workdir, records, results = run
  state = json.loads((workdir / "trackers.json").read_text())
  (run_dir,) = glob.glob(str(workdir / "wandb" / f"offline-run-*-{state['wandb']['id']}"))  # offline: no network
  (file,) = glob.glob(os.path.join(run_dir, "*.wandb"))
  config, history, files, exit_code = {}, {}, set(), None
  for r in wandb_records(file):
    kind = r.WhichOneof("record_type")
    if kind == "run":
      config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    elif kind == "config":
      config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    elif kind == "history":
      row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      history.setdefault(row["_step"], {}).update(row)
    elif kind == "files":
      files |= {f.path for f in r.files.files}
    elif kind == "exit":
      exit_code = r.exit.exit_code
  assert exit_code == 0
  assert config["optimizer.learning_rate"] == 0.001 and config["model.mlp.hidden"] == [16]
  for (name, step), value in expected_scalars(records).items():
    assert history[step][name] == pytest.approx(value), (name, step)
  assert history[20]["final/test/task_0/acc"] == pytest.approx(results["test"]["task_0/acc"])
  assert {"results.json", "plots/curves.png"} <= files
  (table,) = [f for f in files if f.startswith("media/table/results_table")]
  with open(os.path.join(run_dir, "files", table)) as f:
    data = json.load(f)
  assert data["columns"] == trackers.results_table(results)[0]
  assert data["data"] == trackers.results_table(results)[1]
