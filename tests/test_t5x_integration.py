"""dst_optax.t5x: the gin factory, partition rules, metrics, tasks and CLI.

The first part needs no T5X; the tests marked ``needs_t5x`` skip, with the
reason, where T5X is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

import dst_optax
from dst_optax import t5x as dst_t5x
from dst_optax.t5x import _cli, _import

needs_t5x = pytest.mark.skipif(
  importlib.util.find_spec("t5x") is None,
  reason="T5X is not installed (it is not on PyPI; see t5x_configs/README.md)",
)


def _t5_like_params() -> dict:
  """A small parameter tree named like T5X's (``encoder/layers_N/...``)."""
  keys = iter(jax.random.split(jax.random.key(0), 8))
  normal = lambda shape: jax.random.normal(next(keys), shape)
  return {
    "token_embedder": {"embedding": normal((16, 8))},
    "encoder": {
      "layers_0": {"mlp": {"wi": {"kernel": normal((8, 12))}}, "norm": {"scale": normal((8,))}},
      "layers_1": {"mlp": {"wi": {"kernel": normal((8, 12))}}, "norm": {"scale": normal((8,))}},
      "layers_10": {"mlp": {"wi": {"kernel": normal((8, 12))}}, "norm": {"scale": normal((8,))}},
    },
  }


def _step(tx: optax.GradientTransformation, params: dict, seed: int = 1) -> tuple[dict, object]:
  """One update with random gradients; returns the new params and the state."""
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  return optax.apply_updates(params, updates), state


def _changed_within_budget(new: dict, params: dict, **dst_options) -> dict:
  """Coordinates changed per leaf once the rounding residue of resets is dropped.

  Projects bit-exactly, as an export does (see ``dst_optax.project_to_budget``).
  """
  projected = dst_optax.project_to_budget(new, params, 0.25, **dst_options)
  return jax.tree.map(lambda a, b: int(jnp.sum(a != b)), projected, params)


@pytest.mark.parametrize(
  ("name", "spec"),
  [
    ("per_tensor", dst_optax.PerTensor()),
    ("rows", dst_optax.rows()),
    ("columns", dst_optax.columns()),
    ("global", dst_optax.Global()),
    ("per_layer", dst_t5x.per_layer_silos),
  ],
)
def test_resolve_silos_maps_names_and_passes_specs_through(name, spec):
  assert dst_t5x.resolve_silos(name) == spec
  assert dst_t5x.resolve_silos(spec) is spec


def test_resolve_silos_rejects_unknown_names():
  with pytest.raises(ValueError, match="per_tensor"):
    dst_t5x.resolve_silos("per_row")


def test_per_layer_silos_share_one_budget_per_layer():
  params = _t5_like_params()
  tx = optax.chain(optax.sgd(0.1), dst_t5x.dynamic_subset_tuning(0.25, "per_layer"))
  new, _ = _step(tx, params)
  changed = _changed_within_budget(new, params, silos=dst_t5x.per_layer_silos)
  for layer in ("layers_0", "layers_1", "layers_10"):
    # One group of 8 * 12 + 8 = 104 coordinates: floor(0.25 * 104) = 26 in total,
    # shared by the kernel and the norm by magnitude, not split per tensor.
    assert sum(jax.tree.leaves(changed["encoder"][layer])) == 26, layer
  assert changed["token_embedder"]["embedding"] == 32


def test_unconstrained_patterns_train_matching_params_freely():
  params = _t5_like_params()
  tx = optax.chain(
    optax.sgd(0.1),
    dst_t5x.dynamic_subset_tuning(0.25, unconstrained_patterns=[r"^token_embedder/"]),
  )
  new, _ = _step(tx, params)
  changed = _changed_within_budget(
    new, params, mask=dst_t5x.constrained_mask([r"^token_embedder/"])
  )
  assert changed["token_embedder"]["embedding"] == 16 * 8
  assert changed["encoder"]["layers_0"]["mlp"]["wi"]["kernel"] == 24


def test_init_works_under_jit_as_t5x_calls_it():
  # T5X builds the train state with jax.eval_shape and then a jitted init.
  tx = optax.chain(optax.adafactor(1e-3), dst_t5x.dynamic_subset_tuning(0.25))
  state = jax.jit(tx.init)(_t5_like_params())
  assert isinstance(state[-1], dst_optax.DynamicSubsetTuningState)


def test_keep_state_dtypes_accepts_float32_counters_under_jit():
  params = {"kernel": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)}
  grads = {"kernel": jnp.linspace(1.0, -2.0, 24).reshape(4, 6)}
  tx = dst_t5x.dynamic_subset_tuning(0.25)
  update = jax.jit(tx.update)
  int_state = update(grads, tx.init(params), params)[1]
  # What T5X hands back after restoring a checkpoint with dtype='float32'.
  restored = jax.tree.map(lambda x: x.astype(jnp.float32), int_state)
  updates, state = update(grads, restored, params)
  assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, restored)
  expected_updates, expected_state = update(grads, int_state, params)
  jax.tree.map(np.testing.assert_array_equal, updates, expected_updates)
  np.testing.assert_array_equal(state.num_changed, expected_state.num_changed)
  assert int(state.count) == 2


def test_factored_state_axes_partition_only_param_shaped_statistics():
  params = {"big": jnp.zeros((256, 300)), "small": jnp.zeros((5,))}
  params_axes = {"big": PartitionSpec("embed", "mlp"), "small": PartitionSpec("embed")}
  factored_state = optax.adafactor(1e-3).init(params)[0]
  axes = dst_t5x.factored_state_axes(factored_state, params_axes)
  assert axes.count is None
  # "big" is factored (v is a placeholder); "small" keeps a full v like its param.
  assert axes.v == {"big": None, "small": PartitionSpec("embed")}
  assert axes.v_row == {"big": None, "small": None}
  assert axes.v_col == {"big": None, "small": None}


def test_require_explains_how_to_install_t5x(monkeypatch):
  # None in sys.modules makes the import fail, as if T5X were not installed.
  for name in ("t5x", "t5x.optimizers"):
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(ImportError, match="not on PyPI"):
    _import.require("t5x.optimizers")


def test_exact_match_is_a_percentage():
  assert dst_t5x.exact_match(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == {"exact_match": 75.0}


def test_export_command_parses_the_run_settings():
  parser = argparse.ArgumentParser()
  _cli.register(parser.add_subparsers(dest="command"))
  args = parser.parse_args(
    [
      "t5x-export",
      "ckpt",
      "out.safetensors",
      "--fraction_of_free_params",
      "0.01",
      "--silos",
      "rows",
      "--unconstrained",
      "^a/",
      "--unconstrained",
      "^b/",
    ]
  )
  assert (args.checkpoint, args.output, args.fraction_of_free_params) == (
    "ckpt",
    "out.safetensors",
    0.01,
  )
  assert (args.silos, args.seed_checkpoint, args.unconstrained) == ("rows", None, ["^a/", "^b/"])
  assert args.func is _cli._run


def test_export_checks_the_run_settings_against_the_stored_state(tmp_path, monkeypatch, capsys):
  """A checkpoint's DST state knows its budgets: an export with another ε or silos fails."""
  params = _t5_like_params()
  tx = optax.chain(
    optax.adafactor(1e-2),
    dst_t5x.dynamic_subset_tuning(0.25, unconstrained_patterns=[r"^token_embedder/"]),
  )
  new, state = _step(tx, params)
  # A T5X state dict: the optimizer state as nested mappings, restored as float32.
  dst_state = {
    name: jax.tree.map(lambda x: np.asarray(x, np.float32), value)
    for name, value in dst_optax.find_state(state)._asdict().items()
  }
  checkpoint = {"target": new, "state": {"param_states": {"0": {}, "1": dst_state}}}
  monkeypatch.setattr(dst_t5x._export, "load_checkpoint", lambda path: checkpoint)
  settings = {"unconstrained_patterns": [r"^token_embedder/"]}
  subset = dst_t5x.export_subset("ckpt", str(tmp_path / "a.subset"), 0.25, **settings)
  assert subset.tensors["encoder/layers_0/mlp/wi/kernel"].num_changed == 24
  for fraction, silos in [(0.1, "per_tensor"), (0.25, "rows")]:
    with pytest.raises(dst_optax.SubsetError, match="pass the ε, silos and mask of training"):
      dst_t5x.export_subset("ckpt", str(tmp_path / "b.subset"), fraction, silos=silos, **settings)
  with pytest.raises(dst_optax.SubsetError, match="pass the ε, silos and mask of training"):
    dst_t5x.export_subset("ckpt", str(tmp_path / "c.subset"), 0.25)
  # The command reports it in one line.
  command = ["t5x-export", "ckpt", str(tmp_path / "d.subset"), "--fraction_of_free_params=0.1"]
  assert _cli.main([*command, "--unconstrained=^token_embedder/"]) == 2
  assert "t5x-export: error: ε = 0.1 with silos" in capsys.readouterr().err


@needs_t5x
def test_t5x_partitions_the_seed_like_the_params():
  from t5x import optimizers

  params = _t5_like_params()
  params_axes = jax.tree.map(lambda p: PartitionSpec(*(["embed", "mlp"][: p.ndim])), params)
  tx = optax.chain(optax.adafactor(1e-3), dst_t5x.dynamic_subset_tuning(0.1))
  axes = optimizers.OptaxStatePartitionRules.derive_optax_logical_axes(tx.init(params), params_axes)
  dst_axes = axes[-1]
  assert isinstance(dst_axes, dst_optax.DynamicSubsetTuningState)
  assert dst_axes.seed == params_axes
  assert all(getattr(dst_axes, field) is None for field in dst_axes._fields if field != "seed")


@needs_t5x
def test_metrics_computer_reports_the_subset():
  from t5x import metrics as metrics_lib

  params = _t5_like_params()
  tx = optax.chain(optax.sgd(0.1), dst_t5x.dynamic_subset_tuning(0.25))
  _, state = _step(tx, params)
  train_state = type("TrainState", (), {"param_states": state})()
  metrics = dst_t5x.DstMetricsComputer().compute_metrics(None, None, train_state)
  assert set(metrics) == {f"dst/{name}" for name in dst_optax.subset_stats(state)} - {"dst/step"}
  assert all(isinstance(metric, metrics_lib.AveragePerStep) for metric in metrics.values())
  assert metrics["dst/changed"].compute() == dst_optax.subset_stats(state)["changed"]


@needs_t5x
def test_tsv_task_reads_input_target_pairs(tmp_path):
  import seqio

  (tmp_path / "train.tsv").write_text("review: fun\tpositive\n")
  (tmp_path / "validation.tsv").write_text("review: dull\tnegative\n")
  name = dst_t5x.tsv_task(str(tmp_path), name="dst_test_tsv")
  dataset = seqio.get_mixture_or_task(name).get_dataset(
    {"inputs": 32, "targets": 8}, split="validation", shuffle=False
  )
  (example,) = list(dataset.as_numpy_iterator())
  assert example["inputs_pretokenized"] == b"review: dull"
  assert example["targets_pretokenized"] == b"negative"
  assert dst_t5x.tsv_task(str(tmp_path), name="dst_test_tsv") == name  # idempotent


@needs_t5x
def test_task_with_vocabulary_retokenizes_wmt_for_mt5():
  pytest.importorskip("t5.data.mixtures", reason="the `t5` package registers the WMT tasks")
  assert dst_t5x.task_with_vocabulary("wmt16_enro_v003", "t5") == "wmt16_enro_v003"
  import seqio

  name = dst_t5x.task_with_vocabulary("wmt16_enro_v003", "mt5")
  vocabulary = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
  assert vocabulary.sentencepiece_model_file == dst_t5x.VOCABULARY_FILES["mt5"]
  with pytest.raises(ValueError, match="mixture"):
    dst_t5x.task_with_vocabulary("super_glue_v102_proportional", "mt5")
