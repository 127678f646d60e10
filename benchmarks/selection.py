"""Speed of silo-wise selection: adam + DST versus adam alone.

Measures, in one process, median wall times of jitted optimizer updates on a
T5-shaped parameter tree (or the 16 × 1024² tree the targets were calibrated on):

* ``adam``: ``optax.adam(...).update`` alone (the unit of the ratios);
* ``ours``: ``optax.chain(optax.adam(...), dst_optax.dynamic_subset_tuning(ε))``,
  timed in steady state (the state comes from 10 earlier steps, so the search
  is warm-started from the threshold's trend as in training; the table gives
  the passes the last timed search took);
* ``quantile``: adam + DST with the paper's literal per-silo ``jnp.quantile``;
* ``top_k``: adam + DST with ``lax.top_k`` per silo.

Sizes: ~1M, ~16M and ~107M parameters (T5-shaped) and ``16M-square``; silos per
tensor or per row; ε over ``--fractions``. Prints a table of ratios to adam alone
and writes JSON and a PNG.

Run ``python benchmarks/selection.py --help`` for the subset flags.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import dst_optax

LEARNING_RATE = 1e-3
# Steps before timing, so that the warm start has a trend. With repeated gradients:
# three fresh ones, then the timed one's; with noisy ones the cycle runs on.
WARMUP_STEPS = 10
NUM_GRADIENTS = 4
# "repeated": the timed steps repeat one gradient, so adam's steps crowd Δ at one
# learning rate (ties everywhere, the search's hard case). "noisy": a fixed
# signal plus fresh noise of the same scale every step (cycling NUM_GRADIENTS
# draws), as in training: Δ spreads out and the thresholds jitter.
GRADIENTS = ("repeated", "noisy")
METHODS = ("ours", "quantile", "top_k")
SILO_KINDS = ("per_tensor", "rows")
# d_model, d_ff, vocabulary, encoder layers = decoder layers; about 1M, 16M, 107M params.
T5_SHAPES = {"1M": (128, 512, 2048, 2), "16M": (256, 1024, 32128, 4), "100M": (768, 3072, 32128, 5)}
# Number and side of square matrices: the tree the and DESIGN.md's costs were measured on.
SQUARE_SHAPES = {"16M-square": (16, 1024)}
SIZES = (*T5_SHAPES, *SQUARE_SHAPES)


def t5_shaped_params(size: str, key: jax.Array) -> dict[str, Any]:
  """A T5 encoder-decoder parameter tree (shared embedding, attention, MLPs, norms)."""
  d_model, d_ff, vocabulary, num_layers = T5_SHAPES[size]
  shapes: dict[str, tuple[int, ...]] = {"token_embedder": (vocabulary, d_model)}
  attention = {f"{name}": (d_model, d_model) for name in ("query", "key", "value", "out")}
  mlp = {"wi": (d_model, d_ff), "wo": (d_ff, d_model)}
  for layer in range(num_layers):
    for name, shape in {**attention, **mlp, "pre_attention_norm": (d_model,)}.items():
      shapes[f"encoder/layer{layer}/{name}"] = shape
    for block in ("self_attention", "cross_attention"):
      for name, shape in attention.items():
        shapes[f"decoder/layer{layer}/{block}/{name}"] = shape
    for name, shape in {**mlp, "pre_mlp_norm": (d_model,)}.items():
      shapes[f"decoder/layer{layer}/{name}"] = shape
  keys = jax.random.split(key, len(shapes))
  return {
    name: jax.random.normal(k, shape, jnp.float32) / math.sqrt(shape[0])
    for k, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


def square_params(size: str, key: jax.Array) -> dict[str, jax.Array]:
  """``count`` independent ``side × side`` matrices."""
  count, side = SQUARE_SHAPES[size]
  keys = jax.random.split(key, count)
  return {f"w{i}": jax.random.normal(k, (side, side)) / math.sqrt(side) for i, k in enumerate(keys)}


def benchmark_params(size: str, key: jax.Array) -> dict[str, jax.Array]:
  """The parameter tree named ``size`` (see :data:`SIZES`)."""
  return square_params(size, key) if size in SQUARE_SHAPES else t5_shaped_params(size, key)


def random_grads(params: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
  """Gaussian gradients of scale 1e-2, a fresh draw per key."""
  keys = jax.random.split(key, len(params))
  return {
    name: 1e-2 * jax.random.normal(k, leaf.shape)
    for k, (name, leaf) in zip(keys, params.items(), strict=True)
  }


def check_gradients(gradients: str) -> str:
  if gradients not in GRADIENTS:
    raise ValueError(f"gradients must be one of {GRADIENTS}; got {gradients!r}")
  return gradients


def benchmark_inputs(
  size: str, gradients: str = "repeated"
) -> tuple[dict[str, jax.Array], list[dict[str, jax.Array]]]:
  """The params named ``size`` and the steady-state steps' gradients (see :data:`GRADIENTS`)."""
  check_gradients(gradients)
  params = benchmark_params(size, jax.random.key(0))
  draws = [random_grads(params, jax.random.key(step)) for step in range(NUM_GRADIENTS)]
  if gradients == "noisy":
    signal = random_grads(params, jax.random.key(NUM_GRADIENTS))
    draws = [jax.tree.map(jnp.add, signal, noise) for noise in draws]
  return params, draws


def _silo_axis(silo_kind: str, leaf: jax.Array) -> int | None:
  """The silo axis of a leaf: ``None`` for one silo, 0 for rows of a matrix."""
  return 0 if silo_kind == "rows" and leaf.ndim == 2 else None


def _silos(silo_kind: str) -> Callable[[Any, jax.Array], dst_optax.SiloSpec]:
  def spec(path: Any, leaf: jax.Array) -> dst_optax.SiloSpec:
    del path
    return dst_optax.rows() if _silo_axis(silo_kind, leaf) == 0 else dst_optax.PerTensor()

  return spec


def _sort_based_keep(delta: jax.Array, fraction: float, axis: int | None, method: str) -> jax.Array:
  """Keep-mask of the top ``floor(ε |S|)`` Δ per silo by quantile or ``lax.top_k``."""
  silos = delta.reshape(1, -1) if axis is None else delta.reshape(delta.shape[0], -1)
  budget = math.floor(fraction * silos.shape[1])
  if budget == 0:
    return jnp.zeros(delta.shape, bool)
  if method == "quantile":
    threshold = jnp.quantile(silos, 1.0 - fraction, axis=1, keepdims=True)
    return ((silos >= threshold) & (silos > 0)).reshape(delta.shape)
  _, indices = jax.lax.top_k(silos, budget)
  rows = jnp.arange(silos.shape[0])[:, None]
  keep = jnp.zeros(silos.shape, bool).at[rows, indices].set(True)
  return (keep & (silos > 0)).reshape(delta.shape)


def sort_based_dst(fraction: float, silo_kind: str, method: str) -> optax.GradientTransformation:
  """DST with a sort-based selection (the baselines); seed given at init."""

  def init_fn(params: optax.Params) -> optax.Params:
    return params

  def update_fn(updates, seed, params=None):
    def one_leaf(u, p, s):
      proposal = p + u
      keep = _sort_based_keep(jnp.abs(proposal - s), fraction, _silo_axis(silo_kind, p), method)
      return jnp.where(keep, u, s - p)

    return jax.tree.map(one_leaf, updates, params, seed), seed

  return optax.GradientTransformation(init_fn, update_fn)


def _optimizer(method: str, fraction: float, silo_kind: str) -> optax.GradientTransformation:
  adam = optax.adam(LEARNING_RATE)
  if method == "adam":
    return adam
  if method == "ours":
    # ε as an injected hyperparameter: one compilation serves every ε.
    dst = optax.inject_hyperparams(dst_optax.dynamic_subset_tuning, static_args=("silos",))
    return optax.chain(adam, dst(fraction_of_free_params=fraction, silos=_silos(silo_kind)))
  return optax.chain(adam, sort_based_dst(fraction, silo_kind, method))


class SteadyStateSteps:
  """Compiles jitted updates (once per method, silo kind and, for baselines, ε)."""

  def __init__(
    self,
    params: dict[str, jax.Array],
    grads: list[dict[str, jax.Array]],
    gradients: str = "repeated",
  ):
    self.params = params
    self.grads = grads
    self.cycle_gradients = check_gradients(gradients) == "noisy"
    self.compiled: dict[tuple[Any, ...], Any] = {}

  def grads_at(self, step: int) -> dict[str, jax.Array]:
    """The gradient of step ``step`` (0 = the first warm-up step)."""
    if self.cycle_gradients:
      return self.grads[step % len(self.grads)]
    return self.grads[min(step, len(self.grads) - 1)]

  def step(self, method: str, fraction: float, silo_kind: str) -> tuple[Callable[[], Any], dict]:
    """A steady-state update (``ours``: state from earlier steps) and its memory."""
    optimizer = _optimizer(method, fraction, silo_kind)
    key = (method, silo_kind) if method in ("adam", "ours") else (method, silo_kind, fraction)
    # Fresh copies: donation consumes them (a sort-based state holds the params).
    state = jax.tree.map(jnp.copy, optimizer.init(self.params))
    current = jax.tree.map(jnp.copy, self.params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    compile_seconds = float("nan")  # Compiled for an earlier ε: no cost here.
    if key not in self.compiled:

      def update(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      # Params and state donated, as in a training loop: each step writes in
      # place. Outputs in the order of the donated inputs, or JAX pairs buffers
      # by shape across them (new params into mu...) and XLA adds copies.
      jitted = jax.jit(update, donate_argnums=(0, 1))
      start = time.perf_counter()
      self.compiled[key] = jitted.lower(current, state, self.grads[-1]).compile()
      compile_seconds = time.perf_counter() - start
    compiled = self.compiled[key]
    if method == "ours":
      for step in range(WARMUP_STEPS):
        current, state = compiled(current, state, self.grads_at(step))
    carry = [current, state]
    step_numbers = itertools.count(WARMUP_STEPS)

    def step() -> Any:
      carry[:] = compiled(carry[0], carry[1], self.grads_at(next(step_numbers)))
      return carry

    jax.block_until_ready(step())
    memory = compiled.memory_analysis()
    return step, {
      "state_bytes": state_bytes,
      "temp_bytes": getattr(memory, "temp_size_in_bytes", float("nan")),
      "compile_seconds": compile_seconds,
      "carry": carry,
    }


def interleaved_medians(
  steps: list[Callable[[], Any]], repeats: int
) -> tuple[list[float], list[float]]:
  """Median seconds of each step, timed in alternation so that load drifts cancel.

  Also returns each step's mean number of minor page faults: memory the step
  touches for the first time (fresh temporary buffers) costs a fault per page.
  """
  times: list[list[float]] = [[] for _ in steps]
  faults = [0] * len(steps)
  for _ in range(repeats):
    for index, step in enumerate(steps):
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      jax.block_until_ready(step())
      times[index].append(time.perf_counter() - start)
      faults[index] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  return [statistics.median(t) for t in times], [f / repeats for f in faults]


def run(args: argparse.Namespace) -> dict[str, Any]:
  results = []
  for size in args.sizes:
    params, grads = benchmark_inputs(size, args.gradients)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    steps = SteadyStateSteps(params, grads, args.gradients)
    adam_step, adam_info = steps.step("adam", 1.0, "per_tensor")
    print(
      f"\n{size}: {num_params / 1e6:.1f}M params in {len(params)} tensors "
      f"(adam compiles in {adam_info['compile_seconds']:.1f} s)",
      flush=True,
    )
    for silo_kind in args.silos:
      for fraction in args.fractions:
        row = {"size": size, "num_params": num_params, "silos": silo_kind, "fraction": fraction}
        methods = [
          method
          for method in args.methods
          if method == "ours" or (size in args.sort_sizes and fraction in args.sort_fractions)
        ]
        method_steps, infos = zip(
          *(steps.step(method, fraction, silo_kind) for method in methods), strict=True
        )
        medians, faults = interleaved_medians([adam_step, *method_steps], args.repeats)
        adam_seconds, *seconds = medians
        row["adam_seconds"] = adam_seconds
        row["adam_page_faults"] = faults[0]
        for method, method_seconds, method_faults, info in zip(
          methods, seconds, faults[1:], infos, strict=True
        ):
          row[f"{method}_seconds"] = method_seconds
          row[f"{method}_page_faults"] = method_faults
          row[f"{method}_ratio"] = method_seconds / adam_seconds
          row[f"{method}_temp_bytes"] = info["temp_bytes"]
          row[f"{method}_compile_seconds"] = info["compile_seconds"]
          if method == "ours":
            # Radix passes of the last timed step's threshold search.
            row["ours_passes"] = int(dst_optax.find_state(info["carry"][1]).num_passes)
            dst_state_bytes = info["state_bytes"] - adam_info["state_bytes"]
            row["dst_state_bytes_per_param_byte"] = dst_state_bytes / param_bytes
        row["adam_temp_bytes"] = adam_info["temp_bytes"]
        row["adam_compile_seconds"] = adam_info["compile_seconds"]
        results.append(row)
        print(_format_row(row), flush=True)
  return {
    "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, "
    f"{jax.device_count()} device(s), jax {jax.__version__}",
    # glibc's settings decide whether temporaries are page-faulted in every step.
    "malloc_environment": {
      k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"
    },
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "repeats": args.repeats,
    "gradients": args.gradients,
    "results": results,
  }


def _format_row(row: dict[str, Any]) -> str:
  ratios = "  ".join(
    f"{method} {row[f'{method}_ratio']:6.2f}x" if f"{method}_ratio" in row else f"{method}     -  "
    for method in METHODS
  )
  compiled = row.get("ours_compile_seconds", float("nan"))
  return (
    f"{row['size']:>5} {row['silos']:>10} eps={row['fraction']:<7g} "
    f"adam {row['adam_seconds'] * 1e3:8.1f} ms  {ratios}  passes {row.get('ours_passes', '-')}"
    f"  page faults/step {row.get('ours_page_faults', float('nan')):.0f}"
    + ("" if math.isnan(compiled) else f"  (ours compiled in {compiled:.1f} s)")
  )


def plot(report: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["results"]
  sizes = sorted({r["size"] for r in rows}, key=SIZES.index)
  figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
  for ax, size in zip(axes[0], sizes, strict=True):
    for silo_kind, marker in zip(SILO_KINDS, "os", strict=True):
      for method, color in zip(METHODS, ("C0", "C1", "C2"), strict=True):
        points = [
          (r["fraction"], r[f"{method}_ratio"])
          for r in rows
          if r["size"] == size and r["silos"] == silo_kind and f"{method}_ratio" in r
        ]
        if points:
          x, y = zip(*points, strict=True)
          ax.plot(x, y, marker=marker, color=color, label=f"{method}, {silo_kind}")
    ax.axhline(3.0, color="gray", linestyle="--", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="ε", ylabel="time / adam update", title=size)
    ax.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
  parser.add_argument("--silos", nargs="+", default=list(SILO_KINDS), choices=SILO_KINDS)
  parser.add_argument("--fractions", nargs="+", type=float, default=[1e-6, 1e-4, 1e-2, 0.1, 0.5])
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument(
    "--sort-sizes",
    nargs="*",
    default=["1M", "16M", "16M-square"],
    choices=SIZES,
    help="sizes at which the sort-based baselines run (slow)",
  )
  parser.add_argument(
    "--sort-fractions",
    nargs="*",
    type=float,
    default=[1e-2],
    help="ε at which the sort-based baselines run (slow)",
  )
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--gradients",
    default="repeated",
    choices=GRADIENTS,
    help="repeated: one gradient every timed step (ties, the hard case); noisy: as in training",
  )
  parser.add_argument(
    "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "selection"
  )
  args = parser.parse_args()
  # Frozen-silo warnings at tiny ε are expected here (that is what is measured).
  warnings.filterwarnings("ignore", message="fraction_of_free_params=")
  report = run(args)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
  plot(report, args.out.with_suffix(".png"))
  print(
    f"\npeak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB; "
    f"wrote {args.out.with_suffix('.json')} and .png"
  )


if __name__ == "__main__":
  main()
