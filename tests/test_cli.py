"""Tests of the ``dst-optax`` command dispatcher."""

import importlib

import pytest

from dst_optax import _cli


def test_commands_are_registered():
  parser = _cli.build_parser()
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args(["--help"])
  assert exit_info.value.code == 0


def test_missing_optional_dependency_is_explained(monkeypatch, capsys):
  real_import = importlib.import_module

  def import_without_flax(name, *args):
    if name == "dst_optax.demo._cli":
      raise ModuleNotFoundError("No module named 'flax'", name="flax")
    return real_import(name, *args)

  monkeypatch.setattr(importlib, "import_module", import_without_flax)
  assert _cli.main(["demo", "--steps", "3"]) == 2
  assert "the module 'flax' is not installed; run: pip install \"dst_optax[demo]\"" in (
    capsys.readouterr().out
  )
