"""Tests of subset extraction, exact application, composition and on-device switching."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dst_optax
from dst_optax import _subset, _subset_extract
from tests import reference

DTYPES = (np.float32, ml_dtypes.bfloat16)
SILO_KINDS = {
  "per_tensor": dst_optax.PerTensor(),
  "rows": dst_optax.rows(),
  "global": dst_optax.Global(),
}


def bits(array) -> np.ndarray:
  array = np.ascontiguousarray(np.asarray(array))
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def assert_trees_bitwise_equal(actual, expected) -> None:
  actual_leaves = _subset.named_leaves(actual)
  expected_leaves = _subset.named_leaves(expected)
  assert actual_leaves.keys() == expected_leaves.keys()
  for path, leaf in expected_leaves.items():
    assert np.asarray(actual_leaves[path]).dtype == np.asarray(leaf).dtype, path
    np.testing.assert_array_equal(bits(actual_leaves[path]), bits(leaf), err_msg=path)


def make_model(rng: np.random.Generator, dtype, scale: float = 0.1):
  """A small seed with a head, and a fine-tuned version moved everywhere."""
  seed = {
    "encoder": {
      "kernel": rng.normal(size=(12, 10)).astype(dtype),
      "bias": rng.normal(size=(10,)).astype(dtype),
    },
    "head": rng.normal(size=(10, 3)).astype(dtype),
  }
  finetuned = jax.tree.map(
    lambda x: (x.astype(np.float32) + scale * rng.normal(size=x.shape)).astype(dtype), seed
  )
  return seed, finetuned


def head_free(params):
  """Mask of the test models: the head is new, hence unconstrained (stored dense)."""
  return {key: key != "head" for key in params}


def oracle_projection(seed, finetuned, fraction, spec, free_paths=None):
  """The NumPy reference's projection: top-k per silo kept, the rest set to the seed."""
  seed_leaves = _subset.named_leaves(seed)
  finetuned_leaves = _subset.named_leaves(finetuned)
  paths = list(seed_leaves)
  specs = [
    dst_optax.Unconstrained() if free_paths and path in free_paths else spec for path in paths
  ]
  proposals = [np.asarray(finetuned_leaves[path]) for path in paths]
  seeds = [np.asarray(seed_leaves[path]) for path in paths]
  masks = reference.select(proposals, seeds, specs, fraction)
  return {
    path: proposal if free_paths and path in free_paths else np.where(keep, proposal, seed_leaf)
    for path, proposal, seed_leaf, keep in zip(paths, proposals, seeds, masks, strict=True)
  }


def silo_budgets_respected(seed, params, fraction: float, kind: str) -> None:
  """Independent check: changed coordinates per silo ≤ floor(ε |S|)."""
  changed = {
    path: bits(leaf) != bits(_subset.named_leaves(seed)[path])
    for path, leaf in _subset.named_leaves(params).items()
  }
  if kind == "global":
    total = sum(flags.size for flags in changed.values())
    assert sum(int(flags.sum()) for flags in changed.values()) <= math.floor(fraction * total)
    return
  for flags in changed.values():
    silos = flags.reshape(flags.shape[0], -1) if kind == "rows" else flags.reshape(1, -1)
    budget = math.floor(fraction * silos.shape[1])
    assert np.all(silos.sum(axis=1) <= budget)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(SILO_KINDS))
def test_apply_rebuilds_projection_bitwise(dtype, kind):
  seed, finetuned = make_model(np.random.default_rng(0), dtype)
  subset = _subset_extract.extract_subset(seed, finetuned, 0.1, SILO_KINDS[kind])
  rebuilt = _subset.apply_subset(seed, subset)
  expected = oracle_projection(seed, finetuned, 0.1, SILO_KINDS[kind])
  assert_trees_bitwise_equal(_subset.named_leaves(rebuilt), expected)
  silo_budgets_respected(seed, rebuilt, 0.1, kind)
  for tensor in subset.tensors.values():
    assert tensor.indices.dtype == np.int32
    assert np.all(np.diff(tensor.indices) > 0)


MOVES = ("tiny_residue", "sign_flip", "signed_zero", "large", "ties")


def adversarial_pair(rng: np.random.Generator, shape, dtype, moves: str):
  """Seed and fine-tuned trees moved in the ways that trip float comparisons."""
  seed_values = rng.normal(size=shape) * 10.0 ** rng.integers(-6, 3, size=shape)
  if moves == "tiny_residue":  # every coordinate one ulp off, as resets can leave it
    finetuned_values = np.nextafter(seed_values.astype(dtype), np.inf).astype(np.float64)
  elif moves == "sign_flip":
    finetuned_values = -seed_values
  elif moves == "signed_zero":
    seed_values = np.zeros(shape)
    finetuned_values = -np.zeros(shape) * rng.integers(0, 2, size=shape)
  elif moves == "large":
    finetuned_values = seed_values + 1e3 * rng.normal(size=shape)
  else:
    finetuned_values = seed_values + rng.integers(-1, 2, size=shape) * 0.5
  seed = {"w": seed_values.astype(dtype), "v": seed_values[0].astype(dtype)}
  finetuned = {"w": finetuned_values.astype(dtype), "v": finetuned_values[0].astype(dtype)}
  return seed, finetuned


def check_budget_and_exactness(seed, finetuned, fraction: float, kind: str) -> None:
  subset = _subset_extract.extract_subset(seed, finetuned, fraction, SILO_KINDS[kind])
  rebuilt = _subset.apply_subset(seed, subset)
  silo_budgets_respected(seed, rebuilt, fraction, kind)
  assert_trees_bitwise_equal(
    _subset.named_leaves(rebuilt), oracle_projection(seed, finetuned, fraction, SILO_KINDS[kind])
  )
  for path, tensor in subset.tensors.items():
    np.testing.assert_array_equal(
      tensor.indices, _subset.changed_indices(seed[path], rebuilt[path])
    )
  assert_trees_bitwise_equal(_subset.revert_subset(rebuilt, seed, subset), seed)


@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_revert_checks_that_the_params_hold_the_subset(as_jax):
  """Reverting a subset the params do not hold would leave stale coordinates behind."""
  seed, finetuned = adversarial_pair(np.random.default_rng(12), (6, 5), np.float32, "large")
  if as_jax:
    seed, finetuned = (jax.tree.map(jnp.asarray, tree) for tree in (seed, finetuned))
  subset = _subset_extract.extract_subset(seed, finetuned, 0.2)
  rebuilt = _subset.apply_subset(seed, subset)
  position = int(subset.tensors["w"].indices[3])
  moved = {**rebuilt, "w": _subset._scatter(rebuilt["w"], np.array([position]), np.float32(9.5))}
  with pytest.raises(_subset.SubsetError, match=rf"'w' does not hold .* {position} is 9.5"):
    _subset.revert_subset(moved, seed, subset)
  reverted = _subset.revert_subset(moved, seed, subset, verify=False)
  assert_trees_bitwise_equal(_subset.named_leaves(reverted), _subset.named_leaves(seed))
  with pytest.raises(_subset.SubsetError, match="the subset does not fit the tree of the params"):
    _subset.revert_subset({"w": rebuilt["w"]}, seed, subset)
  with pytest.raises(_subset.SubsetError, match="'w' is not the tensor"):
    _subset.revert_subset(rebuilt, {**seed, "w": seed["w"] + 1.0}, subset)


@pytest.mark.parametrize("moves", MOVES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["per_tensor", "global"])
def test_budget_is_never_exceeded(moves, dtype, kind):
  seed, finetuned = adversarial_pair(np.random.default_rng(11), (6, 5), dtype, moves)
  check_budget_and_exactness(seed, finetuned, 0.3, kind)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  data=st.data(),
  dtype=st.sampled_from(DTYPES),
  kind=st.sampled_from(sorted(SILO_KINDS)),
  fraction=st.floats(0.01, 1.0),
  moves=st.sampled_from(MOVES),
)
def test_budget_is_never_exceeded_for_any_shape_and_fraction(data, dtype, kind, fraction, moves):
  shape = data.draw(st.tuples(st.integers(1, 9), st.integers(1, 9)))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  check_budget_and_exactness(*adversarial_pair(rng, shape, dtype, moves), fraction, kind)


def test_signed_zero_and_nan_count_as_changes():
  seed = {"w": np.array([0.0, 1.0, np.nan, 2.0], np.float32)}
  finetuned = {"w": np.array([-0.0, 1.0, np.nan, 3.0], np.float32)}
  indices = _subset.changed_indices(seed["w"], finetuned["w"])
  np.testing.assert_array_equal(indices, [0, 3])


def test_unconstrained_head_is_stored_dense_and_independent_of_seed_head():
  seed, finetuned = make_model(np.random.default_rng(1), np.float32)
  subset = _subset_extract.extract_subset(seed, finetuned, 0.05, mask=head_free)
  head = subset.tensors["head"]
  assert head.dense and head.budget == _subset.UNCONSTRAINED_BUDGET
  # A fresh random head in the seed does not matter: only the encoder is fingerprinted.
  other_head_seed = {**seed, "head": np.zeros_like(seed["head"])}
  rebuilt = _subset.apply_subset(other_head_seed, subset)
  np.testing.assert_array_equal(rebuilt["head"], finetuned["head"])
  expected = oracle_projection(seed, finetuned, 0.05, dst_optax.PerTensor(), {"head"})
  assert_trees_bitwise_equal(_subset.named_leaves(rebuilt), expected)


def test_extract_from_dst_training_state():
  seed, _ = make_model(np.random.default_rng(2), np.float32)
  params = jax.tree.map(jnp.asarray, seed)
  optimizer = optax.chain(optax.adam(0.05), dst_optax.dynamic_subset_tuning(0.1, mask=head_free))
  opt_state = optimizer.init(params)
  loss = lambda p: sum(jnp.sum(jnp.sin(3.0 * leaf)) for leaf in jax.tree.leaves(p))

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(5):
    params, opt_state = step(params, opt_state)
  state = dst_optax.find_state(opt_state)
  subset = _subset_extract.extract_subset_from_state(params, state, 0.1, mask=head_free)
  rebuilt = _subset.apply_subset(seed, subset)
  expected = oracle_projection(seed, params, 0.1, dst_optax.PerTensor(), {"head"})
  assert_trees_bitwise_equal(_subset.named_leaves(rebuilt), expected)
  for path in ("encoder/kernel", "encoder/bias"):
    assert 0 < subset.tensors[path].num_changed <= subset.tensors[path].budget


def test_extract_from_state_needs_the_budgets_of_training():
  """Another ε, silo spec or mask than training's would drop or admit changes silently."""
  params = {"w": jnp.linspace(-1.0, 1.0, 100).reshape(10, 10), "b": jnp.zeros(10)}
  # ε = 0.53 of 100 coordinates: 53 in float64, 52 in float32 (as injected).
  injected = optax.inject_hyperparams(dst_optax.dynamic_subset_tuning, static_args=("silos",))
  tx = optax.chain(optax.sgd(0.1), injected(fraction_of_free_params=0.53))
  opt_state = tx.init(params)
  updates, opt_state = jax.jit(tx.update)(jax.tree.map(jnp.cos, params), opt_state, params)
  params = optax.apply_updates(params, updates)
  state = dst_optax.find_state(opt_state)
  assert int(state.budget.sum()) == 52 + 5
  subset = _subset_extract.extract_subset_from_state(params, state, 0.53)
  assert subset.tensors["w"].num_changed == 52
  for fraction, silos, mask in [
    (0.5, dst_optax.PerTensor(), None),
    (0.53, dst_optax.rows(), None),
    (0.53, dst_optax.PerTensor(), {"w": True, "b": False}),
  ]:
    with pytest.raises(_subset.SubsetError, match="pass the ε, silos and mask of training"):
      _subset_extract.extract_subset_from_state(params, state, fraction, silos, mask=mask)


def test_extract_from_state_keeps_budgets_float32_made_one_higher():
  """ε = 0.29 of 100 is 29 coordinates in float32 (training, injected) and 28 in float64."""
  params = {"w": jnp.linspace(-1.0, 1.0, 100)}
  injected = optax.inject_hyperparams(dst_optax.dynamic_subset_tuning)
  tx = optax.chain(optax.sgd(0.1), injected(fraction_of_free_params=0.29))
  opt_state = tx.init(params)
  updates, opt_state = jax.jit(tx.update)({"w": jnp.cos(params["w"] * 7)}, opt_state, params)
  trained = optax.apply_updates(params, updates)
  state = dst_optax.find_state(opt_state)
  assert int(state.budget.sum()) == 29
  subset = _subset_extract.extract_subset_from_state(trained, state, 0.29)
  assert subset.tensors["w"].num_changed == 29 and subset.fraction_of_free_params == 0.29
  assert_trees_bitwise_equal(_subset.apply_subset(state.seed, subset), trained)


def test_extract_from_a_partial_state_points_to_the_full_seed():
  """DST in one branch of ``optax.multi_transform`` holds no seed for the other branch."""
  seed, _ = make_model(np.random.default_rng(4), np.float32)
  params = jax.tree.map(jnp.asarray, seed)
  labels = {"encoder": {"kernel": "dst", "bias": "dst"}, "head": "full"}
  tx = optax.multi_transform(
    {
      "dst": optax.chain(optax.adam(0.05), dst_optax.dynamic_subset_tuning(0.1)),
      "full": optax.adam(0.05),
    },
    labels,
  )
  opt_state = tx.init(params)
  for _ in range(3):
    updates, opt_state = jax.jit(tx.update)(jax.tree.map(jnp.cos, params), opt_state, params)
    params = optax.apply_updates(params, updates)
  state = dst_optax.find_state(opt_state)
  with pytest.raises(_subset.SubsetError, match=r"DST never saw \['head'\].*extract_subset"):
    _subset_extract.extract_subset_from_state(params, state, 0.1)
  # The advice holds: the full seed, the head stored whole.
  subset = _subset_extract.extract_subset(seed, params, 0.1, mask=head_free)
  expected = oracle_projection(seed, params, 0.1, dst_optax.PerTensor(), {"head"})
  assert_trees_bitwise_equal(_subset.named_leaves(_subset.apply_subset(seed, subset)), expected)
  assert subset.tensors["encoder/kernel"].num_changed == int(state.num_changed[1]) == 12


def test_extract_from_state_before_first_step_fails():
  seed, _ = make_model(np.random.default_rng(3), np.float32)
  state = dst_optax.dynamic_subset_tuning(0.1).init(seed)
  with pytest.raises(_subset.SubsetError, match="no step"):
    _subset_extract.extract_subset_from_state(seed, state, 0.1)


@pytest.mark.parametrize(
  ("mutate", "message"),
  [
    (lambda s: {**s, "head": s["head"] + 1.0}, "'head' is not the tensor"),
    (lambda s: {**s, "head": s["head"].T.copy()}, "'head' has shape"),
    (lambda s: {**s, "head": s["head"].astype(np.float16)}, "'head' has dtype"),
    (lambda s: {"encoder": s["encoder"]}, "missing from the seed"),
  ],
)
def test_wrong_seed_is_rejected_naming_the_leaf(mutate, message):
  seed, finetuned = make_model(np.random.default_rng(4), np.float32)
  subset = _subset_extract.extract_subset(seed, finetuned, 0.1)
  dst_optax.check_seed(seed, subset)
  with pytest.raises(_subset.SubsetError, match=message):
    dst_optax.check_seed(mutate(seed), subset)
  with pytest.raises(_subset.SubsetError, match=message):
    _subset.apply_subset(mutate(seed), subset)


def test_mismatched_finetuned_tree_is_rejected_naming_the_leaf():
  seed, finetuned = make_model(np.random.default_rng(5), np.float32)
  finetuned["encoder"]["bias"] = finetuned["encoder"]["bias"][:5]
  with pytest.raises(_subset.SubsetError, match="'encoder/bias' has shape"):
    _subset_extract.extract_subset(seed, finetuned, 0.1)


def test_compose_reports_overlaps_and_later_subset_wins():
  rng = np.random.default_rng(6)
  seed, task_a = make_model(rng, np.float32)
  _, task_b = make_model(rng, np.float32)
  task_b = jax.tree.map(lambda s, b: s + (b - s) * 3.0, seed, task_b)
  subset_a = _subset_extract.extract_subset(seed, task_a, 0.3, mask=head_free)
  subset_b = _subset_extract.extract_subset(seed, task_b, 0.3, mask=head_free)
  params, overlaps = _subset.compose(seed, [subset_a, subset_b])
  by_tensor = {overlap.tensor: overlap for overlap in overlaps}
  for path in ("encoder/kernel", "encoder/bias"):
    shared = np.intersect1d(subset_a.tensors[path].indices, subset_b.tensors[path].indices)
    if shared.size:
      assert by_tensor[path].num_shared == shared.size
      assert by_tensor[path].num_conflicting == shared.size  # task b moved 3x further
    else:
      assert path not in by_tensor
  assert by_tensor["head"].num_shared == seed["head"].size
  expected = _subset.apply_subset(_subset.apply_subset(seed, subset_a), subset_b, verify=False)
  assert_trees_bitwise_equal(params, expected)


def test_compose_rejects_subsets_of_different_seeds():
  rng = np.random.default_rng(7)
  seed_a, finetuned_a = make_model(rng, np.float32)
  seed_b, finetuned_b = make_model(rng, np.float32)
  with pytest.raises(_subset.SubsetError, match="'encoder/bias'"):
    _subset.compose_subsets(
      [
        _subset_extract.extract_subset(seed_a, finetuned_a, 0.1),
        _subset_extract.extract_subset(seed_b, finetuned_b, 0.1),
      ]
    )


@pytest.mark.parametrize(
  ("dtype", "donate"),
  [(np.float32, True), (ml_dtypes.bfloat16, True), (np.float32, False)],
)
def test_switch_subset_on_device_matches_apply(dtype, donate):
  rng = np.random.default_rng(8)
  seed, task_a = make_model(rng, dtype)
  _, task_b = make_model(rng, dtype)
  subset_a = _subset_extract.extract_subset(seed, task_a, 0.1, mask=head_free)
  subset_b = _subset_extract.extract_subset(seed, task_b, 0.2, mask=head_free)
  device_seed = jax.tree.map(jnp.asarray, seed)
  patches_a = _subset.device_patches(subset_a)
  patches_b = _subset.device_patches(subset_b)
  served = jax.tree.map(jnp.copy, device_seed)
  served = _subset.switch_subset(served, device_seed, patches_a, donate=donate)
  assert_trees_bitwise_equal(served, _subset.apply_subset(seed, subset_a))
  served = _subset.switch_subset(served, device_seed, patches_b, patches_a, donate=donate)
  assert_trees_bitwise_equal(served, _subset.apply_subset(seed, subset_b))
  served = _subset.switch_subset(served, device_seed, patches_a, patches_b, donate=donate)
  assert_trees_bitwise_equal(served, _subset.apply_subset(seed, subset_a))
  chex.assert_trees_all_equal_shapes_and_dtypes(served, device_seed)


def test_switch_from_a_dense_tensor_to_a_sparse_one_starts_from_the_seed():
  """Task A stores its new head whole; task B changes a few of the head's coordinates."""
  rng = np.random.default_rng(11)
  seed, task_a = make_model(rng, np.float32)
  _, task_b = make_model(rng, np.float32)
  subset_a = _subset_extract.extract_subset(seed, task_a, 0.1, mask=head_free)
  subset_b = _subset_extract.extract_subset(seed, task_b, 0.1)
  assert subset_a.tensors["head"].dense and not subset_b.tensors["head"].dense
  device_seed = jax.tree.map(jnp.asarray, seed)
  patches_a, patches_b = _subset.device_patches(subset_a), _subset.device_patches(subset_b)
  served = _subset.switch_subset(jax.tree.map(jnp.copy, device_seed), device_seed, patches_a)
  served = _subset.switch_subset(served, device_seed, patches_b, patches_a)
  assert_trees_bitwise_equal(served, _subset.apply_subset(seed, subset_b))


def test_sharded_params_keep_their_sharding_through_apply_revert_and_switch(mesh_case):
  with mesh_case.context():
    check_sharded_subset_round_trips(mesh_case.mesh)


def check_sharded_subset_round_trips(mesh):
  rng = np.random.default_rng(12)
  seed, task_a = make_model(rng, np.float32)
  _, task_b = make_model(rng, np.float32)
  subset_a = _subset_extract.extract_subset(seed, task_a, 0.1, mask=head_free)
  subset_b = _subset_extract.extract_subset(seed, task_b, 0.2)
  specs = {"encoder": {"kernel": P("data", "model"), "bias": P("model")}, "head": P(None, None)}
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
  device_seed = jax.device_put(seed, shardings)

  def assert_laid_out_as_the_seed(tree):
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
      assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)

  applied = _subset.apply_subset(device_seed, subset_a)
  assert_laid_out_as_the_seed(applied)
  assert_trees_bitwise_equal(applied, _subset.apply_subset(seed, subset_a))
  reverted = _subset.revert_subset(applied, device_seed, subset_a)
  assert_laid_out_as_the_seed(reverted)
  assert_trees_bitwise_equal(reverted, seed)
  served = jax.tree.map(jnp.copy, device_seed)
  patches_a, patches_b = _subset.device_patches(subset_a), _subset.device_patches(subset_b)
  switched = _subset.switch_subset(served, device_seed, patches_a)
  # Laid out as they came, the sparse leaves' buffers were reused in place.
  assert served["encoder"]["kernel"].is_deleted()
  assert_laid_out_as_the_seed(switched)
  switched = _subset.switch_subset(switched, device_seed, patches_b, patches_a)
  assert_laid_out_as_the_seed(switched)
  assert_trees_bitwise_equal(switched, _subset.apply_subset(seed, subset_b))


def test_apply_without_verify_still_checks_tree_shapes_and_dtypes():
  seed, finetuned = make_model(np.random.default_rng(13), np.float32)
  subset = _subset_extract.extract_subset(seed, finetuned, 0.1)
  with pytest.raises(_subset.SubsetError, match="'head' has dtype float16"):
    _subset.apply_subset({**seed, "head": seed["head"].astype(np.float16)}, subset, verify=False)
  with pytest.raises(_subset.SubsetError, match="'head' has shape"):
    _subset.revert_subset(seed, {**seed, "head": seed["head"].T}, subset, verify=False)


def test_apply_keeps_jax_leaves_on_device():
  seed, finetuned = make_model(np.random.default_rng(9), np.float32)
  subset = _subset_extract.extract_subset(seed, finetuned, 0.1)
  rebuilt = _subset.apply_subset(jax.tree.map(jnp.asarray, seed), subset)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(rebuilt))
  assert_trees_bitwise_equal(rebuilt, _subset.apply_subset(seed, subset))


def test_precomputed_fingerprints_are_used_for_checks():
  seed, finetuned = make_model(np.random.default_rng(10), np.float32)
  subset = _subset_extract.extract_subset(seed, finetuned, 0.1)
  fingerprints = _subset.seed_fingerprints(seed)
  dst_optax.check_seed(jax.tree.map(jnp.asarray, seed), subset, fingerprints)
  fingerprints["head"] = "0" * 32
  with pytest.raises(_subset.SubsetError, match="'head'"):
    dst_optax.check_seed(seed, subset, fingerprints)
  with pytest.raises(_subset.SubsetError, match="'head'"):
    _subset.apply_subset(seed, subset, fingerprints=fingerprints)


def test_float64_leaves_without_x64_are_rejected_naming_the_leaf():
  seed = {"w": np.zeros(4, np.float32), "scale": np.ones(3, np.float64)}
  finetuned = {"w": np.ones(4, np.float32), "scale": np.full(3, 2.0)}
  with pytest.raises(_subset.SubsetError, match="'scale' has dtype float64"):
    _subset_extract.extract_subset(seed, finetuned, 0.5)
  unconstrained = {"w": True, "scale": False}
  subset = _subset_extract.extract_subset(seed, finetuned, 0.5, mask=unconstrained)
  np.testing.assert_array_equal(_subset.apply_subset(seed, subset)["scale"], finetuned["scale"])
