"""``dst-optax t5x-export``: write the DST subset of a T5X checkpoint.

T5X is imported only when the command runs, so the ``dst-optax`` dispatcher
can register it on machines without T5X.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dst_optax import _cli
from dst_optax.t5x import _export, _factory


@_cli.fails_cleanly(lambda args: "t5x-export")
def _run(args: argparse.Namespace) -> int:
  subset = _export.export_subset(
    args.checkpoint,
    args.output,
    args.fraction_of_free_params,
    seed_checkpoint=args.seed_checkpoint,
    silos=args.silos,
    distance=args.distance,
    unconstrained_patterns=args.unconstrained,
  )
  changed = sum(tensor.num_changed for tensor in subset.tensors.values())
  print(f"wrote {args.output}: {changed} changed coordinates in {len(subset.tensors)} tensors")
  return 0


def register(subparsers: argparse._SubParsersAction) -> None:
  """Adds the ``t5x-export`` command to a ``dst-optax`` sub-parser set.

  Args:
    subparsers: the dispatcher's ``add_subparsers()`` result.
  """
  parser = subparsers.add_parser(
    "t5x-export",
    help="extract the DST subset of a T5X checkpoint into a safetensors file",
    description=(
      "Extract the DST subset (changed coordinates and their values) of a fine-tuned "
      "T5X checkpoint. Use the epsilon, silos, distance and unconstrained patterns of the "
      "training run."
    ),
  )
  parser.add_argument("checkpoint", help="checkpoint_<step> directory or model directory")
  parser.add_argument("output", help="safetensors file to write")
  parser.add_argument(
    "--fraction_of_free_params", type=float, required=True, help="epsilon of the run"
  )
  parser.add_argument(
    "--seed_checkpoint",
    default=None,
    help="pretrained checkpoint; default: the seed stored in the DST optimizer state",
  )
  parser.add_argument("--silos", default="per_tensor", choices=sorted(_factory.NAMED_SILOS))
  parser.add_argument("--distance", default="absolute", choices=("absolute", "relative"))
  parser.add_argument(
    "--unconstrained",
    action="append",
    default=[],
    help="regex of parameter paths trained freely (repeatable; the run's DST_UNCONSTRAINED)",
  )
  parser.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``t5x-export`` as ``python -m dst_optax.t5x``; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m dst_optax.t5x")
  register(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  return args.func(args)
