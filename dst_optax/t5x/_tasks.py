"""SeqIO tasks for DST runs: a local TSV task and mT5-vocabulary variants.

Both are gin-configurable functions that register a task (idempotently) and
return its name, so a gin file can write ``MIXTURE_OR_TASK_NAME = @dst_t5x.tsv_task()``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from dst_optax.t5x import _import

# SentencePiece models of the public checkpoints (T5X's model gins use the same).
VOCABULARY_FILES = {
  "t5": "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model",
  "mt5": "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model",
}
# Vocabulary of the tasks that the ``t5`` package registers.
_TASK_VOCABULARY = "t5"


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target (a SeqIO metric function).

  Args:
    targets: postprocessed targets.
    predictions: postprocessed predictions.

  Returns:
    ``{"exact_match": percentage}``.
  """
  matches = sum(map(str.__eq__, targets, predictions))
  return {"exact_match": 100.0 * matches / max(len(targets), 1)}


def _parse_tsv_line(dataset: Any) -> Any:
  """Splits ``input<TAB>target`` lines into ``inputs`` and ``targets``."""
  tf = _import.require("tensorflow")

  # TextLineDataSource yields each line as a scalar string tensor.
  def parse(line: Any) -> dict[str, Any]:
    inputs, targets = tf.io.decode_csv(
      line, record_defaults=["", ""], field_delim="\t", use_quote_delim=False
    )
    return {"inputs": inputs, "targets": targets}

  return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def _replace_task(task: Any) -> None:
  """Registers ``task``, replacing a task of the same name (re-registration is idempotent)."""
  seqio = _import.require("seqio")
  seqio.TaskRegistry.remove(task.name)
  seqio.TaskRegistry.add_provider(task.name, task)


def tsv_task(data_dir: str, name: str = "dst_local_tsv", vocabulary: Any = None) -> str:
  """Registers a text-to-text task read from ``train.tsv`` and ``validation.tsv``.

  Each line is ``input<TAB>target``. Nothing is downloaded: with the default
  byte-level vocabulary the task runs on any machine, which is what the tiny
  local config and its tests use.

  Args:
    data_dir: directory (local or ``gs://``) holding ``train.tsv`` and
      ``validation.tsv``.
    name: the task name to register.
    vocabulary: a ``seqio.Vocabulary`` for inputs and targets; default
      ``seqio.ByteVocabulary()``.

  Returns:
    ``name``, for ``MIXTURE_OR_TASK_NAME``.
  """
  seqio = _import.require("seqio")
  vocabulary = vocabulary or seqio.ByteVocabulary()
  features = {
    key: seqio.Feature(vocabulary=vocabulary, add_eos=True) for key in ("inputs", "targets")
  }
  source = seqio.TextLineDataSource(
    {split: os.path.join(data_dir, f"{split}.tsv") for split in ("train", "validation")}
  )
  _replace_task(
    seqio.Task(
      name,
      source=source,
      preprocessors=[
        _parse_tsv_line,
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=features,
      metric_fns=[exact_match],
    )
  )
  return name


def task_with_vocabulary(task_name: str, vocabulary: str) -> str:
  """The name of ``task_name`` tokenized with a public checkpoint's vocabulary.

  The WMT and SuperGLUE tasks of the ``t5`` package use the T5 vocabulary; mT5
  checkpoints need the mC4 one. For ``vocabulary="mt5"`` this registers
  ``<task_name>_mt5`` with the same source, preprocessors and metrics.

  Args:
    task_name: a registered SeqIO task (not a mixture).
    vocabulary: a key of :data:`VOCABULARY_FILES`.

  Returns:
    The name of a registered task tokenized with ``vocabulary``.

  Raises:
    ValueError: for an unknown vocabulary name, or a mixture that would need
      re-tokenizing (register its tasks' variants and a mixture of them instead).
  """
  if vocabulary not in VOCABULARY_FILES:
    raise ValueError(
      f"unknown vocabulary {vocabulary!r}; expected one of {sorted(VOCABULARY_FILES)}"
    )
  if vocabulary == _TASK_VOCABULARY:
    return task_name
  seqio = _import.require("seqio")
  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(
      f"{task_name!r} is a mixture; only tasks can be re-tokenized with the {vocabulary!r} "
      "vocabulary"
    )
  spm = seqio.SentencePieceVocabulary(VOCABULARY_FILES[vocabulary])
  features = {
    key: seqio.Feature(vocabulary=spm, add_eos=feature.add_eos, required=feature.required)
    for key, feature in task.output_features.items()
  }
  variant = f"{task_name}_{vocabulary}"
  _replace_task(
    seqio.Task(
      variant,
      source=task.source,
      preprocessors=task.preprocessors,
      output_features=features,
      postprocess_fn=task.postprocessor,
      metric_fns=task.metric_fns,
    )
  )
  return variant
