"""Where one steady-state adam + DST step spends its time, from a ``jax.profiler`` trace.

Builds the step of ``benchmarks/selection.py`` (same inputs, same steady state), traces a
few calls and prints, for the last one, its wall time and the kernels that took longest,
summed over every thread, per kind (the name without XLA's ``.N`` suffix: one kind per
operation, e.g. one per leaf) and per kernel; a kernel split across threads counts once
per thread, so the sums can exceed the wall time::

  python benchmarks/profile_step.py --size 16M-square --silos per_tensor --fraction 1e-2

Kernel names are XLA's (``multiply_divide_fusion.3``: adam's update of one leaf, …); the
HLO behind a name is in ``jax.jit(...).lower(...).compile().as_text()``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile
from typing import Any

import jax
import selection

_STEP_ANNOTATION = "dst_step"
# Host-side events of the runtime and of Python, not kernels.
_NOT_KERNELS = (
  "$",
  "CommonPjRt",
  "ThunkExecutor",
  "Threadpool",
  "Wait for",
  "end: ",
  "Pjit",
  "Parse",
)


def trace_events(trace_dir: pathlib.Path) -> list[dict[str, Any]]:
  """The complete ("X") events of the Perfetto trace that ``jax.profiler`` wrote."""
  (path,) = trace_dir.glob("**/*.trace.json.gz")
  with gzip.open(path) as trace_file:
    trace = json.load(trace_file)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [event for event in events if event.get("ph") == "X"]


def last_step_kernels(events: list[dict[str, Any]]) -> tuple[float, collections.Counter, int]:
  """Wall seconds of the last annotated step, kernel seconds per name, threads used."""
  steps = sorted((e for e in events if e["name"] == _STEP_ANNOTATION), key=lambda e: e["ts"])
  if not steps:
    raise RuntimeError(f"the trace holds no {_STEP_ANNOTATION!r} annotation")
  start, end = steps[-1]["ts"], steps[-1]["ts"] + steps[-1]["dur"]
  seconds: collections.Counter = collections.Counter()
  threads = set()
  for event in events:
    name = event["name"]
    inside = start <= event["ts"] and event["ts"] + event["dur"] <= end
    # Control flow (while, cond) encloses the kernels it runs: counting it too would
    # count them twice.
    if (
      inside and name != _STEP_ANNOTATION and not name.startswith((*_NOT_KERNELS, "while", "cond"))
    ):
      seconds[name] += event["dur"] * 1e-6
      threads.add((event.get("pid"), event.get("tid")))
  return (end - start) * 1e-6, seconds, len(threads)


def profile(
  size: str, silos: str, fraction: float, num_steps: int, gradients: str
) -> tuple[float, collections.Counter, int]:
  """Traces ``num_steps`` steady-state steps and summarises the last one."""
  params, grads = selection.benchmark_inputs(size, gradients)
  step, _ = selection.SteadyStateSteps(params, grads, gradients).step("ours", fraction, silos)
  jax.block_until_ready(step())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(num_steps):
        with jax.profiler.TraceAnnotation(_STEP_ANNOTATION):
          jax.block_until_ready(step())
    return last_step_kernels(trace_events(pathlib.Path(trace_dir)))


def main() -> tuple[float, collections.Counter, int]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="16M-square", choices=selection.SIZES)
  parser.add_argument("--silos", default="per_tensor", choices=selection.SILO_KINDS)
  parser.add_argument("--fraction", type=float, default=1e-2)
  parser.add_argument("--steps", type=int, default=3, help="steps traced; the last is reported")
  parser.add_argument("--top", type=int, default=30, help="kernels listed")
  parser.add_argument("--gradients", default="repeated", choices=selection.GRADIENTS)
  args = parser.parse_args()
  wall, seconds, num_threads = profile(
    args.size, args.silos, args.fraction, args.steps, args.gradients
  )
  print(
    f"{args.size} {args.silos} eps={args.fraction:g}: step {wall * 1e3:.1f} ms (profiler on), "
    f"kernels {sum(seconds.values()) * 1e3:.1f} ms on {num_threads} threads"
  )
  kinds: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  for name, kernel_seconds in seconds.items():
    kind = re.sub(r"\.\d+$", "", name)
    kinds[kind] += kernel_seconds
    counts[kind] += 1
  print("by kind:")
  for kind, kind_seconds in kinds.most_common(args.top):
    print(f"  {kind_seconds * 1e3:8.2f} ms  {kind} ({counts[kind]} kernels)")
  print("by kernel:")
  for name, kernel_seconds in seconds.most_common(args.top):
    print(f"  {kernel_seconds * 1e3:8.2f} ms  {name}")
  return wall, seconds, num_threads


if __name__ == "__main__":
  main()
