"""Exact silo-wise top-k selection by radix passes, without sorting.

For each silo ``S`` with budget ``k_S`` we select the ``k_S`` coordinates with
the largest distance Δ among those with Δ > 0 (a coordinate at distance 0 equals
the seed and needs no slot). Ties at the threshold go to the lowest position in
silo order (leaf flattening order, then row-major), the order ``lax.top_k`` and a
stable sort use, so the selected set equals the sort-based reference.

Keys. Δ ≥ 0 is float32, so its IEEE bit pattern with the sign cleared is a
non-negative int32 ("key") with the same order (NaN sorts above +inf).

Radix search. Per silo we keep a key interval ``[lo, last]`` known to contain the
k-th largest key. One *pass* reads every key once and counts, per silo, the keys
at or above each of ``2^b + 2`` slot starts: "below ``lo``" (all keys), ``2^b``
equal buckets of ``[lo, last]`` and "above ``last``", by ``2^b + 1`` compares
folded into one variadic reduction. The last bucket whose count reaches ``k``
holds the k-th largest key and becomes the next interval, ``b`` bits narrower;
when it is a single key we have the exact threshold ``t`` together with
``#{key ≥ t}`` and ``#{key > t}``. A search also ends as soon as some slot start
``c`` has exactly ``k`` keys at or above it: ``{key ≥ c}`` is then the selection,
whatever the k-th key's value, and ``c`` is the threshold. So only ties that
straddle the budget need the k-th key pinned; otherwise the search stops once a
slot starts in the gap below it (wide in a sparse tail, or among the positions of
a few tied coordinates). If the k-th key lies outside the interval the counts say
on which side, and the search goes on next to it over a range 2^6 times as wide
(up to the ends of the key range), so exactness never depends on the start.

Passes over parameter-sized arrays are what costs, not arithmetic. So:

* ``b = 3``: one reduction of nine compares fuses with reading the keys and
  costs ~0.25 ns a key on CPU (a pass of 16M keys ~0.2 of an Adam update), where
  a scatter-add histogram pass costs ~2.7 ns a key however many bits it
  resolves, and seventeen compares no longer vectorise (~2 ns);
* a warm start extrapolates the threshold's last change (:class:`WarmStart`)
  and opens a window of ``±2-4×`` the last extrapolation error around it (an
  error of at least 1/8 of the last change), in keys, rounded up to whole
  digits: when the threshold creeps smoothly a search takes a few passes (one
  when it stands still; 5-7 for the 1M-coordinate silos of
  benchmarks/selection.py in steady state). Without a known error the window
  spans ``±2-4×`` the last change, without either ``±2^21`` keys (Δ within about
  ±25%, 8 passes); a cold search takes 11, a miss ``1 + ceil((w + 6) / 3)``
  more if the threshold lies within 2^6 window widths;
* leaves whose silos are all resolved skip the pass (``lax.switch``), and a
  leaf of per-slice silos (rows, columns) with at most one in eight of them
  unresolved gathers just their slices: a search runs until its slowest silo is
  resolved, and in the late passes few rows are left (of 16K rows, ~5% after
  five passes and ~0.1% after nine in benchmarks/selection.py's steady state);
* ties straddling the budget (equal keys at the threshold) are broken by the same
  search over a second key, the reversed position in silo order, which runs only
  when some silo has such ties and costs at most ``ceil(log2 |S| / b)`` passes,
  fewer the fewer coordinates are tied (positions are distinct, so it ends once a
  slot starts between the last tie to take and the next one).

Every pass is elementwise work plus a reduction, which an SPMD partitioner turns
into local counts and an all-reduce of the per-silo counts: keys are never
gathered.

The keys are read from one materialised array by every pass, the tie-break and
the masks: recomputed in another fused loop, Δ could round differently and the
masks would not select the set the search counted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dst_optax._silos import LeafSilos, SiloLayout

# Largest key: the NaN pattern 0x7FFFFFFF. Keys live in [0, _MAX_KEY].
_MAX_KEY = 0x7FFFFFFF
# Keys at or above this are +inf or NaN: no use as a warm start.
_INFINITY_KEY = 0x7F800000
# Bits resolved per pass: 2^_DIGIT_BITS + 1 compares per key in one reduction.
_DIGIT_BITS = 3
# A search whose interval missed the k-th key goes on next to it, 2^6 times wider.
_MISS_GROWTH_BITS = 6
# Warm-start window without a known trend: ±2^(_WARM_WINDOW_BITS - 1) keys around
# the last threshold, i.e. Δ may move by about ±25% between steps and stay inside.
_WARM_WINDOW_BITS = 22
# With a known spread s (in keys) the window spans 2^(bit_length(s) + margin)
# keys, ±2-4 s before rounding up to whole digits: per-tensor thresholds land
# within 1.4-2.9 spreads of the extrapolation in 95% of steps (benchmarks/README.md),
# and a near miss costs about three passes.
_WARM_MARGIN_BITS = 2
# The spread is at least 2^-3 of the last change: two equal changes in a row are
# a coincidence, not a precise trend (per-row thresholds under adam often repeat
# a change exactly and then jump by 15-30%, missing a window of a few keys).
_TREND_TRUST_BITS = 3
# A leaf of per-slice silos with at most 1/_COMPACT_FRACTION of them unresolved
# counts just their slices, gathered: a late pass reads at most 1/8 of its keys.
_COMPACT_FRACTION = 8


class WarmStart(NamedTuple):
  """Where the last steps left each silo's threshold; NaN entries are unknown.

  Attributes:
    threshold: ``(num_silos,)`` float32 last threshold ``t_n``.
    change: ``(num_silos,)`` float32 its last change ``t_n − t_{n−1}``.
    error: ``(num_silos,)`` float32 the last extrapolation error
      ``(t_n − t_{n−1}) − (t_{n−1} − t_{n−2})``.
  """

  threshold: jax.Array
  change: jax.Array
  error: jax.Array


class Selection(NamedTuple):
  """The result of a silo-wise selection.

  Attributes:
    masks: per leaf, a bool array of the selected coordinates, or ``None`` for
      unconstrained leaves.
    threshold: ``(num_silos,)`` float32 ``t`` with ``Δ_(k+1) < t ≤ Δ_(k)`` for
      the sorted Δ of each silo: the selection is ``Δ > t`` and the first ties
      at ``t`` in silo order, and ``t = Δ_(k)`` when ties straddle the budget (0
      when fewer than ``k`` coordinates have Δ > 0, NaN when ``k = 0``).
    num_selected: ``(num_silos,)`` int32 selected coordinates per silo.
    num_passes: int32 scalar, passes over the keys the threshold search took
      (the tie-break, when needed, adds its own).
  """

  masks: list[jax.Array | None]
  threshold: jax.Array
  num_selected: jax.Array
  num_passes: jax.Array


def distance_keys(distance: jax.Array) -> jax.Array:
  """Order-preserving int32 keys in ``[0, 2^31)`` of non-negative float32 distances."""
  bits = lax.bitcast_convert_type(jnp.asarray(distance, jnp.float32), jnp.int32)
  return bits & jnp.int32(_MAX_KEY)


def silo_values_for_leaf(values: jax.Array, leaf: LeafSilos, ndim: int) -> jax.Array:
  """Slices a per-silo vector to this leaf and shapes it to broadcast against it."""
  return _broadcast_to_leaf(values[leaf.offset : leaf.offset + leaf.num_silos], leaf, ndim)


def _broadcast_to_leaf(leaf_values: jax.Array, leaf: LeafSilos, ndim: int) -> jax.Array:
  """Shapes a ``(leaf.num_silos,)`` vector to broadcast against the leaf."""
  if leaf.axis is None:
    return leaf_values[0]
  shape = [1] * ndim
  shape[leaf.axis] = leaf.num_silos
  return leaf_values.reshape(shape)


def _sum_tuples(left: tuple[jax.Array, ...], right: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  return tuple(a + b for a, b in zip(left, right, strict=True))


def _silo_sums(operands: tuple[jax.Array, ...], leaf: LeafSilos) -> tuple[jax.Array, ...]:
  """Per silo, the sums of several int32 arrays shaped like a leaf, in one reduction.

  A leaf that is one silo is summed on CPU over its minor axis first and then
  over the partial sums: XLA:CPU runs that about twice as fast as one reduction
  straight to scalars (2^20 keys, nine counts: 0.23 against 0.5 ms). Elsewhere
  the sum is one reduction, so that a sharded leaf all-reduces scalars, not the
  partial sums of its rows.

  Args:
    operands: int32 arrays shaped like the leaf (fused with whatever computes them).
    leaf: where the leaf's coordinates go.

  Returns:
    One ``(leaf.num_silos,)`` int32 array per operand.
  """
  zeros = tuple(jnp.int32(0) for _ in operands)
  ndim = operands[0].ndim
  summed_axes = tuple(axis for axis in range(ndim) if axis != leaf.axis)

  def at_once(*operands: jax.Array) -> tuple[jax.Array, ...]:
    return lax.reduce(operands, zeros, _sum_tuples, summed_axes)

  def minor_axis_first(*operands: jax.Array) -> tuple[jax.Array, ...]:
    partial = lax.reduce(operands, zeros, _sum_tuples, (ndim - 1,))
    return lax.reduce(partial, zeros, _sum_tuples, tuple(range(ndim - 1)))

  if leaf.axis is None and ndim >= 2:
    sums = lax.platform_dependent(*operands, cpu=minor_axis_first, default=at_once)
  else:
    sums = at_once(*operands)
  return tuple(_replicated(total.reshape(leaf.num_silos)) for total in sums)


def _join_silos(per_leaf: list[jax.Array | None], layout: SiloLayout) -> jax.Array:
  """Joins per-leaf values of their silos into one array over all silos.

  Leaves sharing a silo (a group) add their values. Joined by one concatenation:
  adding each leaf into a ``(num_silos, …)`` array writes that array once per
  leaf, which for per-row silos costs more than the counting itself.

  Args:
    per_leaf: per leaf an array with leading axis ``leaf.num_silos``, or ``None``
      for unconstrained leaves.
    layout: the silo layout (its leaves' silos tile ``[0, num_silos)``).

  Returns:
    The ``(num_silos, …)`` array.
  """
  by_offset: dict[int, jax.Array] = {}
  for values, leaf in zip(per_leaf, layout.leaves, strict=True):
    if leaf is not None:
      earlier = by_offset.get(leaf.offset)
      by_offset[leaf.offset] = values if earlier is None else earlier + values
  return jnp.concatenate([by_offset[offset] for offset in sorted(by_offset)])


def count_per_silo(
  flags: tuple[list[jax.Array | None], ...], layout: SiloLayout
) -> tuple[jax.Array, ...]:
  """Counts, per silo, the true entries of several flag arrays in one pass.

  One variadic reduction per leaf reads its flags once (and fuses with whatever
  computes them), which on CPU is several times faster than a sum per flag.

  Args:
    flags: per kind of flag, per leaf a bool array shaped like the leaf, or
      ``None`` for unconstrained leaves.
    layout: the silo layout.

  Returns:
    One ``(num_silos,)`` int32 count per kind of flag.
  """
  if layout.num_silos == 0:
    return tuple(jnp.zeros(0, jnp.int32) for _ in flags)
  counts = [
    None
    if leaf is None
    else jnp.stack(_silo_sums(tuple(flag.astype(jnp.int32) for flag in leaf_flags), leaf), axis=1)
    for leaf, *leaf_flags in zip(layout.leaves, *flags, strict=True)
  ]
  return tuple(_join_silos(counts, layout).T)


def _leaf_silo_bases(layout: SiloLayout, shapes: list[tuple[int, ...] | None]) -> list[int | None]:
  """Per leaf, the silo-order position of its first coordinate within its silo.

  Non-zero for the later leaves of a group; ``None`` for unconstrained leaves.
  """
  filled = np.zeros(layout.num_silos, np.int64)
  bases: list[int | None] = []
  for leaf, shape in zip(layout.leaves, shapes, strict=True):
    if leaf is None or leaf.axis is not None:
      bases.append(None if leaf is None else 0)
      continue
    bases.append(int(filled[leaf.offset]))
    filled[leaf.offset] += math.prod(shape)
  return bases


def _bit_length(values: jax.Array) -> jax.Array:
  """Number of significant bits of non-negative int32 values."""
  return 32 - lax.clz(values)


def _slot_thresholds(lo: jax.Array, last: jax.Array, shift: jax.Array) -> jax.Array:
  """Per silo the ``2^b + 1`` thresholds ``t_j`` whose ``#{key > t_j}`` a pass counts.

  Slot 0 holds keys below ``lo``, slot ``1 + ((key − lo) >> shift)`` keys in
  ``[lo, last]`` and slot ``2^b + 1`` keys above ``last``; keys in slot ≥ 1 + j
  are those > ``t_j``.

  Returns:
    ``(num_silos, 2^b + 1)`` int32 thresholds.
  """
  # Keys in slot ≥ 1 + j are those > lo − 1 + j·2^shift; buckets that start past
  # ``last`` hold nothing, so they count the keys above ``last``. Comparing with
  # ``start − 1`` keeps every threshold inside int32 (lo ≥ 0, last < 2^31).
  offsets = [lax.shift_left(jnp.int32(j), shift) for j in range(1 << _DIGIT_BITS)]
  thresholds = [jnp.where(o <= last - lo, lo - 1 + o, last) for o in offsets]
  return jnp.stack([*thresholds, last], axis=1)


def _leaf_slot_counts(leaf_keys: jax.Array, leaf: LeafSilos, thresholds: jax.Array) -> jax.Array:
  """Counts one leaf's keys in slot ``≥ j`` for its silos' ``2^b + 2`` slots.

  Args:
    leaf_keys: the leaf's keys.
    leaf: where the leaf's coordinates go.
    thresholds: ``(leaf.num_silos, 2^b + 1)`` :func:`_slot_thresholds` of its silos.

  Returns:
    ``(leaf.num_silos, 2^b + 2)`` int32: column ``j`` is ``#{key in slot ≥ j}``,
    counted by compares in one reduction.
  """
  counts = _silo_sums(
    tuple(
      (leaf_keys > _broadcast_to_leaf(column, leaf, leaf_keys.ndim)).astype(jnp.int32)
      for column in thresholds.T
    ),
    leaf,
  )
  keys_per_silo = jnp.full(leaf.num_silos, leaf_keys.size // leaf.num_silos, jnp.int32)
  return jnp.stack([keys_per_silo, *counts], axis=1)


class _Search(NamedTuple):
  """Per-silo state of the radix search: the k-th key lies in ``[lo, last]``.

  ``count_at_least`` is ``#{key ≥ lo}`` and ``count_above`` is ``#{key > last}``,
  valid once the search resolved the silo (``lo == last``); a silo resolved at a
  cut has ``count_at_least == k`` and ``count_above ≤ k``.
  """

  lo: jax.Array
  last: jax.Array
  count_at_least: jax.Array
  count_above: jax.Array


def _narrow(search: _Search, at_least: jax.Array, budgets: jax.Array, shift: jax.Array) -> _Search:
  """Moves each silo's interval to the slot holding its k-th key.

  Args:
    search: the silos' search state before the pass.
    at_least: ``(num_silos, 2^b + 2)`` counts of keys in slot ≥ j, per slot j.
    budgets: ``(num_silos,)`` k per silo (≥ 1 for unresolved silos).
    shift: ``(num_silos,)`` log2 of the bucket width used by the pass.

  Returns:
    The narrowed state; with ``c_j = #{key in slot ≥ j}``, the k-th key lies in the
    last slot ``j`` with ``c_j ≥ k``.
  """
  at_least = jnp.pad(at_least, ((0, 0), (0, 1)))
  slot = jnp.sum(at_least >= budgets[:, None], axis=1, dtype=jnp.int32) - 1
  count_at_least = jnp.take_along_axis(at_least, slot[:, None], axis=1)[:, 0]
  count_above = jnp.take_along_axis(at_least, slot[:, None] + 1, axis=1)[:, 0]
  bucket_lo = search.lo + lax.shift_left(slot - 1, shift)
  # Written so that no intermediate overflows int32 near the top of the key range.
  bucket_last = bucket_lo + jnp.minimum(
    lax.shift_left(jnp.int32(1), shift) - 1, search.last - bucket_lo
  )
  # A miss continues next to the interval, _MISS_GROWTH_BITS wider, not over the
  # rest of the key range: a warm window that just missed costs a few passes.
  reach = lax.shift_left(
    jnp.int32(1), jnp.minimum(_bit_length(search.last - search.lo) + _MISS_GROWTH_BITS, 30)
  )
  below, above = slot == 0, slot == (1 << _DIGIT_BITS) + 1
  lo = jnp.where(
    below, jnp.maximum(search.lo - reach, 0), jnp.where(above, search.last + 1, bucket_lo)
  )
  last = jnp.where(
    below,
    search.lo - 1,
    jnp.where(above, search.last + jnp.minimum(reach, _MAX_KEY - search.last), bucket_last),
  )
  # A slot start with exactly k keys at or above it is a cut: the keys ≥ it are
  # the selection, whatever the k-th key's exact value. Between distinct keys
  # (a sparse tail, a tie-break over a few positions) this ends the search early.
  cut = ~below & (count_at_least == budgets) & (lo > 0)
  last = jnp.where(cut, lo, last)
  active = search.lo < search.last
  keep_old = lambda new, old: jnp.where(active, new, old)
  return _Search(
    keep_old(lo, search.lo),
    keep_old(last, search.last),
    keep_old(count_at_least, search.count_at_least),
    keep_old(count_above, search.count_above),
  )


def explicitly_sharded(array: jax.Array) -> bool:
  """Whether ``array`` is sharded over explicit mesh axes (``jax.set_mesh``), whose
  operations must spell out the shardings they cannot infer."""
  mesh = jax.typeof(array).sharding.mesh
  return any(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types)


def _replicated(array: jax.Array) -> jax.Array:
  """Per-silo values summed from sharded leaves, replicated like the rest of the
  per-silo state (under explicit sharding they keep the leaf's silo-axis sharding)."""
  if not explicitly_sharded(array):
    return array
  return jax.sharding.reshard(
    array, jax.typeof(array).sharding.update(spec=jax.sharding.PartitionSpec())
  )


def _take_slices(array: jax.Array, indices: jax.Array, axis: int) -> jax.Array:
  """``jnp.take(array, indices, axis)`` (clipped), under explicit sharding too,
  where the output sharding is the array's, replicated along ``axis``."""
  if not explicitly_sharded(array):
    return jnp.take(array, indices, axis=axis, mode="clip")
  sharding = jax.typeof(array).sharding
  spec = [*sharding.spec, *[None] * (array.ndim - len(sharding.spec))]
  spec[axis] = None
  out_sharding = sharding.update(spec=jax.sharding.PartitionSpec(*spec))
  index = (slice(None),) * axis + (indices,)
  return array.at[index].get(mode="clip", out_sharding=out_sharding)


def _constant(value: jax.Array | None) -> Callable[[], jax.Array] | None:
  return None if value is None else lambda: value


def _kth_largest(
  keys: list[Callable[[], jax.Array] | None],
  layout: SiloLayout,
  budgets: jax.Array,
  start: _Search,
  compact: bool = True,
) -> tuple[_Search, jax.Array]:
  """Radix search for the k-th largest key of every silo, from ``start``.

  Args:
    keys: per leaf a function giving its int32 keys in ``[0, 2^31)`` (evaluated
      inside each pass, so derived keys are never materialised), or ``None``.
    layout: the silo layout.
    budgets: ``(num_silos,)`` k per silo.
    start: initial intervals; silos with ``lo == last`` are taken as resolved.
    compact: whether leaves with few unresolved per-slice silos count just
      those (off for the tie-break's search, where it measured no gain and
      would add a gathered branch per leaf to compile).

  Returns:
    The resolved search and the number of passes it took. For each silo that was
    unresolved, ``lo`` is a key ``t`` with ``key_(k+1) < t ≤ key_(k)``: the k-th
    largest key when ties straddle ``k``, else possibly a cut between the two
    with exactly ``k`` keys at or above it (``count_at_least == k``).
  """
  num_slots = (1 << _DIGIT_BITS) + 2

  def one_pass(search: _Search) -> _Search:
    active = search.lo < search.last
    shift = jnp.maximum(_bit_length(search.last - search.lo) - _DIGIT_BITS, 0)
    thresholds = _slot_thresholds(search.lo, search.last, shift)
    leaf_counts = []
    for leaf_keys, leaf in zip(keys, layout.leaves, strict=True):
      if leaf is None:
        leaf_counts.append(None)
        continue
      silos = slice(leaf.offset, leaf.offset + leaf.num_silos)
      leaf_active, leaf_thresholds = active[silos], thresholds[silos]
      zeros = lambda n=leaf.num_silos: jnp.zeros((n, num_slots), jnp.int32)
      cap = leaf.num_silos // _COMPACT_FRACTION

      def counts_of_leaf(leaf_keys=leaf_keys, leaf=leaf, leaf_thresholds=leaf_thresholds):
        return _leaf_slot_counts(leaf_keys(), leaf, leaf_thresholds)

      def counts_of_unresolved(
        leaf_keys=leaf_keys,
        leaf=leaf,
        leaf_active=leaf_active,
        leaf_thresholds=leaf_thresholds,
        zeros=zeros,
        cap=cap,
      ) -> jax.Array:
        # Counts only the slices of the unresolved silos, gathered, so that the
        # late passes read a few keys. Slots left over index slice 0: they count
        # it again and write its counts once more.
        rank = jnp.cumsum(leaf_active, dtype=jnp.int32) - 1
        indices = (
          jnp.zeros(cap, jnp.int32)
          .at[jnp.where(leaf_active, rank, cap)]
          .set(jnp.arange(leaf.num_silos, dtype=jnp.int32), mode="drop")
        )
        counts = _leaf_slot_counts(
          _take_slices(leaf_keys(), indices, leaf.axis),
          leaf._replace(num_silos=cap),
          leaf_thresholds[indices],
        )
        return zeros().at[indices].set(counts)

      # Leaves whose silos are all resolved skip the pass over their keys; those
      # with few unresolved silos (at most one in _COMPACT_FRACTION) count just them.
      branches, bounds = [zeros, counts_of_leaf], [0]
      if compact and leaf.axis is not None and leaf.num_silos >= _COMPACT_FRACTION:
        branches.insert(1, counts_of_unresolved)
        bounds.append(cap)
      num_active = jnp.sum(leaf_active, dtype=jnp.int32)
      branch = jnp.sum(num_active > np.array(bounds, np.int32), dtype=jnp.int32)
      leaf_counts.append(lax.switch(branch, branches))
    slot_counts = _join_silos(leaf_counts, layout)
    # Narrowed on copies gathered by explicit indices, which the SPMD partitioner
    # replicates. Left in place, the per-silo state took the sharding of a leaf's
    # row counts (uneven shards) and the partitioner miscomputed the narrowing
    # (tests/test_selection.py::test_sharded_equals_unsharded_without_gathering).
    silo_ids = np.arange(layout.num_silos)
    return _narrow(
      _Search(*(field[silo_ids] for field in search)),
      slot_counts[silo_ids],
      budgets[silo_ids],
      shift[silo_ids],
    )

  return lax.while_loop(
    lambda carry: jnp.any(carry[0].lo < carry[0].last),
    lambda carry: (one_pass(carry[0]), carry[1] + 1),
    (start, jnp.int32(0)),
  )


def _resolved(budgets: jax.Array, start_lo: jax.Array, start_last: jax.Array) -> _Search:
  """A search state; silos with a zero budget start resolved above every key."""
  frozen = budgets <= 0
  zero = jnp.zeros_like(budgets)
  return _Search(
    jnp.where(frozen, _MAX_KEY, start_lo),
    jnp.where(frozen, _MAX_KEY, start_last),
    zero,
    zero,
  )


def _warm_start(budgets: jax.Array, warm_start: WarmStart | None) -> _Search:
  """The first interval: a window around the extrapolated threshold, else all keys.

  The window is centred on the key of ``c = t + m`` (``m`` the last change, 0 if
  unknown) and ``2^w`` keys wide, ``w = bit_length(|key(c + s) − key(c)|) +
  _WARM_MARGIN_BITS`` for the spread ``s``, the last error but at least
  ``|m| / 8``, or else the last change, rounded up to whole digits (a window of
  a whole number of digits costs no more passes than its width needs); with
  neither, ``w = _WARM_WINDOW_BITS``.
  Windows of 31 bits or more, and thresholds that are not positive and finite,
  start cold.
  """
  cold = _resolved(budgets, jnp.zeros_like(budgets), jnp.full_like(budgets, _MAX_KEY))
  if warm_start is None:
    return cold
  known = lambda value: jnp.where(jnp.isfinite(value), value, 0.0)
  centre_value = jnp.maximum(warm_start.threshold + known(warm_start.change), 0.0)
  # A finite error implies a finite change (it is the difference of two changes).
  error_floor = jnp.abs(warm_start.change) * 2.0**-_TREND_TRUST_BITS
  spread = jnp.where(
    jnp.isfinite(warm_start.error),
    jnp.maximum(jnp.abs(warm_start.error), error_floor),
    warm_start.change,
  )
  # NaN keys lie above the infinity key, so NaN thresholds start cold.
  last_key = distance_keys(warm_start.threshold)
  centre = distance_keys(centre_value)
  spread_keys = jnp.abs(distance_keys(centre_value + jnp.abs(known(spread))) - centre)
  wanted_bits = jnp.where(
    jnp.isfinite(spread), _bit_length(spread_keys) + _WARM_MARGIN_BITS, _WARM_WINDOW_BITS
  )
  window_bits = _DIGIT_BITS * -(-wanted_bits // _DIGIT_BITS)
  usable = (
    (last_key > 0) & (last_key < _INFINITY_KEY) & (centre < _INFINITY_KEY) & (window_bits < 31)
  )
  half_width = lax.shift_left(jnp.int32(1), jnp.clip(window_bits - 1, 0, 30))
  lo = jnp.maximum(centre - half_width, 0)
  last = centre + jnp.minimum(half_width - 1, _MAX_KEY - centre)
  warm = _resolved(budgets, lo, last)
  return _Search(*(jnp.where(usable, w, c) for w, c in zip(warm, cold, strict=True)))


def _reversed_positions(shape: tuple[int, ...], leaf: LeafSilos, base: int) -> jax.Array:
  """Per coordinate, ``2^31 − 2 − position`` in silo order (a tie-break key).

  Positions run over the silo (leaf order, then row-major) from ``base``, the
  position of the leaf's first coordinate; per-slice silos count row-major over
  the axes other than the silo axis.
  """
  # Built from per-axis iotas, not a reshaped flat iota, so that it shards.
  position = jnp.int32(base)
  stride = 1
  for axis in reversed(range(len(shape))):
    if axis != leaf.axis:
      position = position + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
      stride *= shape[axis]
  return _MAX_KEY - 1 - position


def select_top_k(
  keys: list[jax.Array | None],
  layout: SiloLayout,
  budgets: jax.Array,
  warm_start: WarmStart | None = None,
) -> Selection:
  """Selects, per silo, the ``budgets`` coordinates with the largest keys.

  Exact for any start: ``warm_start`` only decides how many passes the search
  needs: ``ceil(w / 3)`` for a window of ``2^w`` keys that holds the new
  threshold (a few when the threshold creeps as it did last time; 8 when only the
  last threshold is known and Δ's k-th largest moved by less than ~25%), a few
  more when it misses; at most 11 from a cold start. A search ends earlier when a slot
  starts between the k-th and the (k+1)-th largest key.

  Args:
    keys: per leaf the :func:`distance_keys` of Δ, or ``None`` if unconstrained.
    layout: the silo layout the keys follow.
    budgets: ``(num_silos,)`` int32 number of coordinates to select per silo.
    warm_start: optional guess of where the k-th largest Δ lies (e.g. the last
      steps' thresholds); wrong, stale or NaN guesses are fine.

  Returns:
    The :class:`Selection`: exactly ``min(k_S, #{Δ > 0})`` coordinates per silo,
    ties at the threshold to the lowest positions in silo order.

  Under ``jax.vmap`` the members are selected one after another (``lax.map``):
  batched, the conditionals become selects that compute both branches, and a
  compiler may then rebuild the keys for the masks outside the one array the
  search counted, rounding them differently (see below).
  """

  @jax.custom_batching.custom_vmap
  def select(keys: list[jax.Array | None], budgets: jax.Array, warm_start: WarmStart | None):
    return _select_top_k(keys, layout, budgets, warm_start)

  @select.def_vmap
  def select_each(axis_size: int, in_batched: tuple, *args) -> tuple[Selection, Selection]:
    per_member = jax.tree.map(
      lambda value, batched: (
        value if batched else jnp.broadcast_to(value, (axis_size, *value.shape))
      ),
      tuple(args),
      tuple(in_batched),
    )
    selections = lax.map(lambda member_args: select(*member_args), per_member)
    return selections, jax.tree.map(lambda _: True, selections)

  return select(keys, jnp.asarray(budgets, jnp.int32), warm_start)


def _select_top_k(
  keys: list[jax.Array | None],
  layout: SiloLayout,
  budgets: jax.Array,
  warm_start: WarmStart | None,
) -> Selection:
  """:func:`select_top_k` of one set of keys."""
  if layout.num_silos == 0:
    no_silos = jnp.zeros(0, jnp.int32)
    return Selection([None] * len(keys), no_silos.astype(jnp.float32), no_silos, jnp.int32(0))
  shapes = [None if k is None else k.shape for k in keys]
  silo_bases = _leaf_silo_bases(layout, shapes)
  start = _warm_start(budgets, warm_start)
  found, num_passes = _kth_largest([_constant(k) for k in keys], layout, budgets, start)
  threshold = found.lo
  positive = (threshold > 0) & (budgets > 0)
  # Ties at a positive threshold that straddle the budget are broken by position;
  # ties at zero are never selected since those coordinates equal the seed.
  ties_needed = jnp.where(positive, budgets - found.count_above, 0)
  num_selected = found.count_above + ties_needed
  straddling = positive & (found.count_at_least > budgets)

  def tied_positions(leaf_keys: jax.Array, leaf: LeafSilos, base: int) -> jax.Array:
    """Reversed positions of the coordinates tied at the threshold, 0 elsewhere."""
    tied = leaf_keys == silo_values_for_leaf(threshold, leaf, leaf_keys.ndim)
    return jnp.where(tied, _reversed_positions(leaf_keys.shape, leaf, base), 0)

  def position_cutoff(keys: list[jax.Array | None]) -> jax.Array:
    """Per silo a cut: the ties to take are those with reversed position ≥ it."""
    tie_keys = [
      None if leaf is None else functools.partial(tied_positions, leaf_keys, leaf, base)
      for leaf_keys, leaf, base in zip(keys, layout.leaves, silo_bases, strict=True)
    ]
    needed = jnp.where(straddling, ties_needed, 0)
    lowest = jnp.asarray(_MAX_KEY - layout.silo_sizes, jnp.int32)
    start = _resolved(needed, lowest, jnp.full_like(needed, _MAX_KEY - 1))
    found_ties, _ = _kth_largest(tie_keys, layout, needed, start, compact=False)
    return jnp.where(straddling, found_ties.lo, 0)

  def masks_for(cutoff: jax.Array | None, keys: list[jax.Array | None]) -> list[jax.Array | None]:
    """Keys above the threshold, and ties at a positive one from ``cutoff`` on.

    Without a cutoff every tie is taken.
    """
    masks = []
    for leaf_keys, leaf, base in zip(keys, layout.leaves, silo_bases, strict=True):
      if leaf is None:
        masks.append(None)
        continue
      per_leaf = functools.partial(silo_values_for_leaf, leaf=leaf, ndim=leaf_keys.ndim)
      leaf_threshold = per_leaf(threshold)
      take_tie = (leaf_keys == leaf_threshold) & per_leaf(positive)
      if cutoff is not None:
        take_tie &= _reversed_positions(leaf_keys.shape, leaf, base) >= per_leaf(cutoff)
      masks.append((leaf_keys > leaf_threshold) | take_tie)
    return masks

  # The masks are computed inside the branches, from the keys as branch operands:
  # a compiler that recomputed the keys for the masks outside (fusing their
  # producer again) could round them differently (e.g. contracting p + a·b into
  # an FMA in one place only) and select a different set than the search counted.
  # Without straddling ties the positions are not needed.
  masks = lax.cond(
    jnp.any(straddling),
    lambda keys: masks_for(position_cutoff(keys), keys),
    lambda keys: masks_for(None, keys),
    keys,
  )
  threshold_value = lax.bitcast_convert_type(threshold, jnp.float32)
  return Selection(masks, threshold_value, num_selected, num_passes)
