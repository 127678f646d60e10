"""Subset extraction, one tensor pair at a time.

:func:`extract_subset` (parameters in memory) and :func:`extract_subset_streaming`
(checkpoints read tensor by tensor, so two large checkpoints never sit in memory
together) share one procedure. Silos inside one tensor (per tensor, per slice) are
selected with :func:`dst_optax.project_to_budget` on that tensor alone, which is
the same selection as on the whole tree, compiled once per shape. Silos shared by
several tensors (``Group``, ``Global``) keep a running top-k of candidates across
their tensors (O(k) memory), ordered like :func:`dst_optax.project_to_budget`: by
distance, then by position in silo order (leaf flattening order, then
row-major), lowest first.

Checkpoints are read through a :class:`ParamSource`; this module provides one
for parameters in memory and one for safetensors files, and
:mod:`dst_optax._subset_orbax` one for Orbax checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import safetensors
import safetensors.numpy

from dst_optax import _distances, _selection, _silos
from dst_optax._subset import (
  SAFETENSORS_DTYPES,
  LeafBudget,
  Subset,
  SubsetError,
  TensorSubset,
  distance_description,
  dtype_of,
  leaf_budgets,
  named_leaves,
  save_safetensors,
  silos_description,
  tensor_fingerprint,
  tensor_subset,
)
from dst_optax._transform import DynamicSubsetTuningState, _check_fraction, project_to_budget


class ParamSource(NamedTuple):
  """A parameter checkpoint that can be read one tensor at a time.

  Attributes:
    abstract: the parameter tree with ``jax.ShapeDtypeStruct`` leaves.
    read: ``path -> np.ndarray``, the tensor at an ``a/b/c`` path of ``abstract``.
    description: where the checkpoint is, for messages.
  """

  abstract: Any
  read: Callable[[str], np.ndarray]
  description: str


def _as_sequences(node: Any) -> Any:
  """Dicts keyed exactly ``"0" … "n-1"`` as lists: what the model's lists were saved from.

  A dict flattens in sorted key order (``"10"`` before ``"2"``), a list in index
  order; leaf order is silo order, which decides ties and the subset's tensor order.
  """
  if not isinstance(node, dict):
    return node
  children = {key: _as_sequences(child) for key, child in node.items()}
  if children and set(children) == {str(index) for index in range(len(children))}:
    return [children[str(index)] for index in range(len(children))]
  return children


def nest(flat: Mapping[str, Any]) -> Any:
  """Nested containers from ``a/b/c`` names, so that silo and mask trees see the model's tree.

  Names whose siblings are exactly ``0 … n-1`` become lists, as the model's were.

  Raises:
    SubsetError: if a name is both a leaf and a prefix of another name.
  """
  tree: dict[str, Any] = {}
  for name, leaf in flat.items():
    *parents, last = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise SubsetError(f"tensor name {name!r} extends the name of another tensor")
    if last in node:
      raise SubsetError(f"tensor name {name!r} is also the prefix of other tensor names")
    node[last] = leaf
  return _as_sequences(tree)


def safetensors_source(file: str | os.PathLike) -> ParamSource:
  """A :class:`ParamSource` over a safetensors file of parameters.

  Tensor names are ``a/b/c`` paths (as :func:`save_params` writes them); the
  abstract tree nests them, so silo and mask trees written for the model fit.

  Raises:
    FileNotFoundError, SubsetError: missing or unreadable file.
  """
  file = os.fspath(file)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"parameter file {file!r} does not exist")
  try:
    with safetensors.safe_open(file, framework="numpy") as reader:
      abstract = {}
      for name in reader.keys():  # noqa: SIM118
        tensor_slice = reader.get_slice(name)
        dtype = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
        if dtype is None:
          raise SubsetError(
            f"tensor {name!r} of {file!r} has dtype {tensor_slice.get_dtype()}, which "
            "dst_optax does not read"
          )
        abstract[name] = jax.ShapeDtypeStruct(tuple(tensor_slice.get_shape()), dtype)
  except (safetensors.SafetensorError, OSError) as error:
    raise SubsetError(f"{file!r} is not a readable safetensors file ({error})") from None

  def read(path: str) -> np.ndarray:
    with safetensors.safe_open(file, framework="numpy") as reader:
      return reader.get_tensor(path)

  return ParamSource(nest(abstract), read, file)


def save_params(params: Any, file: str | os.PathLike) -> int:
  """Writes a parameter tree to a safetensors file with ``a/b/c`` tensor names.

  Returns:
    The number of bytes written.
  """
  leaves = {path: np.require(leaf, requirements="C") for path, leaf in named_leaves(params).items()}
  return save_safetensors(leaves, file)


def load_params(source: ParamSource) -> Any:
  """Reads every tensor of a source into its (nested) tree."""
  return jax.tree_util.tree_map_with_path(
    lambda key_path, _: source.read(_silos.path_name(key_path)), source.abstract
  )


def memory_source(params: Any, description: str) -> ParamSource:
  """A :class:`ParamSource` over a parameter tree in memory (NumPy or JAX leaves)."""
  leaves = named_leaves(params)
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), dtype_of(leaf)), params)
  return ParamSource(abstract, leaves.__getitem__, description)


# project_to_budget compiled with its configuration static, so that tensors of
# equal shape and configuration share one compilation.
_PROJECT_TO_BUDGET = jax.jit(
  project_to_budget, static_argnames=("fraction_of_free_params", "silos", "distance")
)


class _Candidates(NamedTuple):
  """The running top-k of one shared silo, in silo order.

  Attributes:
    keys: uint32 distance keys.
    leaf: int32 position of the tensor in flattening order.
    flat: int64 flat position inside the tensor.
    new_bits: uint64 bit pattern of the fine-tuned value.
    seed_bits: uint64 bit pattern of the seed value.
  """

  keys: np.ndarray
  leaf: np.ndarray
  flat: np.ndarray
  new_bits: np.ndarray
  seed_bits: np.ndarray


def _no_candidates() -> _Candidates:
  empty = lambda dtype: np.zeros(0, dtype)
  return _Candidates(
    empty(np.uint32), empty(np.int32), empty(np.int64), empty(np.uint64), empty(np.uint64)
  )


def _top_k_positions(keys: np.ndarray, k: int) -> np.ndarray:
  """Sorted positions of the ``k`` largest positive keys, ties to the lowest position."""
  k = min(k, int(np.count_nonzero(keys)))
  if k == 0:
    return np.zeros(0, np.int64)
  threshold = np.partition(keys, keys.size - k)[keys.size - k]
  above = np.flatnonzero(keys > threshold)
  tied = np.flatnonzero(keys == threshold)[: k - above.size]
  return np.sort(np.concatenate([above, tied]))


def _flat_bits(array: np.ndarray) -> np.ndarray:
  flat = np.require(array, requirements="C").reshape(-1)
  return flat.view(np.dtype(f"u{flat.dtype.itemsize}")).astype(np.uint64)


def _merge(
  candidates: _Candidates,
  leaf_position: int,
  keys: np.ndarray,
  seed: np.ndarray,
  finetuned: np.ndarray,
  budget: int,
) -> _Candidates:
  """Adds one tensor's best coordinates to a shared silo's running top-k."""
  flat = _top_k_positions(keys.reshape(-1), budget)
  merged = _Candidates(
    np.concatenate([candidates.keys, keys.reshape(-1)[flat]]),
    np.concatenate([candidates.leaf, np.full(flat.size, leaf_position, np.int32)]),
    np.concatenate([candidates.flat, flat]),
    np.concatenate([candidates.new_bits, _flat_bits(finetuned)[flat]]),
    np.concatenate([candidates.seed_bits, _flat_bits(seed)[flat]]),
  )
  # Earlier tensors come first, so positions in ``merged`` follow silo order.
  keep = _top_k_positions(merged.keys, budget)
  return _Candidates(*(field[keep] for field in merged))


def _shared_tensor(
  candidates: _Candidates,
  leaf_position: int,
  abstract: jax.ShapeDtypeStruct,
  budget: LeafBudget,
  fingerprint: str,
) -> TensorSubset:
  """The tensor's part of a finished shared silo selection."""
  mine = (candidates.leaf == leaf_position) & (candidates.new_bits != candidates.seed_bits)
  dtype = np.dtype(abstract.dtype)
  values = candidates.new_bits[mine].astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)
  return TensorSubset(
    candidates.flat[mine].astype(np.int32),
    values,
    tuple(abstract.shape),
    budget.budget,
    budget.silo,
    fingerprint,
  )


def _check_sources(seed: ParamSource, finetuned: ParamSource) -> dict[str, Any]:
  """The abstract leaves by path, after checking both sources agree on them."""
  seed_leaves = named_leaves(seed.abstract)
  finetuned_leaves = named_leaves(finetuned.abstract)
  if seed_leaves.keys() != finetuned_leaves.keys():
    raise SubsetError(
      f"{finetuned.description!r} does not have the leaves of the seed {seed.description!r}: "
      f"missing {sorted(seed_leaves.keys() - finetuned_leaves.keys())}, unexpected "
      f"{sorted(finetuned_leaves.keys() - seed_leaves.keys())}"
    )
  for path, leaf in seed_leaves.items():
    other = finetuned_leaves[path]
    if (leaf.shape, leaf.dtype) != (other.shape, other.dtype):
      raise SubsetError(
        f"leaf {path!r} has shape {tuple(other.shape)} and dtype {other.dtype} in "
        f"{finetuned.description!r} but shape {tuple(leaf.shape)} and dtype {leaf.dtype} in "
        f"the seed {seed.description!r}"
      )
  return finetuned_leaves


def _check_dtypes_jax_keeps(abstract_leaves: dict[str, Any], layout: _silos.SiloLayout) -> None:
  """Constrained leaves must have a dtype JAX computes in (float64 needs x64).

  Otherwise the selection would run on narrowed values and could count
  rounding as changes.
  """
  for (path, abstract), leaf in zip(abstract_leaves.items(), layout.leaves, strict=True):
    canonical = jax.dtypes.canonicalize_dtype(abstract.dtype)
    if leaf is not None and canonical != abstract.dtype:
      raise SubsetError(
        f"leaf {path!r} has dtype {abstract.dtype}, which JAX computes as {canonical} "
        "unless jax_enable_x64 is set; cast it, enable x64, or mark it Unconstrained"
      )


def extract_subset_streaming(
  seed: ParamSource,
  finetuned: ParamSource,
  fraction_of_free_params: float,
  silos: _silos.Silos = _silos.PerTensor(),
  distance: str | _distances.DistanceFn = "absolute",
  mask: Any = None,
) -> Subset:
  """:func:`extract_subset` reading one tensor pair at a time.

  Args:
    seed: the seed checkpoint.
    finetuned: the fine-tuned checkpoint (same leaves, shapes and dtypes).
    fraction_of_free_params, silos, distance, mask: as in training; ``silos`` and
      ``mask`` see the abstract tree (shapes and dtypes, no values).

  Returns:
    The same :class:`Subset` as :func:`extract_subset` on the loaded trees.
  """
  # Checked here for every silo kind: shared silos never reach project_to_budget.
  if callable(fraction_of_free_params):
    raise TypeError(
      "fraction_of_free_params must be the number ε of the training step the params come "
      f"from, not a schedule; got {fraction_of_free_params!r}"
    )
  if isinstance(fraction_of_free_params, jax.Array):
    # Its value, kept in its precision: the budgets are evaluated in it.
    fraction_of_free_params = np.asarray(fraction_of_free_params)[()]
  _check_fraction(fraction_of_free_params)
  abstract_leaves = _check_sources(seed, finetuned)
  layout = _silos.build_layout(finetuned.abstract, silos, mask)
  _check_dtypes_jax_keeps(abstract_leaves, layout)
  specs = _silos._spec_per_leaf(silos, finetuned.abstract)
  budgets = leaf_budgets(finetuned.abstract, fraction_of_free_params, silos, mask)
  offsets = [leaf.offset for leaf in layout.leaves if leaf is not None]
  shared = {offset for offset in offsets if offsets.count(offset) > 1}
  distance_fn = _distances.resolve_distance(distance)
  candidates = {offset: _no_candidates() for offset in shared}
  fingerprints: dict[str, str] = {}
  tensors: dict[str, TensorSubset | None] = {}
  for position, (path, leaf, spec, budget) in enumerate(
    zip(abstract_leaves, layout.leaves, specs, budgets, strict=True)
  ):
    seed_leaf, finetuned_leaf = seed.read(path), finetuned.read(path)
    if leaf is None or leaf.offset not in shared:
      projected = finetuned_leaf
      if leaf is not None:
        projected = _PROJECT_TO_BUDGET(
          finetuned_leaf,
          seed_leaf,
          fraction_of_free_params=fraction_of_free_params,
          silos=spec,
          distance=distance,
        )
      tensors[path] = tensor_subset(path, seed_leaf, projected, budget)
      continue
    keys = np.asarray(_selection.distance_keys(distance_fn(seed_leaf, finetuned_leaf, seed_leaf)))
    candidates[leaf.offset] = _merge(
      candidates[leaf.offset], position, keys, seed_leaf, finetuned_leaf, budget.budget
    )
    fingerprints[path] = tensor_fingerprint(seed_leaf)
    tensors[path] = None
  for position, (path, leaf, budget) in enumerate(
    zip(abstract_leaves, layout.leaves, budgets, strict=True)
  ):
    if tensors[path] is None:
      tensors[path] = _shared_tensor(
        candidates[leaf.offset], position, abstract_leaves[path], budget, fingerprints[path]
      )
  return Subset(
    tensors,
    float(fraction_of_free_params),
    silos_description(silos),
    distance_description(distance),
  )


def extract_subset(
  seed: optax.Params,
  finetuned: optax.Params,
  fraction_of_free_params: float,
  silos: _silos.Silos = _silos.PerTensor(),
  distance: str | _distances.DistanceFn = "absolute",
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> Subset:
  """Extracts the subset of a fine-tuned model within DST's budget, exactly.

  Projects ``finetuned`` to the budget (:func:`dst_optax.project_to_budget`),
  so the subset never exceeds ``floor(ε · |S|)`` changes per silo even if
  training left rounding residue, then records the changed coordinates.

  Args:
    seed: the seed (pretrained) parameters Θ0.
    finetuned: the fine-tuned parameters; same tree, shapes and dtypes.
    fraction_of_free_params: ε in (0, 1], as used in training.
    silos: silo specs, as in :func:`dst_optax.dynamic_subset_tuning`.
    distance: distance name or callable, as in training.
    mask: as in :func:`dst_optax.dynamic_subset_tuning`; ``False`` leaves are
      stored whole. ``silos`` and ``mask`` callables see the tree's shapes and
      dtypes (``jax.ShapeDtypeStruct`` leaves), not its values.

  Returns:
    The :class:`Subset`.

  Raises:
    SubsetError: if the trees, shapes or dtypes differ (naming the leaf).
  """
  return extract_subset_streaming(
    memory_source(seed, "seed"),
    memory_source(finetuned, "fine-tuned params"),
    fraction_of_free_params,
    silos,
    distance,
    mask,
  )


def check_training_state(
  params: Any,
  trained_seed: Any,
  trained_budgets: Any,
  fraction_of_free_params: float,
  silos: _silos.Silos,
  mask: Any,
) -> float | np.float32:
  """Checks that a DST state fits the extraction; returns ε to extract with.

  Its seed must cover every leaf of ``params`` (DST inside ``optax.multi_transform``
  or ``optax.masked`` holds a seed for its part only), and ε, silos and mask must
  give the budgets of its last step: in float64, as for a constant ε, or in
  float32, as for an injected or scheduled one (see :meth:`SiloLayout.budgets`),
  which can differ by one.

  Args:
    params: the parameter tree (arrays or shape structs).
    trained_seed: the DST state's ``seed``.
    trained_budgets: the DST state's ``budget`` (its last step's per-silo budgets;
      any numeric dtype, e.g. float32 after a checkpoint restore).
    fraction_of_free_params, silos, mask: as passed to the extraction.

  Returns:
    ``fraction_of_free_params`` as a float, or as a ``np.float32`` if only float32
    arithmetic gives the state's budgets: extracting with it keeps those budgets.

  Raises:
    SubsetError: if the state does not fit.
  """
  seed_paths = named_leaves(trained_seed).keys()
  params_paths = named_leaves(params).keys()
  if seed_paths < params_paths:
    raise SubsetError(
      f"the DST state holds a seed for part of the params only: DST never saw "
      f"{sorted(params_paths - seed_paths)} (it ran inside optax.multi_transform or "
      "optax.masked); extract with dst_optax.extract_subset(seed, params, ...) against the "
      "full seed, with a mask that is False for the leaves trained without DST (stored whole)"
    )
  layout = _silos.build_layout(params, silos, mask)
  trained = np.asarray(trained_budgets)
  for fraction in (float(fraction_of_free_params), np.float32(fraction_of_free_params)):
    budgets = layout.concrete_budgets(fraction, type(fraction))
    if budgets.shape == trained.shape and np.array_equal(budgets, trained):
      return fraction
  budgets = layout.concrete_budgets(float(fraction_of_free_params))
  raise SubsetError(
    f"ε = {fraction_of_free_params!r} with silos {silos_description(silos)} and this mask "
    f"gives {budgets.size} silos with {int(budgets.sum())} free coordinates in all, but the "
    f"DST state's last step had {trained.size} silos with {int(trained.sum())}: pass the "
    "ε, silos and mask of training (or extract against the seed directly to choose "
    "another budget)"
  )


def extract_subset_from_state(
  params: optax.Params,
  state: DynamicSubsetTuningState,
  fraction_of_free_params: float,
  silos: _silos.Silos = _silos.PerTensor(),
  distance: str | _distances.DistanceFn = "absolute",
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> Subset:
  """:func:`extract_subset` with the seed held by a DST optimizer state.

  Args:
    params: the fine-tuned parameters.
    state: the :class:`dst_optax.DynamicSubsetTuningState` of the run (e.g. from
      :func:`dst_optax.find_state`); it must have taken at least one step.
    fraction_of_free_params, silos, distance, mask: as used in training (ε as
      at the last step).

  Returns:
    The :class:`Subset`.

  Raises:
    SubsetError: if the state has taken no step, or if ``fraction_of_free_params``,
      ``silos`` and ``mask`` give other per-silo budgets than the last step had
      (the subset would silently drop coordinates training changed, or count
      others); :func:`extract_subset` with ``state.seed`` takes any ε. Also if
      DST saw only part of ``params`` (``optax.multi_transform``, ``optax.masked``):
      the state then has no seed for the rest; use :func:`extract_subset`.
  """
  if int(np.asarray(state.count)) == 0:
    raise SubsetError(
      "the DST state has taken no step yet, so it holds no seed (the seed is captured at "
      "the first update)"
    )
  fraction = check_training_state(
    params, state.seed, state.budget, fraction_of_free_params, silos, mask
  )
  subset = extract_subset(state.seed, params, fraction, silos, distance, mask)
  return subset._replace(fraction_of_free_params=float(fraction_of_free_params))
