"""Quality benchmark: DST against the baselines across budgets on two tasks.

``--task sentiment`` (the default) fine-tunes all-MiniLM-L6-v2 on the movie-review sentiment split
(see ``dst_optax/demo/_data.py``) and records validation and test accuracy. ``--task
translation`` fine-tunes SmolLM2-135M-Instruct on English→Spanish Bible verses
(``dst_optax/demo/_translation.py``) and records chrF and BLEU of greedy translations of the
first ``--eval-size`` test verses, next to the zero-shot model. Both record trainable and
changed parameters, storage and time. Results go to a JSON file after every run; a re-run skips
the runs already there (resumable), and ``--methods`` / ``--fractions`` / ``--silos`` /
``--seeds`` pick a subset of the grid. A record lacking one of the
task's scores (a sentiment run from before validation accuracy was recorded) is run again and
replaced. ``--learning-rates`` runs every method at each rate; a method's default rate keeps the
key it has without the option. ``--table --select-by validation`` keeps, per method, budget and
seed, the rate with the best validation accuracy and reports its test accuracy. A plot of the
score against free parameters (log x; with validation scores, at the selected rate) is written
next to the JSON.

LoRA ranks and prompt lengths are matched to DST's per-tensor budget at each ε; runs whose
matched configuration repeats (e.g. LoRA r=1 at several tiny ε) are run once. The translation
task has no BitFit (the decoder has no biases); its prompt tuning puts the soft prompt before
the conversation.

  python benchmarks/quality.py                       # the default sentiment grid
  python benchmarks/quality.py --methods dst --silos global --fractions 1e-5 1e-4
  python benchmarks/quality.py --methods dst lora --fractions 1e-3 --learning-rates 1e-3 3e-3
  python benchmarks/quality.py --table --select-by validation
  python benchmarks/quality.py --task translation --fractions 1e-3 1e-4
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

RESULTS = pathlib.Path(__file__).parent / "results"


class Task(NamedTuple):
  """A benchmark task: its grid defaults, what it measures and how it is drawn.

  Attributes:
    methods: the methods that apply to the task (its defaults come first, all of them).
    fractions: default ε grid.
    silos: default DST silo kinds.
    steps: default optimizer steps.
    batch_size: default training batch size.
    max_length: default token cap.
    output: default JSON path.
    scores: ``(column header, record key, format)`` of each score in the Markdown table.
    plot_score: ``(record key, scale, y label)`` of the plotted score.
    title: plot title.
    selection_score: record key of the score learning rates are selected by (one of ``scores``),
      or None where the task has no validation split.
  """

  methods: tuple[str, ...]
  fractions: tuple[float, ...]
  silos: tuple[str, ...]
  steps: int
  batch_size: int
  max_length: int
  output: pathlib.Path
  scores: tuple[tuple[str, str, str], ...]
  plot_score: tuple[str, float, str]
  title: str
  selection_score: str | None


TASKS = {
  "sentiment": Task(
    methods=("dst", "lora", "prompt", "random", "bitfit", "full"),
    fractions=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    silos=("per-tensor", "global"),
    steps=80,
    batch_size=16,
    max_length=48,
    output=RESULTS / "quality_sentiment.json",
    scores=(("validation", "validation_accuracy", "{:.1%}"), ("test", "accuracy", "{:.1%}")),
    plot_score=("accuracy", 100.0, "test accuracy (%), rate chosen on validation"),
    title="all-MiniLM-L6-v2 on movie-review sentiment",
    selection_score="validation_accuracy",
  ),
  "translation": Task(
    methods=("dst", "lora", "prompt", "random", "full"),
    fractions=(1e-3, 1e-4),
    silos=("per-tensor",),
    steps=60,
    batch_size=4,
    max_length=96,
    output=RESULTS / "quality_translation.json",
    scores=(("chrF", "chrf", "{:.1f}"), ("BLEU", "bleu", "{:.1f}")),
    plot_score=("chrf", 1.0, "chrF on test verses"),
    title="SmolLM2-135M-Instruct, English→Spanish verses",
    selection_score=None,
  ),
}
# The translation grid defaults to DST and LoRA: each decoder run costs minutes on CPU, so full
# fine-tuning and the random subset are opt-in there.
DEFAULT_METHODS = {"sentiment": TASKS["sentiment"].methods, "translation": ("dst", "lora")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line; grid options left out take the task's defaults."""
  from dst_optax.demo import _baselines

  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--task", choices=sorted(TASKS), default="sentiment")
  parser.add_argument(
    "--methods", nargs="+", choices=_baselines.METHOD_NAMES, help="default: the task's"
  )
  parser.add_argument("--fractions", nargs="+", type=float, help="default: the task's")
  parser.add_argument(
    "--silos",
    nargs="+",
    choices=sorted(_baselines.SILO_KINDS),
    help="DST silo kinds, default: the task's (baselines are matched to the per-tensor budget)",
  )
  parser.add_argument("--seeds", nargs="+", type=int, default=(0,))
  parser.add_argument(
    "--learning-rates",
    "--learning-rate",
    nargs="+",
    type=float,
    help="run every method at each of these rates, default: each method's default rate",
  )
  parser.add_argument("--steps", type=int, help="default: the task's")
  parser.add_argument("--batch-size", type=int, help="default: the task's")
  parser.add_argument(
    "--max-length", type=int, help="token cap, default: the task's (translation: longer dropped)"
  )
  parser.add_argument(
    "--eval-size", type=int, default=64, help="translation: first test verses translated"
  )
  parser.add_argument(
    "--max-new-tokens", type=int, default=64, help="translation: generated tokens per verse"
  )
  parser.add_argument(
    "--eval-batch-size", type=int, default=32, help="translation: verses per generation call"
  )
  parser.add_argument("--output", type=pathlib.Path, help="default: the task's")
  parser.add_argument("--dry-run", action="store_true", help="list the grid and exit")
  parser.add_argument(
    "--table", action="store_true", help="print the recorded results as a Markdown table and exit"
  )
  parser.add_argument(
    "--select-by",
    choices=("validation",),
    help="with --table: per method, budget and seed, only the rate with the best validation score",
  )
  args = parser.parse_args(argv)
  task = TASKS[args.task]
  if args.select_by and not args.table:
    parser.error("--select-by applies to --table.")
  if args.select_by and task.selection_score is None:
    parser.error(f"--task {args.task} records no validation score to select by.")
  defaults = {
    "methods": DEFAULT_METHODS[args.task],
    "fractions": task.fractions,
    "silos": task.silos,
    "steps": task.steps,
    "batch_size": task.batch_size,
    "max_length": task.max_length,
    "output": task.output,
  }
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  unsupported = sorted(set(args.methods) - set(task.methods))
  if unsupported:
    parser.error(f"--task {args.task} has no method {unsupported}; choose from {task.methods}.")
  return args


def build_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
  """The runs to do, in priority order: ε from large to small, DST before baselines.

  Args:
    args: parsed command line (seeds, fractions, methods, silos, learning rates).

  Returns:
    One dict per run with its method, fraction, silo kind, seed and learning rate (None: the
    method's default).
  """
  grid = []
  for seed in args.seeds:
    for fraction in sorted(args.fractions, reverse=True):
      for method in args.methods:
        silo_kinds = args.silos if method == "dst" else ("per-tensor",)
        for silos in silo_kinds:
          for rate in args.learning_rates or (None,):
            grid.append(
              {"method": method, "fraction": fraction, "silos": silos, "seed": seed,
               "learning_rate": rate}
            )  # fmt: skip
  return grid


def run_label(label: str, rate: float, default_rate: float) -> str:
  """A method's label, naming its learning rate where it is not the method's default.

  Args:
    label: the method's label (its configuration: rank, length, ε).
    rate: the learning rate of the run.
    default_rate: the method's default learning rate.

  Returns:
    ``label`` at the default rate (so records from before the learning-rate grid resume), else
    ``label`` followed by ``lr=<rate>``.
  """
  return label if math.isclose(rate, default_rate) else f"{label} lr={rate:g}"


def is_complete(record: dict[str, Any], task: Task) -> bool:
  """Whether ``record`` holds every score ``task`` records (older records may lack some)."""
  return all(record.get(key) is not None for _, key, _ in task.scores)


class Selected(NamedTuple):
  """The run kept for one method, budget and seed.

  Attributes:
    record: the kept run.
    num_rates: learning rates with a selection score among which it was chosen.
  """

  record: dict[str, Any]
  num_rates: int


def select_runs(records: list[dict[str, Any]], score: str) -> list[Selected]:
  """Per configuration (method, budget, silo kind), seed and settings: the best-``score`` run.

  Runs differing only in learning rate form one group; ties go to the lowest rate. Runs without
  ``score`` (recorded before it was) take no part. Records from before the learning-rate grid
  carry no ``configuration`` and are keyed by their label.

  Args:
    records: the recorded runs.
    score: record key of the selection score (e.g. validation accuracy).

  Returns:
    One :class:`Selected` per group with a scored run, in order of first appearance.
  """
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for record in records:
    if record.get(score) is not None:
      configuration = record.get("configuration", record["label"])
      groups.setdefault((configuration, record["key"].partition("|")[2]), []).append(record)
  return [
    Selected(max(runs, key=lambda run: (run[score], -run.get("learning_rate", 0.0))), len(runs))
    for runs in groups.values()
  ]


def _write_atomically(path: pathlib.Path, text: str) -> None:
  temporary = path.with_suffix(".tmp")
  temporary.write_text(text)
  os.replace(temporary, path)


def plot(records: list[dict[str, Any]], path: pathlib.Path, task: Task) -> None:
  """The task's score against free parameters (log x), one line per method and silo kind.

  Args:
    records: the recorded runs; where the task has a selection score, only the selected rate
      of each method, budget and seed is drawn (runs without the score are left out).
    path: the image file to write.
    task: the task (its plotted score, title and selection score).
  """
  if task.selection_score is not None:
    records = [selected.record for selected in select_runs(records, task.selection_score)]
  import matplotlib

  matplotlib.use("Agg")  # Files only; never needs a display.
  import matplotlib.pyplot as plt

  key, scale, ylabel = task.plot_score
  figure, axes = plt.subplots(figsize=(7, 4.5))
  series: dict[str, list[tuple[int, float]]] = {}
  for record in records:
    if record["method"] == "zero-shot":
      axes.axhline(scale * record[key], color="gray", linestyle="--", label="zero-shot")
      continue
    name = record["method"] + (f" ({record['silos']})" if record["method"] == "dst" else "")
    series.setdefault(name, []).append((record["num_trainable"], scale * record[key]))
  for name, points in sorted(series.items()):
    points.sort()
    marker = "o" if name.startswith("dst") else "s"
    axes.plot(*zip(*points, strict=True), marker=marker, label=name)
  axes.set(xscale="log", xlabel="free (trainable) parameters", ylabel=ylabel, title=task.title)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _table_order(record: dict[str, Any]) -> tuple[Any, ...]:
  return (
    record["method"] != "zero-shot",
    record["method"],
    record["num_trainable"],
    record.get("silos", ""),
    record.get("seed", 0),
    record.get("learning_rate", 0.0),
  )


def _scores(record: dict[str, Any], task: Task) -> str:
  return " | ".join(
    "–" if record.get(key) is None else form.format(record[key]) for _, key, form in task.scores
  )


def markdown_table(records: list[dict[str, Any]], task: Task) -> str:
  """The recorded runs as a Markdown table, sorted by method and budget (missing scores: –)."""
  headers = " | ".join(header for header, _, _ in task.scores)
  lines = [
    f"| method | seed | free params | changed params | storage | {headers} | train time |",
    "|---|---:|---:|---:|---:|" + "---:|" * len(task.scores) + "---:|",
  ]
  for r in sorted(records, key=_table_order):
    scores = _scores(r, task)
    lines.append(
      f"| {r['label']} | {r.get('seed', '–')} | {r['num_trainable']:,} | {r['num_changed']:,} | "
      f"{r['storage_bytes'] / 1e3:,.1f} KB | {scores} | {r['train_seconds']:.0f} s |"
    )
  return "\n".join(lines)


def selected_table(records: list[dict[str, Any]], task: Task) -> str:
  """Per method, budget and seed, the run at the rate with the best selection score.

  Args:
    records: the recorded runs.
    task: a task with a selection score.

  Returns:
    A Markdown table with the chosen learning rate and how many rates it was chosen among,
    followed by a line counting the runs left out for lacking the selection score.
  """
  headers = " | ".join(header for header, _, _ in task.scores)
  lines = [
    f"| method | seed | free params | rates tried | chosen lr | {headers} |",
    "|---|---:|---:|---:|---:|" + "---:|" * len(task.scores),
  ]
  selected = select_runs(records, task.selection_score)
  for record, num_rates in sorted(selected, key=lambda s: _table_order(s.record)):
    trained = record["method"] != "zero-shot"
    rates = f"{num_rates} | {record['learning_rate']:g}" if trained else "– | –"
    lines.append(
      f"| {record.get('configuration', record['label'])} | {record.get('seed', '–')} | "
      f"{record['num_trainable']:,} | {rates} | {_scores(record, task)} |"
    )
  left_out = sum(record.get(task.selection_score) is None for record in records)
  lines.append(f"\nRuns left out for lacking a selection score: {left_out}.")
  return "\n".join(lines)


class Runner(NamedTuple):
  """A loaded task: the pretrained parameters, its zero-shot result and a training run.

  Attributes:
    params: the pretrained parameters the methods start from.
    settings: the task's run settings, recorded with every result and keyed into it.
    zero_shot: computes the untrained model's result.
    run: ``(method, seed) -> result`` trains and evaluates one method.
  """

  params: Any
  settings: dict[str, int]
  zero_shot: Callable[[], Any]
  run: Callable[[Any, int], Any]


def sentiment_runner(args: argparse.Namespace) -> Runner:
  """Loads MiniLM and the movie-review splits."""
  from dst_optax.demo import _bert, _data, _train

  pretrained = _bert.load_minilm(args.max_length)
  splits = _data.load_movie_sentiment()
  train_split, validation_split, test_split = (
    _train.encode_split(pretrained.tokenizer, splits[name])
    for name in ("train", "validation", "test")
  )
  prototypes = _train.label_prototypes(pretrained)

  def run(method: Any, seed: int) -> Any:
    config = _train.TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=seed)
    return _train.run_method(
      pretrained, method, prototypes, train_split, test_split, config,
      validation_split=validation_split,
    )  # fmt: skip

  zero_shot = functools.partial(
    _train.zero_shot_result, pretrained, prototypes, test_split, _train.TrainConfig(),
    validation_split,
  )  # fmt: skip
  return Runner(
    pretrained.params,
    {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length},
    zero_shot,
    run,
  )


def translation_runner(args: argparse.Namespace) -> Runner:
  """Loads SmolLM2 and the English→Spanish verse pairs."""
  from dst_optax.demo import _llama, _translation, _verses

  pretrained = _llama.load_smollm2()
  splits = _verses.load_en_es_verses()
  config = _translation.TranslationConfig(
    steps=args.steps,
    batch_size=args.batch_size,
    max_length=args.max_length,
    eval_size=args.eval_size,
    eval_batch_size=args.eval_batch_size,
    max_new_tokens=args.max_new_tokens,
  )
  train_pairs = _translation.encode_pairs(pretrained.tokenizer, splits["train"], args.max_length)
  test_pairs = _translation.evaluation_pairs(pretrained.tokenizer, splits["test"], config)
  print(
    f"{len(train_pairs.input_ids):,} of {len(splits['train']):,} training pairs fit "
    f"{args.max_length} tokens; evaluating on {len(test_pairs)} test verses.",
    flush=True,
  )

  def run(method: Any, seed: int) -> Any:
    seeded = config._replace(seed=seed)
    return _translation.run_translation(pretrained, method, train_pairs, test_pairs, seeded)

  settings = {
    "steps": args.steps,
    "batch_size": args.batch_size,
    "max_length": args.max_length,
    "eval_size": len(test_pairs),
    "max_new_tokens": args.max_new_tokens,
  }
  zero_shot = functools.partial(_translation.zero_shot_translation, pretrained, test_pairs, config)
  return Runner(pretrained.params, settings, zero_shot, run)


RUNNERS = {"sentiment": sentiment_runner, "translation": translation_runner}


def main(argv: list[str] | None = None) -> int:
  """Runs the missing part of the grid; returns the exit status."""
  args = parse_args(argv)
  task = TASKS[args.task]
  grid = build_grid(args)
  if args.table:
    records = json.loads(args.output.read_text())
    print(selected_table(records, task) if args.select_by else markdown_table(records, task))
    return 0
  if args.dry_run:
    for run in grid:
      print(run)
    return 0
  from dst_optax.demo import _baselines, _fetch

  try:
    runner = RUNNERS[args.task](args)
  except _fetch.SourceUnavailableError as error:
    print(f"quality.py: {error}", file=sys.stderr)
    return 2
  records = json.loads(args.output.read_text()) if args.output.exists() else []
  # Incomplete records (older runs lacking a score) are run again and replaced.
  done = {record["key"] for record in records if is_complete(record, task)}
  args.output.parent.mkdir(parents=True, exist_ok=True)

  def record(key: str, result: Any, extra: dict[str, Any]) -> None:
    entry = {"key": key, **extra, **runner.settings, **result._asdict()}
    entry["method"] = extra.get("method", result.name)
    entry["final_loss"] = sum(result.losses[-10:]) / max(1, len(result.losses[-10:]))
    del entry["losses"]
    records[:] = [old for old in records if old["key"] != key]
    records.append(entry)
    done.add(key)
    _write_atomically(args.output, json.dumps(records, indent=1, ensure_ascii=False))
    plot(records, args.output.with_suffix(".png"), task)
    scores = ", ".join(f"{name} {form.format(entry[key])}" for name, key, form in task.scores)
    print(f"{entry['label']}: {scores}", flush=True)

  # Sentiment keys stay as they were, so earlier result files resume.
  settings_key = {"steps": "steps", "batch_size": "batch", "max_length": "len"}
  settings_key.update(eval_size="eval", max_new_tokens="new")
  config_key = "|".join(f"{settings_key[name]}={v}" for name, v in runner.settings.items())
  if f"zero-shot|{config_key}" not in done:
    record(f"zero-shot|{config_key}", runner.zero_shot(), {"method": "zero-shot"})
  for run in grid:
    default_rate = _baselines.DEFAULT_LEARNING_RATES[run["method"]]
    rate = default_rate if run["learning_rate"] is None else run["learning_rate"]
    method = _baselines.matched_method(
      run["method"], runner.params, run["fraction"], run["silos"], rate, run["seed"]
    )
    configuration = method.label
    method = method._replace(label=run_label(configuration, rate, default_rate))
    # The label names the configuration (rank, length, ε), so repeats across ε collapse.
    key = f"{method.label}|seed={run['seed']}|{config_key}"
    if key in done:
      continue
    result = runner.run(method, run["seed"])
    record(key, result, {**run, "configuration": configuration, "learning_rate": rate})
  return 0


if __name__ == "__main__":
  sys.exit(main())
