"""Tests of subset files: round trips, index encodings, validation of bad files."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import dst_optax
from dst_optax import _subset, _subset_extract, _subset_io
from tests.test_subset_extract import extract_via_files


def bits(array) -> np.ndarray:
  array = np.ascontiguousarray(np.asarray(array))
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def head_free(params):
  """Mask for every test model: the head is new, hence unconstrained (stored dense)."""
  return {key: key != "head" for key in params}


def make_subset(dtype, fraction=0.1, silos=None):
  rng = np.random.default_rng(0)
  seed = {
    "encoder": {"kernel": rng.normal(size=(40, 30)).astype(dtype)},
    "bias": rng.normal(size=(30,)).astype(dtype),
    "head": rng.normal(size=(30, 2)).astype(dtype),
  }
  finetuned = jax.tree.map(
    lambda x: (x.astype(np.float32) + 0.1 * rng.normal(size=x.shape)).astype(dtype), seed
  )
  subset = _subset_extract.extract_subset(
    seed, finetuned, fraction, silos or dst_optax.PerTensor(), mask=head_free
  )
  return seed, subset


def assert_subsets_equal(actual: _subset.Subset, expected: _subset.Subset) -> None:
  assert list(actual.tensors) == list(expected.tensors)
  assert actual[1:] == expected[1:]
  for path, tensor in expected.tensors.items():
    loaded = actual.tensors[path]
    assert loaded[2:] == tensor[2:], path
    assert loaded.dtype == tensor.dtype, path
    if tensor.dense:
      assert loaded.dense
    else:
      assert loaded.indices.dtype == np.int32
      np.testing.assert_array_equal(loaded.indices, tensor.indices)
    np.testing.assert_array_equal(bits(loaded.values), bits(tensor.values))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("index_encoding", _subset_io.INDEX_ENCODINGS)
@pytest.mark.parametrize("name_separator", ["/", "."])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype, index_encoding, name_separator):
  seed, subset = make_subset(dtype)
  file = tmp_path / "subset.safetensors"
  _subset_io.save_subset(subset, file, index_encoding, name_separator)
  loaded = _subset_io.load_subset(file)
  assert_subsets_equal(loaded, subset)
  rebuilt = _subset.apply_subset(seed, loaded)
  expected = _subset.apply_subset(seed, subset)
  for path, leaf in _subset.named_leaves(expected).items():
    np.testing.assert_array_equal(bits(_subset.named_leaves(rebuilt)[path]), bits(leaf))


def test_flat_layout_is_int32_index_and_value_per_tensor(tmp_path):
  _, subset = make_subset(np.float32)
  file = tmp_path / "patches.safetensors"
  _subset_io.save_subset(subset, file, index_encoding="raw", name_separator=".")
  tensors = safetensors.numpy.load_file(file)
  assert tensors["encoder.kernel.indices"].dtype == np.int32
  np.testing.assert_array_equal(
    tensors["encoder.kernel.indices"], subset.tensors["encoder/kernel"].indices
  )
  np.testing.assert_array_equal(
    tensors["encoder.kernel.values"], subset.tensors["encoder/kernel"].values
  )
  assert tensors["head.values"].shape == (30, 2)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 2**31 - 2), max_size=200))
def test_varint_deltas_round_trip(positions):
  indices = np.array(sorted(positions), np.int32)
  encoded = _subset_io.encode_varint_deltas(indices)
  assert encoded.dtype == np.uint8
  np.testing.assert_array_equal(_subset_io.decode_varint_deltas(encoded), indices)


def test_delta_varint_beats_raw_indices(tmp_path):
  _, subset = make_subset(np.float32, fraction=0.05)
  sizes = {}
  for encoding in _subset_io.INDEX_ENCODINGS:
    _subset_io.save_subset(subset, tmp_path / encoding, encoding)
    sizes[encoding] = _subset_io.file_summary(tmp_path / encoding)
  raw, varint = sizes["raw"], sizes["delta_varint"]
  assert raw["bytes_per_free_param"] == 8.0 == raw["ideal_bytes"] / raw["num_sparse"]
  assert varint["bytes_per_free_param"] < 6.5
  assert varint["dense_bytes"] == raw["dense_bytes"] == 30 * 2 * 4


def test_group_budgets_are_checked_across_tensors(tmp_path):
  _, subset = make_subset(np.float32, silos=dst_optax.Global())
  file = tmp_path / "global.safetensors"
  _subset_io.save_subset(subset, file)
  assert_subsets_equal(_subset_io.load_subset(file), subset)
  kernel = subset.tensors["encoder/kernel"]
  grown = kernel._replace(
    indices=np.arange(kernel.budget + 1, dtype=np.int32),
    values=np.ones(kernel.budget + 1, np.float32),
  )
  _subset_io.save_subset(subset._replace(tensors={**subset.tensors, "encoder/kernel": grown}), file)
  with pytest.raises(_subset.SubsetError, match="over its budget"):
    _subset_io.load_subset(file)


def rewrite_metadata(file, **changes) -> None:
  with safetensors.safe_open(file, framework="numpy") as reader:
    metadata = reader.metadata()
    tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
  safetensors.numpy.save_file(tensors, file, metadata={**metadata, **changes})


def corrupt_truncated(file):
  data = file.read_bytes()
  file.write_bytes(data[: len(data) - 7])


def corrupt_flipped_value_byte(file):
  data = bytearray(file.read_bytes())
  data[-1] ^= 0x10
  file.write_bytes(bytes(data))


def corrupt_garbage(file):
  file.write_bytes(b"\x00" * 3 + b"not a safetensors file")


def corrupt_version(file):
  rewrite_metadata(file, format_version="99")


def corrupt_other_format(file):
  rewrite_metadata(file, format="something.else")


def corrupt_tensor_list(file):
  rewrite_metadata(file, tensors="[{]")


def corrupt_counts(file):
  with safetensors.safe_open(file, framework="numpy") as reader:
    entries = json.loads(reader.metadata()["tensors"])
  entries[0]["count"] += 1
  rewrite_metadata(file, tensors=json.dumps(entries))


def corrupt_entry(field, value):
  def corrupt(file):
    with safetensors.safe_open(file, framework="numpy") as reader:
      entries = json.loads(reader.metadata()["tensors"])
    entries[0][field] = value
    rewrite_metadata(file, tensors=json.dumps(entries))

  return corrupt


@pytest.mark.parametrize(
  ("corrupt", "message"),
  [
    (corrupt_truncated, "not a readable safetensors file"),
    (corrupt_flipped_value_byte, "payload_sha256"),
    (corrupt_garbage, "not a readable safetensors file"),
    (corrupt_version, "format_version '99'"),
    (corrupt_other_format, "not a subset file"),
    (corrupt_tensor_list, "metadata's tensors is '\\[{\\]'"),
    (corrupt_counts, "stores .* values, not"),
    (lambda file: rewrite_metadata(file, fraction_of_free_params="abc"), "is 'abc'"),
    (lambda file: rewrite_metadata(file, fraction_of_free_params="7.0"), r"7.0 lies outside"),
    (lambda file: rewrite_metadata(file, fraction_of_free_params="nan"), r"nan lies outside"),
    (lambda file: rewrite_metadata(file, tensors='{"path": 1}'), "are a dict, not a list"),
    (corrupt_entry("budget", "x"), "entry 0 has budget 'x', not a int"),
    (corrupt_entry("silo", 5), "entry 0 has silo 5, not a str"),
    (corrupt_entry("shape", [3, -1]), r"entry 0 has shape \[3, -1\]"),
  ],
)
def test_corrupt_files_fail_with_a_clear_error(tmp_path, corrupt, message):
  _, subset = make_subset(np.float32)
  file = tmp_path / "subset.safetensors"
  _subset_io.save_subset(subset, file)
  corrupt(file)
  with pytest.raises(_subset.SubsetError, match=message):
    _subset_io.load_subset(file)


def test_summary_of_a_file_that_is_not_a_subset_is_refused(tmp_path):
  _subset_extract.save_params({"w": np.ones(3, np.float32)}, tmp_path / "params.safetensors")
  with pytest.raises(_subset.SubsetError, match="not a subset file"):
    _subset_io.file_summary(tmp_path / "params.safetensors")


def test_out_of_range_or_unsorted_indices_are_rejected(tmp_path):
  _, subset = make_subset(np.float32)
  bias = subset.tensors["bias"]
  for indices in ([5, 3, 7], [1, 2, 30]):
    bad = bias._replace(
      indices=np.array(indices, np.int32), values=np.ones(3, np.float32), budget=30
    )
    file = tmp_path / "bad.safetensors"
    _subset_io.save_subset(subset._replace(tensors={**subset.tensors, "bias": bad}), file, "raw")
    with pytest.raises(_subset.SubsetError, match="'bias' are not sorted unique positions"):
      _subset_io.load_subset(file)


def test_missing_file_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.safetensors"):
    _subset_io.load_subset(tmp_path / "missing.safetensors")


def test_scalar_leaves_round_trip_as_scalars(tmp_path):
  """0-d leaves (a temperature, a step count) keep their shape through files."""
  seed = {"w": np.zeros((4, 4), np.float32), "temperature": np.float32(1.0), "step": np.int32(0)}
  finetuned = {
    "w": np.eye(4, dtype=np.float32),
    "temperature": np.float32(2.0),
    "step": np.int32(7),
  }
  subset = dst_optax.extract_subset(
    seed, finetuned, 0.25, mask={"w": True, "temperature": False, "step": True}
  )
  dst_optax.save_subset(subset, tmp_path / "scalars.subset")
  rebuilt = dst_optax.apply_subset(seed, dst_optax.load_subset(tmp_path / "scalars.subset"))
  for path, leaf in finetuned.items():
    assert np.shape(rebuilt[path]) == np.shape(leaf)
    np.testing.assert_array_equal(rebuilt[path], leaf)

  from_files = extract_via_files(
    tmp_path, seed, finetuned, 0.25, mask={"w": True, "temperature": False, "step": True}
  )
  rebuilt = dst_optax.apply_subset(seed, from_files)
  for path, leaf in finetuned.items():
    assert np.shape(rebuilt[path]) == np.shape(leaf)
    np.testing.assert_array_equal(rebuilt[path], leaf)


def test_composed_group_subsets_load_back(tmp_path):
  """A union of group subsets may change more in a group than either part's budget."""
  rng = np.random.default_rng(5)

  def assert_round_trip(seed, first, second):
    composed, _ = dst_optax.compose_subsets([first, second])
    dst_optax.save_subset(composed, tmp_path / "composed.subset")
    loaded = dst_optax.load_subset(tmp_path / "composed.subset")
    want, _ = dst_optax.compose(seed, [first, second])
    for path, leaf in dst_optax.apply_subset(seed, loaded).items():
      np.testing.assert_array_equal(bits(leaf), bits(want[path]))

  # Global (20 over both tensors) then per tensor (10 each): 40 changes, 30 per tensor.
  seed = {path: rng.normal(size=1000).astype(np.float32) for path in "ab"}
  moved = lambda: {
    path: leaf + rng.normal(size=1000).astype(np.float32) for path, leaf in seed.items()
  }
  assert_round_trip(
    seed,
    dst_optax.extract_subset(seed, moved(), 0.01, silos=dst_optax.Global()),
    dst_optax.extract_subset(seed, moved(), 0.01, silos=dst_optax.PerTensor()),
  )
  # Two global subsets (8 each): the small tensors' composed budgets are capped at their size.
  seed = {
    "a": np.zeros(10, np.float32),
    "b": np.zeros(10, np.float32),
    "c": np.zeros(1000, np.float32),
  }
  ones = np.r_[np.ones(4), np.zeros(6)].astype(np.float32)
  fraction = 8 / 1020
  assert_round_trip(
    seed,
    dst_optax.extract_subset(
      seed, {**seed, "a": ones, "b": ones}, fraction, silos=dst_optax.Global()
    ),
    dst_optax.extract_subset(
      seed, {**seed, "a": ones[::-1], "b": ones[::-1]}, fraction, silos=dst_optax.Global()
    ),
  )
