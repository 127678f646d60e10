"""Tests of streaming extraction from safetensors files and Orbax checkpoints."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

import dst_optax
from dst_optax import _subset, _subset_extract

SILOS = {
  "per_tensor": dst_optax.PerTensor(),
  "rows": dst_optax.rows(),
  "global": dst_optax.Global(),
  "groups": {
    "encoder": dst_optax.Group("body"),
    "bias": dst_optax.Group("body"),
    "head": dst_optax.PerTensor(),
  },
}


def head_free(params):
  """Mask of the test model: the head is new, hence unconstrained (stored dense)."""
  return {key: key != "head" for key in params}


def make_model():
  rng = np.random.default_rng(0)
  seed = {
    "encoder": {
      "kernel": rng.normal(size=(16, 12)).astype(np.float32),
      "ties": (rng.integers(-2, 3, size=(20,)) * 0.25).astype(np.float32),
    },
    "bias": rng.normal(size=(12,)).astype(ml_dtypes.bfloat16),
    "head": rng.normal(size=(12, 2)).astype(np.float32),
  }
  # Steps of 0.25 make many distances tie, so tie-breaking across tensors is exercised.
  finetuned = jax.tree.map(
    lambda x: (x.astype(np.float32) + rng.integers(-2, 3, size=x.shape) * 0.25).astype(x.dtype),
    seed,
  )
  return seed, finetuned


def assert_rebuilds_core_projection(subset: _subset.Subset, seed, finetuned, silos) -> None:
  """The subset rebuilds exactly what the core's whole-tree projection keeps."""
  expected = dst_optax.project_to_budget(finetuned, seed, 0.2, silos, mask=head_free)
  rebuilt = _subset.apply_subset(seed, subset)
  for path, leaf in _subset.named_leaves(expected).items():
    actual = np.asarray(_subset.named_leaves(rebuilt)[path])
    np.testing.assert_array_equal(actual.view(np.uint8), np.asarray(leaf).view(np.uint8), path)


def assert_same_subset(actual: _subset.Subset, expected: _subset.Subset) -> None:
  assert list(actual.tensors) == list(expected.tensors)
  for path, tensor in expected.tensors.items():
    streamed = actual.tensors[path]
    assert streamed[2:] == tensor[2:], path
    if tensor.dense:
      assert streamed.dense, path
    else:
      np.testing.assert_array_equal(streamed.indices, tensor.indices, err_msg=path)
    np.testing.assert_array_equal(
      streamed.values.view(np.uint8), tensor.values.view(np.uint8), err_msg=path
    )


def extract_via_files(tmp_path, seed, finetuned, fraction, silos=None, mask=None):
  """Saves both trees as params files and extracts from the files, streaming."""
  _subset_extract.save_params(seed, tmp_path / "seed.safetensors")
  _subset_extract.save_params(finetuned, tmp_path / "finetuned.safetensors")
  return _subset_extract.extract_subset_streaming(
    _subset_extract.safetensors_source(tmp_path / "seed.safetensors"),
    _subset_extract.safetensors_source(tmp_path / "finetuned.safetensors"),
    fraction,
    silos or dst_optax.PerTensor(),
    mask=mask,
  )


@pytest.mark.parametrize(
  "kind", ["per_tensor", "global", "groups", pytest.param("rows", marks=pytest.mark.slow)]
)
def test_streaming_from_safetensors_equals_in_memory_extraction(tmp_path, kind):
  seed, finetuned = make_model()
  streamed = extract_via_files(tmp_path, seed, finetuned, 0.2, SILOS[kind], mask=head_free)
  expected = _subset_extract.extract_subset(seed, finetuned, 0.2, SILOS[kind], mask=head_free)
  assert_same_subset(streamed, expected)
  assert_rebuilds_core_projection(streamed, seed, finetuned, SILOS[kind])


def test_streaming_rejects_mismatched_checkpoints(tmp_path):
  seed, finetuned = make_model()
  finetuned["encoder"]["kernel"] = finetuned["encoder"]["kernel"][:, :5]
  _subset_extract.save_params(seed, tmp_path / "seed.safetensors")
  _subset_extract.save_params(finetuned, tmp_path / "finetuned.safetensors")
  with pytest.raises(_subset.SubsetError, match="'encoder/kernel' has shape"):
    _subset_extract.extract_subset_streaming(
      _subset_extract.safetensors_source(tmp_path / "seed.safetensors"),
      _subset_extract.safetensors_source(tmp_path / "finetuned.safetensors"),
      0.2,
    )


def test_params_file_round_trip_keeps_the_tree(tmp_path):
  seed, _ = make_model()
  _subset_extract.save_params(seed, tmp_path / "seed.safetensors")
  loaded = _subset_extract.load_params(
    _subset_extract.safetensors_source(tmp_path / "seed.safetensors")
  )
  assert jax.tree.structure(loaded) == jax.tree.structure(seed)
  for path, leaf in _subset.named_leaves(seed).items():
    np.testing.assert_array_equal(_subset.named_leaves(loaded)[path], leaf)


@pytest.mark.parametrize("kind", ["per_tensor", "global"])
def test_orbax_streaming_equals_in_memory_extraction(tmp_path, kind):
  ocp = pytest.importorskip("orbax.checkpoint")
  from dst_optax import _subset_orbax  # after the skip: it needs orbax

  seed, finetuned = make_model()
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(tmp_path / "seed", seed)
  checkpointer.save(tmp_path / "finetuned", {"params": finetuned, "step": np.int32(7)})
  streamed = _subset_orbax.extract_subset_from_orbax(
    tmp_path / "seed",
    tmp_path / "finetuned",
    0.2,
    SILOS[kind],
    mask=head_free,
    finetuned_item=("params",),
  )
  expected = _subset_extract.extract_subset(seed, finetuned, 0.2, SILOS[kind], mask=head_free)
  assert_same_subset(streamed, expected)


def test_orbax_reports_missing_items_and_directories(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  from dst_optax import _subset_orbax  # after the skip: it needs orbax

  seed, _ = make_model()
  ocp.PyTreeCheckpointer().save(tmp_path / "seed", seed)
  with pytest.raises(_subset.SubsetError, match="no item 'params'"):
    _subset_orbax.orbax_source(tmp_path / "seed", ("params",))
  with pytest.raises(FileNotFoundError, match="missing"):
    _subset_orbax.orbax_source(tmp_path / "missing")


def test_params_files_of_list_models_keep_the_list_order(tmp_path):
  """Leaves of a list are in index order in memory; files must not sort "10" before "2"."""
  seed = [np.full(4, float(index), np.float32) for index in range(12)]
  # Equal distances everywhere: one global silo's ties go to the earliest leaves.
  finetuned = [leaf + 1.0 for leaf in seed]
  in_memory = dst_optax.extract_subset(seed, finetuned, 0.25, silos=dst_optax.Global())
  from_files = extract_via_files(tmp_path, seed, finetuned, 0.25, dst_optax.Global())
  seed_file = _subset_extract.safetensors_source(tmp_path / "seed.safetensors")
  assert jax.tree.structure(_subset_extract.load_params(seed_file)) == jax.tree.structure(seed)
  assert list(from_files.tensors) == list(in_memory.tensors) == [str(i) for i in range(12)]
  assert_same_subset(from_files, in_memory)
  assert [from_files.tensors[str(i)].num_changed for i in range(12)] == [4] * 3 + [0] * 9


@pytest.mark.parametrize("kind", ["per_tensor", "global", "groups"])
@pytest.mark.parametrize("fraction", [0.0, -0.5, 2.0, float("nan")])
def test_fraction_outside_unit_interval_is_rejected_for_every_silo_kind(kind, fraction):
  seed, finetuned = make_model()
  with pytest.raises(ValueError, match=r"must lie in \(0, 1\]; got"):
    dst_optax.extract_subset(seed, finetuned, fraction, SILOS[kind])
  with pytest.raises(TypeError, match="not a schedule"):
    dst_optax.extract_subset(seed, finetuned, lambda step: 0.1, SILOS[kind])


def test_compose_matches_tensors_by_path_whatever_their_order(tmp_path):
  """Keys "0" … "10" sort as strings in memory; read from a params file they are a list."""
  rng = np.random.default_rng(1)
  seed = {"layers": {str(i): rng.normal(size=(8,)).astype(np.float32) for i in range(11)}}
  task_a = jax.tree.map(lambda x: x + 1.0, seed)
  task_b = jax.tree.map(lambda x: x - rng.normal(size=x.shape).astype(np.float32), seed)
  in_memory = dst_optax.extract_subset(seed, task_a, 0.25)
  from_files = extract_via_files(tmp_path, seed, task_b, 0.25)
  assert list(in_memory.tensors) != list(from_files.tensors)
  composed, _ = dst_optax.compose(seed, [in_memory, from_files])
  expected = dst_optax.apply_subset(
    dst_optax.apply_subset(seed, in_memory), from_files, verify=False
  )
  for path, leaf in _subset.named_leaves(expected).items():
    np.testing.assert_array_equal(_subset.named_leaves(composed)[path], leaf, err_msg=path)
  del seed["layers"]["10"], task_a["layers"]["10"]
  with pytest.raises(_subset.SubsetError, match=r"lacks tensors of subset 0 \['layers/10'\]"):
    dst_optax.compose_subsets([from_files, dst_optax.extract_subset(seed, task_a, 0.25)])


def test_params_files_of_complex_leaves_round_trip(tmp_path):
  params = {
    "w": np.ones((2, 3), np.float32),
    "phase": np.exp(1j * np.arange(3)).astype(np.complex64),
  }
  try:
    _subset_extract.save_params(params, tmp_path / "complex.safetensors")
  except _subset.SubsetError as error:
    # Older safetensors releases (0.4.1) cannot write complex64: a clear error, then.
    assert "cannot write" in str(error) and "complex64" in str(error)
    pytest.skip(f"this safetensors cannot write complex64 ({error})")
  loaded = _subset_extract.load_params(
    _subset_extract.safetensors_source(tmp_path / "complex.safetensors")
  )
  np.testing.assert_array_equal(loaded["phase"], params["phase"])


def test_files_hold_only_dtypes_they_can_read_back(tmp_path):
  params = {"w": np.ones((2, 3), np.float32), "flags": np.ones(3, bool)}
  narrow = {**params, "scales": np.ones(4, ml_dtypes.float8_e4m3fn)}
  with pytest.raises(_subset.SubsetError, match="tensor 'scales' has dtype float8_e4m3fn"):
    _subset_extract.save_params(narrow, tmp_path / "narrow.safetensors")
  assert not (tmp_path / "narrow.safetensors").exists()
  subset = dst_optax.extract_subset(
    narrow, narrow, 0.5, mask={"w": True, "flags": False, "scales": False}
  )
  with pytest.raises(_subset.SubsetError, match="tensor 'scales.values' has dtype float8_e4m3fn"):
    dst_optax.save_subset(subset, tmp_path / "narrow.subset")
