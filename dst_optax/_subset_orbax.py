"""Orbax checkpoints as subset sources, read one tensor at a time.

``orbax-checkpoint`` is imported only when these functions run (install the
``orbax`` extra: ``pip install dst_optax[orbax]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dst_optax import _distances, _silos
from dst_optax._subset import Subset, SubsetError, named_leaves
from dst_optax._subset_extract import ParamSource, extract_subset_streaming


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ModuleNotFoundError:
    raise ModuleNotFoundError(
      "reading Orbax checkpoints needs orbax-checkpoint: pip install 'dst_optax[orbax]'"
    ) from None
  return ocp


def _subtree(tree: Any, keys: Sequence[str], directory: str) -> Any:
  for key in keys:
    if not isinstance(tree, dict) or key not in tree:
      available = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
      raise SubsetError(
        f"Orbax checkpoint {directory!r} has no item {key!r} under {'/'.join(keys)!r} "
        f"(found {available})"
      )
    tree = tree[key]
  return tree


def orbax_source(directory: str | os.PathLike, item: Sequence[str] = ()) -> ParamSource:
  """A :class:`ParamSource` over an Orbax PyTree checkpoint.

  Args:
    directory: the checkpoint directory (the one holding ``_METADATA``).
    item: keys leading to the parameters inside the saved tree, e.g.
      ``("params",)`` for a saved train state; empty for a bare parameter tree.

  Returns:
    The source; each ``read`` restores a single array (other leaves are skipped
    with ``orbax.checkpoint.PLACEHOLDER``).

  Raises:
    FileNotFoundError: if the directory does not exist.
    SubsetError: if it is not an Orbax PyTree checkpoint or lacks ``item``.
  """
  ocp = _orbax()
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Orbax checkpoint directory {directory!r} does not exist")
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(directory).item_metadata.tree
  except (FileNotFoundError, ValueError, AttributeError, KeyError) as error:
    raise SubsetError(f"{directory!r} is not a readable Orbax checkpoint ({error})") from None
  abstract = jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
    _subtree(metadata, item, directory),
  )
  leaves, treedef = jax.tree.flatten(metadata)
  prefix = "".join(f"{key}/" for key in item)
  position = {path: index for index, path in enumerate(named_leaves(metadata))}

  def read(path: str) -> np.ndarray:
    index = position[prefix + path]
    items = [ocp.PLACEHOLDER] * len(leaves)
    restore_args = [ocp.PLACEHOLDER] * len(leaves)
    items[index] = jax.ShapeDtypeStruct(tuple(leaves[index].shape), leaves[index].dtype)
    restore_args[index] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = checkpointer.restore(
      directory,
      args=ocp.args.PyTreeRestore(
        item=jax.tree.unflatten(treedef, items),
        restore_args=jax.tree.unflatten(treedef, restore_args),
      ),
    )
    return np.asarray(treedef.flatten_up_to(restored)[index])

  return ParamSource(abstract, read, directory)


def extract_subset_from_orbax(
  seed_directory: str | os.PathLike,
  finetuned_directory: str | os.PathLike,
  fraction_of_free_params: float,
  silos: _silos.Silos = _silos.PerTensor(),
  distance: str | _distances.DistanceFn = "absolute",
  mask: Any = None,
  seed_item: Sequence[str] = (),
  finetuned_item: Sequence[str] = (),
) -> Subset:
  """Extracts a subset from two Orbax checkpoints, streaming tensor by tensor.

  At most one tensor of each checkpoint (plus the selection's O(k) candidates
  for silos shared across tensors) is in memory at a time.

  Args:
    seed_directory: the seed checkpoint.
    finetuned_directory: the fine-tuned checkpoint.
    fraction_of_free_params, silos, distance, mask: as in training.
    seed_item: keys to the parameters inside the seed checkpoint's tree.
    finetuned_item: keys to the parameters inside the fine-tuned checkpoint's tree.

  Returns:
    The :class:`dst_optax.Subset`, equal to :func:`dst_optax.extract_subset` on
    the loaded trees.
  """
  return extract_subset_streaming(
    orbax_source(seed_directory, seed_item),
    orbax_source(finetuned_directory, finetuned_item),
    fraction_of_free_params,
    silos,
    distance,
    mask,
  )
