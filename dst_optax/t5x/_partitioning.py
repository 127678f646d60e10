"""Registration of DST's optimizer state with T5X's partition rules.

T5X derives the logical axes of every optax state from a rule table keyed by the
state's type and refuses unregistered ``...State`` named tuples. Without a rule,
DST could not run under ``PjitPartitioner``; a rule that replicated the seed copy
would cost a full copy of the model on every device. The rules here shard the
seed exactly like the parameters and replicate the small per-silo counters.
"""

from __future__ import annotations

from typing import Any

import jax

# optax does not re-export FactoredState, the state type T5X's table is keyed by.
from optax._src import factorized

from dst_optax import DynamicSubsetTuningState
from dst_optax.t5x import _import


def dst_state_axes(state: DynamicSubsetTuningState, params_axes: Any) -> DynamicSubsetTuningState:
  """Logical axes of a DST state: the seed like the params, the rest replicated.

  Args:
    state: the DST state (arrays or shape structs).
    params_axes: the params' logical axes (a tree of T5X ``PartitionSpec``).

  Returns:
    A ``DynamicSubsetTuningState`` holding axes (or ``None``) instead of arrays.
  """
  optimizers = _import.require("t5x.optimizers")
  replicated = {field: None for field in state._fields if field != "seed"}
  return state._replace(
    seed=optimizers.OptaxStatePartitionRules.derive_params_axes(state.seed, params_axes),
    **replicated,
  )


def factored_state_axes(state: factorized.FactoredState, params_axes: Any) -> Any:
  """Logical axes of ``optax.adafactor``'s second-moment state.

  The factored row and column statistics are vectors, a few KB per matrix, and
  stay replicated. The unfactored statistic ``v`` is shaped like its parameter
  (for small or 1-D parameters) and is partitioned like it.

  Args:
    state: the ``FactoredState`` of ``optax.scale_by_factored_rms``.
    params_axes: the params' logical axes.

  Returns:
    A ``FactoredState`` holding axes (or ``None``) instead of arrays.
  """
  v_axes = jax.tree.map(
    lambda axes, v: axes if axes is not None and len(axes) == v.ndim else None,
    params_axes,
    state.v,
    is_leaf=lambda node: node is None,
  )
  replicated = lambda tree: jax.tree.map(lambda _: None, tree)
  return factorized.FactoredState(
    count=None, v_row=replicated(state.v_row), v_col=replicated(state.v_col), v=v_axes
  )


def register_partition_rules() -> None:
  """Teaches T5X how to partition DST's state and ``optax.adafactor``'s state.

  Idempotent. A rule T5X already has for ``FactoredState`` is kept.

  Raises:
    ImportError: if T5X is not installed.
  """
  optimizers = _import.require("t5x.optimizers")
  # T5X exposes no public registration hook; its rule table is the documented
  # place to "add to this list to support additional optimizers".
  rules = optimizers.OptaxStatePartitionRules._RULES
  rules[DynamicSubsetTuningState] = dst_state_axes
  rules.setdefault(factorized.FactoredState, factored_state_axes)
