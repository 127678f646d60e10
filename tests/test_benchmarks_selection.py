"""The selection speed benchmark runs end to end and reports what its README quotes."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

_BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def load_script(name: str):
  """``benchmarks/<name>.py`` as a module (the scripts import each other as top-level names)."""
  spec = importlib.util.spec_from_file_location(f"{name}_benchmark", _BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


selection_benchmark = load_script("selection")


@pytest.mark.slow
def test_small_run_writes_every_reported_quantity(tmp_path, monkeypatch):
  out = tmp_path / "selection"
  sizes_and_silos = ["--sizes", "1M", "--silos", "per_tensor", "rows"]
  flags = [*sizes_and_silos, "--fractions", "1e-2", "--repeats", "1", "--out", str(out)]
  monkeypatch.setattr(sys, "argv", ["selection.py", *flags, "--gradients", "noisy"])
  selection_benchmark.main()
  report = json.loads(out.with_suffix(".json").read_text())
  assert report["gradients"] == "noisy"
  assert out.with_suffix(".png").stat().st_size > 0
  assert [(row["size"], row["silos"]) for row in report["results"]] == [
    ("1M", "per_tensor"),
    ("1M", "rows"),
  ]
  for row in report["results"]:
    for method in selection_benchmark.METHODS:
      assert math.isfinite(row[f"{method}_ratio"]) and row[f"{method}_ratio"] > 0
      assert row[f"{method}_page_faults"] >= 0
    # A warm search in steady state takes at least one pass and at most a cold
    # search plus a miss; the state adds at most per-silo vectors to the params.
    assert 1 <= row["ours_passes"] <= 20
    assert 0 < row["dst_state_bytes_per_param_byte"] < 1.1


def test_noisy_gradients_change_every_step_around_one_signal():
  params, repeated = selection_benchmark.benchmark_inputs("1M", "repeated")
  _, noisy = selection_benchmark.benchmark_inputs("1M", "noisy")
  count = selection_benchmark.NUM_GRADIENTS
  noisy_steps = selection_benchmark.SteadyStateSteps(params, noisy, "noisy")
  assert all(noisy_steps.grads_at(step) is noisy[step % count] for step in range(3 * count))
  # Repeated: fresh draws while warming up, then the last one for good.
  repeated_steps = selection_benchmark.SteadyStateSteps(params, repeated, "repeated")
  assert [repeated_steps.grads_at(step) is repeated[-1] for step in range(2 * count)] == [
    step >= count - 1 for step in range(2 * count)
  ]
  # The noisy draws are one shared signal plus the repeated mode's draws as noise.
  for name, leaf in params.items():
    np.testing.assert_allclose(
      noisy[1][name] - noisy[0][name], repeated[1][name] - repeated[0][name], atol=1e-7
    )
    assert not np.allclose(noisy[0][name], repeated[0][name])
    assert leaf.shape == noisy[0][name].shape
  with pytest.raises(ValueError, match="gradients must be one of .* got 'nosy'"):
    selection_benchmark.SteadyStateSteps(params, noisy, "nosy")


@pytest.mark.slow
def test_side_by_side_run_swaps_in_the_base_selection(monkeypatch):
  """Against the search before the cut: same trained bits, fewer passes (so it really swapped)."""
  base = "7471f8e"
  repo = pathlib.Path(__file__).parents[1]
  if subprocess.run(["git", "cat-file", "-e", base], cwd=repo, capture_output=True).returncode:
    pytest.skip(f"needs a git checkout holding {base}")
  monkeypatch.syspath_prepend(str(_BENCHMARKS))
  selection_ab = load_script("selection_ab")
  flags = ["--base", base, "--sizes", "1M", "--silos", "per_tensor", "--fractions", "1e-2"]
  monkeypatch.setattr(
    sys, "argv", ["selection_ab.py", *flags, "--repeats", "1", "--training-steps", "10"]
  )
  results = selection_ab.main()
  [row] = results["timings"]
  assert row["passes"]["base"] > 0 and row["passes"]["ours"] > 0
  assert set(results["training"]) == {"per_tensor", "rows", "global"}
  for result in results["training"].values():
    assert result["identical"]
    assert 0 < result["ours_passes"] < result["base_passes"]


@pytest.mark.slow
def test_side_by_side_run_without_the_base_search(monkeypatch):
  """The floor: the base's step runs no search pass where the working tree's needs several."""
  monkeypatch.syspath_prepend(str(_BENCHMARKS))
  selection_ab = load_script("selection_ab")
  flags = ["--sizes", "1M", "--silos", "per_tensor", "--fractions", "1e-2", "--repeats", "1"]
  monkeypatch.setattr(
    sys, "argv", ["selection_ab.py", "--base", "HEAD", "--base-without-search", *flags]
  )
  results = selection_ab.main()
  [row] = results["timings"]
  assert row["passes"] == {"base": 0, "ours": row["passes"]["ours"]} and row["passes"]["ours"] > 0
  assert results["training"] is None


@pytest.mark.slow
def test_profile_of_a_step_lists_its_kernels(monkeypatch):
  monkeypatch.syspath_prepend(str(_BENCHMARKS))
  profile_step = load_script("profile_step")
  flags = ["--size", "1M", "--silos", "per_tensor", "--fraction", "1e-2", "--steps", "2"]
  monkeypatch.setattr(sys, "argv", ["profile_step.py", *flags])
  wall, kernel_seconds, num_threads = profile_step.main()
  assert wall > 0 and num_threads >= 1
  # The step ran the search: its passes are reductions over the leaves' keys.
  assert any("reduce" in name for name in kernel_seconds)
  assert not any(name.startswith(profile_step._NOT_KERNELS) for name in kernel_seconds)
