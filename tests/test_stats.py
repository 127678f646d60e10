"""Tests of subset statistics."""

import jax
import jax.numpy as jnp
import optax
import pytest

import dst_optax


def test_stats_found_inside_wrappers():
  params = {"w": jnp.arange(10.0)}
  tx = optax.MultiSteps(
    optax.chain(optax.sgd(1.0), optax.inject_hyperparams(dst_optax.dynamic_subset_tuning)(0.3)), 1
  )
  state = tx.init(params)
  _, state = tx.update({"w": jnp.arange(10.0)}, state, params)
  stats = dst_optax.subset_stats(state)
  assert {k: int(v) for k, v in stats.items() if k != "churn"} == {
    "step": 1,
    "changed": 3,
    "budget": 3,
    "entered": 3,
    "exited": 0,
    "frozen_silos": 0,
    # Cold, 3 key bits a pass: done once a slot starts between Δ = 7 and Δ = 6,
    # 2^21 keys apart, after ceil((31 - 21) / 3) passes.
    "search_passes": 4,
  }
  assert float(stats["churn"]) == 1.0


def test_stats_of_a_vmapped_state_are_per_member():
  tx = dst_optax.dynamic_subset_tuning(0.25)
  params = {"w": jnp.stack([jnp.ones((4, 4))] * 3)}
  grads = {"w": jnp.arange(48.0).reshape(3, 4, 4) * jnp.array([1.0, 0.0, -1.0])[:, None, None]}
  state = jax.vmap(tx.init)(params)
  _, state = jax.vmap(tx.update)(grads, state, params)
  stats = dst_optax.subset_stats(state)
  assert {k: v.shape for k, v in stats.items()} == dict.fromkeys(stats, (3,))
  assert stats["changed"].tolist() == [4, 0, 4] and stats["budget"].tolist() == [4, 4, 4]


def test_find_state_errors():
  with pytest.raises(ValueError, match="found 0"):
    dst_optax.find_state(optax.adam(1.0).init({"w": jnp.ones(2)}))
  params = {"w": jnp.ones(2)}
  both = optax.chain(dst_optax.dynamic_subset_tuning(0.5), dst_optax.dynamic_subset_tuning(0.5))
  with pytest.raises(ValueError, match="found 2"):
    dst_optax.find_state(both.init(params))
