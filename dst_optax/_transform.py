"""Dynamic Subset Tuning as an ``optax.GradientTransformation``.

Stahlberg, Lichtarge, Kumar (2024), *Dynamic Subset Tuning: Expanding the
Operational Range of Parameter-Efficient Training for Large Language Models*,
arXiv:2411.08610.

Each step, given the base optimizer's update ``u``::

  Θ̂ = Θ(t) + u
  Δ = d(Θ0, Θ̂, Θ0)
  for every silo S: keep the k_S = floor(ε |S|) coordinates with the largest Δ > 0
                    at Θ̂ and reset all others to the seed Θ0.

Exactness. A kept coordinate gets the update ``u`` unchanged, so
``optax.apply_updates`` lands bit-exactly on ``Θ̂``. A reset coordinate gets
``Θ0 − Θ(t)`` (subtracted at the wider of the params' and the update's dtype,
returned in the update's), and ``Θ(t) + (Θ0 − Θ(t))`` can be one rounding away
from ``Θ0``. Such residue heals itself: if the coordinate stays out of the
subset, the next step's reset starts within a factor of two of ``Θ0``, where the
subtraction is exact (Sterbenz) and the sum lands on ``Θ0``. For bfloat16 params
with float32 updates every reset is exact; with updates narrower than the params
(bfloat16 updates of float32 params) rounding the difference can leave residue
again, 2^8 times smaller each step, until it vanishes. Residue never
consumes budget in a materialised model: :func:`project_to_budget` (and the
subset export built on it) keeps at most ``k_S`` changed coordinates per silo,
bit-exactly, using ``jnp.where`` rather than arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dst_optax import _distances, _selection, _silos

Fraction = float | jax.Array | optax.Schedule


class DynamicSubsetTuningState(NamedTuple):
  """State of :func:`dynamic_subset_tuning`; a plain pytree.

  Attributes:
    count: number of updates so far (int32; float32 after some checkpoint
      restores is accepted). The seed is captured when it is 0.
    seed: the seed parameters Θ0, shaped (and shardable) like the params.
    threshold: ``(num_silos,)`` float32 the last step's selection threshold:
      kept coordinates had Δ ≥ it, reset ones Δ ≤ it (see :class:`Selection`).
    threshold_change: ``(num_silos,)`` float32 change of the threshold at the
      last step (NaN when unknown); the next search extrapolates it.
    threshold_error: ``(num_silos,)`` float32 how far the last change was from
      the one before (NaN when unknown); the next search's window scales with it.
    budget: ``(num_silos,)`` int32 free coordinates per silo at the last step.
    num_changed: ``(num_silos,)`` int32 coordinates kept different from the seed.
    num_entered: ``(num_silos,)`` int32 coordinates that joined the subset.
    num_exited: ``(num_silos,)`` int32 coordinates that left it.
    num_passes: int32 passes over Δ the last threshold search took.
  """

  count: jax.Array
  seed: optax.Params
  threshold: jax.Array
  threshold_change: jax.Array
  threshold_error: jax.Array
  budget: jax.Array
  num_changed: jax.Array
  num_entered: jax.Array
  num_exited: jax.Array
  num_passes: jax.Array


def _check_fraction(fraction_of_free_params: Fraction) -> None:
  """Checks a constant ε; an array ε (as injected) or a schedule's value is not
  checked, concrete or traced alike, so that eager and jitted steps agree."""
  if callable(fraction_of_free_params) or isinstance(
    fraction_of_free_params, (jax.Array, jax.core.Tracer)
  ):
    return
  value = np.asarray(fraction_of_free_params)
  if value.shape != () or not np.issubdtype(value.dtype, np.number):
    raise TypeError(
      f"fraction_of_free_params must be a number in (0, 1] or a schedule; got "
      f"{fraction_of_free_params!r}"
    )
  if not 0.0 < float(value) <= 1.0:
    raise ValueError(f"fraction_of_free_params must lie in (0, 1]; got {float(value)!r}")


def _check_same_structure(name: str, tree: Any, params: optax.Params) -> None:
  """Raises a ValueError naming the first path where ``tree`` differs from params."""
  tree_leaves = _silos.leaves_by_path(tree)
  param_leaves = _silos.leaves_by_path(params)
  missing = sorted(param_leaves.keys() - tree_leaves.keys())
  extra = sorted(tree_leaves.keys() - param_leaves.keys())
  if missing or extra:
    raise ValueError(
      f"{name} do not match the params tree: missing leaves {missing}, unexpected leaves {extra}"
    )
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
      f"{name} have the same leaf paths as the params but a different tree structure: "
      f"{jax.tree.structure(tree)} vs {jax.tree.structure(params)}"
    )
  for path, leaf in tree_leaves.items():
    if np.shape(leaf) != np.shape(param_leaves[path]):
      raise ValueError(
        f"{name} leaf {path!r} has shape {np.shape(leaf)} but the param has shape "
        f"{np.shape(param_leaves[path])}"
      )


def _distance_keys(
  distance: _distances.DistanceFn,
  layout: _silos.SiloLayout,
  proposals: list[jax.Array],
  seeds: list[jax.Array],
) -> list[jax.Array | None]:
  """Keys of Δ = d(seed, proposal, seed) for every constrained leaf."""
  keys = []
  for path, leaf, proposal, seed in zip(layout.paths, layout.leaves, proposals, seeds, strict=True):
    if leaf is None:
      keys.append(None)
      continue
    delta = distance(seed, proposal, seed)
    if delta.shape != proposal.shape:
      raise ValueError(
        f"distance returned shape {delta.shape} for leaf {path!r} of shape {proposal.shape}; "
        "it must be elementwise"
      )
    keys.append(_selection.distance_keys(delta))
  return keys


def _select(
  proposals: list[jax.Array],
  seeds: list[jax.Array],
  layout: _silos.SiloLayout,
  budgets: jax.Array,
  distance: _distances.DistanceFn,
  warm_start: _selection.WarmStart | None = None,
) -> _selection.Selection:
  keys = _distance_keys(distance, layout, proposals, seeds)
  return _selection.select_top_k(keys, layout, budgets, warm_start)


def _reset(param: jax.Array, seed: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """The update ``Θ0 − Θ`` that resets a coordinate, in the update's ``dtype``.

  Subtracted at the wider of the two dtypes: for updates narrower than the
  params (bfloat16 updates of float32 params) only the difference is rounded,
  not Θ and Θ0 first, which would turn small excursions into a reset of 0.
  """
  wide = jnp.promote_types(param.dtype, dtype)
  return (-(param.astype(wide) - seed.astype(wide))).astype(dtype)


def dynamic_subset_tuning(
  fraction_of_free_params: Fraction,
  silos: _silos.Silos = _silos.PerTensor(),
  distance: str | _distances.DistanceFn = "absolute",
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  """Dynamic Subset Tuning: keep only a moving subset of params off the seed.

  Chain it **last**, after the base optimizer, so that it masks the final
  update (weight decay and momentum then cannot move frozen coordinates)::

    tx = optax.chain(optax.adamw(1e-4, weight_decay=0.01),
                     dynamic_subset_tuning(0.01))

  With ``u`` the incoming update, ``Θ̂ = Θ(t) + u`` and ``Δ = d(Θ0, Θ̂, Θ0)``,
  each silo ``S`` keeps its ``k_S = floor(ε · |S|)`` largest-Δ coordinates (of
  those with Δ > 0) at ``Θ̂`` and resets the rest to the seed ``Θ0``. Ties go to
  the lowest position in silo order (leaf flattening order, then row-major).

  The seed Θ0 is taken from ``params`` at the **first update**, not at ``init``:
  trainers such as T5X call ``init`` on random parameters and restore the
  pretrained ones afterwards.

  Non-finite updates are not filtered: NaN/Inf distances rank highest, so they
  reach the params as they would without DST. Wrap the chain in
  ``optax.apply_if_finite`` to skip such steps.

  Args:
    fraction_of_free_params: ε in (0, 1], a float, an array (e.g. via
      ``optax.inject_hyperparams``) or a schedule of the step count. ε = 1 is full
      fine-tuning and returns the base updates unchanged. Traced values are not
      checked: above 1 counts as 1; 0, below or NaN gives every silo a zero
      budget, which resets every constrained coordinate to the seed.
    silos: how coordinates are partitioned into silos: a spec for every leaf
      (:class:`PerTensor`, :class:`PerSlice`, :func:`rows`, :func:`columns`,
      :class:`Group`, :class:`Global`, :class:`Unconstrained`), a callable
      ``(path, leaf) -> spec``, or a pytree (prefix) of specs.
    distance: ``"absolute"`` (default), ``"relative"`` or a callable
      ``d(candidate, proposal, seed)`` returning elementwise non-negative values.
    mask: optional tree (prefix) of bools or a callable ``params -> tree``, as in
      ``optax.masked``; ``False`` leaves pass through unconstrained. Leaves not
      of a real floating dtype (integer, bool, complex) always pass through; if
      no coordinate is left to constrain, every update does and ``init`` warns.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` requires ``params``.
  """
  _check_fraction(fraction_of_free_params)
  distance_fn = _distances.resolve_distance(distance)

  def fraction_at(count: jax.Array) -> Any:
    if callable(fraction_of_free_params):
      return fraction_of_free_params(count)
    return fraction_of_free_params

  def init_fn(params: optax.Params) -> DynamicSubsetTuningState:
    layout = _silos.build_layout(params, silos, mask)
    _silos.warn_if_unconstrained(layout)
    if not callable(fraction_of_free_params):
      _silos.warn_if_frozen(layout, fraction_of_free_params)
    # A fresh array per field: a state sharing buffers cannot be donated.
    per_silo_zeros = lambda: jnp.zeros(layout.num_silos, jnp.int32)
    per_silo_unknown = lambda: jnp.full(layout.num_silos, jnp.nan, jnp.float32)
    return DynamicSubsetTuningState(
      count=jnp.zeros([], jnp.int32),
      seed=jax.tree.map(jnp.zeros_like, params),
      threshold=jnp.zeros(layout.num_silos, jnp.float32),
      threshold_change=per_silo_unknown(),
      threshold_error=per_silo_unknown(),
      budget=per_silo_zeros(),
      num_changed=per_silo_zeros(),
      num_entered=per_silo_zeros(),
      num_exited=per_silo_zeros(),
      num_passes=jnp.zeros([], jnp.int32),
    )

  def update_fn(
    updates: optax.Updates, state: DynamicSubsetTuningState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, DynamicSubsetTuningState]:
    if params is None:
      raise ValueError(
        "dynamic_subset_tuning needs the current parameters: call "
        "`tx.update(updates, state, params)`"
      )
    _check_same_structure("updates", updates, params)
    _check_same_structure("state.seed", state.seed, params)
    # Python scalars are valid leaves in optax; as arrays they have a dtype.
    updates, params = jax.tree.map(jnp.asarray, (updates, params))
    layout = _silos.build_layout(params, silos, mask)
    if state.threshold.shape != (layout.num_silos,):
      raise ValueError(
        f"the state has {state.threshold.shape[0]} silos but the silo spec gives "
        f"{layout.num_silos} for these params; was the state built for other params?"
      )
    budgets = layout.budgets(fraction_at(state.count))
    # A cond, not an elementwise select: under buffer donation the steady-state
    # branch hands the seed buffers through untouched instead of rewriting them.
    # The seed is the cond's operand, which that branch returns as is; captured
    # by closure (or returned from another branch) XLA copies it every step.
    seed_tree = jax.lax.cond(
      state.count == 0,
      lambda seed: params,
      lambda seed: seed,
      jax.tree.map(lambda p, s: jnp.asarray(s, p.dtype), params, state.seed),
    )

    leaves_u, treedef = jax.tree.flatten(updates)
    leaves_p = treedef.flatten_up_to(params)
    leaves_s = treedef.flatten_up_to(seed_tree)
    proposals = [
      (p + u).astype(p.dtype) if leaf is not None else p
      for p, u, leaf in zip(leaves_p, leaves_u, layout.leaves, strict=True)
    ]
    # The last thresholds are only a warm start: selection is exact from any start.
    warm_start = _selection.WarmStart(
      state.threshold, state.threshold_change, state.threshold_error
    )
    selection = _select(proposals, leaves_s, layout, budgets, distance_fn, warm_start)
    # NaN after the first step (no threshold before it) and around NaN thresholds.
    threshold_change = jnp.where(
      state.threshold > 0, selection.threshold - state.threshold, jnp.nan
    )

    # Membership before this step: kept coordinates sit exactly at their Δ from
    # the last selection, which is ≥ that step's threshold.
    previous_keys = _distance_keys(distance_fn, layout, leaves_p, leaves_s)
    previous_threshold = _selection.distance_keys(state.threshold)
    was_member = [
      None
      if keys is None
      else (keys > 0)
      & (keys >= _selection.silo_values_for_leaf(previous_threshold, leaf, keys.ndim))
      for keys, leaf in zip(previous_keys, layout.leaves, strict=True)
    ]
    entered = [
      None if keep is None else keep & ~member
      for keep, member in zip(selection.masks, was_member, strict=True)
    ]
    exited = [
      None if keep is None else member & ~keep
      for keep, member in zip(selection.masks, was_member, strict=True)
    ]
    num_entered, num_exited = _selection.count_per_silo((entered, exited), layout)
    # The counts read the params, whose donated buffers the caller's
    # `apply_updates` overwrites. Making the updates depend on the counts (by an
    # always-true test XLA cannot fold) schedules the counting first; otherwise
    # XLA copies every param to keep them alive (an optimization barrier does
    # not survive XLA:CPU's pipeline).
    counted = jnp.min(num_entered, initial=0) >= 0

    # A proposal that already equals the seed keeps its update: it lands on the
    # seed exactly, where the reset's arithmetic could round. The reset is written
    # −(Θ − Θ0), equal to Θ0 − Θ (a zero difference becomes −0, which adds to Θ
    # exactly), so that XLA does not share it with the counts' |Θ0 − Θ| and
    # materialise it.
    new_updates = [
      u if keep is None else jnp.where(counted & (keep | (proposal == s)), u, _reset(p, s, u.dtype))
      for u, p, s, proposal, keep in zip(
        leaves_u, leaves_p, leaves_s, proposals, selection.masks, strict=True
      )
    ]
    new_state = DynamicSubsetTuningState(
      count=optax.safe_increment(state.count),
      seed=seed_tree,
      threshold=selection.threshold,
      threshold_change=threshold_change,
      threshold_error=threshold_change - state.threshold_change,
      budget=budgets,
      num_changed=selection.num_selected,
      num_entered=num_entered,
      num_exited=num_exited,
      num_passes=selection.num_passes,
    )
    return jax.tree.unflatten(treedef, new_updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def project_to_budget(
  params: optax.Params,
  seed: optax.Params,
  fraction_of_free_params: float | jax.Array,
  silos: _silos.Silos = _silos.PerTensor(),
  distance: str | _distances.DistanceFn = "absolute",
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.Params:
  """Materialises params with at most ``floor(ε · |S|)`` changes per silo, exactly.

  Per silo keeps the ``k_S`` coordinates of ``params`` with the largest
  ``d(seed, params, seed) > 0`` (ties to the lowest position) and sets every other
  coordinate to ``seed`` bit-exactly (a select, not arithmetic). Use it on the
  final params of a DST run to drop rounding residue of resets.

  Args:
    params: the fine-tuned parameters.
    seed: the seed parameters Θ0 (same tree, shapes and dtypes).
    fraction_of_free_params: ε in (0, 1].
    silos: silo specs, as in :func:`dynamic_subset_tuning`.
    distance: distance name or callable, as in :func:`dynamic_subset_tuning`.
    mask: as in :func:`dynamic_subset_tuning`; unconstrained leaves are returned
      as they are in ``params``.

  Returns:
    The projected parameters.
  """
  _check_fraction(fraction_of_free_params)
  _check_same_structure("seed", seed, params)
  layout = _silos.build_layout(params, silos, mask)
  leaves_p, treedef = jax.tree.flatten(params)
  leaves_s = treedef.flatten_up_to(seed)
  for path, p, s in zip(layout.paths, leaves_p, leaves_s, strict=True):
    if jnp.result_type(p) != jnp.result_type(s):
      raise ValueError(
        f"seed leaf {path!r} has dtype {jnp.result_type(s)} but the param has {jnp.result_type(p)}"
      )
  distance_fn = _distances.resolve_distance(distance)

  # One compiled program: run eagerly, the selection loop would dispatch (and
  # compile) its operations one by one.
  @jax.jit
  def project(leaves_p, leaves_s, budgets):
    selection = _select(leaves_p, leaves_s, layout, budgets, distance_fn)
    return [
      p if keep is None else jnp.where(keep, p, s)
      for p, s, keep in zip(leaves_p, leaves_s, selection.masks, strict=True)
    ]

  projected = project(leaves_p, leaves_s, layout.budgets(fraction_of_free_params))
  return jax.tree.unflatten(treedef, projected)
