"""The ``dst-optax`` command line: ``dst-optax demo`` and ``dst-optax subset ...``.

Each command group lives beside the code it drives and registers itself here through a
``register(subparsers)`` function, so this module stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that each define ``register(subparsers)``; the registered sub-parser sets
# ``func(args) -> int`` as its default.
_COMMAND_MODULES = (
  "dst_optax._subset_cli",
  "dst_optax.demo._cli",
)


def build_parser() -> argparse.ArgumentParser:
  """Returns the argument parser with every available command group registered."""
  parser = argparse.ArgumentParser(
    prog="dst-optax", description="Dynamic Subset Tuning for optax: tools and demo."
  )
  subparsers = parser.add_subparsers(dest="command", required=True)
  for module_name in _COMMAND_MODULES:
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      if not module_name.startswith(error.name or "\0"):
        raise
      continue
    module.register(subparsers)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``dst-optax``; returns the process exit status."""
  args = build_parser().parse_args(argv)
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
