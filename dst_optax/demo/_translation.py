"""English→Spanish verse translation with SmolLM2-135M-Instruct: training and evaluation.

Each example is a single-turn chat: the user asks ``"Translate to Spanish: <English verse>"`` (in
SmolLM2's chat template, default system prompt included) and the assistant replies with the
Reina-Valera verse and its end-of-turn token. Training minimises the causal-LM cross-entropy of
the reply tokens only; the prompt is context, never a target. Pairs whose whole conversation is
longer than ``max_length`` tokens are dropped (not truncated, so no reply is cut mid-verse), which
keeps one fixed training shape. Evaluation greedily translates the first ``eval_size`` test verses
that fit the same cap and scores them with sacreBLEU's chrF and BLEU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

from dst_optax.demo import _baselines, _llama, _metrics, _train, _verses

INSTRUCTION = "Translate to Spanish: {}"
END_OF_TURN = "<|im_end|>"
NUM_SAMPLES = 3  # Translations kept in each result, for reading.


class TranslationConfig(NamedTuple):
  """How to train and evaluate.

  Attributes:
    steps: optimizer steps.
    batch_size: training conversations per step.
    seed: seed of the data order (and of the methods' random initialisations).
    max_length: longest conversation in tokens (prompt + reply); longer pairs are dropped.
    eval_size: translate the first this many test verses that fit ``max_length``.
    eval_batch_size: verses per generation call.
    max_new_tokens: generated tokens per verse (enough for any reply that fits ``max_length``).
  """

  steps: int = 60
  batch_size: int = 4
  seed: int = 0
  max_length: int = 96
  eval_size: int = 64
  eval_batch_size: int = 32
  max_new_tokens: int = 64

  @property
  def train_config(self) -> _train.TrainConfig:
    return _train.TrainConfig(self.steps, self.batch_size, self.seed)


class EncodedPairs(NamedTuple):
  """Conversations right-padded to one length, as numpy arrays ``(examples, length)``.

  Attributes:
    input_ids: prompt then reply token ids, padding after.
    attention_mask: 1 on real tokens.
    target_mask: 1 on reply tokens (the Spanish verse and the end-of-turn token), the only ones
      whose prediction is scored.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  target_mask: np.ndarray


class TranslationResult(NamedTuple):
  """Outcome of one run on the translation task.

  Attributes:
    name: the method's short name.
    label: the method with its hyperparameters.
    chrf: corpus chrF of the exported model on the evaluation verses (0-100).
    bleu: corpus BLEU (0-100).
    num_trainable: the method's budget of free parameters.
    num_changed: coordinates of the exported model that differ from the pretrained one.
    storage_bytes: bytes to store the result next to the pretrained model.
    train_seconds: wall-clock seconds of training and export, compilation included.
    eval_seconds: wall-clock seconds of greedy translation of the evaluation verses.
    losses: training loss per step.
    samples: the first few translations, for reading.
  """

  name: str
  label: str
  chrf: float
  bleu: float
  num_trainable: int
  num_changed: int
  storage_bytes: int
  train_seconds: float
  eval_seconds: float
  losses: list[float]
  samples: list[str]


def prompt_text(english: str) -> str:
  """The chat-templated instruction for one verse, ending where the reply begins."""
  return _llama.chat_prompt([("user", INSTRUCTION.format(english))])


def _conversations(
  tokenizer: Any, pairs: Sequence[_verses.VersePair]
) -> list[tuple[list[int], list[int]]]:
  """``(prompt ids, reply ids)`` of each pair, the reply ending with the end-of-turn token."""
  # Prompt and reply are tokenised apart so the boundary is exact; the template's newline before
  # the reply is its own pre-token, so this equals tokenising the whole conversation.
  texts = [prompt_text(pair.en) for pair in pairs] + [pair.es + END_OF_TURN for pair in pairs]
  ids, mask = _llama.tokenize(tokenizer, texts)
  # The tokenizer pads on the left; keep only the real tokens of each text.
  unpadded = [row[keep.astype(bool)].tolist() for row, keep in zip(ids, mask, strict=True)]
  return list(zip(unpadded[: len(pairs)], unpadded[len(pairs) :], strict=True))


def fits(tokenizer: Any, pairs: Sequence[_verses.VersePair], max_length: int) -> list[bool]:
  """Whether each pair's conversation (prompt, reply, end of turn) has at most ``max_length``."""
  return [len(p) + len(r) <= max_length for p, r in _conversations(tokenizer, pairs)]


def encode_pairs(
  tokenizer: Any, pairs: Sequence[_verses.VersePair], max_length: int
) -> EncodedPairs:
  """Tokenises the conversations of ``pairs`` that fit ``max_length``, right-padded to it.

  Args:
    tokenizer: SmolLM2's tokenizer.
    pairs: verse pairs.
    max_length: padded length; longer conversations are dropped.

  Returns:
    The encoded conversations that fit, in input order.
  """
  kept = [(p, r) for p, r in _conversations(tokenizer, pairs) if len(p) + len(r) <= max_length]
  pad_id = tokenizer.padding["pad_id"]
  ids = np.full((len(kept), max_length), pad_id, np.int32)
  attention = np.zeros((len(kept), max_length), np.int32)
  target = np.zeros((len(kept), max_length), np.int32)
  for row, (prompt, reply) in enumerate(kept):
    ids[row, : len(prompt) + len(reply)] = prompt + reply
    attention[row, : len(prompt) + len(reply)] = 1
    target[row, len(prompt) : len(prompt) + len(reply)] = 1
  return EncodedPairs(ids, attention, target)


def target_loss(model: _llama.LlamaModel) -> _train.LossFn:
  """Mean next-token cross-entropy over reply tokens, as a :func:`_train.fit` loss.

  Args:
    model: the decoder.

  Returns:
    ``(params, prompt, ids, attention_mask, target_mask) -> loss``; ``prompt`` is a soft prompt
    placed before each conversation (prompt tuning) or None.
  """

  def loss_fn(params, prompt, ids, attention_mask, target_mask):
    logits = model.apply(params, ids, attention_mask, prompt)
    # The logits at position t predict token t + 1: score them where t + 1 is a reply token.
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    weights = target_mask[:, 1:].astype(losses.dtype)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return loss_fn


def evaluation_pairs(
  tokenizer: Any, test: Sequence[_verses.VersePair], config: TranslationConfig
) -> list[_verses.VersePair]:
  """The first ``config.eval_size`` test pairs that fit ``config.max_length``."""
  keep = fits(tokenizer, test, config.max_length)
  return [pair for pair, fit in zip(test, keep, strict=True) if fit][: config.eval_size]


def translate_and_score(
  pretrained: _llama.PretrainedLlama,
  params: Any,
  pairs: Sequence[_verses.VersePair],
  config: TranslationConfig,
  soft_prompt: Any = None,
) -> tuple[dict[str, float], list[str], float]:
  """Greedily translates the English side of ``pairs`` and scores it against the Spanish.

  Args:
    pretrained: the decoder and its tokenizer.
    params: the parameters to translate with.
    pairs: evaluation pairs.
    config: generation length and batch size.
    soft_prompt: the trained soft prompt of prompt tuning, else None.

  Returns:
    ``(scores, translations, seconds)``: chrF and BLEU, the outputs, wall-clock seconds.
  """
  start = time.perf_counter()
  translations = _llama.answer(
    pretrained,
    [INSTRUCTION.format(pair.en) for pair in pairs],
    config.max_new_tokens,
    params,
    config.eval_batch_size,
    soft_prompt,
  )
  seconds = time.perf_counter() - start
  scores = _metrics.translation_scores(
    [text.strip() for text in translations], [pair.es for pair in pairs]
  )
  return scores, translations, seconds


def run_translation(
  pretrained: _llama.PretrainedLlama,
  method: _baselines.Method,
  train_pairs: EncodedPairs,
  test_pairs: Sequence[_verses.VersePair],
  config: TranslationConfig,
  progress: bool = True,
) -> TranslationResult:
  """Trains ``method`` on the conversations, exports the model and scores its translations.

  Args:
    pretrained: the decoder and its pretrained parameters.
    method: what to train and how.
    train_pairs: encoded training conversations.
    test_pairs: evaluation pairs, see :func:`evaluation_pairs`.
    config: training and evaluation settings.
    progress: show a progress bar.

  Returns:
    The run's result.
  """
  trained = _train.train_and_export(
    method,
    pretrained.params,
    target_loss(pretrained.model),
    tuple(train_pairs),
    config.train_config,
    progress,
  )
  scores, translations, eval_seconds = translate_and_score(
    pretrained, trained.params, test_pairs, config, trained.prompt
  )
  return TranslationResult(
    method.name, method.label, scores["chrf"], scores["bleu"], method.num_trainable,
    trained.num_changed, trained.storage_bytes, trained.train_seconds, eval_seconds,
    trained.losses, translations[:NUM_SAMPLES],
  )  # fmt: skip


def zero_shot_translation(
  pretrained: _llama.PretrainedLlama,
  test_pairs: Sequence[_verses.VersePair],
  config: TranslationConfig,
) -> TranslationResult:
  """The untrained Instruct model on the evaluation pairs."""
  scores, translations, seconds = translate_and_score(
    pretrained, pretrained.params, test_pairs, config
  )
  return TranslationResult(
    "zero-shot", "zero-shot (no training)", scores["chrf"], scores["bleu"], 0, 0, 0, 0.0,
    seconds, [], translations[:NUM_SAMPLES],
  )  # fmt: skip
