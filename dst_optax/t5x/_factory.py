"""A gin-friendly Dynamic Subset Tuning factory for T5X optimizer chains.

Gin bindings are easiest to override from the command line with plain values
(``--gin.DST_SILOS="'rows'"``), so this factory accepts silo names and regular
expressions besides the spec objects of :mod:`dst_optax`. It needs no T5X.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

import dst_optax
from dst_optax import _silos

# T5X names its transformer blocks ``encoder/layers_3``, ``decoder/layers_11``.
_T5X_LAYER = re.compile(r"^(?:encoder|decoder)/layers_\d+(?=/)")


def per_layer_silos(path: tuple[Any, ...], leaf: jax.Array) -> _silos.SiloSpec:
  """One silo per T5X transformer layer; other leaves are one silo each.

  Args:
    path: the ``jax.tree_util`` key path of a parameter.
    leaf: the parameter (unused: the layer is read from the path).

  Returns:
    ``Group("encoder/layers_3")`` for every parameter of that layer, and
    :class:`dst_optax.PerTensor` for embeddings, final norms and the like.
  """
  del leaf
  layer = _T5X_LAYER.match(_silos.path_name(path))
  return dst_optax.Group(layer.group(0)) if layer else dst_optax.PerTensor()


# Silo names accepted by :func:`dynamic_subset_tuning` (constant).
NAMED_SILOS: dict[str, _silos.Silos] = {
  "per_tensor": dst_optax.PerTensor(),
  "rows": dst_optax.rows(),
  "columns": dst_optax.columns(),
  "global": dst_optax.Global(),
  "per_layer": per_layer_silos,
}


def resolve_silos(silos: str | _silos.Silos) -> _silos.Silos:
  """Maps a silo name from :data:`NAMED_SILOS` to its spec; passes specs through.

  Args:
    silos: a name (``"per_tensor"``, ``"rows"``, ``"columns"``, ``"global"``,
      ``"per_layer"``) or anything :func:`dst_optax.dynamic_subset_tuning` accepts.

  Returns:
    A silo spec, callable or spec tree.

  Raises:
    ValueError: for an unknown name.
  """
  if not isinstance(silos, str):
    return silos
  if silos not in NAMED_SILOS:
    raise ValueError(f"unknown silo name {silos!r}; expected one of {sorted(NAMED_SILOS)}")
  return NAMED_SILOS[silos]


def constrained_mask(unconstrained_patterns: Sequence[str]) -> Any | None:
  """A DST ``mask``: ``params -> bool tree``, False where a path matches a pattern.

  Args:
    unconstrained_patterns: regular expressions searched in ``/``-joined
      parameter paths.

  Returns:
    A callable for the ``mask`` argument of :func:`dst_optax.dynamic_subset_tuning`,
    or ``None`` (everything constrained) when there are no patterns.
  """
  if not unconstrained_patterns:
    return None
  patterns = [re.compile(pattern) for pattern in unconstrained_patterns]

  def mask(params: optax.Params) -> Any:
    return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(_silos.path_name(path)) for p in patterns), params
    )

  return mask


def keep_state_dtypes(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Makes ``update`` return its state in the dtypes the state came in.

  T5X restores a checkpoint in one dtype (``RestoreCheckpointConfig.dtype``,
  float32 by default), so DST's int32 counters come back as float32 when a run
  resumes, and T5X compiles its train step for the restored types. A step that
  returned int32 counters again would no longer match that compiled step.

  Args:
    inner: a transformation whose state is a pytree of arrays.

  Returns:
    The same transformation, with the state's dtypes stable across updates.
  """

  def update_fn(
    updates: optax.Updates, state: Any, params: optax.Params | None = None
  ) -> tuple[optax.Updates, Any]:
    new_updates, new_state = inner.update(updates, state, params)
    return new_updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

  return optax.GradientTransformation(inner.init, update_fn)


def dynamic_subset_tuning(
  fraction_of_free_params: float | optax.Schedule = 0.01,
  silos: str | _silos.Silos = "per_tensor",
  distance: str | Any = "absolute",
  unconstrained_patterns: Sequence[str] = (),
) -> optax.GradientTransformation:
  """:func:`dst_optax.dynamic_subset_tuning` for T5X gin configs.

  Put it last in ``optimizers.chain.transformations``. The state keeps the
  dtypes it is restored with (see :func:`keep_state_dtypes`). When T5X is installed,
  calling it also registers DST's state with T5X's optimizer-state partition
  rules (see :func:`dst_optax.t5x.register_partition_rules`), so the seed copy is
  sharded like the parameters whatever the import order of the gin files.

  Args:
    fraction_of_free_params: ε in (0, 1] or an optax schedule of the step.
    silos: a name from :data:`NAMED_SILOS` or any silo spec of :mod:`dst_optax`.
    distance: ``"absolute"``, ``"relative"`` or a callable, as in the core.
    unconstrained_patterns: regular expressions searched in ``/``-joined
      parameter paths (e.g. ``"decoder/logits_dense"``); matching parameters are
      trained freely (use it for newly initialised, not pretrained, weights).

  Returns:
    The DST ``optax.GradientTransformation``.
  """
  if importlib.util.find_spec("t5x") is not None:
    # Imported here: the partitioning module needs T5X, this factory does not.
    from dst_optax.t5x import _partitioning

    _partitioning.register_partition_rules()
  return keep_state_dtypes(
    dst_optax.dynamic_subset_tuning(
      fraction_of_free_params,
      silos=resolve_silos(silos),
      distance=distance,
      mask=constrained_mask(unconstrained_patterns),
    )
  )
