"""Training and evaluation of a sentence classifier built on a pretrained encoder.

The classifier needs no new parameters: the logits are the scaled cosine similarities between a
sentence's embedding and the embeddings of one description per label (computed once with the
pretrained encoder, then frozen). Before any training this is a zero-shot classifier, so every
method is measured against the same starting point and its budget is exactly what it may move.

The loop itself (:func:`fit`, :func:`train_and_export`) takes any loss over any model's
parameters; the translation task (``_translation``) trains the Llama decoder with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from dst_optax.demo import _baselines, _bert, _data

# Scale of the cosine-similarity logits; cosines lie in [-1, 1], so a softmax over them needs a
# temperature to become confident (the value sentence-transformers' contrastive losses use).
LOGIT_SCALE = 20.0
# Chosen on the validation split among four pairs (zero-shot accuracy 0.708).
LABEL_DESCRIPTIONS = ("This movie is bad.", "This movie is good.")
# Evaluation batches are cut to their longest sequence rounded up to this multiple: few shapes
# to compile, little compute spent on padding (most movie snippets are under 32 tokens).
LENGTH_MULTIPLE = 16
BYTES_PER_INDEX = 4


class EncodedSplit(NamedTuple):
  """Token ids, attention masks and labels of one split, as numpy arrays."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray


class TrainConfig(NamedTuple):
  """How long and on what to train.

  Attributes:
    steps: optimizer steps.
    batch_size: training examples per step.
    seed: seed of the data order (and of the methods' random initialisations).
    eval_batch_size: examples per forward pass in evaluation.
  """

  steps: int = 80
  batch_size: int = 16
  seed: int = 0
  eval_batch_size: int = 128


class RunResult(NamedTuple):
  """Outcome of one fine-tuning run.

  Attributes:
    name: the method's short name.
    label: the method with its hyperparameters.
    accuracy: test accuracy of the exported model.
    num_trainable: the method's budget of free parameters.
    num_changed: coordinates of the exported model that differ from the pretrained one, plus any
      new parameters (a soft prompt).
    storage_bytes: bytes to store the result next to the pretrained model: (int32 index, value)
      pairs for sparse methods, the trainable tensors for dense ones.
    train_seconds: wall-clock seconds of training, compilation included.
    losses: training loss per step.
    validation_accuracy: validation accuracy of the exported model (what a learning rate is
      chosen by), or None when no validation split was evaluated.
  """

  name: str
  label: str
  accuracy: float
  num_trainable: int
  num_changed: int
  storage_bytes: int
  train_seconds: float
  losses: list[float]
  validation_accuracy: float | None = None


def encode_split(tokenizer: Any, split: _data.SentimentSplit) -> EncodedSplit:
  """Tokenises a split with the encoder's tokenizer."""
  input_ids, attention_mask = _bert.tokenize(tokenizer, split.texts)
  return EncodedSplit(input_ids, attention_mask, np.asarray(split.labels, np.int32))


def trim_padding(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Drops padding columns beyond the longest sequence, rounded up to :data:`LENGTH_MULTIPLE`."""
  longest = int(mask.sum(axis=1).max())
  length = min(ids.shape[1], -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
  return ids[:, :length], mask[:, :length]


def _embed(
  model: _bert.BertEncoder, params: Any, prompt: jax.Array | None, ids: jax.Array, mask: jax.Array
) -> jax.Array:
  hidden, token_mask = model.apply(params, ids, mask, prompt)
  return _bert.mean_pool_normalized(hidden, token_mask)


def label_prototypes(pretrained: _bert.PretrainedBert) -> jax.Array:
  """Embeddings ``(num_labels, hidden)`` of :data:`LABEL_DESCRIPTIONS` by the pretrained encoder."""
  ids, mask = _bert.tokenize(pretrained.tokenizer, list(LABEL_DESCRIPTIONS))
  return _embed(pretrained.model, pretrained.params, None, ids, mask)


def classifier_logits(
  model: _bert.BertEncoder,
  params: Any,
  prompt: jax.Array | None,
  prototypes: jax.Array,
  ids: jax.Array,
  mask: jax.Array,
) -> jax.Array:
  """Logits ``(batch, num_labels)``: scaled cosine similarity to each label prototype."""
  return LOGIT_SCALE * _embed(model, params, prompt, ids, mask) @ prototypes.T


def evaluate(
  model: _bert.BertEncoder,
  params: Any,
  prompt: jax.Array | None,
  prototypes: jax.Array,
  split: EncodedSplit,
  batch_size: int = 128,
) -> float:
  """Accuracy of the classifier on ``split``.

  Args:
    model: the encoder module.
    params: its parameters.
    prompt: soft prompt or None.
    prototypes: label prototypes.
    split: the encoded examples.
    batch_size: examples per forward pass (the last batch is padded to it).

  Returns:
    Fraction of correctly classified examples.
  """
  predict = jax.jit(
    lambda params, prompt, ids, mask: jnp.argmax(
      classifier_logits(model, params, prompt, prototypes, ids, mask), axis=-1
    )
  )
  # Sorted by length, each batch is padded only as far as its own longest sentence.
  order = np.argsort(split.attention_mask.sum(axis=1), kind="stable")
  predictions = np.zeros(len(order), np.int32)
  for start in range(0, len(order), batch_size):
    batch = order[start : start + batch_size]
    ids, mask = trim_padding(split.input_ids[batch], split.attention_mask[batch])
    padding = batch_size - len(batch)
    ids, mask = np.pad(ids, ((0, padding), (0, 0))), np.pad(mask, ((0, padding), (0, 0)))
    predictions[batch] = np.asarray(predict(params, prompt, ids, mask))[: len(batch)]
  return float(np.mean(predictions == split.labels))


LossFn = Callable[..., jax.Array]


def sentiment_loss(model: _bert.BertEncoder, prototypes: jax.Array) -> LossFn:
  """Cross-entropy of the prototype classifier, as a :func:`fit` loss over (ids, mask, labels)."""

  def loss_fn(params, prompt, ids, mask, labels):
    logits = classifier_logits(model, params, prompt, prototypes, ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn


def fit(
  method: _baselines.Method,
  base: Any,
  loss_fn: LossFn,
  examples: tuple[np.ndarray, ...],
  config: TrainConfig,
  progress: bool = True,
) -> tuple[Any, list[float]]:
  """Trains ``method`` on shuffled mini-batches of ``examples`` (any model, any loss).

  Args:
    method: what to train and how.
    base: the pretrained parameters ``method.materialize`` builds on.
    loss_fn: ``(params, prompt, *batch) -> scalar`` mean loss of one batch, ``batch`` being the
      rows of each array of ``examples``.
    examples: arrays with one row per example, all the same length.
    config: steps, batch size, seed.
    progress: show a progress bar.

  Returns:
    ``(trainable, losses)``: the trained pytree and the loss of every step.
  """

  def method_loss(trainable, base, *batch):
    return loss_fn(*method.materialize(trainable, base), *batch)

  @jax.jit
  def step(trainable, opt_state, base, *batch):
    loss, grads = jax.value_and_grad(method_loss)(trainable, base, *batch)
    updates, opt_state = method.optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  trainable = method.trainable
  opt_state = method.optimizer.init(trainable)
  rng = np.random.default_rng(config.seed)
  order = np.zeros(0, int)
  losses = []
  with tqdm.trange(config.steps, desc=method.label, disable=not progress, leave=True) as bar:
    for _ in bar:
      if len(order) < config.batch_size:
        order = np.concatenate([order, rng.permutation(len(examples[0]))])
      batch, order = order[: config.batch_size], order[config.batch_size :]
      # Full-length batches: one shape, one compilation of the training step.
      trainable, opt_state, loss = step(trainable, opt_state, base, *(a[batch] for a in examples))
      losses.append(float(loss))
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
  return trainable, losses


def train(
  pretrained: _bert.PretrainedBert,
  method: _baselines.Method,
  prototypes: jax.Array,
  split: EncodedSplit,
  config: TrainConfig,
  progress: bool = True,
) -> tuple[Any, list[float]]:
  """Trains ``method`` with cross-entropy on ``split`` (AdamW-style optimizers, no schedule).

  Args:
    pretrained: the encoder and its pretrained parameters.
    method: what to train and how.
    prototypes: label prototypes (frozen).
    split: encoded training examples.
    config: steps, batch size, seed.
    progress: show a progress bar.

  Returns:
    ``(trainable, losses)``: the trained pytree and the loss of every step.
  """
  examples = (split.input_ids, split.attention_mask, split.labels)
  loss_fn = sentiment_loss(pretrained.model, prototypes)
  return fit(method, pretrained.params, loss_fn, examples, config, progress)


def count_changed(params: Any, prompt: jax.Array | None, base: Any) -> int:
  """Coordinates of ``params`` that differ from ``base`` (bit-exactly), plus the prompt's size."""
  changed = sum(
    int(jnp.sum(p != b))
    for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(base), strict=True)
  )
  return changed + (0 if prompt is None else int(prompt.size))


class Trained(NamedTuple):
  """A trained and exported model with what it costs.

  Attributes:
    params: the exported model parameters.
    prompt: the soft prompt, or None.
    num_changed: see :attr:`RunResult.num_changed`.
    storage_bytes: see :attr:`RunResult.storage_bytes`.
    train_seconds: wall-clock seconds of training and export, compilation included.
    losses: training loss per step.
  """

  params: Any
  prompt: jax.Array | None
  num_changed: int
  storage_bytes: int
  train_seconds: float
  losses: list[float]


def train_and_export(
  method: _baselines.Method,
  base: Any,
  loss_fn: LossFn,
  examples: tuple[np.ndarray, ...],
  config: TrainConfig,
  progress: bool = True,
) -> Trained:
  """Runs :func:`fit`, exports the final model and measures its changes and storage.

  Args:
    method: what to train and how.
    base: the pretrained parameters.
    loss_fn: see :func:`fit`.
    examples: see :func:`fit`.
    config: steps, batch size, seed.
    progress: show a progress bar.

  Returns:
    The exported model with its costs.
  """
  start = time.perf_counter()
  trainable, losses = fit(method, base, loss_fn, examples, config, progress)
  params, prompt = method.export(trainable, base)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  num_changed = count_changed(params, prompt, base)
  value_bytes = jnp.dtype(jax.tree.leaves(trainable)[0].dtype).itemsize
  if method.sparse:
    storage = num_changed * (BYTES_PER_INDEX + value_bytes)
  else:
    storage = method.num_trainable * value_bytes
  return Trained(params, prompt, num_changed, storage, seconds, losses)


def run_method(
  pretrained: _bert.PretrainedBert,
  method: _baselines.Method,
  prototypes: jax.Array,
  train_split: EncodedSplit,
  test_split: EncodedSplit,
  config: TrainConfig,
  progress: bool = True,
  validation_split: EncodedSplit | None = None,
) -> RunResult:
  """Trains ``method``, exports the model and evaluates it on ``test_split`` (and validation).

  Args:
    pretrained: the encoder and its pretrained parameters.
    method: what to train and how.
    prototypes: label prototypes (frozen).
    train_split: encoded training examples.
    test_split: encoded evaluation examples.
    config: steps, batch size, seed.
    progress: show a progress bar.
    validation_split: encoded validation examples, also evaluated when given.

  Returns:
    The run's result.
  """
  trained = train_and_export(
    method,
    pretrained.params,
    sentiment_loss(pretrained.model, prototypes),
    (train_split.input_ids, train_split.attention_mask, train_split.labels),
    config,
    progress,
  )
  accuracy, validation_accuracy = _evaluate_splits(
    pretrained.model, trained.params, trained.prompt, prototypes, test_split, validation_split,
    config,
  )  # fmt: skip
  return RunResult(
    method.name, method.label, accuracy, method.num_trainable, trained.num_changed,
    trained.storage_bytes, trained.train_seconds, trained.losses, validation_accuracy,
  )  # fmt: skip


def _evaluate_splits(
  model: _bert.BertEncoder,
  params: Any,
  prompt: jax.Array | None,
  prototypes: jax.Array,
  test_split: EncodedSplit,
  validation_split: EncodedSplit | None,
  config: TrainConfig,
) -> tuple[float, float | None]:
  """Test accuracy and validation accuracy (None without a validation split)."""
  accuracy = evaluate(model, params, prompt, prototypes, test_split, config.eval_batch_size)
  if validation_split is None:
    return accuracy, None
  return accuracy, evaluate(
    model, params, prompt, prototypes, validation_split, config.eval_batch_size
  )


def zero_shot_result(
  pretrained: _bert.PretrainedBert,
  prototypes: jax.Array,
  test_split: EncodedSplit,
  config: TrainConfig,
  validation_split: EncodedSplit | None = None,
) -> RunResult:
  """The untrained classifier: the pretrained encoder against the label prototypes.

  Args:
    pretrained: the encoder and its pretrained parameters.
    prototypes: label prototypes.
    test_split: encoded evaluation examples.
    config: its ``eval_batch_size`` is used.
    validation_split: encoded validation examples, also evaluated when given.

  Returns:
    The zero-shot result (no budget, no training).
  """
  accuracy, validation_accuracy = _evaluate_splits(
    pretrained.model, pretrained.params, None, prototypes, test_split, validation_split, config
  )
  return RunResult(
    "zero-shot", "zero-shot (no training)", accuracy, 0, 0, 0, 0.0, [], validation_accuracy
  )
