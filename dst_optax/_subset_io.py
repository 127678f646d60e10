"""Subset files: one safetensors file per subset.

Layout (format version 1). For a tensor at path ``p`` (``a/b/c``, or with
``name_separator="."`` the name ``a.b.c``):

- ``p.values``: the new values (1-D, the tensor's dtype), or the whole tensor if
  it is stored dense;
- ``p.indices``: sorted flat (row-major) int32 positions (``index_encoding="raw"``),
  or ``p.index_deltas``: the gaps between successive positions (the first one
  from 0) as LEB128 varints in uint8 (``index_encoding="delta_varint"``, the
  default: about 1-2 bytes per index instead of 4 at ε ≥ 1e-4).

With ``index_encoding="raw"`` and ``name_separator="."`` every tensor is a flat
int32 index vector plus a value vector named after the checkpoint's tensor, the
layout of sparse weight patches that other tools read.

The file's metadata (string to string) holds ``format``, ``format_version``,
``fraction_of_free_params``, ``silos``, ``distance``, ``seed_fingerprint``, a JSON
list ``tensors`` (per tensor: path, name, shape, dtype, budget, silo, seed
fingerprint, encoding, count) and ``payload_sha256``, a hash of all tensor bytes
that detects corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from dst_optax._subset import (
  UNCONSTRAINED_BUDGET,
  Subset,
  SubsetError,
  TensorSubset,
  combined_seed_fingerprint,
  save_safetensors,
)

FORMAT = "dst_optax.subset"
FORMAT_VERSION = 1
INDEX_ENCODINGS = ("delta_varint", "raw")
_DENSE = "dense"
_VARINT_PAYLOAD_BITS = 7
_VARINT_CONTINUE = 0x80
# An int32 gap needs at most ceil(31 / 7) varint bytes.
_VARINT_MAX_BYTES = 5


def encode_varint_deltas(indices: np.ndarray) -> np.ndarray:
  """Sorted unique non-negative positions as LEB128 varints of their gaps (uint8)."""
  gaps = np.diff(indices.astype(np.int64), prepend=0).astype(np.uint64)
  lengths = np.ones(gaps.shape, np.int64)
  for byte in range(1, _VARINT_MAX_BYTES):
    lengths += gaps >= (1 << (_VARINT_PAYLOAD_BITS * byte))
  starts = np.cumsum(lengths) - lengths
  encoded = np.empty(int(lengths.sum()), np.uint8)
  for byte in range(_VARINT_MAX_BYTES):
    present = lengths > byte
    payload = (gaps[present] >> np.uint64(_VARINT_PAYLOAD_BITS * byte)) & np.uint64(0x7F)
    more = (lengths[present] > byte + 1).astype(np.uint64) * _VARINT_CONTINUE
    encoded[starts[present] + byte] = (payload | more).astype(np.uint8)
  return encoded


def decode_varint_deltas(encoded: np.ndarray) -> np.ndarray:
  """Inverse of :func:`encode_varint_deltas`; returns int64 positions.

  Raises:
    ValueError: if the bytes are not a sequence of complete varints of at most
      five bytes.
  """
  if encoded.size == 0:
    return np.zeros(0, np.int64)
  last_byte = (encoded & _VARINT_CONTINUE) == 0
  if not last_byte[-1]:
    raise ValueError("the last varint is cut off")
  ends = np.flatnonzero(last_byte)
  starts = np.concatenate([[0], ends[:-1] + 1])
  if np.any(ends - starts >= _VARINT_MAX_BYTES):
    raise ValueError("a varint is longer than 5 bytes")
  value_of_byte = np.repeat(np.arange(starts.size), ends - starts + 1)
  shifts = (np.arange(encoded.size) - starts[value_of_byte]) * _VARINT_PAYLOAD_BITS
  payload = (encoded & 0x7F).astype(np.int64) << shifts
  return np.cumsum(np.add.reduceat(payload, starts))


def _tensor_name(path: str, name_separator: str) -> str:
  return path.replace("/", name_separator)


def _payload_digest(tensors: Mapping[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for name in sorted(tensors):
    array = np.require(tensors[name], requirements="C")
    digest.update(f"{name}|{array.dtype.name}{array.shape}|".encode())
    digest.update(memoryview(array.reshape(-1).view(np.uint8)))
  return digest.hexdigest()


def save_subset(
  subset: Subset,
  file: str | os.PathLike,
  index_encoding: str = "delta_varint",
  name_separator: str = "/",
) -> int:
  """Writes a subset to one safetensors file.

  Args:
    subset: the subset.
    file: the path to write.
    index_encoding: ``"delta_varint"`` (smallest) or ``"raw"`` (int32 indices).
    name_separator: joins path parts in tensor names; ``"."`` gives checkpoint
      style names such as ``encoder.layer_0.kernel``.

  Returns:
    The number of bytes written.
  """
  if index_encoding not in INDEX_ENCODINGS:
    raise ValueError(f"index_encoding must be one of {INDEX_ENCODINGS}; got {index_encoding!r}")
  arrays: dict[str, np.ndarray] = {}
  entries = []
  for path, tensor in subset.tensors.items():
    name = _tensor_name(path, name_separator)
    arrays[f"{name}.values"] = np.require(tensor.values, requirements="C")
    encoding = _DENSE if tensor.dense else index_encoding
    if encoding == "raw":
      arrays[f"{name}.indices"] = tensor.indices.astype(np.int32)
    elif encoding == "delta_varint":
      arrays[f"{name}.index_deltas"] = encode_varint_deltas(tensor.indices)
    entries.append(
      {
        "path": path,
        "name": name,
        "shape": list(tensor.shape),
        "dtype": tensor.dtype.name,
        "budget": tensor.budget,
        "silo": tensor.silo,
        "seed_fingerprint": tensor.seed_fingerprint,
        "encoding": encoding,
        "count": int(tensor.num_changed),
      }
    )
  if len({entry["name"] for entry in entries}) != len(entries):
    raise SubsetError(
      f"name_separator={name_separator!r} maps two tensor paths to one name; use another"
    )
  metadata = {
    "format": FORMAT,
    "format_version": str(FORMAT_VERSION),
    "fraction_of_free_params": repr(subset.fraction_of_free_params),
    "silos": subset.silos,
    "distance": subset.distance,
    "seed_fingerprint": combined_seed_fingerprint(subset),
    "tensors": json.dumps(entries),
    "payload_sha256": _payload_digest(arrays),
  }
  return save_safetensors(arrays, file, metadata)


def _corrupt(file: str | os.PathLike, reason: str) -> SubsetError:
  return SubsetError(f"subset file {os.fspath(file)!r} is invalid: {reason}")


def _read(file: str | os.PathLike) -> tuple[dict[str, str], dict[str, np.ndarray]]:
  """Metadata and tensors of a safetensors file, with file errors made readable."""
  if os.path.isdir(file):
    raise SubsetError(f"{os.fspath(file)!r} is a directory, not a subset file")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"subset file {os.fspath(file)!r} does not exist")
  try:
    with safetensors.safe_open(os.fspath(file), framework="numpy") as reader:
      metadata = reader.metadata() or {}
      arrays = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
  except (safetensors.SafetensorError, OSError, ValueError) as error:
    raise _corrupt(file, f"not a readable safetensors file ({error})") from None
  return metadata, arrays


# Fields of a tensor's metadata entry and their JSON types.
_ENTRY_FIELDS = {
  "path": str,
  "name": str,
  "shape": list,
  "dtype": str,
  "budget": int,
  "silo": str,
  "seed_fingerprint": str,
  "encoding": str,
  "count": int,
}


def _metadata_field(
  file: str | os.PathLike, metadata: Mapping[str, str], key: str, parse: Callable[[str], Any]
) -> Any:
  """A header field, parsed; a missing or unparsable one makes the file invalid."""
  if key not in metadata:
    raise _corrupt(file, f"its metadata has no {key!r}")
  try:
    return parse(metadata[key])
  except ValueError:
    raise _corrupt(file, f"its metadata's {key} is {metadata[key]!r}") from None


def _read_subset_file(
  file: str | os.PathLike,
) -> tuple[dict[str, str], list[dict[str, Any]], dict[str, np.ndarray]]:
  """The metadata, the tensors' entries (checked for fields and types) and the arrays
  of a subset file of the version this code reads."""
  metadata, arrays = _read(file)
  if metadata.get("format") != FORMAT:
    raise _corrupt(file, f"its metadata does not say format={FORMAT!r}; not a subset file")
  if metadata.get("format_version") != str(FORMAT_VERSION):
    raise _corrupt(
      file,
      f"format_version {metadata.get('format_version')!r} is not supported (this "
      f"dst_optax reads version {FORMAT_VERSION})",
    )
  entries = _metadata_field(file, metadata, "tensors", json.loads)
  if not isinstance(entries, list):
    raise _corrupt(file, f"its metadata's tensors are a {type(entries).__name__}, not a list")
  for position, entry in enumerate(entries):
    where = f"tensor entry {position}"
    if not isinstance(entry, dict):
      raise _corrupt(file, f"{where} is a {type(entry).__name__}, not an object")
    for field, kind in _ENTRY_FIELDS.items():
      value = entry.get(field)
      # bool is an int to Python, not to the format.
      if not isinstance(value, kind) or isinstance(value, bool):
        raise _corrupt(file, f"{where} has {field} {value!r}, not a {kind.__name__}")
    if not all(isinstance(size, int) and size >= 0 for size in entry["shape"]):
      raise _corrupt(file, f"{where} has shape {entry['shape']!r}")
  return metadata, entries, arrays


def _decode_indices(
  file: str | os.PathLike, entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> np.ndarray | None:
  """The tensor's flat int32 positions, validated against its shape and count."""
  name, path, encoding = entry["name"], entry["path"], entry["encoding"]
  if encoding == _DENSE:
    return None
  if encoding == "raw":
    indices = arrays.get(f"{name}.indices")
    if indices is None or indices.dtype != np.int32 or indices.ndim != 1:
      raise _corrupt(file, f"tensor {path!r} has no 1-D int32 '{name}.indices'")
  elif encoding == "delta_varint":
    deltas = arrays.get(f"{name}.index_deltas")
    if deltas is None or deltas.dtype != np.uint8 or deltas.ndim != 1:
      raise _corrupt(file, f"tensor {path!r} has no 1-D uint8 '{name}.index_deltas'")
    try:
      indices = decode_varint_deltas(deltas)
    except ValueError as error:
      raise _corrupt(file, f"index deltas of tensor {path!r}: {error}") from None
  else:
    raise _corrupt(file, f"tensor {path!r} has unknown index encoding {encoding!r}")
  size = int(np.prod(entry["shape"]))
  if indices.size and (indices[0] < 0 or indices[-1] >= size or np.any(np.diff(indices) <= 0)):
    raise _corrupt(
      file, f"indices of tensor {path!r} are not sorted unique positions in [0, {size})"
    )
  return indices.astype(np.int32)


def _tensor_subset(
  file: str | os.PathLike, entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> TensorSubset:
  path, name = entry["path"], entry["name"]
  values = arrays.get(f"{name}.values")
  if values is None:
    raise _corrupt(file, f"tensor {path!r} has no '{name}.values'")
  shape = tuple(entry["shape"])
  indices = _decode_indices(file, entry, arrays)
  expected_shape = shape if indices is None else indices.shape
  if values.shape != expected_shape or values.dtype.name != entry["dtype"]:
    raise _corrupt(
      file,
      f"values of tensor {path!r} have shape {values.shape} and dtype {values.dtype.name}; "
      f"expected {expected_shape} and {entry['dtype']}",
    )
  if values.size != entry["count"]:
    raise _corrupt(file, f"tensor {path!r} stores {values.size} values, not {entry['count']}")
  return TensorSubset(
    indices, values, shape, int(entry["budget"]), entry["silo"], entry["seed_fingerprint"]
  )


def _check_budgets(file: str | os.PathLike, tensors: Mapping[str, TensorSubset]) -> None:
  """Sparse tensors may not change more coordinates than their silos' budget.

  Tensors sharing a group silo record the group's budget; their counts are
  summed per group. A composed tensor (silo ``a + b``) records the sum of its
  parts' budgets, which bounds that tensor alone.
  """
  groups: dict[tuple[str, int], int] = {}
  for path, tensor in tensors.items():
    if tensor.budget == UNCONSTRAINED_BUDGET:
      continue
    if tensor.silo.startswith(("Group(", "Global(")) and " + " not in tensor.silo:
      key = (tensor.silo, tensor.budget)
      groups[key] = groups.get(key, 0) + tensor.num_changed
      count, where = groups[key], f"group {tensor.silo}"
    else:
      count, where = tensor.num_changed, f"tensor {path!r}"
    if count > tensor.budget:
      raise _corrupt(file, f"{where} changes {count} coordinates, over its budget {tensor.budget}")


def load_subset(file: str | os.PathLike) -> Subset:
  """Reads and validates a subset file written by :func:`save_subset`.

  Args:
    file: the path.

  Returns:
    The :class:`Subset`.

  Raises:
    FileNotFoundError: if there is no such file.
    SubsetError: if the file is not a valid subset file (wrong format or version,
      corrupt bytes, indices out of range or unsorted, counts over budget).
  """
  metadata, entries, arrays = _read_subset_file(file)
  if _payload_digest(arrays) != metadata.get("payload_sha256"):
    raise _corrupt(file, "its tensor bytes do not match payload_sha256 (corrupted)")
  tensors = {entry["path"]: _tensor_subset(file, entry, arrays) for entry in entries}
  fraction = _metadata_field(file, metadata, "fraction_of_free_params", float)
  if not 0.0 < fraction <= 1.0:
    raise _corrupt(file, f"its fraction_of_free_params {fraction!r} lies outside (0, 1]")
  subset = Subset(
    tensors,
    fraction,
    _metadata_field(file, metadata, "silos", str),
    _metadata_field(file, metadata, "distance", str),
  )
  _check_budgets(file, tensors)
  if combined_seed_fingerprint(subset) != metadata.get("seed_fingerprint"):
    raise _corrupt(file, "seed_fingerprint does not match the per-tensor fingerprints")
  return subset


def file_summary(file: str | os.PathLike) -> dict[str, Any]:
  """Sizes of a subset file: bytes on disk, stored coordinates, and the ideal.

  Returns:
    ``file_bytes``; ``tensor_bytes``, per tensor path the bytes of its index and
    value tensors; ``num_sparse``, changed coordinates of sparse tensors;
    ``sparse_bytes``, their index and value bytes; ``ideal_bytes``, a 4-byte index
    plus the value per changed coordinate; ``dense_bytes``; and
    ``bytes_per_free_param``, ``sparse_bytes / num_sparse``.
  """
  _, entries, arrays = _read_subset_file(file)
  tensor_bytes = {}
  num_sparse = sparse_bytes = ideal_bytes = dense_bytes = 0
  for entry in entries:
    names = [f"{entry['name']}.{suffix}" for suffix in ("values", "indices", "index_deltas")]
    tensor_bytes[entry["path"]] = sum(arrays[name].nbytes for name in names if name in arrays)
    values = arrays.get(names[0])
    if values is None:
      raise _corrupt(file, f"tensor {entry['path']!r} has no '{names[0]}'")
    if entry["encoding"] == _DENSE:
      dense_bytes += values.nbytes
    else:
      num_sparse += values.size
      sparse_bytes += tensor_bytes[entry["path"]]
      ideal_bytes += values.size * (np.dtype(np.int32).itemsize + values.itemsize)
  return {
    "file_bytes": os.path.getsize(file),
    "tensor_bytes": tensor_bytes,
    "num_sparse": num_sparse,
    "sparse_bytes": sparse_bytes,
    "ideal_bytes": ideal_bytes,
    "dense_bytes": dense_bytes,
    "bytes_per_free_param": sparse_bytes / num_sparse if num_sparse else float("nan"),
  }
