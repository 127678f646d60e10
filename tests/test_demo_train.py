"""End-to-end smoke runs of the demo's training loop and CLI on a tiny random BERT."""

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dst_optax.demo import _baselines, _bert, _cli, _report, _train

TINY = _bert.BertConfig(
  vocab_size=40, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, max_positions=32
)


@pytest.fixture(scope="module")
def setup():
  model = _bert.BertEncoder(TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
  pretrained = _bert.PretrainedBert(model, params, tokenizer=None)
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 12, size=64)
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, TINY.vocab_size, size=(64, 12)).astype(np.int32) * mask
  # Learnable labels: whether token 7 occurs in the sentence.
  labels = np.any(ids == 7, axis=1).astype(np.int32)
  split = _train.EncodedSplit(ids, mask, labels)
  prototypes = jnp.eye(2, TINY.hidden_size)
  return pretrained, split, prototypes


# DST and LoRA in the default run; the other methods (same loop) in the slow run.
@pytest.mark.parametrize(
  "name",
  [
    name if name in ("dst", "lora") else pytest.param(name, marks=pytest.mark.slow)
    for name in _baselines.METHOD_NAMES
  ],
)
def test_every_method_trains_and_reports(setup, name):
  pretrained, split, prototypes = setup
  method = _baselines.matched_method(name, pretrained.params, 0.05)
  config = _train.TrainConfig(steps=2, batch_size=8, eval_batch_size=16)
  # Validation is the test split with every label flipped: its accuracy is the complement.
  flipped = split._replace(labels=1 - split.labels)
  result = _train.run_method(
    pretrained, method, prototypes, split, split, config, progress=False, validation_split=flipped
  )
  assert len(result.losses) == 2 and np.all(np.isfinite(result.losses))
  assert 0.0 <= result.accuracy <= 1.0
  assert result.validation_accuracy == pytest.approx(1.0 - result.accuracy)
  assert result.num_changed > 0
  if name in ("dst", "random", "bitfit"):
    assert result.num_changed <= result.num_trainable
    assert result.storage_bytes == 8 * result.num_changed


@pytest.mark.slow
def test_dst_training_reduces_loss(setup):
  pretrained, split, prototypes = setup
  method = _baselines.dynamic_subset(pretrained.params, 3e-2, 0.1, "per-tensor")
  config = _train.TrainConfig(steps=40, batch_size=16)
  trainable, losses = _train.train(pretrained, method, prototypes, split, config, progress=False)
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  exported, _ = method.export(trainable, pretrained.params)
  assert _train.count_changed(exported, None, pretrained.params) <= method.num_trainable


def test_validation_accuracy_is_optional(setup):
  pretrained, split, prototypes = setup
  config = _train.TrainConfig(eval_batch_size=16)
  without = _train.zero_shot_result(pretrained, prototypes, split, config)
  assert without.validation_accuracy is None
  half = _train.EncodedSplit(split.input_ids[:32], split.attention_mask[:32], 1 - split.labels[:32])
  result = _train.zero_shot_result(pretrained, prototypes, split, config, validation_split=half)
  assert result.accuracy == without.accuracy
  expected = _train.evaluate(pretrained.model, pretrained.params, None, prototypes, half, 16)
  assert result.validation_accuracy == expected


def test_evaluate_pads_the_last_batch(setup):
  pretrained, split, prototypes = setup
  full = _train.evaluate(pretrained.model, pretrained.params, None, prototypes, split, 64)
  batched = _train.evaluate(pretrained.model, pretrained.params, None, prototypes, split, 24)
  assert full == batched


def test_trim_padding_rounds_to_multiple():
  mask = np.zeros((2, 64), np.int32)
  mask[0, :17] = 1
  ids, trimmed = _train.trim_padding(np.ones((2, 64), np.int32), mask)
  assert ids.shape == trimmed.shape == (2, 32)


def test_report_table_and_plot(tmp_path):
  results = [
    _train.RunResult("zero-shot", "zero-shot", 0.7, 0, 0, 0, 0.0, []),
    _train.RunResult("dst", "DST ε=0.01", 0.85, 1000, 990, 7920, 12.0, [0.7, 0.5, 0.4]),
  ]
  table = _report.format_table(results)
  assert "85.0%" in table and "7.9 KB" in table and "1,000" in table
  _report.plot_demo(results, tmp_path / "plot.png")
  assert (tmp_path / "plot.png").stat().st_size > 0


def _demo_parser():
  parser = argparse.ArgumentParser()
  _cli.register(parser.add_subparsers())
  return parser


def test_cli_defaults_and_flags():
  args = _demo_parser().parse_args(["demo", "--fraction", "1e-3", "--baseline", "prompt"])
  assert args.func is _cli.run
  assert args.fraction == 1e-3 and args.baseline == "prompt" and args.silos == "per-tensor"


def test_cli_rejects_bad_fraction():
  args = _demo_parser().parse_args(["demo", "--fraction", "2"])
  with pytest.raises(SystemExit, match="fraction"):
    _cli.run(args)


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    (["--max-length", "2"], "--max-length must be at least 3; got 2"),
    (["--learning-rate=-1e-3"], "--learning-rate must be positive; got -0.001"),
    (["--baseline-learning-rate", "0"], "--baseline-learning-rate must be positive; got 0.0"),
  ],
)
def test_cli_rejects_settings_that_cannot_train(flags, message):
  """A two-token sequence cannot hold a word; a negative rate would ascend the loss."""
  args = _demo_parser().parse_args(["demo", *flags])
  with pytest.raises(SystemExit, match=re.escape(message)):
    _cli.run(args)
