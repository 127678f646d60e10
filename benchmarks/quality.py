"""Quality benchmark: DST against the baselines across budgets on movie-review sentiment.

Fine-tunes all-MiniLM-L6-v2 on the movie-review sentiment split (see ``dst_optax/demo/_data.py``)
with each method and budget of the grid and records test accuracy, trainable and changed
parameters, storage and time. Results go to a JSON file after every run; a re-run skips the runs
already there (resumable), and ``--methods`` / ``--fractions`` / ``--seeds`` pick a subset of the
grid. A plot of accuracy against free parameters (log x) is written next to the JSON.

LoRA ranks and prompt lengths are matched to DST's per-tensor budget at each ε; runs whose
matched configuration repeats (e.g. LoRA r=1 at several tiny ε) are run once.

  python benchmarks/quality.py                       # the default grid
  python benchmarks/quality.py --methods dst --silos global --fractions 1e-5 1e-4
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

DEFAULT_FRACTIONS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_METHODS = ("dst", "lora", "prompt", "random", "bitfit", "full")
DEFAULT_OUTPUT = pathlib.Path(__file__).parent / "results" / "quality_sentiment.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line."""
  from dst_optax.demo import _baselines

  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument(
    "--methods", nargs="+", choices=_baselines.METHOD_NAMES, default=DEFAULT_METHODS
  )
  parser.add_argument("--fractions", nargs="+", type=float, default=DEFAULT_FRACTIONS)
  parser.add_argument(
    "--silos",
    nargs="+",
    choices=sorted(_baselines.SILO_KINDS),
    default=("per-tensor", "global"),
    help="DST silo kinds (baselines are matched to the per-tensor budget)",
  )
  parser.add_argument("--seeds", nargs="+", type=int, default=(0,))
  parser.add_argument(
    "--learning-rate", type=float, help="overrides every method's default learning rate"
  )
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--max-length", type=int, default=48)
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  parser.add_argument("--dry-run", action="store_true", help="list the grid and exit")
  parser.add_argument(
    "--table", action="store_true", help="print the recorded results as a Markdown table and exit"
  )
  return parser.parse_args(argv)


def build_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
  """The runs to do, in priority order: ε from large to small, DST before baselines."""
  grid = []
  for seed in args.seeds:
    for fraction in sorted(args.fractions, reverse=True):
      for method in args.methods:
        silo_kinds = args.silos if method == "dst" else ("per-tensor",)
        for silos in silo_kinds:
          grid.append({"method": method, "fraction": fraction, "silos": silos, "seed": seed})
  return grid


def _write_atomically(path: pathlib.Path, text: str) -> None:
  temporary = path.with_suffix(".tmp")
  temporary.write_text(text)
  os.replace(temporary, path)


def plot(records: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Accuracy against free parameters (log x), one line per method and silo kind."""
  import matplotlib

  matplotlib.use("Agg")  # Files only; never needs a display.
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(7, 4.5))
  series: dict[str, list[tuple[int, float]]] = {}
  for record in records:
    if record["method"] == "zero-shot":
      axes.axhline(100 * record["accuracy"], color="gray", linestyle="--", label="zero-shot")
      continue
    name = record["method"] + (f" ({record['silos']})" if record["method"] == "dst" else "")
    series.setdefault(name, []).append((record["num_trainable"], 100 * record["accuracy"]))
  for name, points in sorted(series.items()):
    points.sort()
    marker = "o" if name.startswith("dst") else "s"
    axes.plot(*zip(*points, strict=True), marker=marker, label=name)
  axes.set(
    xscale="log",
    xlabel="free (trainable) parameters",
    ylabel="test accuracy (%)",
    title="all-MiniLM-L6-v2 on movie-review sentiment",
  )
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def markdown_table(records: list[dict[str, Any]]) -> str:
  """The recorded runs as a Markdown table, sorted by method and budget."""
  lines = [
    "| method | free params | changed params | storage | accuracy | train time |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for r in sorted(
    records, key=lambda r: (r["method"] != "zero-shot", r["method"], r["num_trainable"])
  ):
    lines.append(
      f"| {r['label']} | {r['num_trainable']:,} | {r['num_changed']:,} | "
      f"{r['storage_bytes'] / 1e3:,.1f} KB | {100 * r['accuracy']:.1f}% | "
      f"{r['train_seconds']:.0f} s |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Runs the missing part of the grid; returns the exit status."""
  args = parse_args(argv)
  grid = build_grid(args)
  if args.table:
    print(markdown_table(json.loads(args.output.read_text())))
    return 0
  if args.dry_run:
    for run in grid:
      print(run)
    return 0
  from dst_optax.demo import _baselines, _bert, _data, _fetch, _train

  try:
    pretrained = _bert.load_minilm(args.max_length)
    splits = _data.load_movie_sentiment()
  except _fetch.SourceUnavailableError as error:
    print(f"quality.py: {error}", file=sys.stderr)
    return 2
  train_split = _train.encode_split(pretrained.tokenizer, splits["train"])
  test_split = _train.encode_split(pretrained.tokenizer, splits["test"])
  prototypes = _train.label_prototypes(pretrained)
  settings = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length}
  records = json.loads(args.output.read_text()) if args.output.exists() else []
  done = {record["key"] for record in records}
  args.output.parent.mkdir(parents=True, exist_ok=True)

  def record(key: str, result: _train.RunResult, extra: dict[str, Any]) -> None:
    entry = {"key": key, **extra, **settings, **result._asdict()}
    entry["method"] = extra.get("method", result.name)
    entry["final_loss"] = sum(result.losses[-10:]) / max(1, len(result.losses[-10:]))
    del entry["losses"]
    records.append(entry)
    done.add(key)
    _write_atomically(args.output, json.dumps(records, indent=1))
    plot(records, args.output.with_suffix(".png"))
    print(f"{result.label}: accuracy {100 * result.accuracy:.1f}%", flush=True)

  config_key = f"steps={args.steps}|batch={args.batch_size}|len={args.max_length}"
  if f"zero-shot|{config_key}" not in done:
    result = _train.zero_shot_result(pretrained, prototypes, test_split, _train.TrainConfig())
    record(f"zero-shot|{config_key}", result, {"method": "zero-shot"})
  for run in grid:
    method = _baselines.matched_method(
      run["method"],
      pretrained.params,
      run["fraction"],
      run["silos"],
      args.learning_rate,
      run["seed"],
    )
    if args.learning_rate is not None:
      method = method._replace(label=f"{method.label} lr={args.learning_rate:g}")
    # The label names the configuration (rank, length, ε), so repeats across ε collapse.
    key = f"{method.label}|seed={run['seed']}|{config_key}"
    if key in done:
      continue
    config = _train.TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=run["seed"])
    result = _train.run_method(pretrained, method, prototypes, train_split, test_split, config)
    rate = args.learning_rate or _baselines.DEFAULT_LEARNING_RATES[run["method"]]
    record(key, result, {**run, "learning_rate": rate})
  return 0


if __name__ == "__main__":
  sys.exit(main())
