"""Corpus-level translation metrics for the verse translation demo, computed with sacreBLEU.

BLEU uses sacreBLEU's default ``13a`` tokenisation and chrF its default character 6-grams with
β = 2, so the scores are comparable with published sacreBLEU numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Scores system translations against one reference translation each.

  Args:
    hypotheses: system outputs, one per segment.
    references: the reference translation of each segment.

  Returns:
    ``{"bleu": ..., "chrf": ...}`` on sacreBLEU's 0-100 scale.

  Raises:
    ValueError: when the two lists differ in length or are empty.
  """
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(
      f"Need as many hypotheses as references, and at least one; got {len(hypotheses)} "
      f"hypotheses and {len(references)} references."
    )
  hypotheses, references = list(hypotheses), [list(references)]
  return {
    "bleu": sacrebleu.corpus_bleu(hypotheses, references).score,
    "chrf": sacrebleu.corpus_chrf(hypotheses, references).score,
  }
