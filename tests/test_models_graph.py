"""SchNet (jmtl.models.schnet): invariances, extensivity, compact pairs == all pairs, gradient routes in float64."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmtl
from jmtl import grads
from jmtl import losses as L
from jmtl import weighting as W
from jmtl.models import graph
from jmtl.models import schnet
from tests._engine import context

TASKS = ("u0", "homo", "mu")  # u0 extensive (sum-pooled head), homo and mu not
SMALL = dict(features=8, num_interactions=2, num_rbf=6, atom_features=(5,))


def molecule(n, seed=0, spread=1.2):
  """``n`` atoms (H, C, N, O, F) at random positions: numbers ``(n,)`` and positions ``(n, 3)`` in Å."""
  r = np.random.default_rng(seed)
  return r.choice([1, 6, 7, 8, 9], n), r.normal(size=(n, 3)) * spread


def pack(numbers, positions, slots=29, order=None):
  """Packed rows ``(slots, 5)``; the atoms go to the slots ``order`` (default the first ones)."""
  out = np.zeros((slots, 5))
  order = np.arange(len(numbers)) if order is None else np.asarray(order)
  out[order, 0] = numbers
  out[order, 1:4] = positions
  out[order, 4] = 1.0
  return out


def batch_of(mols, slots=29, dtype=np.float64):
  return jnp.asarray(np.stack([pack(z, r, slots) for z, r in mols]), dtype)


@pytest.fixture(scope="module")
def model_params():
  with jax.enable_x64(True):
    model = schnet({t: 1 for t in TASKS}, **SMALL, pair_budget=0.0, param_dtype=jnp.float64)  # all slot pairs
    x = batch_of([molecule(6)])
    params = model.init(jax.random.key(0), x)
    # Non-zero biases everywhere, so that a padded slot would show if it leaked.
    params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    return model, params


def predict(model, params, x):
  preds, _ = jax.jit(model.apply)(params, x, {})
  return np.concatenate([np.asarray(preds[t]) for t in TASKS], axis=1)


def test_padding_atom_order_and_rigid_motions_change_nothing(model_params):
  model, params = model_params
  with jax.enable_x64(True):
    mols = [molecule(n, seed) for n, seed in ((5, 1), (9, 2), (17, 3))]
    want = predict(model, params, batch_of(mols))
    r = np.random.default_rng(7)
    compact = schnet({t: 1 for t in TASKS}, **SMALL, pair_budget=0.5, param_dtype=jnp.float64)
    for slots, m in ((29, model), (40, model), (40, compact)):  # the atoms scattered among the padding, in any order
      x = np.stack([pack(z, p, slots, r.choice(slots, len(z), replace=False)) for z, p in mols])
      np.testing.assert_allclose(predict(m, params, jnp.asarray(x)), want, rtol=1e-10, atol=1e-12)
    q, _ = np.linalg.qr(r.normal(size=(3, 3)))  # a rotation (or reflection) and a shift
    moved = [(z, p @ q.T + np.array([3.0, -2.0, 0.5])) for z, p in mols]
    np.testing.assert_allclose(predict(model, params, batch_of(moved)), want, rtol=1e-9, atol=1e-10)
    # One molecule alone gives the prediction it has in the batch.
    np.testing.assert_allclose(predict(model, params, batch_of(mols[1:2])), want[1:2], rtol=1e-10, atol=1e-12)


def test_compact_pairs_equal_all_pairs_and_overflow_falls_back(model_params):
  _, params = model_params
  with jax.enable_x64(True):
    mols = [molecule(n, seed) for n, seed in ((29, 4), (12, 5), (3, 6))]
    x = batch_of(mols)
    real = sum(len(z) * (len(z) - 1) for z, _ in mols)
    outs = {}
    for budget in (0.0, 0.5, 0.05):  # 0.5 fits the batch's real pairs; 0.05 does not (the lax.cond fallback)
      m = schnet({t: 1 for t in TASKS}, **SMALL, pair_budget=budget, param_dtype=jnp.float64)
      outs[budget] = predict(m, params, x)
    assert real <= round(0.5 * 3 * 29 * 28) and real > round(0.05 * 3 * 29 * 28)
    np.testing.assert_allclose(outs[0.5], outs[0.0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(outs[0.05], outs[0.0], rtol=1e-10, atol=1e-12)


def test_pair_list_against_brute_force():
  r = np.random.default_rng(0)
  mask = (r.uniform(size=(3, 6)) < 0.6).astype(np.float32)
  want = [
    (b * 6 + i, b * 6 + j) for b in range(3) for i in range(6) for j in range(6) if i != j and mask[b, i] * mask[b, j]
  ]
  dst, src, valid, count = graph.pair_list(jnp.asarray(mask), len(want) + 4)
  got = [(int(d), int(s)) for d, s, v in zip(dst, src, valid) if v]
  assert got == want and int(count) == len(want) and float(valid.sum()) == len(want)


def test_extensive_heads_are_additive_over_far_apart_copies(model_params):
  """Two copies of a molecule 100 Å apart (beyond the 5 Å cutoff): the sum-pooled part doubles, the mean stays."""
  model, params = model_params
  with jax.enable_x64(True):
    z, p = molecule(8, 11)
    one = batch_of([(z, p)])
    two = batch_of([(np.concatenate([z, z]), np.concatenate([p, p + np.array([100.0, 0.0, 0.0])]))])
    z1, _ = model.encode(params["shared"], one, {})
    z2, _ = model.encode(params["shared"], two, {})
    a = SMALL["atom_features"][-1]
    np.testing.assert_allclose(z2[:, :a], 2 * z1[:, :a], rtol=1e-10)  # s Σ φ
    np.testing.assert_allclose(z2[:, a : 2 * a], z1[:, a : 2 * a], rtol=1e-10)  # mean φ
    np.testing.assert_allclose(z2[:, 2 * a], 2 * z1[:, 2 * a], rtol=1e-12)  # s n
    bias = params["tasks"]["u0"]["dense"]["bias"]
    u1 = model.head("u0", params["tasks"]["u0"], z1) - bias
    u2 = model.head("u0", params["tasks"]["u0"], z2) - bias
    np.testing.assert_allclose(u2, 2 * u1, rtol=1e-10)
    h1 = model.head("homo", params["tasks"]["homo"], z1)
    h2 = model.head("homo", params["tasks"]["homo"], z2)
    assert not np.allclose(
      h2 - params["tasks"]["homo"]["dense"]["bias"], 2 * (h1 - params["tasks"]["homo"]["dense"]["bias"])
    )
  assert set(graph.QM9_EXTENSIVE) == {"alpha", "zpve", "u0", "u", "h", "g", "cv"}


def capture():
  """Weights 1/‖gₖ‖ (a non-trivial function of the Gramian); the state keeps the Gramian."""

  def update(losses, state, *, gramian, **_):
    del state
    return (1.0 / jnp.sqrt(jnp.diagonal(gramian) + 1e-30)).astype(losses.dtype), gramian

  return W.WeightingTransform(lambda k: jnp.zeros((k, k)), update, "gramian", None)


def test_separable_and_general_routes_give_the_same_gradients(model_params):
  model, params = model_params
  with jax.enable_x64(True):
    r = np.random.default_rng(3)
    x = batch_of([molecule(n, s) for n, s in ((4, 1), (7, 2), (11, 3), (6, 4))])
    batch = {"inputs": x, "labels": {t: jnp.asarray(r.normal(size=(4, 1))) for t in TASKS}}
    tasks = [jmtl.Task(t, L.mse) for t in TASKS]
    general = model._replace(encode=None, head=None, head_kind=None)
    out = {}
    for name, m in (("separable", model), ("general", general)):
      ctx = context(m, params, batch, tasks, capture())
      assert grads.route(ctx).name == name
      out[name] = jax.jit(lambda p, bt, ctx=ctx: grads.compute(dataclasses.replace(ctx, params=p, batch=bt)))(
        params, batch
      )
    np.testing.assert_allclose(out["separable"].weighting_state, out["general"].weighting_state, rtol=1e-10)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13), out["separable"].grads, out["general"].grads
    )

    # and both equal Σ wₖ ∇Lₖ by brute force.
    def task_loss(p, t):
      pred = model.apply(p, x, {})[0][t]
      return jnp.mean((pred - batch["labels"][t]) ** 2)

    w = out["general"].weights
    per_task = [jax.jit(jax.grad(task_loss), static_argnums=1)(params, t) for t in TASKS]
    want = jax.tree.map(lambda *g: sum(wi * gi for wi, gi in zip(w, g)), *per_task)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13), out["general"].grads, want)


def test_bad_inputs_and_arguments_fail_clearly(model_params):
  model, params = model_params
  with pytest.raises(ValueError, match=r"packed molecules \(B, N, 5\).*\(2, 29, 4\)"):
    model.apply(params, jnp.zeros((2, 29, 4)), {})
  with pytest.raises(ValueError, match="pair_budget"):
    schnet({"a": 1}, pair_budget=1.5)
  with pytest.raises(ValueError, match="cutoff"):
    schnet({"a": 1}, cutoff=0.0)
  with pytest.raises(ValueError, match="atom_features"):
    schnet({"a": 1}, atom_features=())
  with pytest.raises(ValueError, match="string"):
    schnet({"a": 1}, extensive="u0")


@pytest.mark.skipif(
  importlib.util.find_spec("qm9pack") is None, reason="qm9 needs the optional extra: pip install 'jmtl[qm9]' (qm9pack)"
)
def test_protocol_runs_end_to_end_and_prints_the_papers_table(tmp_path, capsys):
  from benchmarks import qm9_protocol

  out = qm9_protocol.main(
    [
      "--methods=equal,mgda",
      f"--workdir={tmp_path / 'protocol'}",
      "--no-progress",
      f"--config.dataset.data_dir={tmp_path / 'data'}",
      "--config.dataset.options.max_molecules=300",
      "--config.dataset.options.num_validation=40",
      "--config.dataset.options.num_test=40",
      "--config.tasks=mu,u0",
      "--config.num_steps=2",
      "--config.eval_every=2",
      "--config.checkpoint_every=2",
      "--config.log_every=1",
      "--config.batch_size=8",
      "--config.eval_batch_size=40",
      "--config.model.schnet.features=8",
      "--config.model.schnet.num_interactions=1",
      "--config.model.schnet.atom_features=(8,)",
    ]
  )
  printed = capsys.readouterr().out
  assert out["tasks"] == ["mu", "u0"] and list(out["rows"]) == ["STL (ours)", "equal", "mgda"]
  assert "Δm%" in printed and "U0" in printed and "UNVERIFIED" in printed and "62.0" in printed
  for method in ("equal", "mgda"):
    with open(tmp_path / "protocol" / method / "results.json") as f:
      results = json.load(f)
    row = out["rows"][method]
    # meV for the energies, and the papers' sign: Δm% here is minus jmtl's Δm.
    assert row["mae"]["u0"] == pytest.approx(1000 * results["test"]["u0/mae"])
    assert row["mae"]["mu"] == pytest.approx(results["test"]["mu/mae"])
    assert row["delta_m"] == pytest.approx(-results["delta_m"], rel=1e-6, abs=1e-9)
  assert out["rows"]["equal"]["mr"] + out["rows"]["mgda"]["mr"] == 3.0  # ranks 1 and 2 on each of 2 tasks


def test_qm9_config_variants_pass_the_checks():
  from jmtl.run import config as config_lib
  from jmtl.run import registry

  graph_config = config_lib.load_config("qm9:graph")
  assert (graph_config.num_steps, graph_config.batch_size, graph_config.eval_every) == (300 * 924, 120, 924)
  assert graph_config.dataset.options.to_dict() == {}  # the papers' 110,831 / 10,000 / 10,000 split
  for variant in ("", ":descriptor", ":descriptor_reduced", ":graph", ":graph_reduced"):
    config = config_lib.load_config("qm9" + variant)
    registry.check(config)
    assert registry.make_model(config, {"mu": 1, "u0": 1}).task_names == ("mu", "u0")
  with pytest.raises(config_lib.ConfigError, match="unknown variant"):
    config_lib.load_config("qm9:nope")
