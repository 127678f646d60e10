"""Tests of ``dst-optax subset ...``: the user's path from checkpoints to a rebuilt model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dst_optax
from dst_optax import _cli, _subset, _subset_extract, _subset_io


def bits(array) -> np.ndarray:
  array = np.ascontiguousarray(np.asarray(array))
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


@pytest.fixture
def checkpoints(tmp_path):
  """Seed and two fine-tuned parameter files; the head is new in both."""
  rng = np.random.default_rng(0)
  seed = {
    "encoder": {"kernel": rng.normal(size=(32, 16)).astype(np.float32)},
    "head": rng.normal(size=(16, 2)).astype(np.float32),
  }
  files = {"seed": tmp_path / "seed.safetensors"}
  _subset_extract.save_params(seed, files["seed"])
  for task in ("a", "b"):
    finetuned = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(x.dtype), seed)
    files[task] = tmp_path / f"{task}.safetensors"
    _subset_extract.save_params(finetuned, files[task])
  return files


def run(*args) -> int:
  return _cli.main(["subset", *map(str, args)])


def extract(checkpoints, task, output, *options) -> int:
  return run(
    "extract", checkpoints["seed"], checkpoints[task], "-o", output, "-e", "0.05",
    "--unconstrained", "^head$", *options,
  )  # fmt: skip


def test_extract_inspect_apply_rebuilds_the_projection(tmp_path, checkpoints, capsys):
  subset_file = tmp_path / "a.subset.safetensors"
  assert extract(checkpoints, "a", subset_file) == 0
  summary = capsys.readouterr().out
  assert "ε = 0.05" in summary and "encoder/kernel" in summary and "dense" in summary
  assert "bytes per changed coordinate" in summary
  assert run("inspect", subset_file) == 0
  assert "25 of 512 constrained coordinates" in capsys.readouterr().out
  rebuilt_file = tmp_path / "rebuilt.safetensors"
  assert run("apply", checkpoints["seed"], subset_file, "-o", rebuilt_file) == 0
  rebuilt = _subset_extract.load_params(_subset_extract.safetensors_source(rebuilt_file))
  seed = _subset_extract.load_params(_subset_extract.safetensors_source(checkpoints["seed"]))
  finetuned = _subset_extract.load_params(_subset_extract.safetensors_source(checkpoints["a"]))
  np.testing.assert_array_equal(bits(rebuilt["head"]), bits(finetuned["head"]))
  changed = _subset.changed_indices(seed["encoder"]["kernel"], rebuilt["encoder"]["kernel"])
  assert changed.size == 25
  np.testing.assert_array_equal(
    bits(rebuilt["encoder"]["kernel"].reshape(-1)[changed]),
    bits(finetuned["encoder"]["kernel"].reshape(-1)[changed]),
  )


def test_compose_reports_overlaps(tmp_path, checkpoints, capsys):
  for task in ("a", "b"):
    assert extract(checkpoints, task, tmp_path / f"{task}.subset", "--silos", "rows") == 0
  composed = tmp_path / "ab.subset"
  assert run("compose", tmp_path / "a.subset", tmp_path / "b.subset", "-o", composed) == 0
  output = capsys.readouterr().out
  assert "head: " in output and "share 32 coordinates" in output
  assert run("apply", checkpoints["seed"], composed, "-o", tmp_path / "ab.safetensors") == 0


def test_wrong_seed_fails_with_a_clear_error(tmp_path, checkpoints, capsys):
  subset_file = tmp_path / "a.subset"
  assert extract(checkpoints, "a", subset_file) == 0
  capsys.readouterr()
  assert run("apply", checkpoints["b"], subset_file, "-o", tmp_path / "out.safetensors") == 2
  error = capsys.readouterr().err
  assert "'encoder/kernel' is not the tensor this subset was extracted against" in error


@pytest.mark.parametrize(
  ("change", "message"),
  [
    (lambda seed: {**seed, "head": seed["head"].astype(np.float16)}, "has dtype float16"),
    (lambda seed: {**seed, "head": seed["head"].T.copy()}, "has shape (2, 16)"),
    (lambda seed: {"encoder": seed["encoder"]}, "tensors missing from the seed ['head']"),
  ],
  ids=["dtype", "shape", "tree"],
)
def test_no_verify_skips_only_the_fingerprints(tmp_path, checkpoints, capsys, change, message):
  subset_file = tmp_path / "a.subset"
  assert extract(checkpoints, "a", subset_file) == 0
  seed = _subset_extract.load_params(_subset_extract.safetensors_source(checkpoints["seed"]))
  output = tmp_path / "out.safetensors"
  # Another seed of the same layout is taken unchecked, as asked.
  other_seed = tmp_path / "other.safetensors"
  _subset_extract.save_params(jax.tree.map(lambda x: x + 1, seed), other_seed)
  assert run("apply", other_seed, subset_file, "-o", output, "--no-verify") == 0
  capsys.readouterr()
  _subset_extract.save_params(change(seed), other_seed)
  assert run("apply", other_seed, subset_file, "-o", output, "--no-verify") == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize(
  ("arguments", "message"),
  [
    (("inspect", "{tmp}/missing.subset"), "does not exist"),
    (("inspect", "{seed}"), "not a subset file"),
    (("extract", "{seed}", "{tmp}/nope.safetensors", "-o", "{tmp}/x", "-e", "0.1"), "nope"),
    (("apply", "{seed}", "{tmp}/garbage.subset", "-o", "{tmp}/x"), "not a readable safetensors"),
    (
      ("extract", "{seed}", "{seed}", "-o", "{tmp}/no_dir/x", "-e", "0.1"),
      "no_dir' does not exist",
    ),
    (("extract", "{seed}", "{seed}", "-o", "{tmp}", "-e", "0.1"), "it is a directory"),
    (("inspect", "{tmp}"), "is a directory, not a subset file"),
  ],
)
def test_bad_inputs_exit_with_status_2_and_a_message(
  tmp_path, checkpoints, capsys, arguments, message
):
  (tmp_path / "garbage.subset").write_bytes(b"garbage")
  filled = [argument.format(tmp=tmp_path, seed=checkpoints["seed"]) for argument in arguments]
  assert run(*filled) == 2
  assert message in capsys.readouterr().err


def test_mismatched_shapes_fail_at_extraction(tmp_path, checkpoints, capsys):
  _subset_extract.save_params(
    {"encoder": {"kernel": np.zeros((16, 32), np.float32)}, "head": np.zeros((16, 2), np.float32)},
    tmp_path / "other.safetensors",
  )
  checkpoints = {**checkpoints, "other": tmp_path / "other.safetensors"}
  assert extract(checkpoints, "other", tmp_path / "x.subset") == 2
  assert "'encoder/kernel' has shape (16, 32)" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", ["0", "1.5", "abc"])
def test_fraction_outside_unit_interval_is_a_usage_error(tmp_path, checkpoints, capsys, fraction):
  with pytest.raises(SystemExit) as exit_info:
    run("extract", checkpoints["seed"], checkpoints["a"], "-o", tmp_path / "x", "-e", fraction)
  assert exit_info.value.code == 2
  assert "ε must" in capsys.readouterr().err


def test_bad_path_pattern_is_a_usage_error(tmp_path, checkpoints, capsys):
  with pytest.raises(SystemExit) as exit_info:
    extract(checkpoints, "a", tmp_path / "x", "--unconstrained", "(")
  assert exit_info.value.code == 2
  assert "'(' is not a regular expression" in capsys.readouterr().err


def test_train_export_and_rebuild_from_the_command_line(tmp_path):
  rng = np.random.default_rng(1)
  seed = {"encoder": {"kernel": rng.normal(size=(24, 8)).astype(np.float32)}}
  params = jax.tree.map(jnp.asarray, seed)
  optimizer = optax.chain(optax.adamw(0.05), dst_optax.dynamic_subset_tuning(0.1))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.sum(jnp.cos(2.0 * p["encoder"]["kernel"])))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(4):
    params, opt_state = step(params, opt_state)
  subset = _subset_extract.extract_subset_from_state(params, dst_optax.find_state(opt_state), 0.1)
  _subset_io.save_subset(subset, tmp_path / "task.subset")
  _subset_extract.save_params(seed, tmp_path / "seed.safetensors")
  assert run("apply", tmp_path / "seed.safetensors", tmp_path / "task.subset", "-o",
             tmp_path / "rebuilt.safetensors") == 0  # fmt: skip
  rebuilt = _subset_extract.load_params(
    _subset_extract.safetensors_source(tmp_path / "rebuilt.safetensors")
  )
  expected = dst_optax.project_to_budget(params, seed, 0.1)
  np.testing.assert_array_equal(
    bits(rebuilt["encoder"]["kernel"]), bits(expected["encoder"]["kernel"])
  )
  assert 0 < subset.tensors["encoder/kernel"].num_changed <= math.floor(0.1 * 24 * 8)


def test_extract_from_orbax_checkpoints(tmp_path, checkpoints, capsys):
  ocp = pytest.importorskip("orbax.checkpoint")
  checkpointer = ocp.PyTreeCheckpointer()
  for task in ("seed", "a"):
    params = _subset_extract.load_params(_subset_extract.safetensors_source(checkpoints[task]))
    checkpointer.save(tmp_path / f"{task}_orbax", {"params": params, "step": np.int32(3)})
  from_orbax, from_files = tmp_path / "orbax.subset", tmp_path / "files.subset"
  assert run(
    "extract", tmp_path / "seed_orbax", tmp_path / "a_orbax", "-o", from_orbax, "-e", "0.05",
    "--seed-item", "params", "--finetuned-item", "params", "--unconstrained", "^head$",
  ) == 0  # fmt: skip
  assert extract(checkpoints, "a", from_files) == 0
  orbax_subset = _subset_io.load_subset(from_orbax)
  file_subset = _subset_io.load_subset(from_files)
  for path, tensor in file_subset.tensors.items():
    assert orbax_subset.tensors[path][2:] == tensor[2:]
    if not tensor.dense:
      np.testing.assert_array_equal(orbax_subset.tensors[path].indices, tensor.indices)
    np.testing.assert_array_equal(bits(orbax_subset.tensors[path].values), bits(tensor.values))
  assert run("extract", tmp_path / "seed_orbax", checkpoints["a"], "-o", tmp_path / "x",
             "-e", "0.05", "--seed-item", "nope") == 2  # fmt: skip
  assert "no item 'nope'" in capsys.readouterr().err
