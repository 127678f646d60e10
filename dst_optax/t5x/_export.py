"""Export of a DST subset from T5X checkpoints.

A T5X checkpoint of a DST run holds the fine-tuned parameters (``target``) and,
in the optimizer state, the seed copy. The subset is extracted against the
pretrained checkpoint, or against that stored seed when none is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

import dst_optax
from dst_optax import _subset_extract
from dst_optax.t5x import _factory, _import

# Item of an Orbax-format T5X checkpoint that holds ``target`` and ``state``.
_ORBAX_STATE_ITEM = "state"


def _checkpoint_dir(checkpoint: str) -> str:
  """``checkpoint`` itself, or the latest ``checkpoint_<step>`` inside a model dir."""
  checkpoints_utils = _import.require("t5x.checkpoints_utils")
  step = checkpoints_utils.latest_step(checkpoint)
  return checkpoint if step is None else checkpoints_utils.get_checkpoint_dir(checkpoint, step)


def load_checkpoint(checkpoint: str) -> Mapping[str, Any]:
  """Reads a whole T5X checkpoint into host memory, in its stored dtypes.

  Reads both formats: the legacy one of the public checkpoints (a msgpack
  ``checkpoint`` file plus TensorStore arrays) and the Orbax one that current
  T5X writes (a ``state`` item).

  Args:
    checkpoint: a ``checkpoint_<step>`` directory, or a model directory (its
      latest checkpoint is read); local or ``gs://``.

  Returns:
    The checkpoint's state dict: ``target`` (the parameters) and ``state``, with
    numpy arrays.
  """
  directory = _checkpoint_dir(checkpoint)
  gfile = _import.require("tensorflow").io.gfile
  orbax_state = os.path.join(directory, _ORBAX_STATE_ITEM)
  if gfile.isdir(orbax_state):
    orbax = _import.require("orbax.checkpoint")
    state_dict = orbax.PyTreeCheckpointer().restore(orbax_state)
  else:
    state_dict = _import.require("t5x.checkpoints").load_t5x_checkpoint(directory)
  return jax.tree.map(np.asarray, state_dict)


def _stored_dst_states(state_dict: Mapping[str, Any]) -> list[Mapping[str, Any]]:
  """The DST states (as mappings of their fields) in a checkpoint's optimizer state."""
  fields = set(dst_optax.DynamicSubsetTuningState._fields)
  found = []
  pending = [state_dict["state"]]
  while pending:
    node = pending.pop()
    if isinstance(node, Mapping):
      if fields <= node.keys():
        found.append(node)
      else:
        pending.extend(node.values())
  return found


def stored_seed(state_dict: Mapping[str, Any]) -> Any:
  """The seed parameters kept in a DST run's optimizer state.

  Args:
    state_dict: a T5X checkpoint state dict (see :func:`load_checkpoint`).

  Returns:
    The seed, a tree like ``state_dict["target"]``.

  Raises:
    dst_optax.SubsetError: (a ValueError) if the optimizer state holds no DST
      state, or several.
  """
  return _seed_of(_stored_dst_states(state_dict))


def _seed_of(dst_states: list[Mapping[str, Any]]) -> Any:
  if len(dst_states) != 1:
    raise dst_optax.SubsetError(
      f"expected one DST state in the checkpoint's optimizer state, found {len(dst_states)}; "
      "pass the pretrained checkpoint as the seed"
    )
  return dst_states[0]["seed"]


def export_subset(
  checkpoint: str,
  output: str,
  fraction_of_free_params: float,
  seed_checkpoint: str | None = None,
  silos: str = "per_tensor",
  distance: str = "absolute",
  unconstrained_patterns: Sequence[str] = (),
) -> dst_optax.Subset:
  """Extracts the DST subset of a fine-tuned T5X checkpoint and saves it.

  The subset is exact: at most ``floor(ε · |S|)`` changed coordinates per silo,
  bit for bit (see :func:`dst_optax.project_to_budget`). Use the ε, silos,
  distance and patterns of the training run (the ``dst.gin`` macros).

  Args:
    checkpoint: the fine-tuned checkpoint (or model directory: its latest).
    output: the safetensors file to write.
    fraction_of_free_params: ε of the run.
    seed_checkpoint: the pretrained checkpoint; ``None`` uses the seed stored in
      the fine-tuned checkpoint's DST state.
    silos: the run's ``DST_SILOS``.
    distance: the run's ``DST_DISTANCE``.
    unconstrained_patterns: the run's ``DST_UNCONSTRAINED``.

  Returns:
    The saved :class:`Subset`.

  Raises:
    dst_optax.SubsetError: if the checkpoint holds a DST state whose seed covers
      part of the params only, or whose last per-silo budgets differ from those
      of ``fraction_of_free_params``, ``silos`` and ``unconstrained_patterns``
      (the subset would drop coordinates training changed, or count others).
  """
  finetuned = load_checkpoint(checkpoint)
  silo_specs = _factory.resolve_silos(silos)
  mask = _factory.constrained_mask(unconstrained_patterns)
  dst_states = _stored_dst_states(finetuned)
  fraction = fraction_of_free_params
  if len(dst_states) == 1:
    fraction = _subset_extract.check_training_state(
      finetuned["target"],
      dst_states[0]["seed"],
      dst_states[0]["budget"],
      fraction_of_free_params,
      silo_specs,
      mask,
    )
  seed = (
    _seed_of(dst_states) if seed_checkpoint is None else load_checkpoint(seed_checkpoint)["target"]
  )
  subset = dst_optax.extract_subset(
    seed,
    finetuned["target"],
    fraction,
    silos=silo_specs,
    distance=distance,
    mask=mask,
  )._replace(fraction_of_free_params=float(fraction_of_free_params))
  dst_optax.save_subset(subset, output)
  return subset
