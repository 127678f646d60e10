"""Distance functions ``d(candidate, proposal, seed)``.

DST ranks coordinates by the cost of resetting them: ``Δ = d(Θ0, Θ̂, Θ0)``, the
distance between the candidate value (the seed) and the proposal ``Θ̂`` of the
base optimizer, given the seed. Larger Δ means the coordinate is more worth
keeping. Distances are evaluated in float32 (bfloat16 and float16 inputs are
cast), or in float64 for float64 params, and must be non-negative; their
magnitude is used, and NaN ranks above everything. They are ranked at float32
precision: float64 distances equal to 24 bits tie (broken by position), and
those below float32's smallest subnormal count as 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import jax
import jax.numpy as jnp

DistanceFn: TypeAlias = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Keeps the relative distance finite for zero seeds while leaving it unchanged
# for any seed of normal magnitude.
_RELATIVE_FLOOR = 1e-12


def absolute_distance(candidate: jax.Array, proposal: jax.Array, seed: jax.Array) -> jax.Array:
  """``|candidate − proposal|``."""
  del seed
  return jnp.abs(candidate - proposal)


def relative_distance(candidate: jax.Array, proposal: jax.Array, seed: jax.Array) -> jax.Array:
  """``|candidate − proposal| / (|seed| + 1e-12)``: change relative to the seed's size."""
  return jnp.abs(candidate - proposal) / (jnp.abs(seed) + _RELATIVE_FLOOR)


_NAMED_DISTANCES: dict[str, DistanceFn] = {
  "absolute": absolute_distance,
  "relative": relative_distance,
}


def resolve_distance(distance: str | DistanceFn) -> DistanceFn:
  """Returns the distance function named by ``distance`` or ``distance`` itself.

  Args:
    distance: ``"absolute"``, ``"relative"`` or a callable
      ``d(candidate, proposal, seed) -> Array`` of elementwise non-negative values.

  Returns:
    A function computing Δ in float32, or float64 for float64 inputs.
  """
  if isinstance(distance, str):
    if distance not in _NAMED_DISTANCES:
      raise ValueError(
        f"unknown distance {distance!r}; use one of {sorted(_NAMED_DISTANCES)} or a callable "
        "d(candidate, proposal, seed)"
      )
    function = _NAMED_DISTANCES[distance]
  elif callable(distance):
    function = distance
  else:
    raise TypeError(f"distance must be a name or a callable; got {distance!r}")

  def widened_distance(candidate: jax.Array, proposal: jax.Array, seed: jax.Array) -> jax.Array:
    # float64 stays float64: a change below float32's resolution is still a change.
    widen = lambda x: jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
    return function(widen(candidate), widen(proposal), widen(seed))

  return widened_distance
