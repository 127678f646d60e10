"""Tests of dynamic_subset_tuning against the NumPy oracle and the DST contract."""

from __future__ import annotations

import contextlib
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dst_optax
from dst_optax import _selection, _silos
from tests import reference

SHAPES = ((6, 5), (7,), (3, 4, 2))

SPEC_KINDS = {
  "per_tensor": lambda shapes: [dst_optax.PerTensor()] * len(shapes),
  "rows": lambda shapes: [
    dst_optax.rows() if len(s) > 1 else dst_optax.PerTensor() for s in shapes
  ],
  "columns": lambda shapes: [
    dst_optax.columns() if len(s) > 1 else dst_optax.PerTensor() for s in shapes
  ],
  "global": lambda shapes: [dst_optax.Global()] * len(shapes),
  "groups": lambda shapes: [dst_optax.Group(f"g{i % 2}") for i in range(len(shapes))],
}


def as_tree(leaves):
  return {f"leaf{i}": leaf for i, leaf in enumerate(leaves)}


def from_tree(tree):
  return [np.asarray(tree[f"leaf{i}"]) for i in range(len(tree))]


def adversarial_values(rng: np.random.Generator, shape, dtype, kind: str) -> np.ndarray:
  """Parameter values with the float pitfalls DST must survive."""
  size = math.prod(shape)
  if kind == "normal":
    values = rng.normal(size=size)
  elif kind == "tiny":
    values = rng.normal(size=size) * 1e-30
  elif kind == "ties":
    values = rng.integers(-2, 3, size=size) * 0.25
  elif kind == "zeros":
    values = np.zeros(size)
  else:  # mixed magnitudes
    values = rng.normal(size=size) * 10.0 ** rng.integers(-8, 8, size=size)
  return values.reshape(shape).astype(dtype)


def adversarial_update(rng: np.random.Generator, params: np.ndarray, kind: str) -> np.ndarray:
  """Updates that flip signs, move far past a param's magnitude, or tie."""
  p = params.astype(np.float32)
  if kind == "sign_flip":
    update = -2.0 * p
  elif kind == "large":
    update = 100.0 * p + rng.normal(size=p.shape)
  elif kind == "ties":
    update = rng.integers(-1, 2, size=p.shape) * 0.5
  elif kind == "sparse":
    update = rng.normal(size=p.shape) * (rng.random(p.shape) < 0.2)
  else:
    update = rng.normal(size=p.shape) * 1e-3
  return update.astype(np.float32)


DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}
VALUE_KINDS = ("normal", "tiny", "ties", "zeros", "mixed")
UPDATE_KINDS = ("sign_flip", "large", "ties", "sparse", "small")
FRACTIONS = (1e-6, 0.05, 0.2, 0.5, 0.9, 1.0)


def run_dst(params_leaves, updates_per_step, specs, fraction, distance="absolute"):
  """Runs the library on explicit updates; returns the params after every step."""
  tx = dst_optax.dynamic_subset_tuning(fraction, silos=as_tree(specs), distance=distance)
  params = as_tree([jnp.asarray(p) for p in params_leaves])
  state = tx.init(params)

  @jax.jit
  def step(params, state, updates):
    updates, state = tx.update(updates, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for updates in updates_per_step:
    params, state = step(params, state, as_tree([jnp.asarray(u) for u in updates]))
    history.append((from_tree(params), state))
  return history


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  spec_kind=st.sampled_from(sorted(SPEC_KINDS)),
  dtype=st.sampled_from(sorted(DTYPES)),
  value_kind=st.sampled_from(VALUE_KINDS),
  update_kinds=st.lists(st.sampled_from(UPDATE_KINDS), min_size=3, max_size=3),
  fraction=st.sampled_from(FRACTIONS),
  distance=st.sampled_from(("absolute", "relative")),
  seed=st.integers(0, 2**16),
)
def test_matches_reference_step_by_step(
  spec_kind, dtype, value_kind, update_kinds, fraction, distance, seed
):
  rng = np.random.default_rng(seed)
  specs = SPEC_KINDS[spec_kind](SHAPES)
  params = [adversarial_values(rng, s, DTYPES[dtype], value_kind) for s in SHAPES]
  updates_per_step = [[adversarial_update(rng, p, kind) for p in params] for kind in update_kinds]
  history = run_dst(params, updates_per_step, specs, fraction, distance)
  oracle_distance = getattr(reference, distance)
  seeds, expected = params, params
  for updates, (got, state) in zip(updates_per_step, history, strict=True):
    expected, masks = reference.dst_step(expected, updates, seeds, specs, fraction, oracle_distance)
    for want, have in zip(expected, got, strict=True):
      np.testing.assert_array_equal(have.view(np.uint8), want.view(np.uint8))
    assert int(np.sum(state.num_changed)) == sum(int(m.sum()) for m in masks)


def residue_bound(previous: np.ndarray, seed: np.ndarray) -> np.ndarray:
  """One rounding of ``previous + (seed − previous)``: an ulp at the larger magnitude."""
  magnitude = np.maximum(np.abs(previous.astype(np.float32)), np.abs(seed.astype(np.float32)))
  return np.spacing(magnitude.astype(previous.dtype)).astype(np.float32)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  spec_kind=st.sampled_from(sorted(SPEC_KINDS)),
  dtype=st.sampled_from(sorted(DTYPES)),
  fraction=st.sampled_from((1e-6, 0.01, 0.1, 0.5)),
  seed=st.integers(0, 2**16),
)
def test_budget_and_exactness_over_many_steps(spec_kind, dtype, fraction, seed):
  """Hundreds of adversarial steps: budget per silo, residue bound, self-healing."""
  rng = np.random.default_rng(seed)
  specs = SPEC_KINDS[spec_kind](SHAPES)
  seeds = [adversarial_values(rng, s, DTYPES[dtype], "mixed") for s in SHAPES]
  num_steps = 200
  updates_per_step = [
    [adversarial_update(rng, s, UPDATE_KINDS[step % len(UPDATE_KINDS)]) for s in seeds]
    for step in range(num_steps)
  ]
  history = run_dst(seeds, updates_per_step, specs, fraction)
  silos = reference.silo_coordinates(SHAPES, specs)
  project = jax.jit(
    lambda leaves: dst_optax.project_to_budget(
      as_tree(leaves), as_tree(seeds), fraction, silos=as_tree(specs)
    )
  )
  previous = seeds
  previous_masks = None
  for updates, (params, _) in zip(updates_per_step, history, strict=True):
    proposals = [(p + u).astype(p.dtype) for p, u in zip(previous, updates, strict=True)]
    masks = reference.select(proposals, seeds, specs, fraction)
    for p, s, prev, keep in zip(params, seeds, previous, masks, strict=True):
      # Outside the subset: at most one rounding of the reset away from the seed.
      off = np.abs(p.astype(np.float32) - s.astype(np.float32))
      assert np.all(off[~keep] <= residue_bound(prev, s)[~keep])
    if previous_masks is not None:
      # Out of the subset for two steps in a row: back on the seed exactly.
      for p, s, keep, kept_before in zip(params, seeds, masks, previous_masks, strict=True):
        stayed_out = ~keep & ~kept_before
        np.testing.assert_array_equal(p[stayed_out], s[stayed_out])
    # The materialised model never exceeds any silo's budget, bit-exactly.
    projected = from_tree(project(params))
    changed = [
      (p.view(np.uint8) != s.view(np.uint8)).reshape((*p.shape, -1)).any(-1)
      for p, s in zip(projected, seeds, strict=True)
    ]
    for scale, coordinates in silos:
      budget = math.floor(min(1.0, fraction * scale) * len(coordinates))
      assert sum(changed[leaf].ravel()[j] for leaf, j in coordinates) <= budget
    previous, previous_masks = params, masks


def random_tree(seed: int = 0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    "dense": {"kernel": jax.random.normal(keys[0], (16, 8), dtype), "bias": jnp.zeros(8, dtype)},
    "out": jax.random.normal(keys[1], (8, 4), dtype),
  }


def gradients(params, seed: int):
  noise = random_tree(seed + 100)
  return jax.tree.map(lambda p, n: (n + p).astype(p.dtype), params, noise)


def train(tx, params, num_steps: int = 5, grad_fn=gradients):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(num_steps):
    params, state = step(params, state, grad_fn(params, i))
  return params, state


def changed_count(params, seed) -> int:
  """Changed floating-point coordinates (non-float leaves are not DST's business)."""
  return sum(
    int(jnp.sum(p != s))
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(seed), strict=True)
    if jnp.issubdtype(p.dtype, jnp.floating)
  )


def test_full_fraction_equals_base_optimizer_exactly():
  # Op by op: under jit, XLA:CPU fuses adamw differently once anything follows
  # it in the graph (even an identity `where`), which moves results by an ulp.
  params = random_tree()
  base = optax.adamw(1e-2, weight_decay=0.1)
  with jax.disable_jit():
    want, _ = train(base, params, num_steps=3)
    have, _ = train(optax.chain(base, dst_optax.dynamic_subset_tuning(1.0)), params, num_steps=3)
  chex.assert_trees_all_equal(have, want)


def test_no_leak_weight_decay_and_momentum_never_move_frozen_coordinates():
  """Gradient masking leaks through weight decay and momentum; update masking must not."""
  params = random_tree()
  tx = optax.chain(
    optax.adamw(1e-2, b1=0.9, weight_decay=0.5),
    dst_optax.dynamic_subset_tuning(
      0.1, silos={"dense": dst_optax.rows(), "out": dst_optax.PerTensor()}
    ),
  )

  # Only the first row of the kernel ever receives a gradient; momentum and decay
  # still produce updates everywhere.
  def first_row_gradient(p, i):
    del i
    grads = jax.tree.map(jnp.zeros_like, p)
    grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0].set(1.0)
    return grads

  trained, state = train(tx, params, num_steps=20, grad_fn=first_row_gradient)
  budgets = dst_optax.subset_stats(state)["budget"]
  assert int(budgets) > 0
  assert changed_count(trained, params) <= int(budgets)
  # Rows get floor(0.1 * 8) = 0 free coordinates: the kernel must stay exactly put.
  chex.assert_trees_all_equal(trained["dense"]["kernel"], params["dense"]["kernel"])


def test_seed_is_captured_at_first_update_not_init():
  pretrained = random_tree(seed=1)
  random_init = random_tree(seed=2)
  tx = dst_optax.dynamic_subset_tuning(0.25)
  state = tx.init(random_init)  # trainers init on random weights, then restore
  updates, state = jax.jit(tx.update)(gradients(pretrained, 0), state, pretrained)
  chex.assert_trees_all_equal(state.seed, pretrained)
  # Later updates keep the captured seed even when params move.
  moved = optax.apply_updates(pretrained, updates)
  _, state = jax.jit(tx.update)(gradients(moved, 1), state, moved)
  chex.assert_trees_all_equal(state.seed, pretrained)


def test_float32_counter_from_checkpoint_is_accepted():
  params = random_tree()
  tx = dst_optax.dynamic_subset_tuning(0.25)
  state = tx.init(params)
  state = state._replace(count=jnp.asarray(0.0, jnp.float32))
  _, state = tx.update(gradients(params, 0), state, params)
  chex.assert_trees_all_equal(state.seed, params)
  _, restored = tx.update(gradients(params, 1), state._replace(count=jnp.float32(1)), params)
  chex.assert_trees_all_equal(restored.seed, params)


@pytest.mark.parametrize(
  "wrap",
  [
    pytest.param(lambda tx: optax.MultiSteps(tx, every_k_schedule=2), id="multi_steps"),
    pytest.param(
      lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3), id="apply_if_finite"
    ),
  ],
)
def test_wrappers_keep_the_budget(wrap):
  params = random_tree()
  tx = wrap(optax.chain(optax.sgd(0.1, momentum=0.9), dst_optax.dynamic_subset_tuning(0.1)))
  trained, state = train(tx, params, num_steps=6)
  stats = dst_optax.subset_stats(state)
  assert 0 < changed_count(trained, params) <= int(stats["budget"])


def test_multi_steps_matches_manual_accumulation():
  params = random_tree()
  inner = optax.chain(optax.adam(1e-2), dst_optax.dynamic_subset_tuning(0.2))
  have, _ = train(optax.MultiSteps(inner, every_k_schedule=2), params, num_steps=4)

  def mean_of_pairs(p, i):
    return jax.tree.map(lambda a, b: (a + b) / 2, gradients(p, 2 * i), gradients(p, 2 * i + 1))

  want, _ = train(inner, params, num_steps=2, grad_fn=mean_of_pairs)
  chex.assert_trees_all_close(have, want, rtol=1e-6)


def test_apply_if_finite_skips_non_finite_steps():
  params = random_tree()
  tx = optax.apply_if_finite(
    optax.chain(optax.sgd(0.1), dst_optax.dynamic_subset_tuning(0.1)), max_consecutive_errors=5
  )
  nan_grads = lambda p, i: jax.tree.map(
    lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, p
  )
  trained, state = train(tx, params, num_steps=2, grad_fn=nan_grads)
  chex.assert_trees_all_equal(trained, params)
  assert int(state.notfinite_count) == 2


def test_non_float_leaves_pass_through():
  params = {"w": jnp.ones(4), "table": jnp.arange(4)}
  tx = dst_optax.dynamic_subset_tuning(0.25)
  updates = {"w": jnp.ones(4), "table": jnp.array([1, 0, 2, 0])}
  new_updates, _ = tx.update(updates, tx.init(params), params)
  chex.assert_trees_all_equal(new_updates["table"], updates["table"])
  assert int(jnp.sum(new_updates["w"] != 0)) == 1


def test_non_finite_updates_surface_in_params_without_a_guard():
  params = {"w": jnp.arange(10.0)}
  tx = dst_optax.dynamic_subset_tuning(0.2)
  grads = {"w": jnp.zeros(10).at[3].set(jnp.inf).at[5].set(1.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)["w"]
  assert jnp.isinf(new[3]) and new[5] == 6.0 and int(jnp.sum(new != params["w"])) == 2


def test_inject_hyperparams_fraction_and_schedule():
  params = random_tree()
  make = optax.inject_hyperparams(dst_optax.dynamic_subset_tuning)
  tx = optax.chain(optax.sgd(0.1), make(fraction_of_free_params=0.5))
  state = tx.init(params)
  grads = gradients(params, 0)

  def changed_after_step(state):
    updates, state = jax.jit(tx.update)(grads, state, params)
    return changed_count(optax.apply_updates(params, updates), params), state

  many, state = changed_after_step(state)
  state[1].hyperparams["fraction_of_free_params"] = jnp.asarray(0.05)
  few, state = changed_after_step(state)
  assert few < many
  assert few <= math.floor(0.05 * 128) + math.floor(0.05 * 8) + math.floor(0.05 * 32)

  schedule = optax.linear_schedule(0.5, 0.05, transition_steps=1)
  _, sched_state = train(
    optax.chain(optax.sgd(0.1), dst_optax.dynamic_subset_tuning(schedule)), params, num_steps=2
  )
  assert int(dst_optax.subset_stats(sched_state)["budget"]) == 6 + 0 + 1


def test_array_fractions_give_the_same_budgets_eager_and_jitted():
  """An injected or scheduled ε is evaluated in float32 whether or not the step is jitted."""
  params = {"w": jnp.linspace(-1.0, 1.0, 100)}
  grads = {"w": jnp.cos(jnp.arange(100.0))}
  inject = optax.inject_hyperparams(
    lambda fraction: optax.chain(optax.sgd(0.1), dst_optax.dynamic_subset_tuning(fraction))
  )
  cases = {
    # 0.29 · 100: 28 in float64 (0.29 lies below 29/100 in binary), 29 in float32.
    "injected 0.29": (inject(fraction=0.29), [29] * 2),
    "warm-up from 0": (inject(fraction=optax.linear_schedule(0.0, 0.1, 1)), [0, 10]),
    "negative schedule": (
      dst_optax.dynamic_subset_tuning(lambda count: count * 0.0 - 0.05),
      [0] * 2,
    ),
  }
  for name, (tx, want_budgets) in cases.items():
    runs = []
    for jit in (False, True):
      init, update = (jax.jit(tx.init), jax.jit(tx.update)) if jit else (tx.init, tx.update)
      state, trained, budgets = init(params), params, []
      for _ in range(2):
        updates, state = update(grads, state, trained)
        trained = optax.apply_updates(trained, updates)
        stats = dst_optax.subset_stats(state)
        budgets.append(int(stats["budget"]))
        assert int(stats["frozen_silos"]) == (budgets[-1] == 0), name
      assert budgets == want_budgets, (name, jit)
      runs.append(trained)
    chex.assert_trees_all_equal(*runs)


def test_masked_leaves_pass_through_and_optax_masked_composes():
  params = random_tree()
  tx = optax.chain(
    optax.sgd(0.1), dst_optax.dynamic_subset_tuning(0.01, mask={"dense": True, "out": False})
  )
  trained, _ = train(tx, params)
  plain, _ = train(optax.sgd(0.1), params)
  chex.assert_trees_all_equal(trained["out"], plain["out"])
  # floor(0.01 * 128) = 1 free kernel coordinate, none for the 8 biases.
  assert changed_count(trained["dense"], params["dense"]) == 1

  outer = optax.masked(
    optax.chain(optax.sgd(0.1), dst_optax.dynamic_subset_tuning(0.1)),
    {"dense": True, "out": False},
  )
  trained, _ = train(outer, params)
  assert changed_count(trained["dense"], params["dense"]) == 12


def test_resets_with_updates_narrower_than_the_params_reach_the_seed():
  """bfloat16 updates of float32 params (gradients cast down): resets converge."""
  params = {"w": jnp.ones(1000, jnp.float32)}
  tx = dst_optax.dynamic_subset_tuning(0.01)
  state = tx.init(params)
  step = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  for i in range(8):
    # Five steps that move, then steps that do not: what stays off the seed is the subset.
    scale = 1e-3 if i < 5 else 0.0
    updates = {"w": jnp.asarray(rng.normal(size=1000) * scale, jnp.bfloat16)}
    updates, state = step(updates, state, params)
    params = optax.apply_updates(params, updates)
  assert changed_count(params, {"w": jnp.ones(1000)}) == int(state.num_changed.sum()) == 10


@contextlib.contextmanager
def x64_enabled():
  """``jax_enable_x64`` on inside the block (a process-wide flag, restored after)."""
  previous = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize(
  "silos", [dst_optax.PerTensor(), dst_optax.rows(), dst_optax.Global()], ids=str
)
def test_x64_leaves_float32_training_unchanged(silos):
  params = random_tree()
  # SGD: adam's bias correction itself computes in float64 under x64.
  make = lambda: optax.chain(
    optax.sgd(0.1, momentum=0.9), dst_optax.dynamic_subset_tuning(0.1, silos=silos)
  )
  want, _ = train(make(), params, num_steps=2)
  want_projected = dst_optax.project_to_budget(want, params, 0.1, silos)
  with x64_enabled():
    have, state = train(make(), params, num_steps=2)
    projected = dst_optax.project_to_budget(have, params, 0.1, silos)
  chex.assert_trees_all_equal(have, want)
  chex.assert_trees_all_equal(projected, want_projected)
  assert changed_count(projected, params) == int(dst_optax.subset_stats(state)["changed"])


def test_float64_params_rank_changes_below_float32_resolution():
  with x64_enabled():
    params = {"w": jnp.ones(8, jnp.float64)}
    # Steps of 1e-9: 1 + 1e-9 is 1.0 in float32, yet a change.
    updates = {"w": jnp.asarray([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0], jnp.float64) * 1e-9}
    for fraction, kept in [(1.0, range(8)), (0.5, [2, 4, 5, 7])]:
      tx = dst_optax.dynamic_subset_tuning(fraction)
      new_updates, _ = tx.update(updates, tx.init(params), params)
      new = optax.apply_updates(params, new_updates)["w"]
      assert new.dtype == jnp.float64
      expected = np.where(np.isin(np.arange(8), list(kept)), 1.0 + np.asarray(updates["w"]), 1.0)
      np.testing.assert_array_equal(np.asarray(new), expected)


def test_multi_transform_runs_dst_on_its_partition_only():
  """A new head trained in full beside a DST backbone (``optax.multi_transform``)."""
  params = random_tree()
  dst_branch = lambda: optax.chain(optax.adam(1e-2), dst_optax.dynamic_subset_tuning(0.1))
  tx = optax.multi_transform(
    {"dst": dst_branch(), "full": optax.adam(1e-2)}, {"dense": "dst", "out": "full"}
  )

  def train_eagerly(tx, params, part=lambda tree: tree):
    # Op by op, so that both runs round alike (one compiled program may fuse differently).
    state = tx.init(params)
    for i in range(2):
      grads = jax.tree.map(lambda p, n, s=i + 1.0: (p + n) * s, params, part(random_tree(i + 100)))
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  trained, state = train_eagerly(tx, params)
  dense_alone, dense_state = train_eagerly(dst_branch(), params["dense"], lambda t: t["dense"])
  out_alone, _ = train_eagerly(optax.adam(1e-2), params["out"], lambda t: t["out"])
  chex.assert_trees_all_equal(trained["dense"], dense_alone)
  chex.assert_trees_all_equal(trained["out"], out_alone)
  assert changed_count(trained["out"], params["out"]) == params["out"].size
  stats = dst_optax.subset_stats(state)
  assert int(stats["budget"]) == int(dst_optax.subset_stats(dense_state)["budget"]) == 12
  assert changed_count(trained["dense"], params["dense"]) == int(stats["changed"]) == 12


def test_flax_linen_and_nnx_parameter_trees():
  flax = pytest.importorskip("flax")
  from flax import linen, nnx

  module = linen.Dense(4)
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 6)))
  tx = optax.chain(optax.adam(1e-2), dst_optax.dynamic_subset_tuning(0.25))
  grad_fn = lambda p, i: jax.tree.map(lambda x: jnp.cos(x + i), p)
  trained, _ = train(tx, variables["params"], grad_fn=grad_fn)
  assert 0 < changed_count(trained, variables["params"]) <= 6 + 1
  del flax

  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))

  @nnx.jit
  def nnx_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 6))) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    nnx_step(model, optimizer)
  after = nnx.state(model, nnx.Param)
  assert 0 < changed_count(after, before) <= 6 + 1


def test_sharded_run_equals_unsharded_and_state_follows_param_sharding(mesh_case):
  mesh, explicit, in_mesh = mesh_case
  spec = jax.sharding.PartitionSpec
  params = {"a": jax.random.normal(jax.random.PRNGKey(0), (64, 32)), "b": jnp.ones((32,))}
  shardings = {
    "a": jax.sharding.NamedSharding(mesh, spec("data", "model")),
    "b": jax.sharding.NamedSharding(mesh, spec("model")),
  }
  # Explicit axes take their own paths for gathered slices and per-silo counts.
  silo_specs = [dst_optax.Global(), {"a": dst_optax.rows(), "b": dst_optax.PerTensor()}]
  if explicit:
    silo_specs.append({"a": dst_optax.columns(), "b": dst_optax.PerTensor()})
  else:
    silo_specs.append(dst_optax.PerTensor())
  for silos in silo_specs:
    tx = optax.chain(optax.adam(1e-2), dst_optax.dynamic_subset_tuning(0.05, silos=silos))
    grad_fn = lambda p, i: jax.tree.map(lambda x: jnp.cos(x * (i + 1)), p)
    want, want_state = train(tx, params, num_steps=3, grad_fn=grad_fn)
    with in_mesh():
      sharded = jax.device_put(params, shardings)
      have, state = train(tx, sharded, num_steps=3, grad_fn=grad_fn)
    chex.assert_trees_all_equal(have, want)
    dst_state = dst_optax.find_state(state)
    # The per-silo statistics and thresholds too (small vectors are easy to mis-partition).
    chex.assert_trees_all_equal(
      dst_state._replace(seed=None), dst_optax.find_state(want_state)._replace(seed=None)
    )
    for leaf, param_sharding in zip(
      jax.tree.leaves(dst_state.seed), jax.tree.leaves(shardings), strict=True
    ):
      assert leaf.sharding.is_equivalent_to(param_sharding, leaf.ndim)
    for leaf, param in zip(jax.tree.leaves(have), jax.tree.leaves(shardings), strict=True):
      assert leaf.sharding.is_equivalent_to(param, leaf.ndim)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_rejected(fraction):
  with pytest.raises(ValueError, match="fraction_of_free_params must lie in"):
    dst_optax.dynamic_subset_tuning(fraction)


def test_missing_params_is_a_clear_error():
  params = random_tree()
  tx = dst_optax.dynamic_subset_tuning(0.1)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(params, tx.init(params))


def test_mismatched_trees_name_the_leaf():
  params = random_tree()
  tx = dst_optax.dynamic_subset_tuning(0.1)
  state = tx.init(params)
  updates = dict(params)
  updates["extra"] = jnp.ones(3)
  with pytest.raises(ValueError, match="unexpected leaves \\['extra'\\]"):
    tx.update(updates, state, params)
  bad_shape = jax.tree.map(lambda x: x, params)
  bad_shape["out"] = jnp.ones((4, 8))
  with pytest.raises(ValueError, match="'out' has shape \\(4, 8\\)"):
    tx.update(bad_shape, state, params)


def test_silo_spec_that_does_not_fit_names_the_leaf():
  params = random_tree()
  with pytest.raises(ValueError, match="dense/bias.*axis 1 is out of range"):
    dst_optax.dynamic_subset_tuning(0.1, silos=dst_optax.PerSlice(1)).init(params)
  with pytest.raises(TypeError, match="leaf 'dense/bias' must be one of.*got 'rows'"):
    dst_optax.dynamic_subset_tuning(0.1, silos=lambda path, leaf: "rows").init(params)


def test_unknown_distance_and_non_elementwise_distance():
  with pytest.raises(ValueError, match="unknown distance 'cosine'"):
    dst_optax.dynamic_subset_tuning(0.1, distance="cosine")
  params = {"w": jnp.ones(4)}
  tx = dst_optax.dynamic_subset_tuning(0.5, distance=lambda c, p, s: jnp.sum(jnp.abs(c - p)))
  with pytest.raises(ValueError, match="leaf 'w' of shape \\(4,\\)"):
    tx.update(params, tx.init(params), params)


def test_frozen_silos_warn_once_at_init():
  params = {"w": jnp.ones((10, 10))}
  with pytest.warns(UserWarning, match="budget of 0 free coordinates.*w \\(10/10 silos\\)"):
    dst_optax.dynamic_subset_tuning(0.05, silos=dst_optax.rows()).init(params)


def test_user_distance_callable_is_used():
  params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
  # Prefer the smallest moves: a (strange but valid) distance.
  inverse = lambda c, p, s: 1.0 / (jnp.abs(c - p) + 1.0)
  tx = dst_optax.dynamic_subset_tuning(0.25, distance=inverse)
  updates, _ = tx.update({"w": jnp.array([0.1, 0.4, 0.3, 0.2])}, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"] != 0, [True, False, False, False])


@pytest.mark.parametrize(
  ("params", "mask", "leaves"),
  [
    ({}, None, "[]"),
    ({"w": jnp.ones((4, 3))}, False, "['w']"),
    ({"ids": jnp.arange(3), "w": jnp.ones((4, 3))}, {"ids": True, "w": False}, "['ids', 'w']"),
    ({"w": jnp.ones((0, 3))}, None, "['w']"),
  ],
  ids=["empty tree", "all masked", "int and masked", "empty leaf"],
)
def test_nothing_constrained_passes_every_update_through(params, mask, leaves):
  """With no coordinate to constrain, DST is the identity, and says so at init."""
  tx = optax.chain(optax.adam(0.1), dst_optax.dynamic_subset_tuning(0.1, mask=mask))
  warning = re.escape(f"no coordinate of these params (leaves {leaves}")
  with pytest.warns(UserWarning, match=warning):
    state = tx.init(params)
  base = optax.adam(0.1)
  base_state = base.init(params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(grads, state, params)
    want, base_state = jax.jit(base.update)(grads, base_state, params)
    chex.assert_trees_all_equal(updates, want)
  stats = dst_optax.subset_stats(state)
  assert int(stats["step"]) == 2
  assert [int(stats[name]) for name in ("changed", "budget", "entered", "search_passes")] == [0] * 4
  moved = jax.tree.map(lambda p: p + 1, params)
  chex.assert_trees_all_equal(dst_optax.project_to_budget(moved, params, 0.1, mask=mask), moved)


def test_python_scalar_leaves_work_eagerly_and_jitted():
  """optax accepts Python numbers as leaves; so does DST, eagerly as under jit."""
  params = {"scale": 1.0, "w": jnp.arange(8.0)}
  grads = {"scale": 0.5, "w": jnp.linspace(-1.0, 1.0, 8)}
  tx = optax.chain(optax.sgd(0.1), dst_optax.dynamic_subset_tuning(0.25, silos=dst_optax.Global()))
  eager, _ = tx.update(grads, tx.init(params), params)
  jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal(eager, jitted)
  assert int(jnp.sum(eager["w"] != 0)) + int(eager["scale"] != 0) == 2


@pytest.mark.parametrize("silos", [dst_optax.PerTensor(), dst_optax.rows()], ids=repr)
def test_vmapped_training_equals_each_member_trained_alone(silos):
  """Under vmap (an ensemble of fine-tunings) every member selects as it would alone.

  Adam's first steps put many |u| at the learning rate, so ties straddle the budgets:
  batched naively, the tie-break's conditional became a select and the compiler
  rebuilt the keys for the masks, which then selected fewer coordinates than counted.
  """
  tx = optax.chain(optax.adam(0.1), dst_optax.dynamic_subset_tuning(0.1, silos=silos))
  members = jax.random.split(jax.random.key(0), 3)
  params = jax.vmap(lambda key: {"w": jax.random.normal(key, (16, 32))})(members)
  grads = jax.vmap(lambda key: {"w": jax.random.normal(key, (16, 32))})(
    jax.random.split(jax.random.key(1), 3)
  )

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  batched = (params, jax.vmap(tx.init)(params))
  for _ in range(3):
    batched = jax.jit(jax.vmap(step))(*batched, grads)
  for member in range(3):
    alone = jax.tree.map(lambda x, member=member: x[member], (params, grads))
    single = (alone[0], tx.init(alone[0]))
    for _ in range(3):
      single = jax.jit(step)(*single, alone[1])
    chex.assert_trees_all_equal(single, jax.tree.map(lambda x, member=member: x[member], batched))


def test_stats_track_entries_and_exits():
  params = {"w": jnp.zeros(8)}
  tx = dst_optax.dynamic_subset_tuning(0.25)  # two free coordinates
  state = tx.init(params)
  for grads, entered, exited in (
    ([1, 2, 0, 0, 0, 0, 0, 0], 2, 0),
    ([0, 0, 0, 0, 0, 0, 5, 6], 2, 2),  # w6, w7 move further than w0, w1 are off the seed
    ([0, 0, 0, 0, 0, 0, 0, 0], 0, 0),
  ):
    updates, state = tx.update({"w": jnp.asarray(grads, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    stats = dst_optax.subset_stats(state)
    assert (int(stats["entered"]), int(stats["exited"]), int(stats["changed"])) == (
      entered,
      exited,
      2,
    )


def test_donated_step_copies_no_parameter_sized_buffer():
  """In a donated training step the seed and the params are updated in place."""
  params = {"a": jnp.ones((96, 64)), "b": jnp.ones((64, 96))}
  tx = optax.chain(optax.adam(1e-3), dst_optax.dynamic_subset_tuning(0.1))
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads = jax.tree.map(jnp.ones_like, params)
  donated = jax.jit(step, donate_argnums=(0, 1))
  hlo = donated.lower(params, state, grads).compile().as_text()
  # Copies inside a conditional's branch run only when it is taken (the seed
  # capture at step 0); the entry computation runs every step.
  entry = hlo[hlo.index("\nENTRY ") :]
  entry = entry[: entry.index("\n}")]
  copies = [line.strip() for line in entry.splitlines() if " copy(" in line]
  assert not [c for c in copies if "[96,64]" in c or "[64,96]" in c], copies
  # The state's buffers are all distinct, so a fresh state can be donated.
  params, state = donated(params, state, grads)
  params, state = donated(params, state, grads)
  assert int(dst_optax.find_state(state).count) == 2


def test_steady_training_finds_the_threshold_in_one_pass():
  """The state's threshold trend makes a creeping threshold a one-pass search."""
  seed = {"w": jax.random.normal(jax.random.key(0), (128, 128))}
  grads = {"w": jax.random.normal(jax.random.key(1), (128, 128))}
  tx = optax.chain(optax.sgd(1e-3), dst_optax.dynamic_subset_tuning(0.05))
  state = tx.init(seed)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, thresholds, passes = seed, [], []
  for _ in range(6):
    params, state = step(params, state)
    dst_state = dst_optax.find_state(state)
    thresholds.append(np.asarray(dst_state.threshold))
    passes.append(int(dst_state.num_passes))
    # The threshold separates the kept coordinates (Δ ≥ it) from the reset ones.
    delta = np.abs(np.asarray(params["w"]) - np.asarray(seed["w"]))
    assert 0 < thresholds[-1][0] <= delta[delta > 0].min()
  np.testing.assert_allclose(dst_state.threshold_change, thresholds[-1] - thresholds[-2])
  np.testing.assert_allclose(
    dst_state.threshold_error, (thresholds[-1] - 2 * thresholds[-2] + thresholds[-3]), atol=1e-9
  )
  # A constant gradient moves the kept coordinates by the same amount every step,
  # so the threshold grows linearly. Cold, the search ends once a 3-bit slot starts
  # between Δ_(k) and Δ_(k+1) (6 of the 11 passes that pin a key); then the last
  # threshold and its trend put it in the first pass's window.
  assert passes == [6, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("spec_kind", sorted(SPEC_KINDS))
@pytest.mark.parametrize(
  "base",
  [optax.adam(1e-2), optax.sgd(1e-2, momentum=0.9), optax.adamw(1e-2, weight_decay=0.1)],
  ids=["adam", "sgd_momentum", "adamw"],
)
def test_budget_holds_when_compiled_with_the_base_optimizer(spec_kind, base):
  # A first step from the seed: the base update has many near-equal magnitudes, so
  # ties straddle the budget, and a compiler may round Θ(t) + u differently where
  # it fuses it again (e.g. an FMA in one place only). The selected set must be the
  # one the search counted: every emitted non-zero update is a selected coordinate.
  shapes = ((64, 96), (16, 24), (40,))
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
  params = as_tree([jax.random.normal(k, s) / 6 for k, s in zip(keys, shapes, strict=True)])
  grads = jax.tree.map(lambda p: jnp.sin(p * 50), params)
  silos = as_tree(SPEC_KINDS[spec_kind](shapes))
  tx = optax.chain(base, dst_optax.dynamic_subset_tuning(0.05, silos=silos))
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  dst_state = dst_optax.find_state(state)
  changed = as_tree([u != 0 for u in from_tree(updates)])
  layout = _silos.build_layout(params, silos, None)
  counts = _selection.count_per_silo((from_tree(changed),), layout)[0]
  np.testing.assert_array_equal(counts, dst_state.num_changed)
  assert np.all(np.asarray(counts) <= np.asarray(dst_state.budget))
