"""Exactness of the radix selection against the sort-based NumPy reference."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import export
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import dst_optax
from dst_optax import _selection, _silos
from tests import reference

# Mixed sizes exercise silos of thousands of coordinates, of one coordinate and
# a group spanning leaves of different shapes.
SHAPES = ((6, 5), (1,), (3, 4, 2), (70, 64), (2, 1))
SPEC_KINDS = {
  "per_tensor": lambda shape, i: dst_optax.PerTensor(),
  "rows": lambda shape, i: dst_optax.rows() if len(shape) > 1 else dst_optax.PerTensor(),
  "columns": lambda shape, i: dst_optax.columns() if len(shape) > 1 else dst_optax.PerTensor(),
  "global": lambda shape, i: dst_optax.Global(),
  "groups": lambda shape, i: dst_optax.Group(f"g{i % 2}"),
}
FRACTIONS = (1e-6, 1e-4, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0)
# Each silo kind costs one compilation; the others run with the slow tests.
FAST_KINDS = ("global", "per_tensor", "rows")
KINDS = [
  k if k in FAST_KINDS else pytest.param(k, marks=pytest.mark.slow) for k in sorted(SPEC_KINDS)
]
DELTA_KINDS = ("random", "ties", "all_equal", "all_zero", "sparse", "wide_range")


def specs_of(kind: str, shapes=SHAPES) -> list[dst_optax.SiloSpec]:
  return [SPEC_KINDS[kind](shape, i) for i, shape in enumerate(shapes)]


def make_deltas(rng: np.random.Generator, kind: str, shapes=SHAPES) -> list[np.ndarray]:
  """Non-negative float32 distances with the patterns selection must survive."""
  deltas = []
  for shape in shapes:
    if kind == "random":
      delta = rng.random(shape)
    elif kind == "ties":
      delta = rng.integers(0, 4, shape) * 0.25
    elif kind == "all_equal":
      delta = np.full(shape, 0.5)
    elif kind == "all_zero":
      delta = np.zeros(shape)
    elif kind == "sparse":
      delta = rng.random(shape) * (rng.random(shape) < 0.1)
    else:
      delta = np.abs(rng.normal(size=shape)) * 10.0 ** rng.integers(-30, 30, shape)
    deltas.append(np.asarray(delta, np.float32))
  return deltas


class Selector:
  """Jitted selection per silo kind, compiled once per layout.

  Budgets and the warm start are traced; no warm start is a NaN threshold, which
  the selection treats like any unusable guess (a cold start); an unknown change
  or error is NaN too.
  """

  def __init__(self, shapes=SHAPES):
    self.shapes = shapes
    self.compiled = {}

  def layout(self, kind: str) -> _silos.SiloLayout:
    params = {f"leaf{i}": jnp.zeros(shape) for i, shape in enumerate(self.shapes)}
    tree = {f"leaf{i}": spec for i, spec in enumerate(specs_of(kind, self.shapes))}
    return _silos.build_layout(params, tree)

  def __call__(self, kind, deltas, fraction, threshold=np.nan, change=np.nan, error=np.nan):
    layout = self.layout(kind)
    if kind not in self.compiled:
      self.compiled[kind] = jax.jit(functools.partial(_selection.select_top_k, layout=layout))
    keys = [_selection.distance_keys(jnp.asarray(d)) for d in deltas]
    per_silo = lambda value: jnp.broadcast_to(jnp.asarray(value, jnp.float32), (layout.num_silos,))
    return self.compiled[kind](
      keys,
      budgets=layout.budgets(fraction),
      warm_start=_selection.WarmStart(per_silo(threshold), per_silo(change), per_silo(error)),
    )


@pytest.fixture(scope="module")
def selector() -> Selector:
  return Selector()


def expected_masks(kind, deltas, fraction, shapes=SHAPES):
  zeros = [np.zeros_like(d) for d in deltas]
  return reference.select(deltas, zeros, specs_of(kind, shapes), fraction)


def assert_same_selection(selection, kind, deltas, fraction, shapes=SHAPES):
  want_masks = expected_masks(kind, deltas, fraction, shapes)
  for want, have in zip(want_masks, selection.masks, strict=True):
    np.testing.assert_array_equal(np.asarray(have), want)
  want_counts = sum(int(m.sum()) for m in want_masks)
  assert int(np.sum(selection.num_selected)) == want_counts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("delta_kind", DELTA_KINDS)
def test_matches_reference_for_every_fraction(selector, kind, delta_kind):
  rng = np.random.default_rng(0)
  for fraction in FRACTIONS:
    deltas = make_deltas(rng, delta_kind)
    assert_same_selection(selector(kind, deltas, fraction), kind, deltas, fraction)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
  "previous", [0.0, 0.5, 1e-30, 1e30, np.inf, np.nan, -0.25, 3.4e38], ids=repr
)
def test_any_warm_start_is_exact(selector, kind, previous):
  """Wrong, stale, infinite or NaN thresholds and moves only change the number of passes."""
  rng = np.random.default_rng(1)
  for fraction, delta_kind in [(0.01, "random"), (0.3, "ties"), (0.5, "wide_range")]:
    deltas = make_deltas(rng, delta_kind)
    for change, error in [
      (np.nan, np.nan),
      (0.0, 0.0),
      (1e-3, np.nan),
      (-previous, 1e-3),
      (np.inf, -np.inf),
    ]:
      selection = selector(kind, deltas, fraction, previous, change, error)
      assert_same_selection(selection, kind, deltas, fraction)


@pytest.mark.parametrize("delta_kind", ["random", "ties"])
def test_threshold_separates_the_selection(selector, delta_kind):
  """The threshold lies in (Δ_(k+1), Δ_(k)], and is Δ_(k) when ties straddle k."""
  rng = np.random.default_rng(2)
  deltas = make_deltas(rng, delta_kind)
  for fraction in (0.01, 0.3, 0.9):
    threshold = np.asarray(selector("per_tensor", deltas, fraction).threshold)
    for delta, value in zip(deltas, threshold, strict=True):
      budget = math.floor(fraction * delta.size)
      descending = np.append(np.sort(delta.ravel())[::-1], -np.inf)
      kth, next_one = descending[budget - 1], descending[budget]
      if budget == 0:
        assert np.isnan(value)
      elif kth == next_one:
        assert value == kth
      else:
        assert next_one < value <= kth


def test_warm_started_threshold_is_reused(selector):
  """Feeding the threshold back in (as the transformation does) stays exact."""
  rng = np.random.default_rng(3)
  threshold = None
  for step in range(4):
    deltas = [d * (1.0 + 0.05 * step) for d in make_deltas(rng, "random")]
    selection = selector("rows", deltas, 0.1, threshold if threshold is not None else np.nan)
    assert_same_selection(selection, "rows", deltas, 0.1)
    threshold = selection.threshold


def paired_keys(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Δ ≈ 0.95 whose keys are consecutive integers, each taken twice, shuffled.

  Every count of keys at or above a value is even, so for an odd k no value has
  exactly k above it (Δ_(k) = Δ_(k+1)): the search must pin the k-th key itself.
  """
  first = int(np.float32(0.95).view(np.int32))
  keys = first + rng.permutation(math.prod(shape)).astype(np.int32) // 2
  return keys.view(np.float32).reshape(shape)


@pytest.mark.parametrize("shape", [(128, 128), (64,)], ids=str)
def test_extrapolated_warm_start_saves_passes(shape):
  """A threshold extrapolated to within its window takes the fewest passes."""
  selector = Selector((shape,))
  delta = paired_keys(np.random.default_rng(5), shape)
  fraction = 0.05  # k = 819 and 3: odd
  kth = np.sort(delta.ravel())[::-1][math.floor(fraction * delta.size) - 1]
  # The search must pin the k-th key: 3 bits a pass, whatever the silo size.
  # Cold: 31 bits, 11 passes. Last step the threshold was 0.1% lower and rose by
  # 0.1% (~2^14 keys of Δ≈0.95): a window of 2^18 keys, 6 passes. Knowing that
  # the rise was as predicted within 1e-6 (~2^4 keys) trusts it to 1/8 of the
  # rise (~2^11 keys), 2^15, 5 passes. A rise of 1e-5 predicted within 1e-6:
  # 2^9, 3 passes; at the exact threshold, 1.
  passes = (11, 6, 5, 3, 1)
  last, change = kth * 0.999, kth * 0.001
  starts = [
    (np.nan, np.nan, np.nan),
    (last, change, np.nan),
    (last, change, kth * 1e-6),
    (kth * (1 - 1e-5), kth * 1e-5, kth * 1e-6),
    (kth, 0.0, 0.0),
  ]
  for start, want_passes in zip(starts, passes, strict=True):
    selection = selector("per_tensor", [delta], fraction, *start)
    assert_same_selection(selection, "per_tensor", [delta], fraction, (shape,))
    assert int(selection.num_passes) == want_passes, start
  # A wrong extrapolation costs passes, not exactness.
  selection = selector("per_tensor", [delta], fraction, last, -change, kth * 1e-6)
  assert_same_selection(selection, "per_tensor", [delta], fraction, (shape,))
  assert int(selection.num_passes) > passes[2]


def test_late_passes_count_the_unresolved_rows_alone():
  """Passes over a leaf with at most 1/8 of its rows unresolved gather just those rows.

  Every row holds paired keys and an odd budget, so each needs its k-th key
  pinned. Warm-started at that key, 60 of 64 rows resolve in one pass; the 4
  cold rows (the first and last among them) take 11, the last 10 with the leaf
  in its gathered branch; their selections must still match the reference.
  """
  shape = (64, 32)
  selector = Selector((shape,))
  rng = np.random.default_rng(6)
  delta = np.stack([paired_keys(rng, (32,)) * (1 + row / 64) for row in range(64)])
  fraction = 0.1  # k = 3 per row: odd
  kth = np.sort(delta, axis=1)[:, ::-1][:, 2].astype(np.float32)
  cold = [0, 17, 40, 63]
  threshold = kth.copy()
  threshold[cold] = np.nan
  selection = selector("rows", [delta], fraction, threshold, np.zeros(64), np.zeros(64))
  assert_same_selection(selection, "rows", [delta], fraction, (shape,))
  assert int(selection.num_passes) == 11


def test_a_cut_between_distinct_keys_ends_the_search():
  """Where Δ_(k) and Δ_(k+1) lie far apart, a slot start between them is the answer."""
  shape = (64,)
  selector = Selector((shape,))
  # Keys 2^20 apart: a cold search is done once its buckets are narrower than
  # that, ceil((31 - 20) / 3) = 4 passes instead of 11.
  delta = (np.float32(0.5).view(np.int32) + (np.arange(64, dtype=np.int32) << 20)).view(np.float32)
  selection = selector("per_tensor", [delta], 0.05)
  assert_same_selection(selection, "per_tensor", [delta], 0.05, (shape,))
  assert int(selection.num_passes) == 4


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  kind=st.sampled_from(FAST_KINDS),
  fraction=st.floats(1e-6, 1.0),
  seed=st.integers(0, 2**16),
  levels=st.integers(1, 6),
  previous=st.floats(0.0, 2.0) | st.just(float("nan")),
  change=st.floats(-2.0, 2.0) | st.just(float("nan")),
  error=st.floats(-1.0, 1.0) | st.just(float("nan")),
)
def test_invariants(selector, kind, fraction, seed, levels, previous, change, error):
  """Exact budget, and every selected Δ ≥ every unselected Δ of the same silo."""
  rng = np.random.default_rng(seed)
  deltas = [(rng.integers(0, levels, s) / levels).astype(np.float32) for s in SHAPES]
  selection = selector(kind, deltas, fraction, previous, change, error)
  assert_same_selection(selection, kind, deltas, fraction)


def sharded_setup():
  """A mesh over the 8 fake CPU devices and a tree that splits across it."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  # Silos long enough that per-silo bookkeeping (counts per row) stays smaller
  # than any leaf: gathering that is fine, gathering a leaf is not.
  shapes = ((128, 128), (16, 128), (2048,))
  sharding = [
    NamedSharding(mesh, PartitionSpec("data", "model")),
    NamedSharding(mesh, PartitionSpec("model", "data")),
    NamedSharding(mesh, PartitionSpec(("data", "model"))),
  ]
  return shapes, sharding


@pytest.mark.parametrize(
  "kind", ["rows", *(pytest.param(k, marks=pytest.mark.slow) for k in ("columns", "global"))]
)
def test_sharded_equals_unsharded_without_gathering(kind):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  shapes, shardings = sharded_setup()
  selector = Selector(shapes)
  layout = selector.layout(kind)
  rng = np.random.default_rng(4)
  deltas = make_deltas(rng, "ties", shapes)
  keys = [
    jax.device_put(_selection.distance_keys(jnp.asarray(d)), s)
    for d, s in zip(deltas, shardings, strict=True)
  ]
  budgets = layout.budgets(0.1)
  select = jax.jit(lambda keys, budgets: _selection.select_top_k(keys, layout, budgets).masks)
  sharded = select(keys, budgets)
  unsharded = selector(kind, deltas, 0.1).masks
  for have, want in zip(sharded, unsharded, strict=True):
    np.testing.assert_array_equal(np.asarray(have), np.asarray(want))
  hlo = select.lower(keys, budgets).compile().as_text()
  smallest_leaf = min(math.prod(shape) for shape in shapes)
  for line in hlo.splitlines():
    if "all-gather(" in line or "all-to-all(" in line:
      result_shape = line.split("=")[1].split("all-")[0]
      dims = [int(d) for d in result_shape.split("[")[1].split("]")[0].split(",") if d]
      assert math.prod(dims) < smallest_leaf, f"parameter-sized gather: {line.strip()}"


@pytest.mark.parametrize(
  ("shape", "axis"), [((70, 64), None), ((3, 4, 2), None), ((5,), None), ((70, 64), 0), ((6, 5), 1)]
)
def test_silo_sums_match_numpy(shape, axis):
  leaf = _silos.LeafSilos(axis=axis, offset=0, num_silos=1 if axis is None else shape[axis])
  rng = np.random.default_rng(0)
  operands = tuple(rng.integers(0, 2, shape).astype(np.int32) for _ in range(3))
  sums = jax.jit(lambda *operands: _selection._silo_sums(operands, leaf))(*operands)
  summed_axes = tuple(a for a in range(len(shape)) if a != axis)
  for have, operand in zip(sums, operands, strict=True):
    np.testing.assert_array_equal(have, operand.sum(axis=summed_axes).reshape(leaf.num_silos))


def test_silo_sums_reduce_to_scalars_at_once_except_on_cpu():
  """Off CPU a sharded one-silo leaf must all-reduce scalars, not its rows' partial sums."""
  leaf = _silos.LeafSilos(axis=None, offset=0, num_silos=1)
  sums = jax.jit(lambda a, b: _selection._silo_sums((a, b), leaf))
  operand = jnp.ones((8, 16), jnp.int32)
  reduced_axes = {
    platform: re.findall(
      r"across dimensions = \[([0-9, ]*)\]",
      export.export(sums, platforms=[platform])(operand, operand).mlir_module(),
    )
    for platform in ("cpu", "cuda", "tpu")
  }
  assert reduced_axes == {"cpu": ["1", "0"], "cuda": ["0, 1"], "tpu": ["0, 1"]}
