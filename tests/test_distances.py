"""Tests of the distance functions."""

import jax.numpy as jnp
import numpy as np
import pytest

import dst_optax
from dst_optax import _distances


def test_absolute_and_relative():
  seed = jnp.array([1.0, -2.0, 0.0])
  proposal = jnp.array([1.5, -1.0, 1e-13])
  np.testing.assert_allclose(dst_optax.absolute_distance(seed, proposal, seed), [0.5, 1.0, 1e-13])
  np.testing.assert_allclose(
    dst_optax.relative_distance(seed, proposal, seed), [0.5, 0.5, 0.1], rtol=1e-6
  )


def test_resolve_casts_to_float32_and_rejects_unknown():
  distance = _distances.resolve_distance("absolute")
  seed = jnp.ones(3, jnp.bfloat16)
  assert distance(seed, seed + 1, seed).dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown distance 'l2'"):
    _distances.resolve_distance("l2")
  with pytest.raises(TypeError, match="got 3"):
    _distances.resolve_distance(3)
