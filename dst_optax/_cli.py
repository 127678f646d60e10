"""The ``dst-optax`` command line: ``dst-optax demo`` and ``dst-optax subset ...``.

Each command group lives beside the code it drives and registers itself here through a
``register(subparsers)`` function, so this module stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Sequence

from dst_optax._subset import SubsetError

# Command -> (module defining ``register(subparsers)``, the extra its dependencies come from).
# The registered sub-parser sets ``func(args) -> int`` as its default.
_COMMANDS = {
  "subset": ("dst_optax._subset_cli", None),
  "demo": ("dst_optax.demo._cli", "demo"),
  "t5x-export": ("dst_optax.t5x._cli", "t5x"),
}


def fails_cleanly(
  label: Callable[[argparse.Namespace], str],
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
  """Makes a command report user errors (missing files, wrong seeds or settings, bad
  files) as one line ``dst-optax <label>: error: ...`` with status 2, not a traceback."""

  def wrap(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
      try:
        return command(args)
      except (SubsetError, FileNotFoundError, ImportError) as error:
        print(f"dst-optax {label(args)}: error: {error}", file=sys.stderr)
        return 2

    return run

  return wrap


def _register_missing(subparsers, command: str, extra: str | None, missing: str) -> None:
  """Registers ``command`` as a stub explaining which optional dependency is missing."""
  install = f'pip install "dst_optax[{extra}]"' if extra else "pip install dst_optax"
  parser = subparsers.add_parser(command, help=f"(unavailable: needs {missing})")

  def explain(args: argparse.Namespace) -> int:
    del args
    print(f"dst-optax {command}: the module {missing!r} is not installed; run: {install}")
    return 2

  parser.set_defaults(func=explain, ignores_arguments=True)


def build_parser() -> argparse.ArgumentParser:
  """Returns the argument parser with every command group registered."""
  parser = argparse.ArgumentParser(
    prog="dst-optax", description="Dynamic Subset Tuning for optax: tools and demo."
  )
  subparsers = parser.add_subparsers(dest="command", required=True)
  for command, (module_name, extra) in _COMMANDS.items():
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      if (error.name or "").startswith("dst_optax"):
        raise
      _register_missing(subparsers, command, extra, error.name or str(error))
      continue
    module.register(subparsers)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``dst-optax``; returns the process exit status."""
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  if unknown and not getattr(args, "ignores_arguments", False):
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
