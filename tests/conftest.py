"""Test configuration: eight fake CPU devices for the sharding tests, and their meshes."""

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest

# Must run before any JAX computation initialises the CPU backend.
jax.config.update("jax_num_cpu_devices", 8)


class MeshCase(NamedTuple):
  """A 4 × 2 ("data", "model") mesh of the fake devices, and the context its axes need."""

  mesh: jax.sharding.Mesh
  explicit: bool
  # Explicit axes (sharding in types) hold only inside a mesh context.
  context: Callable[[], Any]


@pytest.fixture(
  params=[
    jax.sharding.AxisType.Auto,
    pytest.param(
      jax.sharding.AxisType.Explicit,
      marks=pytest.mark.skipif(
        not hasattr(jax, "set_mesh"), reason="explicit sharding needs jax.set_mesh"
      ),
    ),
  ],
  ids=["auto", "explicit"],
)
def mesh_case(request) -> MeshCase:
  """The mesh with Auto axes, and with Explicit ones (``jax.set_mesh``)."""
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "model"), axis_types=(request.param,) * 2)
  explicit = request.param == jax.sharding.AxisType.Explicit
  return MeshCase(
    mesh, explicit, lambda: jax.set_mesh(mesh) if explicit else contextlib.nullcontext()
  )
