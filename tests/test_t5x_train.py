"""End to end with T5X: the tiny local config trains, checkpoints, resumes, runs
2-way model parallel and keeps the DST budget; its subset exports.

Runs ``python -m t5x.train`` as a user would (minutes on a CPU). Skipped, with
the reason, where T5X is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import re
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    importlib.util.find_spec("t5x") is None,
    reason="T5X is not installed (it is not on PyPI; see t5x_configs/README.md)",
  ),
]

import jax  # noqa: E402

import dst_optax  # noqa: E402
from dst_optax import t5x as dst_t5x  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# tiny_local.gin's epsilon.
FRACTION = 0.25
PRETRAIN_STEPS = 2
FINETUNE_STEPS = 4


def _write_sentiment_task(directory: pathlib.Path) -> None:
  """A synthetic text-to-text sentiment task: ``review: ...<TAB>positive|negative``."""
  rng = random.Random(0)
  words = {"positive": ["great", "moving", "fun", "brilliant"], "negative": ["dull", "bad", "weak"]}
  for split, size in (("train", 64), ("validation", 16)):
    lines = []
    for _ in range(size):
      label = rng.choice(sorted(words))
      lines.append(f"review: {' and '.join(rng.choices(words[label], k=3))}\t{label}\n")
    (directory / f"{split}.tsv").write_text("".join(lines))


def _train(model_dir: pathlib.Path, data_dir: pathlib.Path, *bindings: str, devices: int = 1):
  """Runs ``t5x.train`` on tiny_local.gin; returns its log text."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  command = [
    sys.executable,
    "-m",
    "t5x.train",
    f"--gin_search_paths={REPO}",
    "--gin_file=t5x_configs/tiny_local.gin",
    f'--gin.MODEL_DIR="{model_dir}"',
    f'--gin.DATA_DIR="{data_dir}"',
    *(f"--gin.{binding}" for binding in bindings),
  ]
  result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-6000:]
  return result.stderr


def _assert_within_budget(checkpoint_dir: pathlib.Path) -> dict:
  """Checks the latest checkpoint against floor(ε |S|) per tensor; returns it."""
  checkpoint = dst_t5x.load_checkpoint(str(checkpoint_dir))
  params = checkpoint["target"]
  sizes = np.array([leaf.size for leaf in jax.tree.leaves(params)])
  dst_state = checkpoint["state"]["param_states"]["1"]
  np.testing.assert_array_equal(dst_state["budget"], np.floor(FRACTION * sizes))
  assert np.all(dst_state["num_changed"] <= dst_state["budget"])
  assert np.any(dst_state["num_changed"] > 0), "DST kept nothing"
  # Materialised bit-exactly, as the export does, the model is within budget too
  # (resets may leave one rounding of residue in the raw params until next step).
  projected = dst_optax.project_to_budget(params, dst_t5x.stored_seed(checkpoint), FRACTION)
  for (path, leaf), seed_leaf in zip(
    jax.tree_util.tree_leaves_with_path(projected),
    jax.tree.leaves(dst_t5x.stored_seed(checkpoint)),
    strict=True,
  ):
    assert np.sum(np.asarray(leaf) != seed_leaf) <= np.floor(FRACTION * leaf.size), path
  return checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("data")
  _write_sentiment_task(directory)
  return directory


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
  """A tiny checkpoint trained with T5X's Adafactor, like the public checkpoints."""
  model_dir = tmp_path_factory.mktemp("pretrained")
  _train(
    model_dir,
    data_dir,
    "OPTIMIZER=@adafactor.Adafactor()",
    "trainer.Trainer.weight_metrics_computer=None",
    f"TRAIN_STEPS={PRETRAIN_STEPS}",
    f"utils.SaveCheckpointConfig.period={PRETRAIN_STEPS}",
    f"EVAL_PERIOD={PRETRAIN_STEPS}",
  )
  return model_dir / f"checkpoint_{PRETRAIN_STEPS}"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data_dir, pretrained):
  """DST fine-tuning from ``pretrained``; returns the model dir and the log."""
  model_dir = tmp_path_factory.mktemp("finetuned")
  log = _train(
    model_dir,
    data_dir,
    f'INITIAL_CHECKPOINT_PATH="{pretrained}"',
    f"TRAIN_STEPS={PRETRAIN_STEPS + FINETUNE_STEPS}",
  )
  return model_dir, log


def test_finetuning_keeps_the_budget_and_seeds_from_the_restored_checkpoint(pretrained, finetuned):
  model_dir, log = finetuned
  checkpoint = _assert_within_budget(model_dir)
  assert int(checkpoint["state"]["step"]) == PRETRAIN_STEPS + FINETUNE_STEPS
  # T5X initialised the optimizer on random weights and then restored the
  # pretrained ones; the seed must be the restored weights.
  pretrained_params = dst_t5x.load_checkpoint(str(pretrained))["target"]
  jax.tree.map(np.testing.assert_array_equal, dst_t5x.stored_seed(checkpoint), pretrained_params)
  assert not all(
    jax.tree.leaves(jax.tree.map(np.array_equal, checkpoint["target"], pretrained_params))
  ), "fine-tuning changed nothing"
  assert re.search(r"dst/changed=[1-9]", log), "DST metrics missing from the summaries"


def test_resume_restores_the_seed_and_float32_counters(data_dir, finetuned):
  model_dir, _ = finetuned
  before = dst_t5x.load_checkpoint(str(model_dir))
  log = _train(model_dir, data_dir, f"TRAIN_STEPS={PRETRAIN_STEPS + FINETUNE_STEPS + 2}")
  assert f"Restoring checkpoint from {model_dir}/checkpoint_" in log
  after = _assert_within_budget(model_dir)
  assert int(after["state"]["step"]) == PRETRAIN_STEPS + FINETUNE_STEPS + 2
  assert int(after["state"]["param_states"]["1"]["count"]) == FINETUNE_STEPS + 2
  jax.tree.map(
    np.testing.assert_array_equal, dst_t5x.stored_seed(after), dst_t5x.stored_seed(before)
  )


def test_export_writes_a_subset_within_the_budget(tmp_path, finetuned):
  model_dir, _ = finetuned
  output = tmp_path / "subset.safetensors"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "dst_optax.t5x",
      "t5x-export",
      str(model_dir),
      str(output),
      f"--fraction_of_free_params={FRACTION}",
    ],
    check=True,
  )
  subset = dst_optax.load_subset(output)
  checkpoint = dst_t5x.load_checkpoint(str(model_dir))
  seed = dst_t5x.stored_seed(checkpoint)
  restored = dst_optax.apply_subset(seed, subset)
  for path, tensor in subset.tensors.items():
    assert tensor.num_changed <= int(np.floor(FRACTION * np.prod(tensor.shape))), path
  # The exported model is the checkpoint materialised within the budget, bit for bit.
  projected = dst_optax.project_to_budget(checkpoint["target"], seed, FRACTION)
  jax.tree.map(np.testing.assert_array_equal, restored, projected)


def _partition_specs(model_info: str) -> dict[str, str]:
  """Variable name -> partition spec, from T5X's model-info.txt."""
  pattern = re.compile(r"^Variable (\S+) .* partition spec (.+)$", re.MULTILINE)
  return {name: spec.strip() for name, spec in pattern.findall(model_info)}


def test_two_way_model_parallel_shards_the_seed_like_the_params(tmp_path, data_dir, pretrained):
  _train(
    tmp_path,
    data_dir,
    f'INITIAL_CHECKPOINT_PATH="{pretrained}"',
    f"TRAIN_STEPS={PRETRAIN_STEPS + 2}",
    "partitioning.PjitPartitioner.num_partitions=2",
    devices=2,
  )
  specs = _partition_specs((tmp_path / "model-info.txt").read_text())
  # Model-info lists the params, then the optimizer's `step` and `param_states/...`.
  params = {
    name: spec
    for name, spec in specs.items()
    if name != "step" and not name.startswith("param_states/")
  }
  assert any("'model'" in spec for spec in params.values()), "nothing is model-parallel"
  for name, spec in params.items():
    assert specs[f"param_states/1/seed/{name}"] == spec, name
  assert specs["param_states/1/count"] == "None"
  assert specs["param_states/1/num_changed"] == "None"
  _assert_within_budget(tmp_path)
