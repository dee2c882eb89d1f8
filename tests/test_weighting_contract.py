"""The contract of every registered weighting method, driven by one table.

``TABLE`` has an entry per name in ``jmtl.weighting.methods()`` (a method registered without one fails
``test_every_registered_method_has_an_entry``) saying how to build it for the tests and which properties hold. Every
test reuses one jitted update per method and K (:func:`tests._asserts.compiled`), so the suite compiles each method a
few times (K = 3, K = 1, eager, chained, injected, pmapped), not once per property. The methods' own math (closed
forms, brute force, published values) is in test_weighting_gramian.py, test_weighting_loss.py and
test_weighting_projection.py; the protocol (chain, named_chain, inject_hyperparams with schedules, a user's new input)
in test_weighting_protocol.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jmtl import weighting as W
from tests._asserts import PmapCase
from tests._asserts import assert_chains
from tests._asserts import assert_finite_along
from tests._asserts import assert_jit_equals_eager
from tests._asserts import assert_no_conflict
from tests._asserts import assert_no_retrace
from tests._asserts import assert_permutation_equivariant
from tests._asserts import assert_pmap_equals_single_device
from tests._asserts import assert_state_stable
from tests._asserts import assert_trees_allclose
from tests._asserts import compiled
from tests._asserts import counting_jit
from tests._asserts import degenerate_jacobians
from tests._asserts import extreme_losses
from tests._asserts import init
from tests._asserts import loss_sequence
from tests._asserts import mixed_losses
from tests._asserts import problem
from tests._asserts import problems
from tests._asserts import random_jacobians
from tests._asserts import run


class Spec(NamedTuple):
  """How the contract tests build and check one method."""

  needs: str = "losses"
  # Constructor arguments for the tests (hashable values), or a function of K for arguments sized by the tasks.
  args: dict | Callable[[int], dict] | None = None
  key: bool = False  # update raises without a key
  # Under a permutation of the tasks (with a fixed key): "equivariant" (weights and per-task state permute with them),
  # "invariant" (the weights ignore the task order), "k2" (equivariant at K = 2 only: each task visits the others in
  # its own random order, which at K = 2 cannot matter), or None (tied to task positions).
  perm: str | None = "equivariant"
  no_conflict: bool = False  # J Jᵀw ≥ 0 by construction
  fixes_k: bool = False  # the state or the arguments fix K: a problem with another number of tasks is rejected
  hyper: tuple[str, ...] = ()  # the arguments inject_hyperparams puts in the state
  inject_args: dict | None = None  # arguments for the inject_hyperparams test, when ``args`` have no numeric one
  last: bool = False  # returns element-wise weights, so goes last in a chain
  invalid: tuple[tuple[dict, str], ...] = ()  # (arguments, message) the factory rejects with a ValueError
  steps: int = 3  # calls per trajectory (jit vs eager, retrace, permutation, chain, inject)
  eager_steps: int | None = None  # of them, compared eagerly (None: all)
  min_k: int = 1  # the fewest tasks the method is defined for (the degenerate cases run at K = 3 and, if allowed, 1)
  validation: bool = False  # requires "validation": its update is given the stand-in meta_gradient below


TABLE: dict[str, Spec] = {
  # Loss level.
  "equal": Spec(),
  "static": Spec(
    args=lambda k: {"weights": tuple(np.linspace(0.5, 2.0, k).tolist())},
    perm=None,
    fixes_k=True,
    hyper=("weights",),
    invalid=(({"weights": (1.0, -1.0)}, "non-negative"), ({"weights": ((1.0,),)}, "1-D")),
  ),
  "dwa": Spec(
    args={"temperature": 0.5, "period": 2},
    fixes_k=True,
    hyper=("temperature",),
    invalid=(({"temperature": 0.0}, "temperature"), ({"period": 1.5}, "period")),
    steps=6,  # the weights move from the fifth call: two periods of two calls first
  ),
  "rlw": Spec(key=True, perm="invariant", invalid=(({"distribution": "cauchy"}, "distribution"),)),
  "rgw": Spec(key=True, perm="invariant", invalid=(({"distribution": "cauchy"}, "distribution"),)),
  "gls": Spec(),
  "uncertainty": Spec(fixes_k=True),
  "imtl_l": Spec(fixes_k=True),
  "auto_lambda": Spec(
    fixes_k=True,
    hyper=("learning_rate", "lookahead_lr", "init_weight"),
    invalid=(({"lookahead_lr": 0.0}, "lookahead_lr"), ({"primary": (0, 0)}, "primary")),
    validation=True,
  ),
  "famo": Spec(
    args={"min_losses": 0.05},
    fixes_k=True,
    hyper=("learning_rate", "weight_decay", "min_losses", "eps"),
    invalid=(({"eps": 0.0}, "eps"), ({"min_losses": float("nan")}, "min_losses")),
  ),
  # Gramian level: min-norm, dual-cone and bargaining solvers.
  "mgda": Spec(needs="gramian", no_conflict=True, invalid=(({"normalization": "l1"}, "normalization"),)),
  "upgrad": Spec(needs="gramian", no_conflict=True),
  "dualproj": Spec(needs="gramian", no_conflict=True),
  "cagrad": Spec(needs="gramian", args={"c": 0.5}, hyper=("c",), invalid=(({"c": -1.0}, "c must be"),)),
  "nash_mtl": Spec(
    needs="gramian",
    no_conflict=True,  # gₖ·d = 1/αₖ > 0
    fixes_k=True,
    hyper=("max_norm",),
    inject_args={"max_norm": 1.0},
    invalid=(({"max_norm": 0.0}, "nash_mtl"), ({"update_weights_every": 0}, "nash_mtl")),
  ),
  # Gramian level: projections and alignments.
  # Each eager call of PCGrad and GradVac traces and compiles their loops again: one is compared.
  "pcgrad": Spec(needs="gramian", key=True, perm="k2", steps=2, eager_steps=1),
  "imtl_g": Spec(needs="gramian"),
  "config": Spec(needs="gramian"),  # conflict-free for independent gradients (test_weighting_projection)
  "aligned_mtl": Spec(
    needs="gramian",
    hyper=("rtol",),
    inject_args={"rtol": 1e-6},
    invalid=(({"scale": "max"}, "scale"), ({"rtol": 1.0}, "rtol")),
  ),
  "gradvac": Spec(
    needs="gramian",
    args={"beta": 0.5},
    key=True,
    perm="k2",
    fixes_k=True,
    hyper=("beta",),
    invalid=(({"beta": 0.0}, "beta"),),
    steps=2,
    eager_steps=1,
  ),
  "gradnorm": Spec(needs="gramian", fixes_k=True, hyper=("alpha",), invalid=(({"alpha": -1.0}, "alpha"),)),
  # Robust aggregators (K ≥ f + 3, K > 2·trim).
  "krum": Spec(
    needs="gramian",
    args={"n_selected": 2},
    min_k=3,
    invalid=(({"n_byzantine": -1}, "n_byzantine"), ({"n_selected": 0}, "n_selected")),
  ),
  # Double sampling: the cross-Gramian of two half-batches.
  "modo": Spec(needs="gramian", fixes_k=True, hyper=("gamma", "rho"), invalid=(({"gamma": 0.0}, "gamma"),)),
  "sdmgrad": Spec(
    needs="gramian",
    fixes_k=True,
    hyper=("lam", "lr", "momentum"),
    invalid=(({"n_iter": 0}, "n_iter"), ({"momentum": 1.0}, "momentum")),
  ),
  # Jacobian level.
  "trimmed_mean": Spec(needs="jacobian", min_k=3, last=True, invalid=(({"trim": 1.5}, "trim"),)),
  # Tracked gradients: the direction is returned (a Direction), so they go last.
  "moco": Spec(
    needs="jacobian",
    fixes_k=True,
    last=True,
    hyper=("beta", "beta_sigma", "gamma", "gamma_sigma", "rho"),
    invalid=(({"beta": 0.0}, "beta"), ({"gamma": -1.0}, "gamma")),
  ),
  "db_mtl": Spec(
    needs="jacobian", fixes_k=True, last=True, hyper=("beta", "beta_sigma", "eps"), invalid=(({"beta": 1.0}, "beta"),)
  ),
  "graddrop": Spec(
    needs="jacobian", args={"leak": 0.25}, key=True, last=True, hyper=("leak",), invalid=(({"leak": 1.5}, "leak"),)
  ),
  # Fairness, priorities, smoothed Tchebycheff, excess risks (FairGrad, PCD, STCH, ExcessMTL).
  "fairgrad": Spec(
    needs="gramian",
    args={"alpha": 2.0},
    no_conflict=True,  # gₖ·d = wₖ^(−1/α) > 0
    hyper=("alpha",),
    invalid=(({"alpha": -1.0}, "alpha"), ({"max_iter": 0}, "max_iter")),
  ),
  "pcd": Spec(
    needs="gramian",
    args={"tau": 0.2},
    perm=None,  # task 0 is the primary objective
    fixes_k=True,
    hyper=("tau", "beta", "eps"),
    invalid=(({"tau": 1.5}, "tau"), ({"beta": 1.0}, "beta"), ({"eps": -1.0}, "eps")),
  ),
  "stch": Spec(
    args={"mu": 0.5, "warmup_steps": 1, "nadir_steps": 2},
    fixes_k=True,
    hyper=("mu", "eps"),
    invalid=(({"mu": 0.0}, "mu"), ({"nadir_steps": 0}, "nadir_steps"), ({"warmup_steps": -1}, "warmup_steps")),
    steps=5,  # log-loss weights for three calls (one warm-up, two recording the nadir), then STCH
  ),
  "excess_mtl": Spec(
    needs="jacobian",
    args={"step_size": 0.5},
    fixes_k=True,
    hyper=("step_size", "eps"),
    invalid=(({"step_size": 0.0}, "step_size"), ({"eps": -1.0}, "eps")),
  ),
}
NAMES = sorted(TABLE)


def stand_in_meta_gradient(w, lr, val_weights=None):
  """What the train step gives a transform that requires "validation" (a function; see test_weighting_tracked for
  the real one), replaced by a smooth task-wise function so the contract runs without a model."""
  v = jnp.ones_like(w) if val_weights is None else val_weights
  return 1e3 * lr * v * jnp.tanh(w - 0.2)


@functools.cache
def factory(name: str):
  """The registered factory; for a method that requires "validation", one whose update has the stand-in bound."""
  base = W.methods()[name]
  if not TABLE[name].validation:
    return base

  @functools.wraps(base)
  def bound(*args, **kwargs):
    t = base(*args, **kwargs)
    return t._replace(update=functools.partial(t.update, meta_gradient=stand_in_meta_gradient))

  return bound


def args_of(name: str, k: int = 3) -> dict:
  args = TABLE[name].args
  return dict(args(k) if callable(args) else args or {})


def method(name: str, k: int = 3):
  """The method built with its test arguments, its jitted update and its list of traces, shared by the tests."""
  return compiled(factory(name), **args_of(name, k))


def tolerance(name: str) -> dict:
  return {"rtol": 1e-5, "atol": 1e-7} if TABLE[name].needs == "losses" else {"rtol": 1e-5, "atol": 1e-6}


def trajectory(name: str, k: int = 3, *, seed: int = 0):
  """``steps`` problems with K tasks (losses, and Jacobians for the methods that need them) and an input no
  built-in reads."""
  spec = TABLE[name]
  losses = loss_sequence(spec.steps, k, seed=seed)
  jacobians = None if spec.needs == "losses" else random_jacobians(spec.steps, k, seed=seed)
  return problems(spec.needs, losses, jacobians, seed=seed)


def test_every_registered_method_has_an_entry():
  assert set(TABLE) == set(W.methods())


@pytest.mark.parametrize("name", NAMES)
def test_needs_and_repr(name):
  """``needs`` is the table's; ``repr`` starts with the method's name and shows every argument, with the values
  given."""
  factory, spec = W.methods()[name], TABLE[name]
  t = method(name).transform
  assert t.needs == spec.needs
  shown = repr(t)
  assert shown.startswith(f"{name}("), shown
  for arg in inspect.signature(factory).parameters:
    assert f"{arg}=" in shown, (arg, shown)
  for arg, value in args_of(name).items():
    assert f"{arg}={list(value) if isinstance(value, tuple) else value!r}" in shown, (arg, shown)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager_ignoring_inputs_it_does_not_read(name):
  """The jitted update along a trajectory equals the eager one; the eager run gets only the inputs the method
  reads (no key unless it draws one, no step, no unknown input), so the jitted run shows the rest are ignored."""
  spec = TABLE[name]
  t, jitted, _ = method(name)
  probs = trajectory(name)[: spec.eager_steps]
  read = ({spec.needs} - {"losses"}) | ({"key"} if spec.key else set()) | set(t.requires)
  eager_probs = [p._replace(inputs={k: v for k, v in p.inputs.items() if k in read}) for p in probs]
  assert_jit_equals_eager(t.update, jitted, init(t, 3), probs, eager_probs, **tolerance(name))


@pytest.mark.parametrize("name", NAMES)
def test_no_retrace_and_stable_state(name):
  """A second call with the same shapes reuses the compiled update, and the state keeps its structure, shapes,
  dtypes and weak types along the calls; with bfloat16 losses too (checked abstractly), where (K,) weights take
  the losses' dtype and the state keeps its own."""
  t, jitted, traces = method(name)
  probs = trajectory(name, seed=1)
  assert_no_retrace(jitted, traces, init(t, 3), probs)
  assert_state_stable(t.update, init(t, 3), probs[0], loss_dtypes=(jnp.bfloat16,))


@pytest.mark.parametrize("name", NAMES)
def test_finite_on_degenerate_inputs(name):
  """Finite weights, direction and state, of the right shape and dtype, without retrace: on extreme losses (all
  methods) and, for the Gramian and Jacobian methods, on zero, duplicated, opposite, rank-deficient, tiny and huge
  task gradients, at K = 3 and K = 1. For the no-conflict methods, the direction conflicts with no task on any."""
  spec = TABLE[name]
  for k in [k for k in (3, 1) if k >= spec.min_k]:
    t, jitted, traces = method(name, k)
    before = len(traces)
    losses = extreme_losses(k)
    cases = {"extreme losses": (losses, random_jacobians(1, k)[0].astype(np.float64))}
    if spec.needs != "losses":
      cases.update({case: (mixed_losses(k), jac) for case, jac in degenerate_jacobians(k).items()})
    for case, (ls, jac64) in cases.items():
      jac = jac64.astype(np.float32)
      probs = problems(spec.needs, ls, None if spec.needs == "losses" else [jac] * len(ls))
      ws = assert_finite_along(jitted, init(t, k), probs, jacobian=jac, err_msg=f"K={k}, {case}")
      for w in ws if spec.no_conflict else ():
        assert_no_conflict(jac, w, err_msg=f"K={k}, {case}")
    assert len(traces) - before <= 1, f"K={k}: retraced on the same shapes"


entries = st.floats(-10, 10, width=32).filter(lambda x: x == 0 or abs(x) >= 1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if TABLE[n].no_conflict])
@settings(max_examples=25, deadline=None)
@given(jac=hnp.arrays(np.float32, (3, 5), elements=entries))
def test_no_conflict_with_any_task(name, jac):
  """J Jᵀw ≥ 0 for any Jacobian. Entries are 0 or at least 1e-6 in magnitude: a float32 Gramian cannot see a row
  whose squared norm underflows (‖g‖ < 1e-19); extreme but representable scales are in the degenerate cases."""
  t, jitted, _ = method(name)
  p = problem(TABLE[name].needs, np.ones(3, np.float32), jac)
  w, _ = jitted(p.losses, init(t, 3), **p.inputs)
  assert_no_conflict(jac, w)


@pytest.mark.parametrize("name", [n for n in NAMES if TABLE[n].perm is not None])
def test_permutation(name):
  """Permuting the tasks (losses, Gramian, Jacobian; same key) permutes the weights and every per-task part of the
  state, or, for an invariant method, leaves the weights unchanged."""
  spec = TABLE[name]
  k = 2 if spec.perm == "k2" else 3
  t, jitted, _ = method(name, k)
  tol = tolerance(name) if spec.needs == "losses" else {"rtol": 1e-4, "atol": 1e-6}
  assert_permutation_equivariant(
    jitted, init(t, k), trajectory(name, k, seed=2), np.roll(np.arange(k), 1), invariant=spec.perm == "invariant", **tol
  )


@pytest.mark.parametrize("name", NAMES)
def test_chains_after_static_and_before_a_user_transform_under_jit(name):
  """chain(static(p), method, user) under jit: the method sees the problem rescaled by p, the user's stateless
  softmax sees the losses rescaled by p ⊙ w; the weights are the product (an element-wise method goes last)."""
  t, jitted, _ = method(name)
  user = None if TABLE[name].last else jax.nn.softmax
  assert_chains(t, jitted, trajectory(name, seed=3), np.array([0.5, 1.0, 2.0], np.float32), user, **tolerance(name))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_puts_the_numeric_arguments_in_the_state(name):
  """inject_hyperparams(method) keeps the same needs, shows the method in its repr and holds exactly the numeric,
  non-static arguments in its state, at their values."""
  spec = TABLE[name]
  args = spec.inject_args or args_of(name)
  t = W.inject_hyperparams(factory(name))(**args)
  assert t.needs == spec.needs and repr(t).startswith(f"inject_hyperparams({name}(")
  state = init(t, 3)
  assert set(state.hyperparams) == set(spec.hyper)
  for arg, value in args.items():
    if arg in spec.hyper:
      np.testing.assert_allclose(state.hyperparams[arg], value)


@pytest.mark.parametrize("name", [n for n in NAMES if TABLE[n].hyper])
def test_inject_hyperparams_with_constant_values_equals_the_plain_method_under_jit(name):
  """Injected with the values it is built with, the method under jit gives the plain method's weights and inner
  state at every call, traced once."""
  spec = TABLE[name]
  if spec.inject_args is None:
    plain, plain_update, _ = method(name)
    args = args_of(name)
  else:  # compared eagerly, which compiles nothing new
    args = spec.inject_args
    plain = factory(name)(**args)
    plain_update = plain.update
  injected = W.inject_hyperparams(factory(name))(**args)
  jitted, traces = counting_jit(injected.update)
  probs = trajectory(name, seed=4)
  ws, state = run(jitted, init(injected, 3), probs)
  ws_plain, plain_state = run(plain_update, init(plain, 3), probs)
  for i, (w, w_plain) in enumerate(zip(ws, ws_plain)):
    assert_trees_allclose(w, w_plain, err_msg=f"call {i}", **tolerance(name))
  assert_trees_allclose(state.inner_state, plain_state, **tolerance(name))
  assert int(state.count) == len(probs) and len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_rejected(name):
  """A missing Gramian, Jacobian or key, or a problem whose size disagrees with the losses or the state, raises a
  ValueError that says so (before any solver runs, so eagerly and cheaply)."""
  spec = TABLE[name]
  t = method(name).transform
  three = problem(spec.needs, np.ones(3, np.float32), random_jacobians(1, 3)[0])
  two = problem(spec.needs, np.ones(2, np.float32), random_jacobians(1, 2)[0])
  if spec.needs != "losses":
    missing = {k: v for k, v in three.inputs.items() if k not in ("gramian", "jacobian", "cross_gramian")}
    with pytest.raises(ValueError, match=f"(?i){spec.needs}"):
      t.update(three.losses, init(t, 3), **missing)
    match = r"gramian must be \(2, 2\); got \(3, 3\)" if spec.needs == "gramian" else "leading axis"
    with pytest.raises(ValueError, match=match):
      t.update(two.losses, init(t, 2), **three.inputs)
  if spec.key:
    with pytest.raises(ValueError, match="key"):
      t.update(three.losses, init(t, 3), **{k: v for k, v in three.inputs.items() if k != "key"})
  if spec.fixes_k:
    with pytest.raises(ValueError, match="tasks"):
      t.update(two.losses, init(t, 3), **two.inputs)
  elif spec.needs == "losses":  # nothing fixes K: the same state serves any number of tasks
    w, _ = t.update(two.losses, init(t, 3), **two.inputs)
    assert w.shape == (2,)


@pytest.mark.parametrize("name", [n for n in NAMES if TABLE[n].invalid])
def test_invalid_arguments_are_rejected(name):
  """The factory rejects out-of-range hyper-parameters with a ValueError that names them."""
  for args, message in TABLE[name].invalid:
    with pytest.raises(ValueError, match=message):
      W.methods()[name](**{**args_of(name), **args})


def test_every_method_under_pmap_equals_one_device():
  """Every method's update under jax.pmap over the 4 devices, its problem replicated, gives on every device the
  single-device (jitted) result. The updates run side by side in one pmapped function: one program to compile."""
  assert jax.local_device_count() == 4
  cases = {}
  for name in NAMES:
    t, jitted, _ = method(name)
    cases[name] = PmapCase(t, jitted, init(t, 3), trajectory(name, seed=5)[0], tolerance(name))
  assert_pmap_equals_single_device(cases)
