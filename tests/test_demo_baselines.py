"""Trainable-parameter counts and behaviour of the demo's fine-tuning methods (tiny BERT)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dst_optax
from dst_optax.demo import _baselines, _bert

TINY = _bert.BertConfig(
  vocab_size=40, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, max_positions=32
)


@pytest.fixture(scope="module")
def base():
  ids = jnp.zeros((1, 4), jnp.int32)
  return _bert.BertEncoder(TINY).init(jax.random.key(0), ids, jnp.ones((1, 4), bool))


def _leaves_named(base, suffix):
  return [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(base)
    if "/".join(str(k.key) for k in path).endswith(suffix)
  ]


def test_full_finetuning_trains_everything(base):
  method = _baselines.matched_method("full", base, 0.01)
  assert method.num_trainable == _baselines.num_params(base)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_dst_and_random_budgets_are_floor_per_tensor(base, fraction):
  expected = sum(math.floor(fraction * leaf.size) for leaf in jax.tree.leaves(base))
  assert _baselines.matched_method("dst", base, fraction).num_trainable == expected
  random = _baselines.matched_method("random", base, fraction)
  assert random.num_trainable == expected


def test_dst_global_budget(base):
  method = _baselines.matched_method("dst", base, 0.01, silo_kind="global")
  assert method.num_trainable == math.floor(0.01 * _baselines.num_params(base))


def test_bitfit_counts_biases(base):
  biases = _leaves_named(base, "bias")
  assert _baselines.matched_method("bitfit", base, 0.01).num_trainable == sum(
    b.size for b in biases
  )


def test_lora_rank_matches_budget(base):
  per_rank = 2 * TINY.num_layers * 2 * TINY.hidden_size  # query and value, (in + out) each
  assert _baselines.lora_params_per_rank(base) == per_rank
  fraction = (3 * per_rank + 0.5) / _baselines.num_params(base)
  method = _baselines.matched_method("lora", base, fraction, silo_kind="global")
  assert method.label == "LoRA r=3"
  assert method.num_trainable == 3 * per_rank


def test_lora_starts_at_the_pretrained_model(base):
  method = _baselines.lora(base, 1e-3, rank=2, seed=0)
  merged, prompt = method.materialize(method.trainable, base)
  assert prompt is None
  jax.tree.map(np.testing.assert_array_equal, merged, base)


def test_prompt_length_matches_budget(base):
  # With one global silo the budget is floor(ε·N) = 5 · hidden_size.
  fraction = (5 * TINY.hidden_size + 0.5) / _baselines.num_params(base)
  method = _baselines.matched_method("prompt", base, fraction, silo_kind="global")
  assert method.trainable.shape == (5, TINY.hidden_size)
  assert method.num_trainable == 5 * TINY.hidden_size
  params, prompt = method.materialize(method.trainable, base)
  assert params is base and prompt.shape == (5, TINY.hidden_size)


def test_tiny_budgets_still_give_one_adapter_unit(base):
  assert _baselines.matched_method("lora", base, 1e-6).label == "LoRA r=1"
  assert _baselines.matched_method("prompt", base, 1e-6).num_trainable == TINY.hidden_size


def test_masked_methods_move_only_their_coordinates(base):
  grads = jax.tree.map(jnp.ones_like, base)
  for name in ("random", "bitfit"):
    method = _baselines.matched_method(name, base, 0.1)
    state = method.optimizer.init(base)
    updates, _ = method.optimizer.update(grads, state, base)
    moved = sum(int(jnp.sum(u != 0)) for u in jax.tree.leaves(updates))
    assert moved == method.num_trainable, name


def test_dst_export_respects_budget(base):
  method = _baselines.matched_method("dst", base, 0.1)
  moved = jax.tree.map(lambda p: p + 1.0, base)
  exported, _ = method.export(moved, base)
  changed = sum(
    int(jnp.sum(e != b))
    for e, b in zip(jax.tree.leaves(exported), jax.tree.leaves(base), strict=True)
  )
  assert changed == method.num_trainable


def test_bad_input_is_rejected(base):
  with pytest.raises(ValueError, match="Unknown method"):
    _baselines.matched_method("adapters", base, 0.01)
  with pytest.raises(ValueError, match="Unknown silo kind"):
    _baselines.matched_method("dst", base, 0.01, silo_kind="rowz")
  with pytest.raises(ValueError, match="rank"):
    _baselines.lora(base, 1e-3, rank=0, seed=0)
  with pytest.raises(ValueError, match="Prompt length"):
    _baselines.prompt_tuning(base, 1e-3, length=0, seed=0)


def test_dst_method_uses_the_library(base):
  method = _baselines.matched_method("dst", base, 0.1)
  state = method.optimizer.init(base)
  assert isinstance(dst_optax.find_state(state), dst_optax.DynamicSubsetTuningState)
