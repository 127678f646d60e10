"""A deliberately plain NumPy reference of one DST step (the test oracle).

It enumerates each silo's coordinates explicitly, ranks them with a stable sort
and keeps the top ``floor(ε · scale · |S|)`` with Δ > 0; it shares no code with
the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

import dst_optax


def silo_coordinates(
  shapes: Sequence[tuple[int, ...]], specs: Sequence[object]
) -> list[tuple[float, list[tuple[int, int]]]]:
  """Lists silos as ``(budget_scale, [(leaf index, flat index), ...])`` in silo order."""
  silos: list[tuple[float, list[tuple[int, int]]]] = []
  groups: dict[str, int] = {}
  for leaf_index, (shape, spec) in enumerate(zip(shapes, specs, strict=True)):
    positions = np.arange(math.prod(shape)).reshape(shape)
    if isinstance(spec, dst_optax.Unconstrained):
      continue
    if isinstance(spec, dst_optax.PerSlice):
      for i in range(shape[spec.axis]):
        flat = np.take(positions, i, axis=spec.axis).ravel()
        silos.append((spec.budget_scale, [(leaf_index, int(j)) for j in flat]))
    elif isinstance(spec, dst_optax.Group):
      if spec.name not in groups:
        groups[spec.name] = len(silos)
        silos.append((spec.budget_scale, []))
      silos[groups[spec.name]][1].extend((leaf_index, int(j)) for j in positions.ravel())
    else:
      silos.append((spec.budget_scale, [(leaf_index, int(j)) for j in positions.ravel()]))
  return silos


def absolute(candidate, proposal, seed):
  del seed
  return np.abs(candidate.astype(np.float32) - proposal.astype(np.float32))


def relative(candidate, proposal, seed):
  difference = np.abs(candidate.astype(np.float32) - proposal.astype(np.float32))
  return difference / (np.abs(seed.astype(np.float32)) + np.float32(1e-12))


def select(
  proposals: Sequence[np.ndarray],
  seeds: Sequence[np.ndarray],
  specs: Sequence[object],
  fraction: float,
  distance=absolute,
) -> list[np.ndarray]:
  """Boolean keep-masks per leaf: the top-k Δ > 0 of every silo, ties to the first."""
  deltas = [distance(s, p, s).ravel() for p, s in zip(proposals, seeds, strict=True)]
  keep = [np.zeros(p.size, bool) for p in proposals]
  for scale, coordinates in silo_coordinates([p.shape for p in proposals], specs):
    budget = math.floor(min(1.0, fraction * scale) * len(coordinates))
    values = np.array([deltas[leaf][j] for leaf, j in coordinates], np.float32)
    order = np.argsort(-values, kind="stable")  # stable: ties keep silo order
    for rank in order[:budget]:
      if values[rank] > 0:
        leaf, j = coordinates[rank]
        keep[leaf][j] = True
  return [k.reshape(p.shape) for k, p in zip(keep, proposals, strict=True)]


def dst_step(
  params: Sequence[np.ndarray],
  updates: Sequence[np.ndarray],
  seeds: Sequence[np.ndarray],
  specs: Sequence[object],
  fraction: float,
  distance=absolute,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """One DST step followed by ``optax.apply_updates``; returns (new params, masks)."""
  proposals = [(p + u).astype(p.dtype) for p, u in zip(params, updates, strict=True)]
  masks = select(proposals, seeds, specs, fraction, distance)
  new_params = []
  for p, u, s, proposal, keep in zip(params, updates, seeds, proposals, masks, strict=True):
    wide = np.promote_types(p.dtype, u.dtype)
    reset = (s.astype(wide) - p.astype(wide)).astype(u.dtype)
    # A proposal already on the seed keeps its update (and so lands on it exactly).
    keep_update = keep | (proposal == s)
    new_params.append(np.where(keep_update, proposal, (p + reset).astype(p.dtype)))
  return new_params, masks
