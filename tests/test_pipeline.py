"""Input pipelines: determinism, exact resume, masks, multi-input sampling rules."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmtl
from jmtl.data import mixing as M
from jmtl.data import pipeline as P
from jmtl.data import synthetic


def _indexed(n, *, with_mask=False):
  """inputs[i] = i, so a batch reveals which examples it holds."""
  data = {"inputs": np.arange(n, dtype=np.int64)[:, None], "labels": {"a": np.arange(n) % 3, "b": np.arange(n) * 0.5}}
  if with_mask:
    data["masks"] = {"a": (np.arange(n) % 2).astype(np.float32)}
  return P.ArraySource(data)


def _ids(batch):
  return batch["inputs"][:, 0].tolist()


def _equal(b1, b2):
  leaves1, tree1 = jax.tree.flatten(b1)
  leaves2, tree2 = jax.tree.flatten(b2)
  return tree1 == tree2 and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(leaves1, leaves2))


class _PlainSource:
  """Only __len__/__getitem__: the minimal source contract."""

  def __init__(self, src):
    self.src = src

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    return self.src[i]


def test_array_source_validates_lengths():
  with pytest.raises(ValueError, match=r"labels\['a'\]"):
    P.ArraySource({"inputs": np.zeros((4, 2)), "labels": {"a": np.zeros(3)}})
  src = P.ArraySource(synthetic.make_tasks(12, synthetic.TaskFamily(num_tasks=2, kind="regression")))
  assert src.tasks["task_0"] == {"kind": "regression", "dim": 1}
  assert src.gather([3, 1])["inputs"].shape == (2, 32)
  masked = _indexed(10, with_mask=True)
  copy = P.ArraySource.from_source(_PlainSource(masked), chunk=3)
  assert _equal(P.multi_label(copy, 4, seed=0)[1], P.multi_label(masked, 4, seed=0)[1])
  assert list(copy.masks) == ["a"]


def test_same_seed_same_batches_and_epochs_are_permutations():
  src = _indexed(50)
  a = [P.multi_label(src, 8, seed=1)[s] for s in range(12)]
  b = list(iter(P.multi_label(src, 8, seed=1)).__next__() for _ in range(1))
  assert _equal(a[0], b[0])
  it = iter(P.multi_label(src, 8, seed=1))
  assert all(_equal(x, next(it)) for x in a)
  c = [P.multi_label(src, 8, seed=2)[s] for s in range(12)]
  assert _ids(a[0]) != _ids(c[0])
  epoch0 = [i for x in a[:6] for i in _ids(x)]
  epoch1 = [i for x in a[6:] for i in _ids(x)]
  assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48  # 6 batches of 8, no repeats within an epoch
  assert epoch0 != epoch1  # reshuffled every epoch


def test_batch_structure_dtypes_and_transform():
  src = P.ArraySource({"inputs": np.full((20, 3, 3), 255, np.uint8), "labels": {"a": np.arange(20, dtype=np.int64)}})
  batch = P.multi_label(src, 4, seed=0, transform=P.normalize_images(255.0))[0]
  assert batch["inputs"].dtype == np.float32 and np.allclose(batch["inputs"], 1.0)
  assert batch["labels"]["a"].dtype == np.int32 and batch["masks"]["a"].tolist() == [1.0] * 4
  # A per-example transform that is not marked elementwise goes example by example; same result.
  per_example = lambda ex: P.normalize_images(255.0)(ex)  # noqa: PLW0108 -- drops the elementwise flag
  assert _equal(P.multi_label(_PlainSource(src), 4, seed=0, transform=per_example)[0], batch)


@pytest.mark.parametrize("stop", [3, 6, 7, 13])
def test_restored_iterator_continues_exactly(stop):
  src = _indexed(50)  # 6 batches per epoch: 6 and 13 cross epoch boundaries
  pipe = P.multi_label(src, 8, seed=5)
  it = iter(pipe)
  reference = [next(it) for _ in range(18)]
  it = iter(pipe)
  for _ in range(stop):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  restored = iter(P.multi_label(src, 8, seed=5))
  restored.set_state(state)
  assert all(_equal(next(restored), reference[s]) for s in range(stop, 18))


def test_finite_epochs_remainder_and_state_mismatch():
  src = _indexed(10)
  pipe = P.multi_label(src, 4, seed=0, num_epochs=2, drop_remainder=False)
  batches = list(pipe)
  assert len(pipe) == 6 and [len(_ids(b)) for b in batches] == [4, 4, 2, 4, 4, 2]
  assert sorted(i for b in batches[:3] for i in _ids(b)) == list(range(10))
  it = iter(P.multi_label(src, 4, seed=0))
  with pytest.raises(ValueError, match="seed"):
    iter(P.multi_label(src, 4, seed=1)).set_state(it.get_state())


def test_masks_mark_missing_labels_and_losses_ignore_them():
  src = _indexed(16, with_mask=True)
  batch = P.multi_label(src, 16, seed=0, shuffle=False)[0]
  np.testing.assert_array_equal(batch["masks"]["a"], np.arange(16) % 2)
  np.testing.assert_array_equal(batch["masks"]["b"], np.ones(16))
  # Garbage labels where the mask is 0 (out of range: a NaN loss unless masked out).
  labels = np.where(batch["masks"]["a"] > 0, batch["labels"]["a"], 99).astype(np.int32)
  logits = jax.random.normal(jax.random.key(0), (16, 3))
  task = jmtl.Task("a", jmtl.losses.softmax_cross_entropy)
  total, count = jmtl.tasks.loss_terms(task, {"a": logits}, {**batch, "labels": {"a": labels}})
  keep = batch["masks"]["a"] > 0
  expected = jmtl.losses.softmax_cross_entropy(logits[keep], labels[keep]).sum()
  assert float(count) == 8.0 and np.isfinite(float(total))
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


def _fake_processes(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def test_process_sharding_takes_rows_of_the_global_batch(monkeypatch):
  src = _indexed(40)
  glob = P.multi_label(src, 8, seed=3)[2]
  srcs = {"a": src, "b": P.ArraySource({"inputs": np.zeros((9, 1), np.int64), "labels": {"b": np.zeros(9)}})}
  mi = M.multi_input(srcs, 8, seed=3)[4]
  _fake_processes(monkeypatch, 1, 2)
  assert _ids(P.multi_label(src, 8, seed=3)[2]) == _ids(glob)[4:]
  assert _equal(M.multi_input(srcs, 8, seed=3)[4], jax.tree.map(lambda x: x[4:], mi))
  with pytest.raises(ValueError, match="divisible"):
    P.multi_label(src, 7, seed=0)


def test_a_position_saved_under_one_process_count_restores_under_another(monkeypatch):
  """The saved position counts global batches: process 1 of 2 resumes what 1 process saved, and vice versa."""
  src = _indexed(40)
  it = iter(P.multi_label(src, 8, seed=3))
  next(it), next(it)
  one = it.get_state()
  _fake_processes(monkeypatch, 1, 2)
  it2 = iter(P.multi_label(src, 8, seed=3))
  it2.set_state(one)
  assert _ids(next(it2)) == _ids(P.multi_label(src, 8, seed=3)[2])  # batch 2, this process's rows
  two = it2.get_state()
  monkeypatch.undo()
  it1 = iter(P.multi_label(src, 8, seed=3))
  it1.set_state(two)
  assert _ids(next(it1)) == _ids(P.multi_label(src, 8, seed=3)[3])
  with pytest.raises(ValueError, match="another pipeline"):
    iter(P.multi_label(src, 8, seed=4)).set_state(two)


def _task_sources(sizes, in_shape=(1,)):
  out = {}
  for k, n in sizes.items():
    x = np.zeros((n, *in_shape), np.int64)
    x[:, 0] = np.arange(n)
    y = np.arange(n) % 4 if k != "reg" else np.ones((n, 3), np.float64)
    out[k] = P.ArraySource({"inputs": x, "labels": {k: y}})
  return out


@pytest.mark.parametrize(("rule", "temperature"), [("proportional", 1.0), ("uniform", 1.0), ("temperature", 3.0)])
def test_multi_input_task_frequencies_match_the_rule(rule, temperature):
  sizes = {"big": 4000, "mid": 1000, "small": 50}
  pipe = M.multi_input(_task_sources(sizes), 64, seed=11, rule=rule, temperature=temperature)
  counts = np.zeros(3)
  for s in range(150):
    b = pipe[s]
    m = np.stack([b["masks"][k] for k in sizes], 1)
    assert (m.sum(1) == 1).all()  # every example belongs to exactly one task
    counts += m.sum(0)
  n = np.array(list(sizes.values()), float)
  p = {"proportional": n, "uniform": np.ones(3), "temperature": n ** (1 / temperature)}[rule]
  expected = counts.sum() * p / p.sum()
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 13.8, (counts, expected)  # chi-square, 2 degrees of freedom, p = 0.001


def test_multi_input_layout_without_replacement_and_resume():
  sizes = {"cls": 30, "reg": 7}
  pipe = M.multi_input(_task_sources(sizes), 8, seed=2, rule="uniform")
  batches = [pipe[s] for s in range(12)]
  seen = {k: [] for k in sizes}
  for b in batches:
    assert b["labels"]["reg"].shape == (8, 3) and b["labels"]["reg"].dtype == np.float32
    assert b["labels"]["cls"].dtype == np.int32
    for k in sizes:
      on = b["masks"][k] > 0
      seen[k] += b["inputs"][on, 0].tolist()
      other = next(t for t in sizes if t != k)
      assert not b["labels"][other][on].any()  # other tasks' labels are zero-filled
  for k, n in sizes.items():
    for e in range(len(seen[k]) // n):  # each full pass over D_k is a permutation
      assert sorted(seen[k][e * n : (e + 1) * n]) == list(range(n))
  it = iter(pipe)
  for _ in range(5):
    next(it)
  restored = iter(M.multi_input(_task_sources(sizes), 8, seed=2, rule="uniform"))
  restored.set_state(json.loads(json.dumps(it.get_state())))
  assert all(_equal(next(restored), batches[s]) for s in range(5, 12))
  assert not _equal(M.multi_input(_task_sources(sizes), 8, seed=3, rule="uniform")[0], batches[0])


def test_multi_input_errors():
  srcs = {**_task_sources({"a": 10}), **_task_sources({"b": 10}, in_shape=(2,))}
  with pytest.raises(ValueError, match=r"'a': '\(1,\) int64', 'b': '\(2,\) int64'"):
    M.multi_input(srcs, 4, seed=0)
  with pytest.raises(ValueError, match="rule must be one of"):
    M.multi_input(_task_sources({"a": 10}), 4, seed=0, rule="sqrt")
  with pytest.raises(ValueError, match="gives no label 'x'"):
    M.multi_input({"x": _task_sources({"a": 10})["a"]}, 4, seed=0)


def test_multi_input_batches_feed_the_train_step():
  data = synthetic.make_tasks(64, synthetic.TaskFamily(num_tasks=2, num_classes=3))
  srcs = {
    k: P.ArraySource(
      {"inputs": data["inputs"][i * 32 : (i + 1) * 32], "labels": {k: data["labels"][k][i * 32 : (i + 1) * 32]}}
    )
    for i, k in enumerate(data["labels"])
  }
  batch = M.multi_input(srcs, 16, seed=0)[0]
  model = jmtl.models.mlp(dict.fromkeys(srcs, 3), hidden=(8,))
  tasks = [jmtl.Task(k, jmtl.losses.softmax_cross_entropy) for k in srcs]
  opt, weighting = optax.sgd(0.1), jmtl.weighting.equal()
  params = model.init(jax.random.key(0), jnp.zeros((1, 32)))
  state = jmtl.TrainState.create(params=params, tx=opt, weighting=weighting, num_tasks=2, rng=jax.random.key(1))
  _, metrics = jax.jit(jmtl.make_train_step(model, tasks))(state, batch)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
