"""The quality benchmark's learning-rate grid, resumption and validation-based selection."""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import pytest

from dst_optax.demo import _train

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "quality.py"
_SPEC = importlib.util.spec_from_file_location("quality", _PATH)
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)

SENTIMENT = quality.TASKS["sentiment"]
TAIL = "seed=0|steps=80|batch=16|len=48"


def _record(configuration, rate, validation, test, *, lr_in_label=True, seed=0, **extra):
  label = f"{configuration} lr={rate:g}" if lr_in_label else configuration
  record = {
    "key": f"{label}|{TAIL.replace('seed=0', f'seed={seed}')}",
    "method": "dst",
    "label": label,
    "configuration": configuration,
    "learning_rate": rate,
    "seed": seed,
    "num_trainable": 100,
    "accuracy": test,
    "validation_accuracy": validation,
  }
  return {**record, **extra}


def test_learning_rates_multiply_the_grid_innermost():
  grid_flags = ["--methods", "dst", "lora", "--fractions", "1e-3", "--silos", "per-tensor"]
  args = quality.parse_args([*grid_flags, "--learning-rates", "1e-3", "3e-3"])
  grid = quality.build_grid(args)
  assert [(run["method"], run["learning_rate"]) for run in grid] == [
    ("dst", 1e-3),
    ("dst", 3e-3),
    ("lora", 1e-3),
    ("lora", 3e-3),
  ]


def test_without_rates_the_grid_uses_defaults_and_the_singular_flag_still_works():
  grid = quality.build_grid(quality.parse_args(["--methods", "bitfit", "--fractions", "1e-2"]))
  assert [run["learning_rate"] for run in grid] == [None]
  assert quality.parse_args(["--learning-rate", "3e-3"]).learning_rates == [3e-3]


def test_select_by_needs_the_table_and_a_validation_score():
  assert quality.parse_args(["--table", "--select-by", "validation"]).select_by == "validation"
  with pytest.raises(SystemExit):
    quality.parse_args(["--select-by", "validation"])
  with pytest.raises(SystemExit):
    quality.parse_args(["--task", "translation", "--table", "--select-by", "validation"])


def test_run_label_names_only_non_default_rates():
  assert quality.run_label("LoRA r=2", 1e-3, 1e-3) == "LoRA r=2"
  assert quality.run_label("LoRA r=2", 3e-3, 1e-3) == "LoRA r=2 lr=0.003"


def test_records_without_validation_accuracy_are_incomplete():
  record = _record("DST ε=0.001 per-tensor", 1e-3, 0.7, 0.7)
  assert quality.is_complete(record, SENTIMENT)
  del record["validation_accuracy"]
  assert not quality.is_complete(record, SENTIMENT)
  assert not quality.is_complete({**record, "validation_accuracy": None}, SENTIMENT)


def test_selection_takes_the_best_validation_rate_per_budget_and_seed():
  dst = "DST ε=0.001 per-tensor"
  records = [
    _record(dst, 1e-3, 0.70, 0.90, lr_in_label=False),
    _record(dst, 3e-3, 0.80, 0.75),  # Best on validation, not on test.
    _record(dst, 1e-2, 0.60, 0.95),
    _record(dst, 1e-3, 0.65, 0.70, lr_in_label=False, seed=1),
    _record("LoRA r=2", 1e-3, 0.72, 0.71, lr_in_label=False, method="lora"),
    _record("LoRA r=2", 3e-3, 0.72, 0.99, method="lora"),  # A tie goes to the lower rate.
  ]
  legacy = {"key": f"BitFit|{TAIL}", "method": "bitfit", "label": "BitFit", "accuracy": 0.79}
  selected = quality.select_runs([*records, {**legacy, "num_trainable": 10}], "validation_accuracy")
  chosen = {(s.record["configuration"], s.record["seed"]): s for s in selected[:3]}
  assert chosen[dst, 0] == (records[1], 3)
  assert chosen[dst, 1] == (records[3], 1)
  assert chosen["LoRA r=2", 0] == (records[4], 2)
  assert len(selected) == 3  # The run without validation accuracy takes no part.


def test_selected_table_reports_the_chosen_rate_and_its_test_accuracy():
  dst = "DST ε=0.001 per-tensor"
  records = [_record(dst, 1e-3, 0.70, 0.90, lr_in_label=False), _record(dst, 3e-3, 0.80, 0.75)]
  records.append(_record("BitFit", 1e-3, None, 0.99, lr_in_label=False))
  table = quality.selected_table(records, SENTIMENT)
  (row,) = [line for line in table.splitlines() if line.startswith("| DST")]
  assert row == f"| {dst} | 0 | 100 | 2 | 0.003 | 80.0% | 75.0% |"
  assert "90.0%" not in table and "BitFit" not in table
  assert table.endswith("Runs left out for lacking a selection score: 1.")


def test_table_shows_missing_scores_as_dashes():
  record = _record("BitFit", 1e-3, None, 0.793, lr_in_label=False, storage_bytes=8)
  record.update(num_changed=100, train_seconds=1.0)
  assert "| – | 79.3% |" in quality.markdown_table([record], SENTIMENT)


def test_main_reruns_records_without_validation_and_resumes_complete_ones(tmp_path, monkeypatch):
  params = {"dense": {"kernel": jnp.zeros((16, 16))}}  # Any tree: the runner is a stand-in.
  calls = []

  def run(method, seed):
    calls.append(method.label)
    return _train.RunResult(
      method.name, method.label, 0.6, method.num_trainable, 1, 8, 1.0, [0.5],
      validation_accuracy=0.5 + 0.1 * len(calls),
    )  # fmt: skip

  def zero_shot():
    return _train.RunResult("zero-shot", "zero-shot (no training)", 0.5, 0, 0, 0, 0.0, [], 0.5)

  settings = {"steps": 80, "batch_size": 16, "max_length": 48}
  runner = quality.Runner(params, settings, zero_shot, run)
  monkeypatch.setitem(quality.RUNNERS, "sentiment", lambda args: runner)
  output = tmp_path / "quality.json"
  legacy = {"key": f"DST ε=0.05 per-tensor|{TAIL}", "label": "DST ε=0.05 per-tensor"}
  legacy.update(method="dst", silos="per-tensor", num_trainable=10, accuracy=0.9)
  output.write_text(json.dumps([legacy]))
  argv = ["--methods", "dst", "--fractions", "0.05", "--silos", "per-tensor", "--output"]
  argv += [str(output), "--learning-rates", "1e-3", "3e-3"]

  assert quality.main(argv) == 0
  assert calls == ["DST ε=0.05 per-tensor", "DST ε=0.05 per-tensor lr=0.003"]
  records = json.loads(output.read_text())
  new_key = f"DST ε=0.05 per-tensor lr=0.003|{TAIL}"
  expected = ["zero-shot|steps=80|batch=16|len=48", legacy["key"], new_key]
  assert sorted(record["key"] for record in records) == sorted(expected)
  rerun = next(record for record in records if record["key"] == legacy["key"])
  assert rerun["validation_accuracy"] == pytest.approx(0.6) and rerun["learning_rate"] == 1e-3
  assert rerun["configuration"] == "DST ε=0.05 per-tensor"

  assert quality.main(argv) == 0
  assert len(calls) == 2  # Everything complete: nothing runs again.
