"""Subsets: a fine-tuned model stored as its seed plus a few changed coordinates.

A :class:`Subset` holds, per parameter tensor (keyed by its ``a/b/c`` path), the
sorted flat (row-major) int32 positions whose values differ from the seed and
the new values there, in checkpoint coordinates. Tensors that DST does not
constrain (``Unconstrained`` silos, ``mask=False``, non-float leaves; e.g. a new
classification head) are stored whole ("dense"): their seed values are
arbitrary, so the fine-tuned values cannot be expressed against them.

Exactness. Extraction (:mod:`dst_optax._subset_extract`) keeps exactly the
coordinates :func:`dst_optax.project_to_budget` keeps, at most ``floor(ε · |S|)``
per silo, and treats every other one as equal to the seed, so any rounding
residue of training is dropped; changed coordinates are then found by comparing
bit patterns (``-0.0`` vs ``0.0`` and NaN payloads count as changes).
:func:`apply_subset` writes the stored values with a scatter, so
``apply_subset(seed, extract_subset(seed, p))`` equals the projection of ``p``
bit for bit.

Seed identity. Every sparse tensor records a fingerprint (SHA-256 of dtype, shape
and bytes) of the seed tensor it was extracted against; applying the subset to a
different seed raises :class:`SubsetError` naming the tensor. Dense tensors do
not depend on the seed's values, so only their shape and dtype are checked.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import safetensors.numpy
from jax.sharding import PartitionSpec

from dst_optax import _distances, _silos
from dst_optax._selection import explicitly_sharded

# safetensors dtype codes that dst_optax reads (NumPy has no float8 types to read into).
SAFETENSORS_DTYPES = {
  "BOOL": np.dtype(bool),
  "U8": np.dtype(np.uint8),
  "I8": np.dtype(np.int8),
  "I16": np.dtype(np.int16),
  "U16": np.dtype(np.uint16),
  "I32": np.dtype(np.int32),
  "U32": np.dtype(np.uint32),
  "I64": np.dtype(np.int64),
  "U64": np.dtype(np.uint64),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype(np.float32),
  "F64": np.dtype(np.float64),
  "C64": np.dtype(np.complex64),
}
# Largest tensor that int32 flat indices can address.
MAX_TENSOR_SIZE = np.iinfo(np.int32).max
# Budget recorded for dense tensors, which DST does not constrain.
UNCONSTRAINED_BUDGET = -1
# Hex digits kept of each SHA-256 fingerprint (128 bits).
_FINGERPRINT_HEX_DIGITS = 32


class SubsetError(ValueError):
  """A subset does not fit a seed, or a subset file is invalid."""


class TensorSubset(NamedTuple):
  """One tensor's part of a :class:`Subset`.

  Attributes:
    indices: sorted, unique flat (row-major) int32 positions of the coordinates
      that differ from the seed; ``None`` when the tensor is stored whole.
    values: the new values at ``indices`` (1-D, the tensor's dtype), or the whole
      tensor when ``indices`` is ``None``.
    shape: the tensor's shape.
    budget: the most coordinates this tensor's silos may change (for a tensor in a
      silo shared with other tensors, that silo's whole budget);
      ``UNCONSTRAINED_BUDGET`` for a dense tensor.
    silo: readable silo spec of the tensor, e.g. ``"PerTensor(budget_scale=1.0)"``.
    seed_fingerprint: :func:`tensor_fingerprint` of the seed tensor, or ``""`` for
      a dense tensor (which does not depend on the seed's values).
  """

  indices: np.ndarray | None
  values: np.ndarray
  shape: tuple[int, ...]
  budget: int
  silo: str
  seed_fingerprint: str

  @property
  def dense(self) -> bool:
    return self.indices is None

  @property
  def dtype(self) -> np.dtype:
    return self.values.dtype

  @property
  def num_changed(self) -> int:
    """Stored coordinates: the changed ones, or the whole size when dense."""
    return self.values.size


class Subset(NamedTuple):
  """A fine-tuned model as changes to its seed.

  Attributes:
    tensors: per leaf path (``jax.tree_util`` flattening order) its
      :class:`TensorSubset`; every leaf of the model appears, changed or not.
    fraction_of_free_params: ε the subset was extracted with.
    silos: readable description of the silo spec.
    distance: name of the distance that ranked the coordinates.
  """

  tensors: dict[str, TensorSubset]
  fraction_of_free_params: float
  silos: str
  distance: str


class Overlap(NamedTuple):
  """Coordinates of one tensor changed by two of the composed subsets.

  Attributes:
    tensor: the tensor's path.
    first: position of the earlier subset in the composed list.
    second: position of the later subset (whose values win).
    num_shared: coordinates both subsets change.
    num_conflicting: shared coordinates whose new values differ (bitwise).
  """

  tensor: str
  first: int
  second: int
  num_shared: int
  num_conflicting: int


def tensor_fingerprint(tensor: Any) -> str:
  """SHA-256 (first 128 bits, hex) of a tensor's dtype, shape and bytes."""
  array = np.require(np.asarray(tensor), requirements="C")
  digest = hashlib.sha256(f"{array.dtype.name}{array.shape}".encode())
  digest.update(memoryview(array.reshape(-1).view(np.uint8)))
  return digest.hexdigest()[:_FINGERPRINT_HEX_DIGITS]


def combined_seed_fingerprint(subset: Subset) -> str:
  """One fingerprint of all the seed tensors (shapes, dtypes, sparse contents) a subset needs."""
  digest = hashlib.sha256()
  for path, tensor in subset.tensors.items():
    digest.update(f"{path}|{tensor.dtype.name}{tensor.shape}|{tensor.seed_fingerprint};".encode())
  return digest.hexdigest()[:_FINGERPRINT_HEX_DIGITS]


def save_safetensors(
  arrays: Mapping[str, np.ndarray], file: str | os.PathLike, metadata: dict[str, str] | None = None
) -> int:
  """Writes a safetensors file and returns its size in bytes.

  Raises:
    FileNotFoundError: naming the directory, if it does not exist (safetensors
      would name a temporary file instead).
    SubsetError: naming a tensor of a dtype that could not be read back, or the
      file if it cannot be written.
  """
  readable = set(SAFETENSORS_DTYPES.values())
  for name, array in arrays.items():
    if array.dtype not in readable:
      raise SubsetError(
        f"tensor {name!r} has dtype {array.dtype}, which dst_optax could not read back from "
        f"a file (it reads {', '.join(sorted(map(str, readable)))})"
      )
  directory = os.path.dirname(os.path.abspath(os.fspath(file)))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"cannot write {os.fspath(file)!r}: the directory {directory!r} does not exist"
    )
  if os.path.isdir(file):
    raise SubsetError(f"cannot write {os.fspath(file)!r}: it is a directory")
  try:
    safetensors.numpy.save_file(dict(arrays), os.fspath(file), metadata=metadata)
  except (safetensors.SafetensorError, OSError) as error:
    # safetensors names its temporary file, not the one asked for.
    raise SubsetError(f"cannot write {os.fspath(file)!r} ({error})") from None
  return os.path.getsize(file)


def named_leaves(tree: Any) -> dict[str, Any]:
  """The leaves of a pytree keyed by their ``a/b/c`` path, in flattening order.

  Raises:
    SubsetError: if two leaves have the same path name.
  """
  leaves: dict[str, Any] = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = _silos.path_name(key_path)
    if name in leaves:
      raise SubsetError(f"two leaves of the tree have the same path name {name!r}")
    leaves[name] = leaf
  return leaves


def dtype_of(leaf: Any) -> np.dtype:
  """A leaf's own dtype (not JAX's canonical one), without copying arrays to the host."""
  return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _bits(array: np.ndarray) -> np.ndarray:
  """The array's bit patterns as unsigned integers (bool/int/float of any width)."""
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def changed_indices(seed: Any, params: Any) -> np.ndarray:
  """Sorted flat int32 positions where ``params`` differs from ``seed`` bitwise."""
  seed_bits = _bits(np.require(np.asarray(seed), requirements="C").reshape(-1))
  param_bits = _bits(np.require(np.asarray(params), requirements="C").reshape(-1))
  return np.flatnonzero(seed_bits != param_bits).astype(np.int32)


def distance_description(distance: str | _distances.DistanceFn) -> str:
  """The distance's name, for metadata."""
  return distance if isinstance(distance, str) else getattr(distance, "__name__", repr(distance))


def silos_description(silos: _silos.Silos) -> str:
  """A readable summary of a silo spec, callable or spec tree, for metadata."""
  if isinstance(silos, (_silos.PerTensor, _silos.PerSlice, _silos.Group, _silos.Unconstrained)):
    return repr(silos)
  if callable(silos):
    return f"callable {getattr(silos, '__name__', repr(silos))}"
  return "pytree of specs (see each tensor's silo)"


class LeafBudget(NamedTuple):
  """Budget and readable silo spec of one leaf; ``budget`` is -1 if unconstrained."""

  budget: int
  silo: str


def leaf_budgets(
  params: Any,
  fraction_of_free_params: float,
  silos: _silos.Silos = _silos.PerTensor(),
  mask: Any = None,
) -> list[LeafBudget]:
  """Per leaf (flattening order) its :class:`LeafBudget`.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    fraction_of_free_params: ε.
    silos: silo specs, as in :func:`dst_optax.dynamic_subset_tuning`.
    mask: as in :func:`dst_optax.dynamic_subset_tuning`.

  Returns:
    The budgets: the sum over the leaf's own silos, or for a leaf in a silo
    shared with other leaves (a group) that silo's budget.
  """
  layout = _silos.build_layout(params, silos, mask)
  specs = _silos._spec_per_leaf(silos, params)
  budgets = np.asarray(layout.budgets(fraction_of_free_params), dtype=np.int64)
  result = []
  for leaf, spec in zip(layout.leaves, specs, strict=True):
    if leaf is None:
      result.append(LeafBudget(UNCONSTRAINED_BUDGET, repr(_silos.Unconstrained())))
    else:
      leaf_silo_budgets = budgets[leaf.offset : leaf.offset + leaf.num_silos]
      result.append(LeafBudget(int(leaf_silo_budgets.sum()), repr(spec)))
  return result


def _check_indexable(path: str, shape: tuple[int, ...]) -> None:
  if math.prod(shape) > MAX_TENSOR_SIZE:
    raise SubsetError(
      f"tensor {path!r} has {math.prod(shape)} coordinates; int32 flat indices address at "
      f"most {MAX_TENSOR_SIZE}"
    )


def tensor_subset(path: str, seed: Any, projected: Any, budget: LeafBudget) -> TensorSubset:
  """The :class:`TensorSubset` of one leaf, given its seed and projected values.

  Args:
    path: the leaf's path, for messages.
    seed: the seed tensor.
    projected: the tensor after :func:`dst_optax.project_to_budget` (or any
      tensor, for an unconstrained leaf).
    budget: the leaf's :class:`LeafBudget`.

  Returns:
    A dense entry for an unconstrained leaf, else the changed coordinates.
  """
  projected = np.asarray(projected)
  shape = tuple(projected.shape)
  if budget.budget == UNCONSTRAINED_BUDGET:
    return TensorSubset(None, projected.copy(), shape, budget.budget, budget.silo, "")
  _check_indexable(path, shape)
  indices = changed_indices(seed, projected)
  values = projected.reshape(-1)[indices]
  return TensorSubset(indices, values, shape, budget.budget, budget.silo, tensor_fingerprint(seed))


def _leaves_fitting(tree: Any, subset: Subset, name: str) -> dict[str, Any]:
  """The leaves of ``tree`` by path, after checking they have the subset's paths,
  shapes and dtypes; ``name`` (``"seed"``, ``"params"``) names the tree in errors."""
  leaves = named_leaves(tree)
  missing = sorted(subset.tensors.keys() - leaves.keys())
  extra = sorted(leaves.keys() - subset.tensors.keys())
  if missing or extra:
    raise SubsetError(
      f"the subset does not fit the tree of the {name}: tensors missing from the {name} "
      f"{missing}, {name} leaves the subset does not know {extra}"
    )
  for path, tensor in subset.tensors.items():
    leaf = leaves[path]
    if tuple(np.shape(leaf)) != tensor.shape:
      raise SubsetError(
        f"{name} leaf {path!r} has shape {tuple(np.shape(leaf))} but the subset was extracted "
        f"for shape {tensor.shape}"
      )
    if dtype_of(leaf) != tensor.dtype:
      raise SubsetError(
        f"{name} leaf {path!r} has dtype {dtype_of(leaf)} but the subset stores {tensor.dtype} "
        "values"
      )
  return leaves


def check_seed(
  seed: optax.Params, subset: Subset, fingerprints: Mapping[str, str] | None = None
) -> None:
  """Raises :class:`SubsetError` unless the subset was extracted against this seed.

  Args:
    seed: the seed parameters (NumPy or JAX leaves).
    subset: the subset.
    fingerprints: optional :func:`seed_fingerprints` of the seed; leaves missing
      here are fingerprinted on demand. Pass precomputed ones to check many
      subsets against one seed cheaply.

  Raises:
    SubsetError: naming the first leaf whose path, shape, dtype or fingerprint
      does not match.
  """
  _check_fingerprints(_leaves_fitting(seed, subset, "seed"), subset, fingerprints)


def _check_fingerprints(
  seed_leaves: Mapping[str, Any], subset: Subset, fingerprints: Mapping[str, str] | None
) -> None:
  """:func:`check_seed` of seed leaves already checked for paths, shapes and dtypes."""
  fingerprints = fingerprints or {}
  for path, tensor in subset.tensors.items():
    leaf = seed_leaves[path]
    if not tensor.dense:
      found = fingerprints.get(path) or tensor_fingerprint(leaf)
      if found != tensor.seed_fingerprint:
        raise SubsetError(
          f"seed leaf {path!r} is not the tensor this subset was extracted against "
          f"(fingerprint {found} != {tensor.seed_fingerprint}): wrong seed checkpoint?"
        )


def seed_fingerprints(seed: optax.Params) -> dict[str, str]:
  """:func:`tensor_fingerprint` of every seed leaf, by path (compute once, check often)."""
  return {path: tensor_fingerprint(leaf) for path, leaf in named_leaves(seed).items()}


def _at_flat(leaf: jax.Array, flat_indices: Any) -> Any:
  """``leaf.at[…]`` at row-major flat indices, without flattening the leaf.

  A flattened (reshaped) sharded array loses its sharding, and the result would
  come back laid out otherwise; indices past the end land past axis 0's end.
  """
  if leaf.ndim <= 1:
    return leaf.reshape(-1).at[flat_indices]
  coordinates = []
  for size in reversed(leaf.shape[1:]):
    coordinates.append(flat_indices % size)
    flat_indices = flat_indices // size
  return leaf.at[(flat_indices, *reversed(coordinates))]


def _get_flat(leaf: jax.Array, flat_indices: Any, **options: Any) -> jax.Array:
  """The values of a device array at flat indices, gathered where it lives."""
  if explicitly_sharded(leaf):
    # Explicit mesh axes want every gather's output sharding spelled out: replicated.
    options["out_sharding"] = jax.typeof(leaf).sharding.update(spec=PartitionSpec())
  return _at_flat(leaf, flat_indices).get(**options)


def _set_flat(leaf: jax.Array, flat_indices: Any, values: Any, **options: Any) -> jax.Array:
  """A device array with ``values`` at flat indices, laid out as it was."""
  if explicitly_sharded(leaf):
    options["out_sharding"] = jax.typeof(leaf).sharding
  return _at_flat(leaf, flat_indices).set(values, **options).reshape(leaf.shape)


def _gather(leaf: Any, indices: np.ndarray) -> Any:
  """The values of ``leaf`` at flat ``indices``, gathered where the leaf lives
  (so that only those coordinates of a device array reach the host)."""
  if isinstance(leaf, jax.Array):
    return _get_flat(leaf, indices)
  return np.asarray(leaf).reshape(-1)[indices]


def _scatter(leaf: Any, indices: np.ndarray, values: Any) -> Any:
  """A copy of ``leaf`` with ``values`` at the flat ``indices`` (NumPy or JAX, as given)."""
  if isinstance(leaf, jax.Array):
    return _set_flat(leaf, indices, values)
  patched = np.array(leaf, copy=True)
  patched.reshape(-1)[indices] = values
  return patched


def _patched_leaf(seed_leaf: Any, tensor: TensorSubset) -> Any:
  if not tensor.dense:
    return _scatter(seed_leaf, tensor.indices, tensor.values)
  if isinstance(seed_leaf, jax.Array):
    return jax.device_put(tensor.values, seed_leaf.sharding)
  return tensor.values.copy()


def _map_named(tree: Any, function: Callable[[str, Any], Any]) -> Any:
  return jax.tree_util.tree_map_with_path(
    lambda key_path, leaf: function(_silos.path_name(key_path), leaf), tree
  )


def apply_subset(
  seed: optax.Params,
  subset: Subset,
  verify: bool = True,
  fingerprints: Mapping[str, str] | None = None,
) -> optax.Params:
  """Materialises the fine-tuned parameters from the seed and a subset, exactly.

  Args:
    seed: the seed parameters (NumPy or JAX leaves; the result has the same kinds).
    subset: the subset.
    verify: also check the seed's fingerprints (:func:`check_seed`), which hashes
      each seed leaf the subset changes unless ``fingerprints`` has it. Its tree,
      shapes and dtypes are always checked.
    fingerprints: optional precomputed :func:`seed_fingerprints` of the seed.

  Returns:
    The parameters: the seed with the subset's values written in, JAX leaves
    laid out (sharded) as the seed's.

  Raises:
    SubsetError: if the subset does not fit this seed, or (when verifying) was
      not extracted against it.
  """
  seed_leaves = _leaves_fitting(seed, subset, "seed")
  if verify:
    _check_fingerprints(seed_leaves, subset, fingerprints)
  return _map_named(seed, lambda path, leaf: _patched_leaf(leaf, subset.tensors[path]))


def revert_subset(
  params: optax.Params,
  seed: optax.Params,
  subset: Subset,
  verify: bool = True,
  fingerprints: Mapping[str, str] | None = None,
) -> optax.Params:
  """Undoes :func:`apply_subset`: sets the subset's coordinates back to the seed.

  Args:
    params: parameters with the subset applied.
    seed: the seed the subset was applied to.
    subset: the subset.
    verify: also check the seed's fingerprints as :func:`apply_subset` does, and
      that ``params`` hold the subset's values (bitwise) at its coordinates. The
      trees, shapes and dtypes of both are always checked.
    fingerprints: optional precomputed :func:`seed_fingerprints` of the seed.

  Returns:
    ``params`` with every coordinate the subset stores taken from ``seed``; equal
    to ``seed`` bitwise when ``params = apply_subset(seed, subset)``.

  Raises:
    SubsetError: if the subset does not belong to this seed, or (when
      verifying) ``params`` do not hold it, naming the leaf and a coordinate.
  """
  seed_leaves = _leaves_fitting(seed, subset, "seed")
  param_leaves = _leaves_fitting(params, subset, "params")
  if verify:
    _check_fingerprints(seed_leaves, subset, fingerprints)
    _check_holds(param_leaves, subset)

  def revert(path: str, leaf: Any) -> Any:
    tensor = subset.tensors[path]
    seed_leaf = seed_leaves[path]
    if tensor.dense:
      return seed_leaf if isinstance(seed_leaf, jax.Array) else np.array(seed_leaf, copy=True)
    return _scatter(leaf, tensor.indices, _gather(seed_leaf, tensor.indices))

  return _map_named(params, revert)


def _check_holds(param_leaves: Mapping[str, Any], subset: Subset) -> None:
  """Raises :class:`SubsetError` unless the params' leaves (checked for paths,
  shapes and dtypes) hold the subset's values bitwise."""
  for path, tensor in subset.tensors.items():
    leaf = param_leaves[path]
    positions = _positions(tensor)
    held = np.asarray(_gather(leaf, positions))
    stored = tensor.values.reshape(-1)
    differ = np.flatnonzero(_bits(held) != _bits(stored))
    if differ.size:
      first = differ[0]
      raise SubsetError(
        f"params leaf {path!r} does not hold this subset: {differ.size} of its "
        f"{positions.size} coordinates differ, e.g. flat position {int(positions[first])} is "
        f"{held[first]} where the subset stores {stored[first]} (revert the subset that was "
        "applied, or pass verify=False)"
      )


def _positions(tensor: TensorSubset) -> np.ndarray:
  """Flat positions a tensor subset writes: its indices, or all when dense."""
  return np.arange(math.prod(tensor.shape)) if tensor.dense else tensor.indices


def _overlaps(path: str, tensors: Sequence[TensorSubset]) -> list[Overlap]:
  """Pairwise overlaps of one tensor's subsets (pairs that share no coordinate omitted)."""
  overlaps = []
  for first in range(len(tensors)):
    for second in range(first + 1, len(tensors)):
      a, b = tensors[first], tensors[second]
      _, at_a, at_b = np.intersect1d(
        _positions(a), _positions(b), assume_unique=True, return_indices=True
      )
      if at_a.size:
        conflicting = _bits(a.values.reshape(-1)[at_a]) != _bits(b.values.reshape(-1)[at_b])
        overlaps.append(Overlap(path, first, second, int(at_a.size), int(conflicting.sum())))
  return overlaps


def _compose_tensor(path: str, tensors: Sequence[TensorSubset]) -> TensorSubset:
  """Union of one tensor's subsets; on shared coordinates the last subset wins."""
  first = tensors[0]
  for tensor in tensors[1:]:
    if (tensor.shape, tensor.dtype, tensor.dense, tensor.seed_fingerprint) != (
      first.shape,
      first.dtype,
      first.dense,
      first.seed_fingerprint,
    ):
      raise SubsetError(
        f"the subsets disagree on tensor {path!r} (shape {first.shape} vs {tensor.shape}, "
        f"dtype {first.dtype} vs {tensor.dtype}, dense {first.dense} vs {tensor.dense}, seed "
        f"fingerprint {first.seed_fingerprint} vs {tensor.seed_fingerprint}): they were "
        "extracted from different seeds or with different unconstrained leaves"
      )
  budget = (
    UNCONSTRAINED_BUDGET
    if first.dense
    else min(sum(tensor.budget for tensor in tensors), math.prod(first.shape))
  )
  # Every part named, even repeated ones: a composed tensor's budget bounds it
  # alone, whatever group its parts shared (see the loader's budget check).
  silo = " + ".join(tensor.silo for tensor in tensors)
  if first.dense:
    return first._replace(values=tensors[-1].values.copy(), budget=budget, silo=silo)
  indices = np.concatenate([tensor.indices for tensor in reversed(tensors)])
  values = np.concatenate([tensor.values for tensor in reversed(tensors)])
  # np.unique keeps the first occurrence, i.e. the value of the latest subset.
  indices, first_occurrence = np.unique(indices, return_index=True)
  return first._replace(
    indices=indices.astype(np.int32), values=values[first_occurrence], budget=budget, silo=silo
  )


def compose_subsets(subsets: Sequence[Subset]) -> tuple[Subset, list[Overlap]]:
  """Merges subsets of one seed into one; later subsets win on shared coordinates.

  The result may change up to the sum of the budgets, so its ε is the sum of
  the subsets' ε (capped at 1).

  Args:
    subsets: at least one subset, all extracted against the same seed.

  Returns:
    ``(composed, overlaps)``: the merged subset and, per tensor and pair of
    subsets that change a common coordinate, an :class:`Overlap`.

  Raises:
    SubsetError: if the subsets do not share a seed and tree.
  """
  if not subsets:
    raise SubsetError("compose needs at least one subset")
  # Matched by path: one model's subsets may list their tensors in other orders
  # (a dict with keys "0" … "10" in memory, the same tree read from a params file).
  paths = list(subsets[0].tensors)
  for position, subset in enumerate(subsets[1:], start=1):
    if subset.tensors.keys() != set(paths):
      raise SubsetError(
        f"subset {position} has tensors subset 0 lacks "
        f"{sorted(subset.tensors.keys() - set(paths))} and lacks tensors of subset 0 "
        f"{sorted(set(paths) - subset.tensors.keys())}: they belong to different models"
      )
  tensors = {}
  overlaps = []
  for path in paths:
    per_subset = [subset.tensors[path] for subset in subsets]
    tensors[path] = _compose_tensor(path, per_subset)
    overlaps.extend(_overlaps(path, per_subset))
  composed = Subset(
    tensors,
    min(1.0, sum(subset.fraction_of_free_params for subset in subsets)),
    " + ".join(dict.fromkeys(subset.silos for subset in subsets)),
    " + ".join(dict.fromkeys(subset.distance for subset in subsets)),
  )
  return composed, overlaps


def compose(
  seed: optax.Params, subsets: Sequence[Subset], verify: bool = True
) -> tuple[optax.Params, list[Overlap]]:
  """Applies several subsets of one seed in order (later ones win on overlaps).

  Args:
    seed: the seed parameters.
    subsets: the subsets, all extracted against ``seed``.
    verify: also check the seed's fingerprints, as in :func:`apply_subset`.

  Returns:
    ``(params, overlaps)``: the composed parameters and the overlaps found, as
    in :func:`compose_subsets`.
  """
  composed, overlaps = compose_subsets(subsets)
  return apply_subset(seed, composed, verify), overlaps


class DevicePatch(NamedTuple):
  """One tensor's subset on device, padded so that switching tasks does not recompile.

  Attributes:
    indices: int32 flat positions padded with the tensor's size (an out-of-range
      position the scatter drops), or ``None`` for a dense tensor.
    values: the new values, padded like ``indices``, or the whole dense tensor.
  """

  indices: jax.Array | None
  values: jax.Array


def _padded_length(length: int) -> int:
  """Next power of two ≥ length: few distinct shapes, so few compilations."""
  return 1 << max(0, length - 1).bit_length()


def device_patches(subset: Subset) -> dict[str, DevicePatch]:
  """Puts a subset on the default device in the form :func:`switch_subset` takes.

  Each tensor's indices are padded to the next power of two, so subsets of
  similar size share one compiled :func:`switch_subset`.

  Args:
    subset: the subset (check it against the seed first, e.g. with
      :func:`check_seed`).

  Returns:
    Per tensor path its :class:`DevicePatch`.
  """
  patches = {}
  for path, tensor in subset.tensors.items():
    if tensor.dense:
      patches[path] = DevicePatch(None, jnp.asarray(tensor.values))
      continue
    padding = _padded_length(tensor.indices.size) - tensor.indices.size
    indices = np.pad(tensor.indices, (0, padding), constant_values=math.prod(tensor.shape))
    values = np.pad(tensor.values, (0, padding))
    patches[path] = DevicePatch(jnp.asarray(indices), jnp.asarray(values))
  return patches


def _switch_leaf(
  leaf: jax.Array, seed_leaf: jax.Array, old: DevicePatch | None, new: DevicePatch
) -> jax.Array:
  if new.indices is None:
    return new.values.astype(leaf.dtype)
  if old is not None and old.indices is None:
    # The old task replaced the whole leaf (a dense tensor): start from the seed.
    leaf = seed_leaf.astype(leaf.dtype)
  elif old is not None:
    seed_values = _get_flat(seed_leaf, old.indices, mode="fill", fill_value=0)
    leaf = _set_flat(leaf, old.indices, seed_values, mode="drop")
  return _set_flat(leaf, new.indices, new.values, mode="drop")


def _switch_tree(params, seed, old, new):
  seed_leaves = named_leaves(seed)
  return _map_named(
    params,
    lambda path, leaf: _switch_leaf(
      leaf, seed_leaves[path], None if old is None else old[path], new[path]
    ),
  )


def switch_subset(
  params: optax.Params,
  seed: optax.Params,
  new: Mapping[str, DevicePatch],
  old: Mapping[str, DevicePatch] | None = None,
  donate: bool = True,
) -> optax.Params:
  """Switches served parameters from one task's subset to another's, on device.

  Jit-compiled; with ``donate=True`` the update happens in the buffers of
  ``params`` (which must not be used afterwards), so a switch costs time in
  the size of the subsets, not of the model. To serve the first task, pass a
  copy of the seed as ``params`` and no ``old``::

    fingerprints = dst_optax.seed_fingerprints(seed)        # once
    for subset in subsets: dst_optax.check_seed(seed, subset, fingerprints)
    params = switch_subset(jax.tree.map(jnp.copy, seed), seed, task_a)
    params = switch_subset(params, seed, task_b, old=task_a)

  Args:
    params: the served parameters: the seed with ``old`` applied (or the seed).
    seed: the seed parameters (JAX arrays), read only.
    new: :func:`device_patches` of the subset to serve.
    old: :func:`device_patches` of the subset applied to ``params`` now, if any.
    donate: reuse the buffers of ``params``.

  Returns:
    The seed with ``new`` applied, bit-exactly.
  """
  # The result keeps the params' shardings (dense tensors would otherwise take
  # their patch's), and only then can their buffers be donated.
  shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
  switch = jax.jit(_switch_tree, donate_argnums=0 if donate else (), out_shardings=shardings)
  return switch(params, seed, old, new)
