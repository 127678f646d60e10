"""Guarded imports of T5X and its data stack, which are optional and not on PyPI."""

from __future__ import annotations

import importlib
import types

INSTALL_HINT = (
  "T5X is not installed. It is not on PyPI: install it from source following "
  "https://github.com/google-research/t5x#installation (see t5x_configs/README.md)."
)

# Top-level packages that come with a T5X installation.
_T5X_STACK = ("t5x", "seqio", "t5", "clu", "tensorflow", "orbax")


def require(module_name: str) -> types.ModuleType:
  """Imports a module of the T5X stack, or raises an ImportError saying how to get it.

  Args:
    module_name: a dotted module name, e.g. ``"t5x.optimizers"`` or ``"seqio"``.

  Returns:
    The imported module.
  """
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name is not None and error.name.split(".")[0] in _T5X_STACK:
      raise ImportError(f"{module_name} could not be imported. {INSTALL_HINT}") from error
    raise
