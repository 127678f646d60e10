"""Exact silo-wise top-k selection without sorting.

For each silo ``S`` with budget ``k_S`` we select the ``k_S`` coordinates with
the largest distance Δ among those with Δ > 0 (a coordinate at distance 0 equals
the seed and needs no slot). Ties at the threshold go to the lowest position in
silo order (leaf flattening order, then row-major), which is the order
``lax.top_k`` uses, so the selected set equals the sort-based reference.

Mechanism: Δ ≥ 0 is float32, so its IEEE bit pattern with the sign cleared is
an unsigned integer ("key") with the same order. The k-th largest key of every
silo is found by bisection over the 31 key bits; each bisection step is an
elementwise compare plus a per-silo count, i.e. local work plus a small
reduction, which partitions over sharded parameters without gathering them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dst_optax._silos import LeafSilos, SiloLayout

_KEY_BITS = 31
_SIGN_MASK = 0x7FFFFFFF


class Selection(NamedTuple):
  """The result of a silo-wise selection.

  Attributes:
    masks: per leaf, a bool array of the selected coordinates, or ``None`` for
      unconstrained leaves.
    threshold: ``(num_silos,)`` float32, the k-th largest Δ of each silo (0 when
      fewer than ``k`` coordinates have Δ > 0).
    num_selected: ``(num_silos,)`` int32 selected coordinates per silo.
  """

  masks: list[jax.Array | None]
  threshold: jax.Array
  num_selected: jax.Array


def distance_keys(distance: jax.Array) -> jax.Array:
  """Order-preserving uint32 keys of non-negative float32 distances."""
  bits = lax.bitcast_convert_type(jnp.asarray(distance, jnp.float32), jnp.uint32)
  return bits & jnp.uint32(_SIGN_MASK)


def silo_values_for_leaf(values: jax.Array, leaf: LeafSilos, ndim: int) -> jax.Array:
  """Slices a per-silo vector to this leaf and shapes it to broadcast against it."""
  leaf_values = values[leaf.offset : leaf.offset + leaf.num_silos]
  if leaf.axis is None:
    return leaf_values[0]
  shape = [1] * ndim
  shape[leaf.axis] = leaf.num_silos
  return leaf_values.reshape(shape)


def _leaf_counts(selected: jax.Array, leaf: LeafSilos) -> jax.Array:
  """Number of selected coordinates in each of the leaf's silos, int32."""
  if leaf.axis is None:
    return jnp.sum(selected, dtype=jnp.int32).reshape(1)
  other_axes = tuple(axis for axis in range(selected.ndim) if axis != leaf.axis)
  return jnp.sum(selected, axis=other_axes, dtype=jnp.int32)


def count_per_silo(keys: list[jax.Array | None], layout: SiloLayout, predicate) -> jax.Array:
  """Counts, per silo, the coordinates where ``predicate(keys, leaf_silos)`` holds.

  Args:
    keys: per leaf its keys, or ``None`` for unconstrained leaves.
    layout: the silo layout.
    predicate: ``(leaf_keys, leaf_silos) -> bool array`` shaped like the keys.

  Returns:
    ``(num_silos,)`` int32 counts.
  """
  totals = jnp.zeros(layout.num_silos, jnp.int32)
  for leaf_keys, leaf in zip(keys, layout.leaves, strict=True):
    if leaf is not None:
      totals = _add_leaf_counts(totals, leaf, predicate(leaf_keys, leaf))
  return totals


def _add_leaf_counts(totals: jax.Array, leaf: LeafSilos, selected: jax.Array) -> jax.Array:
  """Adds the per-silo counts of ``selected`` (one leaf) to ``totals``."""
  return totals.at[leaf.offset : leaf.offset + leaf.num_silos].add(_leaf_counts(selected, leaf))


def _at_least(thresholds: jax.Array):
  return lambda leaf_keys, leaf: leaf_keys >= silo_values_for_leaf(thresholds, leaf, leaf_keys.ndim)


def _kth_largest_keys(
  keys: list[jax.Array | None], layout: SiloLayout, budgets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bisection for the k-th largest key per silo.

  Returns:
    ``(threshold, count_at_least, count_above)``: per silo the largest key ``t``
    with ``#{key ≥ t} ≥ k`` and the counts ``#{key ≥ t}`` and ``#{key > t}``.
  """
  sizes = jnp.asarray(layout.silo_sizes, jnp.int32)
  low = jnp.zeros(layout.num_silos, jnp.uint32)
  high = jnp.full(layout.num_silos, 1 << _KEY_BITS, jnp.uint32)

  def step(_, carry):
    low, high, count_low, count_high = carry
    middle = low + (high - low) // 2
    count = count_per_silo(keys, layout, _at_least(middle))
    enough = count >= budgets
    return (
      jnp.where(enough, middle, low),
      jnp.where(enough, high, middle),
      jnp.where(enough, count, count_low),
      jnp.where(enough, count_high, count),
    )

  init = (low, high, sizes, jnp.zeros_like(sizes))
  low, _, count_low, count_high = lax.fori_loop(0, _KEY_BITS, step, init)
  return low, count_low, count_high


def _tie_ranks(tied: jax.Array, leaf: LeafSilos) -> jax.Array:
  """0-based rank of each tied coordinate among the leaf's ties in its silo."""
  if leaf.axis is None:
    flat = tied.reshape(-1).astype(jnp.int32)
    return (jnp.cumsum(flat) - flat).reshape(tied.shape)
  moved = jnp.moveaxis(tied, leaf.axis, 0)
  flat = moved.reshape(moved.shape[0], -1).astype(jnp.int32)
  ranks = (jnp.cumsum(flat, axis=1) - flat).reshape(moved.shape)
  return jnp.moveaxis(ranks, 0, leaf.axis)


def _break_ties(
  keys: list[jax.Array | None],
  layout: SiloLayout,
  threshold: jax.Array,
  ties_needed: jax.Array,
) -> list[jax.Array | None]:
  """Selects keys above the threshold plus the first ``ties_needed`` ties per silo."""
  ties_seen = jnp.zeros(layout.num_silos, jnp.int32)
  masks = []
  for leaf_keys, leaf in zip(keys, layout.leaves, strict=True):
    if leaf is None:
      masks.append(None)
      continue
    leaf_threshold = silo_values_for_leaf(threshold, leaf, leaf_keys.ndim)
    tied = leaf_keys == leaf_threshold
    ranks = _tie_ranks(tied, leaf) + silo_values_for_leaf(ties_seen, leaf, leaf_keys.ndim)
    take_tie = tied & (ranks < silo_values_for_leaf(ties_needed, leaf, leaf_keys.ndim))
    masks.append((leaf_keys > leaf_threshold) | take_tie)
    if layout.shared:
      ties_seen = _add_leaf_counts(ties_seen, leaf, tied)
  return masks


def select_top_k(keys: list[jax.Array | None], layout: SiloLayout, budgets: jax.Array) -> Selection:
  """Selects, per silo, the ``budgets`` coordinates with the largest keys.

  Args:
    keys: per leaf the :func:`distance_keys` of Δ, or ``None`` if unconstrained.
    layout: the silo layout the keys follow.
    budgets: ``(num_silos,)`` int32 number of coordinates to select per silo.

  Returns:
    The :class:`Selection`: exactly ``min(k_S, #{Δ > 0})`` coordinates per silo.
  """
  threshold, count_at_least, count_above = _kth_largest_keys(keys, layout, budgets)
  positive = threshold > 0
  # Ties at a positive threshold that straddle the budget need a rank; ties at
  # zero are never selected since those coordinates equal the seed.
  ties_needed = jnp.where(positive, budgets - count_above, 0)
  num_selected = count_above + ties_needed
  straddling = jnp.any(positive & (count_at_least > budgets))

  def without_tie_break():
    masks = []
    for leaf_keys, leaf in zip(keys, layout.leaves, strict=True):
      if leaf is None:
        masks.append(None)
      else:
        leaf_threshold = silo_values_for_leaf(threshold, leaf, leaf_keys.ndim)
        take_threshold = silo_values_for_leaf(positive, leaf, leaf_keys.ndim)
        masks.append(
          (leaf_keys > leaf_threshold) | ((leaf_keys == leaf_threshold) & take_threshold)
        )
    return masks

  masks = lax.cond(
    straddling, lambda: _break_ties(keys, layout, threshold, ties_needed), without_tie_break
  )
  threshold_value = lax.bitcast_convert_type(threshold, jnp.float32)
  return Selection(masks, threshold_value, num_selected)
