"""Test configuration: eight fake CPU devices for the sharding tests."""

import jax

# Must run before any JAX computation initialises the CPU backend.
jax.config.update("jax_num_cpu_devices", 8)
