"""Tests of layer-group silos."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dst_optax


def stack(num_layers: int, width: int = 4):
  return {
    "embed": jnp.ones((10, width)),
    "layers": {f"layers_{i}": {"kernel": jnp.ones((width, width))} for i in range(num_layers)},
  }


def test_spindle_splits_twelve_layers_two_four_four_two():
  specs = dst_optax.layer_groups(stack(12))
  names = [specs["layers"][f"layers_{i}"]["kernel"].name for i in range(12)]
  counts = [names.count(f"layer_group_{g}") for g in range(4)]
  assert counts == [2, 4, 4, 2]
  assert specs["embed"] == dst_optax.PerTensor()


def test_uniform_allocation_gives_every_group_the_same_budget():
  params = stack(12)
  specs = dst_optax.layer_groups(params, allocation="uniform")
  tx = dst_optax.dynamic_subset_tuning(0.1, silos=specs)
  state = tx.init(params)
  grads = {k: v for k, v in params.items()}
  _, state = tx.update(grads, state, params)
  group_budgets = np.asarray(state.budget)[1:]  # silo 0 is the embedding
  total = 12 * 16
  assert np.all(group_budgets == math.floor(0.1 * total / 4))


def test_uniform_allocation_counts_only_the_coordinates_dst_constrains():
  params = stack(4)
  # Integer codes in one layer are not DST's to constrain: they must not shrink its budget.
  params["layers"]["layers_0"]["codes"] = jnp.zeros(64, jnp.int8)
  specs = dst_optax.layer_groups(params, num_groups=2, pattern="uniform")
  layout = dst_optax._silos.build_layout(params, specs)
  assert layout.concrete_budgets(0.25).tolist()[1:] == [8, 8]
  params["layers"]["layers_3"]["kernel"] = jnp.ones((0, 4))
  params["layers"]["layers_2"]["kernel"] = jnp.ones((0, 4))
  with pytest.raises(ValueError, match=r"layer group 1 \(layers \[2, 3\]\) has no floating"):
    dst_optax.layer_groups(params, num_groups=2, pattern="uniform")


@pytest.mark.parametrize(
  ("pattern", "counts"),
  [("uniform", [3, 3, 3, 3]), ("bottleneck", [4, 2, 2, 4]), ("increasing", [1, 2, 4, 5])],
)
def test_patterns(pattern, counts):
  specs = dst_optax.layer_groups(stack(12), pattern=pattern, allocation="proportional")
  names = [specs["layers"][f"layers_{i}"]["kernel"].name for i in range(12)]
  assert [names.count(f"layer_group_{g}") for g in range(4)] == counts
  assert all(specs["layers"][f"layers_{i}"]["kernel"].budget_scale == 1.0 for i in range(12))


def test_layer_index_from_path():
  assert dst_optax.layer_index_from_path("encoder/layers_3/attention/kernel") == 3
  assert dst_optax.layer_index_from_path("model/layers/11/mlp") == 11
  assert dst_optax.layer_index_from_path("embed/embedding") is None


def test_too_few_layers_is_a_clear_error():
  with pytest.raises(ValueError, match="found 2 layers"):
    dst_optax.layer_groups(stack(2))
  with pytest.raises(ValueError, match="unknown pattern 'diamond'"):
    dst_optax.layer_groups(stack(12), pattern="diamond")


@pytest.mark.parametrize("num_groups", [0, -2, 2.5, True], ids=repr)
def test_group_count_must_be_a_positive_int(num_groups):
  with pytest.raises(ValueError, match=f"num_groups must be a positive int; got {num_groups!r}"):
    dst_optax.layer_groups(stack(12), num_groups=num_groups)


def test_spec_for_other_leaves_must_be_a_spec():
  with pytest.raises(TypeError, match="other must be a silo spec"):
    dst_optax.layer_groups(stack(12), other="rows")


def test_groups_train_within_budget():
  params = stack(8)
  tx = optax.chain(
    optax.sgd(0.1), dst_optax.dynamic_subset_tuning(0.05, silos=dst_optax.layer_groups(params))
  )
  state = tx.init(params)
  grads = {
    "embed": jnp.ones((10, 4)),
    "layers": {k: {"kernel": jnp.arange(16.0).reshape(4, 4)} for k in params["layers"]},
  }
  _, state = tx.update(grads, state, params)
  stats = dst_optax.subset_stats(state)
  assert 0 < int(stats["changed"]) <= int(stats["budget"])
