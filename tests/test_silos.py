"""Tests of silo specs and their layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dst_optax
from dst_optax import _silos

PARAMS = {"a": jnp.zeros((4, 6)), "b": jnp.zeros(5), "ids": jnp.zeros(3, jnp.int32)}


def test_per_tensor_rows_columns_sizes():
  layout = _silos.build_layout(
    PARAMS, {"a": dst_optax.rows(), "b": dst_optax.PerTensor(), "ids": dst_optax.PerTensor()}
  )
  assert layout.silo_sizes.tolist() == [6, 6, 6, 6, 5]
  assert layout.leaves[0] == _silos.LeafSilos(axis=0, offset=0, num_silos=4)
  assert layout.leaves[2] is None  # integer leaves pass through
  layout = _silos.build_layout(
    PARAMS, lambda path, leaf: dst_optax.columns() if leaf.ndim == 2 else dst_optax.PerTensor()
  )
  assert layout.silo_sizes.tolist() == [4] * 6 + [5]


def test_groups_share_one_silo_and_budget():
  layout = _silos.build_layout(PARAMS, dst_optax.Global())
  assert layout.silo_sizes.tolist() == [29] and layout.shared
  budgets = layout.budgets(0.1)
  assert budgets.tolist() == [2]


def test_budget_scale_and_cap():
  layout = _silos.build_layout(
    PARAMS,
    {
      "a": dst_optax.PerTensor(budget_scale=3.0),
      "b": dst_optax.PerTensor(),
      "ids": dst_optax.Unconstrained(),
    },
  )
  assert layout.budgets(0.5).tolist() == [24, 2]


def test_traced_fraction_gives_the_same_budgets():
  layout = _silos.build_layout(PARAMS, dst_optax.rows(), mask={"a": True, "b": False, "ids": False})
  traced = jax.jit(layout.budgets)(jnp.float32(0.5))
  np.testing.assert_array_equal(traced, layout.budgets(0.5))


def test_group_scale_conflict_and_bad_scale_name_the_leaf():
  specs = {
    "a": dst_optax.Group("g", 1.0),
    "b": dst_optax.Group("g", 2.0),
    "ids": dst_optax.PerTensor(),
  }
  with pytest.raises(ValueError, match="leaf 'b' puts budget_scale=2.0 on group 'g'"):
    _silos.build_layout(PARAMS, specs)
  for scale in (-1.0, 0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="leaf 'a' must be a finite number > 0"):
      _silos.build_layout(PARAMS, dst_optax.PerTensor(budget_scale=scale))
  for scale in (True, "2", np.ones(2)):
    with pytest.raises(TypeError, match="leaf 'a' must be a number"):
      _silos.build_layout(PARAMS, dst_optax.PerTensor(budget_scale=scale))
  # NumPy and JAX numbers are numbers.
  want = _silos.build_layout(PARAMS, dst_optax.PerTensor(budget_scale=0.5)).budget_scales
  for scale in (np.float32(0.5), jnp.float32(0.5), np.asarray(0.5)):
    have = _silos.build_layout(PARAMS, dst_optax.PerTensor(budget_scale=scale)).budget_scales
    np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_constrained_leaves_of_narrow_floats_are_refused_naming_the_leaf(dtype):
  params = {**PARAMS, "scales": jnp.zeros(4, dtype)}
  with pytest.raises(TypeError, match=f"leaf 'scales' has dtype {jnp.dtype(dtype)}"):
    _silos.build_layout(params, dst_optax.PerTensor())
  with pytest.raises(TypeError, match="leaf 'scales'"):
    dst_optax.dynamic_subset_tuning(0.5).update(
      params, dst_optax.dynamic_subset_tuning(0.5).init(params), params
    )
  # Left out, they are carried along unconstrained.
  layout = _silos.build_layout(
    params, {**dict.fromkeys(PARAMS, dst_optax.PerTensor()), "scales": dst_optax.Unconstrained()}
  )
  assert layout.leaves[list(params).index("scales")] is None


def test_spec_tree_and_mask_must_match_the_params():
  with pytest.raises(ValueError, match="`silos` must be a silo spec"):
    _silos.build_layout(PARAMS, {"a": dst_optax.rows(), "zzz": dst_optax.PerTensor()})
  with pytest.raises(ValueError, match="`mask` must match"):
    _silos.build_layout(PARAMS, dst_optax.PerTensor(), mask={"a": True})


@pytest.mark.parametrize("flag", ["no", jnp.array([True, False]), 1], ids=repr)
def test_mask_flags_must_be_bools(flag):
  """Any object is truthy or not; a mask of anything but bools is refused, naming the leaf."""
  mask = lambda params: {**{key: True for key in params}, "b": flag}
  with pytest.raises(TypeError, match=r"`mask` must give a Python bool for leaf 'b'"):
    _silos.build_layout(PARAMS, dst_optax.PerTensor(), mask=mask)


def test_frozen_silo_report_names_leaves():
  layout = _silos.build_layout(
    PARAMS, {"a": dst_optax.rows(), "b": dst_optax.PerTensor(), "ids": dst_optax.Unconstrained()}
  )
  report = layout.frozen_silo_report(0.1)
  assert "a (4/4 silos)" in report and "b (1/1 silos)" in report
  assert layout.frozen_silo_report(0.5) is None


def test_path_names():
  tree = {"layer": [{"w": 1}], "x": 2}
  names = [_silos.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  assert names == ["layer/0/w", "x"]


@pytest.mark.parametrize(
  ("params", "silos", "owner"),
  [
    (
      {"emb": jax.ShapeDtypeStruct((50_000, 50_000), jnp.float32)},
      dst_optax.PerTensor(),
      "leaf 'emb'",
    ),
    (
      {name: jax.ShapeDtypeStruct((40_000, 30_000), jnp.bfloat16) for name in ("a", "b")},
      dst_optax.Global(),
      "group 'global'",
    ),
  ],
  ids=["tensor", "global"],
)
def test_silos_beyond_int32_counts_are_refused(params, silos, owner):
  """Selection counts in int32: a larger silo would wrap silently, so it is an error."""
  with pytest.raises(ValueError, match=f"the silo of {owner} has 2,[45]00,000,000 coordinates"):
    _silos.build_layout(params, silos)
  # Split into rows, the same params are fine.
  assert _silos.build_layout(params, dst_optax.rows()).num_silos == sum(
    leaf.shape[0] for leaf in params.values()
  )


def test_spec_and_mask_trees_built_over_params_with_none_leaves():
  """``jax.tree.map`` over params keeps their None nodes in the spec and mask trees."""
  params = {"a": jnp.ones((4, 4)), "c": jnp.ones(4), "z": None}
  silos = jax.tree.map(
    lambda p: dst_optax.rows() if p.ndim == 2 else dst_optax.Unconstrained(), params
  )
  mask = jax.tree.map(lambda p: p.ndim == 2, params)
  assert _silos._spec_per_leaf(silos, params) == [dst_optax.rows(), dst_optax.Unconstrained()]
  assert _silos._mask_per_leaf(mask, params) == [True, False]
  tx = dst_optax.dynamic_subset_tuning(0.5, silos=silos)
  updates, _ = tx.update(
    {"a": jnp.arange(16.0).reshape(4, 4), "c": jnp.ones(4), "z": None}, tx.init(params), params
  )
  # Two of four per row (the larger ones), all of the unconstrained vector.
  assert int(jnp.sum(updates["a"] != 0)) == 8 and bool(jnp.all(updates["c"] == 1))
