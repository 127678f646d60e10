"""Movie-review sentiment data (Hutto & Gilbert 2014) from the ``vaderSentiment`` sdist.

The sdist of ``vaderSentiment==3.3.2`` (MIT) ships ``additional_resources/hutto_ICWSM_2014.tar.gz``
with ``movieReviewSnippets_GroundTruth.txt``: 10,605 Rotten Tomatoes sentences, each with the mean
of ~20 human ratings on a -4..4 scale. Sentences with ``|score| > 0.5`` are kept (10,043) and
labelled positive when the score is positive.

Fixed split, by the file's sentence id: ``id % 10 == 0`` is the test set, ``id % 10 == 1`` the
validation set, everything else the training set (about 80/10/10).
"""

from __future__ import annotations

import io
import tarfile
from typing import NamedTuple

from dst_optax.demo import _fetch

VADER_SOURCE = _fetch.PackageSource(
  requirement="vaderSentiment==3.3.2", archive_name="vaderSentiment-3.3.2.tar.gz", sdist=True
)
_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
NEUTRAL_MARGIN = 0.5
LABEL_NAMES = ("negative", "positive")
SPLITS = ("train", "validation", "test")


class SentimentExample(NamedTuple):
  """One rated sentence."""

  sentence_id: int
  score: float
  text: str


class SentimentSplit(NamedTuple):
  """Texts and integer labels (0 negative, 1 positive) of one split."""

  texts: list[str]
  labels: list[int]


def parse_ground_truth(content: str) -> list[SentimentExample]:
  """Parses ``id<TAB>mean score<TAB>text`` lines; blank lines are skipped.

  Args:
    content: the file's text.

  Returns:
    The examples in file order.

  Raises:
    ValueError: on a malformed line, naming its line number.
  """
  examples = []
  for line_number, line in enumerate(content.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.rstrip("\r").split("\t", 2)
    try:
      examples.append(SentimentExample(int(fields[0]), float(fields[1]), fields[2].strip()))
    except (IndexError, ValueError) as error:
      raise ValueError(f"Malformed ground-truth line {line_number}: {line[:80]!r}") from error
  return examples


def split_examples(examples: list[SentimentExample]) -> dict[str, SentimentSplit]:
  """Drops near-neutral sentences, labels the rest and splits them by sentence id.

  Args:
    examples: parsed ground-truth examples.

  Returns:
    ``{"train": ..., "validation": ..., "test": ...}``.
  """
  splits = {name: SentimentSplit([], []) for name in SPLITS}
  for example in examples:
    if abs(example.score) <= NEUTRAL_MARGIN:
      continue
    bucket = example.sentence_id % 10
    name = "test" if bucket == 0 else "validation" if bucket == 1 else "train"
    splits[name].texts.append(example.text)
    splits[name].labels.append(int(example.score > 0))
  return splits


def read_movie_ground_truth(sdist_bytes: bytes) -> str:
  """Returns the text of ``movieReviewSnippets_GroundTruth.txt`` from the sdist's bytes."""
  with tarfile.open(fileobj=io.BytesIO(sdist_bytes)) as sdist:
    inner = sdist.extractfile(_INNER_ARCHIVE)
    if inner is None:
      raise ValueError(f"{_INNER_ARCHIVE} is missing from the vaderSentiment sdist.")
    with tarfile.open(fileobj=io.BytesIO(inner.read())) as resources:
      member = resources.extractfile(_MOVIE_FILE)
      if member is None:
        raise ValueError(f"{_MOVIE_FILE} is missing from hutto_ICWSM_2014.tar.gz.")
      return member.read().decode("utf-8")


def load_movie_sentiment() -> dict[str, SentimentSplit]:
  """Loads the movie-review sentiment splits, fetching the sdist into the cache on first use.

  Returns:
    ``{"train": ..., "validation": ..., "test": ...}``.

  Raises:
    SourceUnavailableError: when the sdist is not cached and cannot be fetched.
  """
  sdist_bytes = _fetch.fetch(VADER_SOURCE).read_bytes()
  return split_examples(parse_ground_truth(read_movie_ground_truth(sdist_bytes)))
