"""The translation task on a tiny random Llama with a word-level tokenizer (no weights, no data)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers

import dst_optax
from dst_optax.demo import _baselines, _llama, _train, _translation, _verses

ENGLISH = ["In the beginning God created", "the heaven and the earth", "and God saw the light"]
SPANISH = ["En el principio creó Dios", "los cielos y la tierra", "y vio Dios la luz"]
SPECIAL = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
TINY = _llama.LlamaConfig(
  vocab_size=64, hidden_size=24, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=40
)


@pytest.fixture(scope="module")
def tokenizer():
  words = sorted({word for text in ENGLISH + SPANISH for word in text.split()})
  words += ["user", "assistant", "system", "Translate", "to", "Spanish:"]
  tokenizer = tokenizers.Tokenizer(
    tokenizers.models.WordLevel({w: i for i, w in enumerate(SPECIAL + words)}, unk_token="<unk>")
  )
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL[1:]])
  tokenizer.enable_padding(direction="left", pad_id=1, pad_token="<pad>")
  return tokenizer


@pytest.fixture(scope="module")
def pretrained(tokenizer):
  model = _llama.LlamaModel(TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return _llama.PretrainedLlama(model, params, tokenizer, TINY)


def _pairs(count):
  return [
    _verses.VersePair("Gen", 1, verse, ENGLISH[verse % 3], SPANISH[verse % 3])
    for verse in range(count)
  ]


def test_only_reply_tokens_are_targets(tokenizer):
  pair = _pairs(1)[0]
  encoded = _translation.encode_pairs(tokenizer, [pair], max_length=40)
  prompt = tokenizer.encode(_translation.prompt_text(pair.en)).ids
  reply = tokenizer.encode(pair.es + _translation.END_OF_TURN).ids
  ids, attention, target = (array[0] for array in encoded)
  assert ids[: len(prompt) + len(reply)].tolist() == prompt + reply
  assert target.tolist() == [0] * len(prompt) + [1] * len(reply) + [0] * (40 - len(prompt + reply))
  assert attention.sum() == len(prompt) + len(reply)


def test_pairs_longer_than_the_cap_are_dropped(tokenizer):
  pairs = _pairs(3)
  lengths = [
    len(tokenizer.encode(_translation.prompt_text(p.en)).ids)
    + len(tokenizer.encode(p.es + _translation.END_OF_TURN).ids)
    for p in pairs
  ]
  cap = sorted(lengths)[1]
  encoded = _translation.encode_pairs(tokenizer, pairs, cap)
  assert encoded.input_ids.shape == (sum(n <= cap for n in lengths), cap)
  assert _translation.fits(tokenizer, pairs, cap) == [n <= cap for n in lengths]


def test_loss_averages_the_reply_tokens_only(pretrained):
  encoded = _translation.encode_pairs(pretrained.tokenizer, _pairs(3), max_length=40)
  loss = _translation.target_loss(pretrained.model)(pretrained.params, None, *encoded)
  logits = pretrained.model.apply(pretrained.params, encoded.input_ids, encoded.attention_mask)
  per_token = optax.softmax_cross_entropy_with_integer_labels(
    logits[:, :-1], encoded.input_ids[:, 1:]
  )
  scored = encoded.target_mask[:, 1:].astype(bool)
  np.testing.assert_allclose(loss, per_token[scored].mean(), rtol=1e-6)
  # Prompt tokens would change it: the masking matters.
  real = encoded.attention_mask[:, 1:].astype(bool)
  assert not np.isclose(loss, per_token[real].mean())


def test_lora_adapts_the_decoders_query_and_value_kernels(pretrained):
  per_layer = 2 * TINY.hidden_size + TINY.hidden_size + TINY.num_kv_heads * TINY.head_dim
  assert _baselines.lora_params_per_rank(pretrained.params) == TINY.num_layers * per_layer
  with pytest.raises(ValueError, match="bias"):
    _baselines.matched_method("bitfit", pretrained.params, 1e-2)


def test_prompt_tuning_starts_from_decoder_token_embeddings_at_the_matched_budget(pretrained):
  method = _baselines.matched_method("prompt", pretrained.params, 0.1)
  budget = _baselines.dst_budget(pretrained.params, 0.1, dst_optax.PerTensor())
  assert method.trainable.shape == (round(budget / TINY.hidden_size), TINY.hidden_size)
  vocabulary = np.asarray(pretrained.params["params"]["embed"]["embedding"])
  assert all((vocabulary == row).all(axis=1).any() for row in np.asarray(method.trainable))


def test_prompt_tuned_translation_trains_and_generates_with_the_prompt(pretrained):
  pairs = _pairs(6)
  encoded = _translation.encode_pairs(pretrained.tokenizer, pairs, max_length=40)
  method = _baselines.prompt_tuning(pretrained.params, 3e-1, length=4, seed=0)
  config = _translation.TranslationConfig(
    steps=20, batch_size=3, max_length=40, eval_size=3, eval_batch_size=3, max_new_tokens=6
  )
  result = _translation.run_translation(
    pretrained, method, encoded, pairs[:3], config, progress=False
  )
  assert np.mean(result.losses[-3:]) < 0.95 * np.mean(result.losses[:3])
  assert result.num_trainable == result.num_changed == 4 * TINY.hidden_size
  zero_shot = _translation.zero_shot_translation(pretrained, pairs[:3], config)
  # The trained prompt reaches generation: the pretrained weights alone translate differently.
  assert result.samples != zero_shot.samples


# 30-55 s on the shared 2-core CPU, most of it compiling the DST step and the export.
@pytest.mark.slow
def test_dst_training_lowers_the_loss_within_budget(pretrained):
  encoded = _translation.encode_pairs(pretrained.tokenizer, _pairs(12), max_length=40)
  method = _baselines.matched_method("dst", pretrained.params, 0.05, learning_rate=3e-2)
  trained = _train.train_and_export(
    method,
    pretrained.params,
    _translation.target_loss(pretrained.model),
    tuple(encoded),
    _train.TrainConfig(steps=30, batch_size=4),
    progress=False,
  )
  assert np.mean(trained.losses[-5:]) < 0.8 * trained.losses[0]
  assert 0 < trained.num_changed <= method.num_trainable
  assert trained.storage_bytes == trained.num_changed * (_train.BYTES_PER_INDEX + 4)


def test_zero_shot_translation_scores_greedy_outputs(pretrained):
  config = _translation.TranslationConfig(eval_size=3, eval_batch_size=2, max_new_tokens=4)
  result = _translation.zero_shot_translation(pretrained, _pairs(3), config)
  assert len(result.samples) == 3 and all(isinstance(text, str) for text in result.samples)
  assert 0 <= result.chrf <= 100 and 0 <= result.bleu <= 100
  assert result.num_trainable == result.num_changed == 0
