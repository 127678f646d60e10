"""Same-process A/B of the selection code against another git revision's.

Loads ``dst_optax/_selection.py`` and ``dst_optax/_transform.py`` as they were at
``--base`` (``git show``) and, for each size, silo kind and ε, compiles adam + DST twice,
with those modules and with the working tree's, and times both interleaved with adam
alone (medians of ``--repeats``). On a shared machine host noise moves whole rows of a
table; timed side by side in one process it moves both variants alike. Then a short adamw
run on a small tree with noisy gradients checks that both variants select the same sets
(the params stay bit-identical) and counts the search passes each took::

  python benchmarks/selection_ab.py --base 7471f8e

With ``--base-without-search`` the base skips its threshold search (its selections are
wrong; no training check): what it times are the step's fixed loops, the floor that no
search can go below::

  python benchmarks/selection_ab.py --base HEAD --base-without-search --gradients noisy

The base's transformation must keep the working tree's state fields.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import subprocess
import types
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import selection

import dst_optax
from dst_optax import _transform

_REPO = pathlib.Path(__file__).resolve().parents[1]


def module_at(revision: str, path: str) -> types.ModuleType:
  """The library module at ``path`` as committed at ``revision``, as a fresh module."""
  source = subprocess.run(
    ["git", "show", f"{revision}:{path}"], cwd=_REPO, capture_output=True, text=True, check=True
  ).stdout
  module = types.ModuleType(f"{pathlib.Path(path).stem}_at_{revision}")
  exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
  return module


def transformation_at(revision: str) -> types.ModuleType:
  """``_transform`` at ``revision``, selecting with ``_selection`` at ``revision``.

  Its state type is the working tree's, so that ``dst_optax.find_state`` finds it.
  """
  transform = module_at(revision, "dst_optax/_transform.py")
  transform._selection = module_at(revision, "dst_optax/_selection.py")
  transform.DynamicSubsetTuningState = _transform.DynamicSubsetTuningState
  return transform


def without_search(transform: types.ModuleType) -> types.ModuleType:
  """``transform`` with its threshold search skipped: each start counts as resolved.

  Every other loop of the step stays (adam's update, the keys of Δ, the masks, the
  entry/exit counts, the final update), so its time is what DST costs beyond the
  search. Its selections are not the top-k: for timing only.
  """
  transform._selection._kth_largest = lambda keys, layout, budgets, start, compact=True: (
    start._replace(last=start.lo),
    jnp.int32(0),
  )
  return transform


@contextlib.contextmanager
def selection_code(transform: types.ModuleType | None) -> Iterator[None]:
  """Builds DST from ``transform`` (``None``: the working tree's)."""
  saved = dst_optax.dynamic_subset_tuning
  dst_optax.dynamic_subset_tuning = (transform or _transform).dynamic_subset_tuning
  try:
    yield
  finally:
    dst_optax.dynamic_subset_tuning = saved


def time_side_by_side(args: argparse.Namespace, base: types.ModuleType) -> list[dict[str, Any]]:
  """Prints and returns, per row, both variants' ratios to adam alone and their search passes."""
  variants = {"base": base, "ours": None}
  rows = []
  for size in args.sizes:
    # The tables' inputs, so that both runs measure the same steps.
    params, grads = selection.benchmark_inputs(size, args.gradients)
    adam_step, _ = selection.SteadyStateSteps(params, grads).step("adam", 1.0, "per_tensor")
    # One cache per variant: each compiles once per silo kind (ε is injected).
    steps = {name: selection.SteadyStateSteps(params, grads, args.gradients) for name in variants}
    for silo_kind in args.silos:
      for fraction in args.fractions:
        timed, passes = [], {}
        for name, module in variants.items():
          with selection_code(module):
            step, info = steps[name].step("ours", fraction, silo_kind)
          timed.append(step)
          passes[name] = int(dst_optax.find_state(info["carry"][1]).num_passes)
        (adam_seconds, base_seconds, ours_seconds), _ = selection.interleaved_medians(
          [adam_step, *timed], args.repeats
        )
        print(
          f"{size:>10} {silo_kind:>10} eps={fraction:<7g} adam {adam_seconds * 1e3:7.1f} ms  "
          f"base {base_seconds / adam_seconds:5.2f}x ({passes['base']})  "
          f"ours {ours_seconds / adam_seconds:5.2f}x ({passes['ours']})  "
          f"ours/base {ours_seconds / base_seconds:.3f}",
          flush=True,
        )
        rows.append(
          {
            "size": size,
            "silos": silo_kind,
            "fraction": fraction,
            "ratios": {"base": base_seconds / adam_seconds, "ours": ours_seconds / adam_seconds},
            "passes": passes,
          }
        )
  return rows


def noisy_grads(params: dict[str, jax.Array], index: int) -> dict[str, jax.Array]:
  """A gradient that changes with the params and the step, plus Gaussian noise."""
  noise = jax.random.key(index)
  return {
    name: jnp.sin(p * (index + 1)) + 0.1 * jax.random.normal(noise, p.shape)
    for name, p in params.items()
  }


def noisy_training(silos: Any, num_steps: int) -> tuple[list[np.ndarray], int]:
  """Params after ``num_steps`` of adamw + DST (ε = 5%) on noisy gradients, and total passes."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    "a": jax.random.normal(keys[0], (64, 96)),
    "b": jax.random.normal(keys[1], (96,)),
    "c": jax.random.normal(keys[2], (32, 32)),
  }
  tx = optax.chain(
    optax.adamw(3e-2, weight_decay=0.1), dst_optax.dynamic_subset_tuning(0.05, silos=silos)
  )

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, total_passes = tx.init(params), 0
  for index in range(num_steps):
    params, state = step(params, state, noisy_grads(params, index))
    total_passes += int(dst_optax.find_state(state).num_passes)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(params)], total_passes


def compare_training(base: types.ModuleType, num_steps: int) -> dict[str, dict[str, Any]]:
  """Whether both variants train to the same bits, and their total search passes, per silo kind."""
  silo_kinds = {
    "per_tensor": dst_optax.PerTensor(),
    "rows": lambda path, leaf: dst_optax.rows() if leaf.ndim == 2 else dst_optax.PerTensor(),
    "global": dst_optax.Global(),
  }
  results = {}
  for name, silos in silo_kinds.items():
    with selection_code(base):
      base_params, base_passes = noisy_training(silos, num_steps)
    ours_params, ours_passes = noisy_training(silos, num_steps)
    identical = all(
      np.array_equal(b.view(np.int32), o.view(np.int32))
      for b, o in zip(base_params, ours_params, strict=True)
    )
    print(
      f"noisy adamw, {num_steps} steps, {name:>10}: params bit-identical {identical}; "
      f"search passes base {base_passes}, ours {ours_passes}",
      flush=True,
    )
    results[name] = {"identical": identical, "base_passes": base_passes, "ours_passes": ours_passes}
  return results


def main() -> dict[str, Any]:
  """Runs the comparison: the timed rows and the training check (``None`` without search)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", required=True, help="git revision to compare against")
  parser.add_argument("--sizes", nargs="+", default=["16M-square", "16M"], choices=selection.SIZES)
  parser.add_argument(
    "--silos", nargs="+", default=list(selection.SILO_KINDS), choices=selection.SILO_KINDS
  )
  parser.add_argument("--fractions", nargs="+", type=float, default=[1e-4, 1e-2, 0.1])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--training-steps", type=int, default=30)
  parser.add_argument("--gradients", default="repeated", choices=selection.GRADIENTS)
  parser.add_argument(
    "--base-without-search",
    action="store_true",
    help="skip the base's threshold search: time the step's fixed loops (no training check)",
  )
  args = parser.parse_args()
  warnings.filterwarnings("ignore", message="fraction_of_free_params=")
  base = transformation_at(args.base)
  if args.base_without_search:
    return {"timings": time_side_by_side(args, without_search(base)), "training": None}
  return {
    "timings": time_side_by_side(args, base),
    "training": compare_training(base, args.training_steps),
  }


if __name__ == "__main__":
  main()
