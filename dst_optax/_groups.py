"""Layer-group silos (the grouping patterns of the PEFT design-spaces paper).

He et al. (2023), *Parameter-Efficient Fine-Tuning Design Spaces*, split a
model's consecutive layers into groups and found the "spindle" pattern (fewer
layers in the outer groups, more in the middle ones) with a uniform allocation
of trainable parameters across groups to work best. :func:`layer_groups` builds
that as DST silos: one :class:`Group` per layer group, with a ``budget_scale``
that gives every group the same budget when ``allocation="uniform"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dst_optax._silos import SPEC_TYPES, Group, PerTensor, SiloSpec, path_name

_DEFAULT_LAYER_PATTERN = r"(?:^|/)(?:layers?|blocks?|h)[_./]?(\d+)(?:/|$)"

# Relative number of layers per group, from the first group to the last.
_GROUP_WEIGHTS: dict[str, Callable[[int], list[float]]] = {
  "uniform": lambda groups: [1.0] * groups,
  "spindle": lambda groups: [1.0] + [2.0] * (groups - 2) + [1.0] if groups > 2 else [1.0] * groups,
  "bottleneck": lambda groups: (
    [2.0] + [1.0] * (groups - 2) + [2.0] if groups > 2 else [1.0] * groups
  ),
  "increasing": lambda groups: [float(g + 1) for g in range(groups)],
  "decreasing": lambda groups: [float(groups - g) for g in range(groups)],
}


def layer_index_from_path(path: str, pattern: str = _DEFAULT_LAYER_PATTERN) -> int | None:
  """Layer number in a parameter path such as ``encoder/layers_3/attention/kernel``."""
  match = re.search(pattern, path)
  return int(match.group(1)) if match else None


def _layers_per_group(num_layers: int, weights: list[float]) -> list[int]:
  """Splits ``num_layers`` into ``len(weights)`` counts ∝ weights (largest remainder)."""
  shares = np.asarray(weights) / np.sum(weights) * num_layers
  counts = np.floor(shares).astype(int)
  for index in np.argsort(-(shares - counts), kind="stable")[: num_layers - counts.sum()]:
    counts[index] += 1
  return counts.tolist()


def layer_groups(
  params: optax.Params,
  num_groups: int = 4,
  pattern: str = "spindle",
  allocation: str = "uniform",
  layer_index: Callable[[str], int | None] = layer_index_from_path,
  other: SiloSpec = PerTensor(),
) -> Any:
  """Silo specs grouping consecutive layers, for ``dynamic_subset_tuning(silos=...)``.

  Layers ``0..L-1`` are split into ``num_groups`` consecutive groups whose sizes
  follow ``pattern`` (e.g. spindle with 12 layers and 4 groups: 2, 4, 4, 2). With
  ``allocation="uniform"`` each group gets the budget ``ε · N / G`` (``N`` all
  grouped floating-point coordinates, those DST constrains) via
  ``budget_scale = N / (G · N_g)``; with ``"proportional"`` it gets ``ε · N_g``.

  Args:
    params: the parameter tree (arrays or shape structs).
    num_groups: number of layer groups ``G``.
    pattern: ``"spindle"``, ``"uniform"``, ``"bottleneck"``, ``"increasing"`` or
      ``"decreasing"``.
    allocation: ``"uniform"`` or ``"proportional"``.
    layer_index: maps a leaf's path (``a/b/c``) to its layer number, or ``None``
      for leaves outside the layer stack (embeddings, final norms).
    other: the spec for leaves outside the layer stack.

  Returns:
    A pytree of silo specs shaped like ``params``.
  """
  if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive int; got {num_groups!r}")
  if not isinstance(other, SPEC_TYPES):
    raise TypeError(f"other must be a silo spec (PerTensor, PerSlice, ...); got {other!r}")
  if pattern not in _GROUP_WEIGHTS:
    raise ValueError(f"unknown pattern {pattern!r}; use one of {sorted(_GROUP_WEIGHTS)}")
  if allocation not in ("uniform", "proportional"):
    raise ValueError(f"allocation must be 'uniform' or 'proportional'; got {allocation!r}")
  leaves = jax.tree_util.tree_leaves_with_path(params)
  layers = [layer_index(path_name(path)) for path, _ in leaves]
  present = sorted({layer for layer in layers if layer is not None})
  if len(present) < num_groups:
    raise ValueError(
      f"found {len(present)} layers ({present}) in the parameter paths, fewer than "
      f"num_groups={num_groups}; pass a `layer_index` that recognises your layer names"
    )
  counts = _layers_per_group(len(present), _GROUP_WEIGHTS[pattern](num_groups))
  group_ids = np.repeat(np.arange(num_groups), counts)
  group_of_layer = {layer: int(group) for layer, group in zip(present, group_ids, strict=True)}
  # Counted as DST counts them: leaves that are not floating-point pass through.
  group_sizes = [0] * num_groups
  for (_, leaf), layer in zip(leaves, layers, strict=True):
    if layer is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      group_sizes[group_of_layer[layer]] += math.prod(np.shape(leaf))
  for group, size in enumerate(group_sizes):
    if size == 0:
      members = [layer for layer in present if group_of_layer[layer] == group]
      raise ValueError(
        f"layer group {group} (layers {members}) has no floating-point coordinates to "
        "constrain; use fewer groups or another pattern"
      )
  total = sum(group_sizes)

  def spec_for(layer: int | None) -> SiloSpec:
    if layer is None:
      return other
    group = group_of_layer[layer]
    scale = total / (num_groups * group_sizes[group]) if allocation == "uniform" else 1.0
    return Group(f"layer_group_{group}", scale)

  specs = [spec_for(layer) for layer in layers]
  return jax.tree.unflatten(jax.tree.structure(params), specs)
