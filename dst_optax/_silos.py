"""Silo specifications and their resolution into a static layout.

A *silo* is a set of parameter coordinates that shares one budget: at most
``floor(ε · scale · |S|)`` coordinates of silo ``S`` may differ from the seed. The
specs below say how each leaf is cut into silos; :func:`build_layout` turns a
spec tree and the parameter shapes into a :class:`SiloLayout`, a static
description that the selection code works on.

Coordinates inside a silo are ordered by leaf (in ``jax.tree_util`` flattening
order) and then by row-major position inside the leaf; ties in the selection are
broken towards the lowest position in this order.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class PerTensor:
  """Each leaf is one silo: ``floor(ε · scale · leaf.size)`` free coordinates.

  Attributes:
    budget_scale: multiplies ε for this silo (the fraction is capped at 1).
  """

  budget_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class PerSlice:
  """Each slice ``leaf[..., i, ...]`` along ``axis`` is one silo.

  For a matrix, ``PerSlice(0)`` gives one silo per row and ``PerSlice(-1)`` one
  per column (see :func:`rows` and :func:`columns`).

  Attributes:
    axis: the axis whose indices name the silos.
    budget_scale: multiplies ε for these silos (the fraction is capped at 1).
  """

  axis: int
  budget_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Group:
  """All leaves carrying a ``Group`` of the same ``name`` form one silo.

  Attributes:
    name: the group's name; leaves with equal names share one budget.
    budget_scale: multiplies ε for this silo (the fraction is capped at 1). All
      leaves of a group must agree on it.
  """

  name: str
  budget_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Global(Group):
  """One silo spanning every leaf that carries it (the whole model by default)."""

  name: str = "global"


@dataclasses.dataclass(frozen=True)
class Unconstrained:
  """The leaf is not constrained: its update passes through unchanged.

  Use it for parameters that are new rather than pretrained (e.g. a freshly
  initialised classification head); they are not part of the seed's budget.
  """


SiloSpec: TypeAlias = PerTensor | PerSlice | Group | Unconstrained
SiloSpecFn: TypeAlias = Callable[[tuple[Any, ...], jax.Array], SiloSpec]
Silos: TypeAlias = SiloSpec | SiloSpecFn | Any  # Any: a pytree (prefix) of specs.
SPEC_TYPES = (PerTensor, PerSlice, Group, Unconstrained)
# Selection counts in int32 and breaks ties by positions below 2^31 − 1.
MAX_SILO_SIZE = 2**31 - 2
_LARGEST_FLOAT32_BELOW_2_31 = 2**31 - 128
# Floating-point dtypes whose distances DST ranks; narrower floats (float8, float4)
# do not promote to float32 implicitly, and their files could not be read back.
CONSTRAINED_DTYPES = tuple(
  np.dtype(dtype) for dtype in (np.float16, jnp.bfloat16, np.float32, np.float64)
)


def rows(budget_scale: float = 1.0) -> PerSlice:
  """One silo per row of a matrix (per index of axis 0)."""
  return PerSlice(0, budget_scale)


def columns(budget_scale: float = 1.0) -> PerSlice:
  """One silo per column of a matrix (per index of the last axis)."""
  return PerSlice(-1, budget_scale)


def path_name(path: tuple[Any, ...]) -> str:
  """Readable ``a/b/0`` name of a ``jax.tree_util`` key path."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts) or "<root>"


class LeafSilos(NamedTuple):
  """Where one constrained leaf's coordinates go.

  Attributes:
    axis: ``None`` if the whole leaf lies in silo ``offset``; otherwise the
      (non-negative) axis whose index ``i`` selects silo ``offset + i``.
    offset: index of the leaf's first silo.
    num_silos: 1, or the length of ``axis``.
  """

  axis: int | None
  offset: int
  num_silos: int


class SiloLayout(NamedTuple):
  """Static description of all silos of a parameter tree.

  Attributes:
    leaves: per leaf (flattening order) its :class:`LeafSilos`, or ``None`` for a
      leaf that passes through unconstrained.
    paths: per leaf its readable path, for messages.
    silo_sizes: ``(num_silos,)`` number of coordinates of each silo.
    budget_scales: ``(num_silos,)`` multiplier of ε of each silo.
    shared: whether some silo spans several leaves (a group).
  """

  leaves: tuple[LeafSilos | None, ...]
  paths: tuple[str, ...]
  silo_sizes: np.ndarray
  budget_scales: np.ndarray
  shared: bool

  @property
  def num_silos(self) -> int:
    return len(self.silo_sizes)

  def budgets(self, fraction_of_free_params: Any) -> jax.Array:
    """Per-silo budgets ``floor(min(1, ε · scale) · |S|)``, within ``[0, |S|]``, as int32.

    Evaluated in ε's precision, concrete or traced alike, so that a step's
    budgets do not depend on whether it is jitted: float64 for a Python number
    (a constant ε), the array's float dtype (float32 unless x64 is on) for an
    array ε, as ``optax.inject_hyperparams`` and schedules give.
    """
    if isinstance(fraction_of_free_params, (int, float)):
      return jnp.asarray(self.concrete_budgets(float(fraction_of_free_params)), jnp.int32)
    fraction = jnp.asarray(fraction_of_free_params)
    dtype = jnp.promote_types(fraction.dtype, jnp.float32)
    fractions = jnp.minimum(fraction.astype(dtype) * self.budget_scales.astype(dtype), 1.0)
    budgets = jnp.nan_to_num(jnp.floor(fractions * self.silo_sizes.astype(dtype)), nan=0.0)
    # Clipped as floats below 2^31 first: a float32 |S| near 2^31 rounds up.
    budgets = jnp.clip(budgets, 0.0, _LARGEST_FLOAT32_BELOW_2_31).astype(jnp.int32)
    return jnp.minimum(budgets, self.silo_sizes.astype(np.int32))

  def concrete_budgets(
    self, fraction_of_free_params: float, dtype: type[np.floating] = np.float64
  ) -> np.ndarray:
    """:meth:`budgets` in NumPy, for a concrete ε evaluated in ``dtype``.

    float64 gives a constant ε's budgets, float32 those of a float32 array ε
    (the same IEEE operations as :meth:`budgets` runs on device).
    """
    fraction = np.asarray(fraction_of_free_params, dtype)
    fractions = np.minimum(fraction * self.budget_scales.astype(dtype), dtype(1.0))
    budgets = np.floor(fractions * self.silo_sizes.astype(dtype))
    return np.clip(np.nan_to_num(budgets), 0, self.silo_sizes).astype(np.int64)

  def frozen_silo_report(self, fraction_of_free_params: float) -> str | None:
    """Describes the leaves whose silos get a zero budget, or ``None``."""
    budgets = self.concrete_budgets(fraction_of_free_params)
    frozen = []
    for path, leaf in zip(self.paths, self.leaves, strict=True):
      if leaf is not None:
        leaf_budgets = budgets[leaf.offset : leaf.offset + leaf.num_silos]
        if np.any(leaf_budgets == 0):
          frozen.append(f"{path} ({int(np.sum(leaf_budgets == 0))}/{leaf.num_silos} silos)")
    if not frozen:
      return None
    return (
      f"fraction_of_free_params={fraction_of_free_params} gives these silos a budget of "
      f"0 free coordinates, so they stay frozen: {', '.join(frozen)}. For tiny budgets use "
      "dst_optax.Global() or dst_optax.Group silos."
    )


def _is_spec(value: Any) -> bool:
  return isinstance(value, SPEC_TYPES)


def _broadcast_prefix(
  prefix: Any, params: optax.Params, mismatch: str, is_leaf: Callable[[Any], bool] | None = None
) -> list[Any]:
  """One value per param leaf from a tree that matches (a prefix of) ``params``."""
  try:
    full = jax.tree.map(
      lambda value, subtree: jax.tree.map(lambda _: value, subtree), prefix, params, is_leaf=is_leaf
    )
  except ValueError as error:
    raise ValueError(f"{mismatch}: {error}") from None
  # Flattened by the params' structure: one value per param leaf, none for the
  # params' empty subtrees (a None there may carry a None value, which is no leaf).
  return jax.tree.structure(params).flatten_up_to(full)


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """The leaves of a pytree keyed by their readable :func:`path_name`."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _spec_per_leaf(silos: Silos, params: optax.Params) -> list[SiloSpec]:
  """Expands ``silos`` (spec, callable or spec-tree prefix) to one spec per leaf."""
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(params)
  if _is_spec(silos):
    return [silos] * len(leaves_with_paths)
  if callable(silos):
    specs = [silos(path, leaf) for path, leaf in leaves_with_paths]
  else:
    specs = _broadcast_prefix(
      silos,
      params,
      "`silos` must be a silo spec, a callable (path, leaf) -> spec, or a pytree of specs "
      "matching (a prefix of) the parameters; the tree does not match",
      is_leaf=lambda x: _is_spec(x) or x is None,
    )
  for (path, _), spec in zip(leaves_with_paths, specs, strict=True):
    if not _is_spec(spec):
      raise TypeError(
        f"silo spec for leaf {path_name(path)!r} must be one of PerTensor, PerSlice, "
        f"Group, Global, Unconstrained; got {spec!r}"
      )
  return specs


def _mask_per_leaf(mask: Any, params: optax.Params) -> list[bool]:
  """Expands an ``optax.masked``-style mask (tree or callable) to a bool per leaf."""
  num_leaves = len(jax.tree.leaves(params))
  if mask is None:
    return [True] * num_leaves
  flags = _broadcast_prefix(
    mask(params) if callable(mask) else mask,
    params,
    "`mask` must match (a prefix of) the parameter tree; it does not",
  )
  paths = [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  for path, flag in zip(paths, flags, strict=True):
    # Truthiness would take any object (a string, a traced array) for a flag.
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"`mask` must give a Python bool for leaf {path!r}; got {flag!r}")
  return [bool(flag) for flag in flags]


def _validate_scale(path: str, spec: SiloSpec) -> float:
  scale = spec.budget_scale
  # NumPy and 0-d JAX numbers count; bools do not (as for ε).
  if isinstance(scale, (bool, np.bool_)) or not (
    isinstance(scale, numbers.Real)
    or (isinstance(scale, (np.ndarray, jax.Array)) and scale.ndim == 0)
  ):
    raise TypeError(
      f"budget_scale of the silo spec of leaf {path!r} must be a number; got {scale!r}"
    )
  if not (math.isfinite(float(scale)) and float(scale) > 0):
    raise ValueError(
      f"budget_scale of the silo spec of leaf {path!r} must be a finite number > 0; got {scale!r}"
    )
  return float(scale)


def build_layout(params: optax.Params, silos: Silos, mask: Any = None) -> SiloLayout:
  """Resolves silo specs against the parameters.

  Args:
    params: the parameter tree (arrays or shape/dtype structs).
    silos: a spec for all leaves, a callable ``(path, leaf) -> spec``, or a pytree
      (prefix) of specs.
    mask: optional tree (prefix) or callable of bools, like ``optax.masked``;
      ``False`` leaves are unconstrained.

  Returns:
    The static :class:`SiloLayout`. Non-floating-point leaves are unconstrained.

  Raises:
    ValueError / TypeError naming the leaf whose spec does not fit, or a
      constrained leaf of a float dtype outside :data:`CONSTRAINED_DTYPES`.
  """
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(params)
  specs = _spec_per_leaf(silos, params)
  flags = _mask_per_leaf(mask, params)
  leaves: list[LeafSilos | None] = []
  paths: list[str] = []
  sizes: list[int] = []
  scales: list[float] = []
  groups: dict[str, int] = {}
  for (key_path, leaf), spec, flag in zip(leaves_with_paths, specs, flags, strict=True):
    path = path_name(key_path)
    paths.append(path)
    floating = jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    if not flag or not floating or isinstance(spec, Unconstrained) or np.size(leaf) == 0:
      leaves.append(None)
      continue
    dtype = np.dtype(jnp.result_type(leaf))
    if dtype not in CONSTRAINED_DTYPES:
      raise TypeError(
        f"leaf {path!r} has dtype {dtype}, which DST cannot constrain (it ranks "
        f"{', '.join(map(str, CONSTRAINED_DTYPES))} leaves); leave it out with the mask "
        "or an Unconstrained() silo spec"
      )
    scale = _validate_scale(path, spec)
    shape = np.shape(leaf)
    if isinstance(spec, PerSlice):
      if not -len(shape) <= spec.axis < len(shape):
        raise ValueError(
          f"silo spec {spec!r} does not fit leaf {path!r} with shape {shape}: axis "
          f"{spec.axis} is out of range"
        )
      axis = spec.axis % len(shape)
      leaves.append(LeafSilos(axis, len(sizes), shape[axis]))
      sizes.extend([math.prod(shape) // shape[axis]] * shape[axis])
      scales.extend([scale] * shape[axis])
    elif isinstance(spec, Group):
      if spec.name not in groups:
        groups[spec.name] = len(sizes)
        sizes.append(0)
        scales.append(scale)
      offset = groups[spec.name]
      if scales[offset] != scale:
        raise ValueError(
          f"leaf {path!r} puts budget_scale={scale} on group {spec.name!r}, whose other "
          f"leaves use {scales[offset]}"
        )
      sizes[offset] += math.prod(shape)
      leaves.append(LeafSilos(None, offset, 1))
    else:
      leaves.append(LeafSilos(None, len(sizes), 1))
      sizes.append(math.prod(shape))
      scales.append(scale)
  if sizes and max(sizes) > MAX_SILO_SIZE:
    silo = int(np.argmax(sizes))
    owner = next(
      path
      for path, leaf in zip(paths, leaves, strict=True)
      if leaf is not None and leaf.offset <= silo < leaf.offset + leaf.num_silos
    )
    group = next((f"group {name!r}" for name, offset in groups.items() if offset == silo), None)
    raise ValueError(
      f"the silo of {group or f'leaf {owner!r}'} has {max(sizes):,} coordinates, more than "
      f"selection counts in one silo ({MAX_SILO_SIZE:,}, int32): split it, e.g. into Group "
      "silos per layer (dst_optax.layer_groups) or rows"
    )
  shared = any(
    sum(1 for leaf in leaves if leaf is not None and leaf.offset == offset) > 1
    for offset in groups.values()
  )
  return SiloLayout(
    tuple(leaves),
    tuple(paths),
    np.asarray(sizes, dtype=np.int64),
    np.asarray(scales, dtype=np.float64),
    shared,
  )


def warn_if_frozen(layout: SiloLayout, fraction_of_free_params: Any) -> None:
  """Warns once (per call site) when a constant ε leaves some silos frozen (an
  array ε, as injected, may change from step to step)."""
  if isinstance(fraction_of_free_params, (int, float)):
    report = layout.frozen_silo_report(float(fraction_of_free_params))
    if report:
      warnings.warn(report, stacklevel=3)


def warn_if_unconstrained(layout: SiloLayout) -> None:
  """Warns when no coordinate is constrained, so that every update passes through."""
  if layout.num_silos == 0:
    warnings.warn(
      f"dynamic_subset_tuning constrains no coordinate of these params (leaves "
      f"{list(layout.paths)}: each masked out, Unconstrained, non-float or empty), so every "
      "update passes through unchanged.",
      stacklevel=3,
    )
