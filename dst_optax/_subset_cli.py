"""``dst-optax subset extract|inspect|apply|compose``: subset files from the shell.

Parameter checkpoints (seed, fine-tuned, output) are safetensors files with
``a/b/c`` tensor names or, for inputs, Orbax checkpoint directories.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from typing import Any

from dst_optax import _cli, _silos
from dst_optax._subset import (
  UNCONSTRAINED_BUDGET,
  Subset,
  SubsetError,
  apply_subset,
  combined_seed_fingerprint,
  compose_subsets,
)
from dst_optax._subset_extract import (
  ParamSource,
  extract_subset_streaming,
  load_params,
  safetensors_source,
  save_params,
)
from dst_optax._subset_io import INDEX_ENCODINGS, file_summary, load_subset, save_subset

_SILO_CHOICES: dict[str, _silos.SiloSpec] = {
  "per-tensor": _silos.PerTensor(),
  "rows": _silos.rows(),
  "columns": _silos.columns(),
  "global": _silos.Global(),
}
_NAME_SEPARATORS = {"slash": "/", "dot": "."}
# Tensors listed by ``inspect`` unless --all is given.
_DEFAULT_TENSORS_SHOWN = 20


def _open_source(path: str, item: str) -> ParamSource:
  """A safetensors file or an Orbax checkpoint directory as a :class:`ParamSource`."""
  if os.path.isdir(path):
    # Imported here: orbax-checkpoint is an optional dependency.
    from dst_optax._subset_orbax import orbax_source

    return orbax_source(path, tuple(key for key in item.split("/") if key))
  if item:
    raise SubsetError(f"--*-item only applies to Orbax checkpoint directories, not {path!r}")
  return safetensors_source(path)


def _regex(text: str) -> str:
  """argparse type of a tensor-path pattern: a valid regular expression."""
  try:
    re.compile(text)
  except re.error as error:
    raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({error})") from None
  return text


def _fraction(text: str) -> float:
  """argparse type of ε: a number in (0, 1]."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"ε must be a number in (0, 1]; got {text!r}") from None
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f"ε must lie in (0, 1]; got {value}")
  return value


_fails_cleanly = _cli.fails_cleanly(lambda args: f"subset {args.subset_command}")


def _silo_spec(args: argparse.Namespace) -> _silos.SiloSpec | Callable[..., _silos.SiloSpec]:
  spec = _SILO_CHOICES[args.silos]
  if not args.unconstrained:
    return spec
  pattern = re.compile(args.unconstrained)

  def spec_for(path: tuple[Any, ...], leaf: Any) -> _silos.SiloSpec:
    del leaf
    return _silos.Unconstrained() if pattern.search(_silos.path_name(path)) else spec

  spec_for.__name__ = f"{args.silos} except /{args.unconstrained}/ unconstrained"
  return spec_for


@_fails_cleanly
def _extract(args: argparse.Namespace) -> int:
  subset = extract_subset_streaming(
    _open_source(args.seed, args.seed_item),
    _open_source(args.finetuned, args.finetuned_item),
    args.fraction,
    _silo_spec(args),
    args.distance,
  )
  save_subset(subset, args.output, args.index_encoding, _NAME_SEPARATORS[args.names])
  _print_summary(args.output, subset, args.all)
  return 0


@_fails_cleanly
def _inspect(args: argparse.Namespace) -> int:
  _print_summary(args.subset, load_subset(args.subset), args.all)
  return 0


@_fails_cleanly
def _apply(args: argparse.Namespace) -> int:
  subsets = [load_subset(file) for file in args.subsets]
  subset, overlaps = compose_subsets(subsets)
  if len(subsets) > 1:
    _print_overlaps(args.subsets, overlaps)
  params = apply_subset(load_params(_open_source(args.seed, args.seed_item)), subset, args.verify)
  num_bytes = save_params(params, args.output)
  print(f"wrote {args.output}: {num_bytes:,} bytes, seed + {len(subsets)} subset(s)")
  return 0


@_fails_cleanly
def _compose(args: argparse.Namespace) -> int:
  subset, overlaps = compose_subsets([load_subset(file) for file in args.subsets])
  _print_overlaps(args.subsets, overlaps)
  save_subset(subset, args.output, args.index_encoding, _NAME_SEPARATORS[args.names])
  _print_summary(args.output, subset, args.all)
  return 0


def _print_overlaps(files: list[str], overlaps: list[Any]) -> None:
  if not overlaps:
    print(f"no overlaps between the {len(files)} subsets")
    return
  print("overlaps (the later subset wins):")
  for overlap in overlaps:
    print(
      f"  {overlap.tensor}: {files[overlap.first]} and {files[overlap.second]} share "
      f"{overlap.num_shared:,} coordinates, {overlap.num_conflicting:,} with different values"
    )


def _print_summary(file: str, subset: Subset, show_all: bool) -> None:
  """A readable account of a subset file: totals, bytes against the ideal, tensors."""
  sizes = file_summary(file)
  sparse = [tensor for tensor in subset.tensors.values() if not tensor.dense]
  dense = [tensor for tensor in subset.tensors.values() if tensor.dense]
  num_params = sum(math.prod(tensor.shape) for tensor in sparse)
  num_changed = sum(tensor.num_changed for tensor in sparse)
  print(f"{file}: {sizes['file_bytes']:,} bytes")
  print(
    f"  ε = {subset.fraction_of_free_params:g}, silos: {subset.silos}, distance: "
    f"{subset.distance}, seed fingerprint {combined_seed_fingerprint(subset)}"
  )
  print(
    f"  changed {num_changed:,} of {num_params:,} constrained coordinates "
    f"({num_changed / max(num_params, 1):.3g}) in {len(sparse)} tensors; "
    f"{len(dense)} dense tensors ({sizes['dense_bytes']:,} bytes)"
  )
  if sizes["num_sparse"]:
    ideal = sizes["ideal_bytes"] / sizes["num_sparse"]
    print(
      f"  {sizes['bytes_per_free_param']:.2f} bytes per changed coordinate "
      f"(ideal int32 index + value: {ideal:.2f})"
    )
  shown = list(subset.tensors.items())
  if not show_all:
    shown = sorted(shown, key=lambda item: -sizes["tensor_bytes"][item[0]])
    shown = shown[:_DEFAULT_TENSORS_SHOWN]
  width = max([len("tensor"), *(len(path) for path, _ in shown)])
  print(f"  {'tensor':<{width}}  {'shape':>16} {'dtype':>8} {'changed':>11} {'budget':>11} bytes")
  for path, tensor in shown:
    budget = "dense" if tensor.budget == UNCONSTRAINED_BUDGET else f"{tensor.budget:,}"
    print(
      f"  {path:<{width}}  {tensor.shape!s:>16} {tensor.dtype.name:>8} "
      f"{tensor.num_changed:>11,} {budget:>11} {sizes['tensor_bytes'][path]:,}"
    )
  if len(shown) < len(subset.tensors):
    print(f"  ... {len(subset.tensors) - len(shown)} more tensors (--all lists every tensor)")


def _add_output_format(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--index-encoding",
    choices=INDEX_ENCODINGS,
    default=INDEX_ENCODINGS[0],
    help="delta_varint: smallest; raw: flat int32 indices (default: %(default)s)",
  )
  parser.add_argument(
    "--names",
    choices=sorted(_NAME_SEPARATORS),
    default="slash",
    help="tensor names a/b/c (slash) or a.b.c (dot; with --index-encoding raw this is "
    "the flat index + value layout of sparse weight patches)",
  )
  parser.add_argument("--all", action="store_true", help="list every tensor in the summary")


def register(subparsers: argparse._SubParsersAction) -> None:
  """Adds ``subset`` and its sub-commands to the ``dst-optax`` parser."""
  parser = subparsers.add_parser(
    "subset",
    help="extract, inspect, apply and compose DST subset files",
    description="DST subsets: a fine-tuned model as its seed plus a small safetensors file.",
  )
  commands = parser.add_subparsers(dest="subset_command", required=True)

  extract = commands.add_parser(
    "extract", help="extract a subset from seed and fine-tuned checkpoints"
  )
  extract.add_argument("seed", help="seed params: .safetensors file or Orbax directory")
  extract.add_argument("finetuned", help="fine-tuned params: .safetensors file or Orbax directory")
  extract.add_argument("-o", "--output", required=True, help="subset file to write")
  extract.add_argument(
    "-e", "--fraction", type=_fraction, required=True, help="ε, fraction of free params"
  )
  extract.add_argument("--silos", choices=sorted(_SILO_CHOICES), default="per-tensor")
  extract.add_argument("--distance", choices=("absolute", "relative"), default="absolute")
  extract.add_argument(
    "--unconstrained",
    type=_regex,
    metavar="REGEX",
    help="tensors whose a/b/c path matches are stored whole (e.g. a new head)",
  )
  extract.add_argument("--seed-item", default="", help="Orbax: path to the params, e.g. params")
  extract.add_argument("--finetuned-item", default="", help="Orbax: path to the params")
  _add_output_format(extract)
  extract.set_defaults(func=_extract)

  inspect = commands.add_parser("inspect", help="validate a subset file and summarise it")
  inspect.add_argument("subset")
  inspect.add_argument("--all", action="store_true", help="list every tensor")
  inspect.set_defaults(func=_inspect)

  apply = commands.add_parser("apply", help="rebuild fine-tuned params from the seed and subset(s)")
  apply.add_argument("seed", help="seed params: .safetensors file or Orbax directory")
  apply.add_argument("subsets", nargs="+", help="subset file(s); later ones win on overlaps")
  apply.add_argument("-o", "--output", required=True, help=".safetensors file to write")
  apply.add_argument("--seed-item", default="", help="Orbax: path to the params")
  apply.add_argument(
    "--no-verify",
    dest="verify",
    action="store_false",
    help="skip the seed fingerprint check (paths, shapes and dtypes are still checked)",
  )
  apply.set_defaults(func=_apply)

  compose = commands.add_parser("compose", help="merge subsets of one seed into one file")
  compose.add_argument("subsets", nargs="+", help="subset files; later ones win on overlaps")
  compose.add_argument("-o", "--output", required=True, help="subset file to write")
  _add_output_format(compose)
  compose.set_defaults(func=_compose)
