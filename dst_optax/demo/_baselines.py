"""Fine-tuning methods compared in the demo: DST and the usual baselines.

Every method trains a pytree of its own (``trainable``) with an optax optimizer, and
``materialize(trainable, base)`` turns it into what the model consumes: its parameters and,
for prompt tuning, soft-prompt vectors. ``export`` does the same for the final model (DST projects
onto its budget there, bit-exactly). Budgets count the coordinates a method may move; the frozen
classification head (label prototypes, see ``_train``) is shared by all methods and not counted.

DST, full fine-tuning, the random subset and LoRA work on any Flax parameter tree: LoRA adapts
the kernels under a ``query`` or ``value`` module, which names the attention projections of both
the BERT encoder and the Llama decoder. Prompt tuning starts from the model's input embeddings
(BERT's ``word_embeddings``, Llama's ``embed``), and both models take a soft prompt. BitFit needs
bias vectors, so it is BERT-only (the Llama decoder has none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dst_optax
from dst_optax import _silos

Params = Any
Materialize = Callable[[Any, Params], tuple[Params, jax.Array | None]]

SILO_KINDS: dict[str, Callable[[], Any]] = {
  "per-tensor": dst_optax.PerTensor,
  "global": dst_optax.Global,
  "rows": dst_optax.rows,
  "columns": dst_optax.columns,
}
LORA_TARGETS = ("query", "value")
# Input-embedding modules of the supported models: the BERT encoder's and the Llama decoder's.
INPUT_EMBEDDINGS = ("word_embeddings", "embed")
MAX_PROMPT_LENGTH = 256


class Method(NamedTuple):
  """A fine-tuning method ready to train.

  Attributes:
    name: short name, e.g. ``"dst"`` or ``"lora"``.
    label: human-readable description with its hyperparameters.
    trainable: initial trainable pytree.
    optimizer: optimizer over ``trainable``.
    materialize: ``(trainable, base) -> (model params, prompt or None)`` used in training.
    export: the same for the final model.
    num_trainable: free parameters (the method's budget).
    sparse: the result is stored as (index, value) pairs rather than dense tensors.
  """

  name: str
  label: str
  trainable: Any
  optimizer: optax.GradientTransformation
  materialize: Materialize
  export: Materialize
  num_trainable: int
  sparse: bool


def _as_params(trainable: Params, base: Params) -> tuple[Params, None]:
  del base  # The trainable tree is the whole model.
  return trainable, None


def num_params(tree: Any) -> int:
  """Number of scalars in a pytree."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _adamw(learning_rate: float) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, weight_decay=0.01)


def full_finetuning(base: Params, learning_rate: float) -> Method:
  """All pretrained parameters are trainable."""
  return Method(
    "full", "full fine-tuning", base, _adamw(learning_rate), _as_params, _as_params,
    num_params(base), sparse=False,
  )  # fmt: skip


def dst_budget(base: Params, fraction: float, silos: Any) -> int:
  """Free coordinates DST allows: the sum of ``floor(ε |S|)`` over the silos."""
  return int(np.sum(_silos.build_layout(base, silos).budgets(fraction)))


def dynamic_subset(base: Params, learning_rate: float, fraction: float, silo_kind: str) -> Method:
  """Dynamic Subset Tuning: AdamW followed by DST with ε = ``fraction``.

  Args:
    base: pretrained parameters (the seed).
    learning_rate: AdamW learning rate.
    fraction: ε, the fraction of free parameters per silo.
    silo_kind: a key of :data:`SILO_KINDS`.

  Returns:
    The method; its export projects the final parameters onto the budget exactly.
  """
  silos = _silo_spec(silo_kind)
  optimizer = optax.chain(
    _adamw(learning_rate),
    dst_optax.dynamic_subset_tuning(fraction_of_free_params=fraction, silos=silos),
  )

  # One compiled program rather than many small eager ones (a 100+ leaf model).
  project = jax.jit(lambda params, seed: dst_optax.project_to_budget(params, seed, fraction, silos))

  def export(trainable: Params, seed: Params) -> tuple[Params, None]:
    return project(trainable, seed), None

  label = f"DST ε={fraction:g} {silo_kind}"
  budget = dst_budget(base, fraction, silos)
  return Method("dst", label, base, optimizer, _as_params, export, budget, sparse=True)


def _silo_spec(silo_kind: str) -> Any:
  if silo_kind not in SILO_KINDS:
    raise ValueError(f"Unknown silo kind {silo_kind!r}; choose one of {sorted(SILO_KINDS)}.")
  return SILO_KINDS[silo_kind]()


def _masked_updates(masks: Params) -> optax.GradientTransformation:
  """Multiplies the final updates by fixed 0/1 masks (weight decay cannot leak)."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, masks), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def random_subset(base: Params, learning_rate: float, fraction: float, seed: int) -> Method:
  """A fixed random subset of ``floor(ε · size)`` coordinates per tensor (DST's static twin).

  Args:
    base: pretrained parameters.
    learning_rate: AdamW learning rate.
    fraction: ε, the fraction of each tensor that may change.
    seed: seed of the random subset.

  Returns:
    The method.
  """
  leaves, treedef = jax.tree.flatten(base)
  rng = np.random.default_rng(seed)
  masks = []
  for leaf in leaves:
    mask = np.zeros(leaf.size, bool)
    mask[rng.choice(leaf.size, math.floor(fraction * leaf.size), replace=False)] = True
    masks.append(jnp.asarray(mask.reshape(leaf.shape)))
  budget = int(sum(int(mask.sum()) for mask in masks))
  optimizer = optax.chain(
    _adamw(learning_rate), _masked_updates(jax.tree.unflatten(treedef, masks))
  )
  label = f"random subset ε={fraction:g}"
  return Method("random", label, base, optimizer, _as_params, _as_params, budget, sparse=True)


def bitfit(base: Params, learning_rate: float) -> Method:
  """BitFit (Ben Zaken et al. 2022): only bias vectors are trainable."""
  is_bias = jax.tree_util.tree_map_with_path(
    lambda path, _: _silos.path_name(path).endswith("bias"), base
  )
  masks = jax.tree.map(lambda leaf, bias: jnp.full(leaf.shape, bias), base, is_bias)
  budget = sum(
    leaf.size
    for leaf, bias in zip(jax.tree.leaves(base), jax.tree.leaves(is_bias), strict=True)
    if bias
  )
  if budget == 0:
    raise ValueError("BitFit needs bias vectors, and this model has none.")
  optimizer = optax.chain(_adamw(learning_rate), _masked_updates(masks))
  return Method("bitfit", "BitFit", base, optimizer, _as_params, _as_params, budget, sparse=True)


def _lora_kernels(base: Params) -> dict[str, jax.Array]:
  """The attention kernels LoRA adapts, keyed by their path name."""
  kernels = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(base):
    name = _silos.path_name(path)
    if name.endswith("/kernel") and name.split("/")[-2] in LORA_TARGETS:
      kernels[name] = leaf
  return kernels


def lora_params_per_rank(base: Params) -> int:
  """LoRA parameters added per unit of rank: ``sum(in + out)`` over the adapted kernels."""
  return sum(sum(kernel.shape) for kernel in _lora_kernels(base).values())


def lora(base: Params, learning_rate: float, rank: int, seed: int) -> Method:
  """LoRA (Hu et al. 2022) on the attention query and value kernels, scale ``alpha/r = 1``.

  Args:
    base: pretrained parameters.
    learning_rate: AdamW learning rate.
    rank: adapter rank (≥ 1).
    seed: seed of the down-projection initialisation.

  Returns:
    The method; its model merges ``W + A @ B`` into every adapted kernel.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be at least 1; got {rank}.")
  kernels = _lora_kernels(base)
  keys = jax.random.split(jax.random.key(seed), len(kernels))
  adapters = {
    name: {
      # A is random and B zero, so training starts from the pretrained model.
      "a": jax.random.normal(key, (kernel.shape[0], rank)) / np.sqrt(kernel.shape[0]),
      "b": jnp.zeros((rank, kernel.shape[1])),
    }
    for key, (name, kernel) in zip(keys, kernels.items(), strict=True)
  }

  def merge(trainable: dict[str, Any], base: Params) -> tuple[Params, None]:
    def merged(path, leaf):
      adapter = trainable.get(_silos.path_name(path))
      return leaf if adapter is None else leaf + adapter["a"] @ adapter["b"]

    return jax.tree_util.tree_map_with_path(merged, base), None

  label = f"LoRA r={rank}"
  optimizer = _adamw(learning_rate)
  return Method(
    "lora", label, adapters, optimizer, merge, merge, num_params(adapters), sparse=False
  )


def _prompt_vocabulary(base: Params) -> jax.Array:
  """The input embeddings soft prompts start from."""
  for name in INPUT_EMBEDDINGS:
    if name in base["params"]:
      return base["params"][name]["embedding"]
  raise ValueError(
    f"Prompt tuning needs input embeddings under params/{{{', '.join(INPUT_EMBEDDINGS)}}}; "
    f"this model has {sorted(base['params'])}."
  )


def prompt_tuning(base: Params, learning_rate: float, length: int, seed: int) -> Method:
  """Prompt tuning (Lester et al. 2021): ``length`` soft tokens the model reads with its input.

  The BERT encoder places them after ``[CLS]``, the Llama decoder before the conversation.

  The prompt starts as the embeddings of random vocabulary tokens, as in the paper.

  Args:
    base: pretrained parameters (``{"params": ...}`` of ``BertEncoder`` or ``LlamaModel``).
    learning_rate: AdamW learning rate (no weight decay on the prompt).
    length: number of soft tokens, 1 to :data:`MAX_PROMPT_LENGTH`.
    seed: seed of the vocabulary sample.

  Returns:
    The method.
  """
  if not 1 <= length <= MAX_PROMPT_LENGTH:
    raise ValueError(f"Prompt length must lie in [1, {MAX_PROMPT_LENGTH}]; got {length}.")
  vocabulary = _prompt_vocabulary(base)
  tokens = np.random.default_rng(seed).choice(vocabulary.shape[0], length, replace=False)
  prompt = vocabulary[tokens]

  def with_prompt(trainable: jax.Array, base: Params) -> tuple[Params, jax.Array]:
    return base, trainable

  label = f"prompt tuning L={length}"
  optimizer = optax.adam(learning_rate)
  return Method("prompt", label, prompt, optimizer, with_prompt, with_prompt, prompt.size, False)


METHOD_NAMES = ("dst", "full", "lora", "prompt", "bitfit", "random")
DEFAULT_LEARNING_RATES = {
  "dst": 1e-3,
  "full": 5e-5,
  "lora": 1e-3,
  "prompt": 1e-2,
  "bitfit": 1e-3,
  "random": 1e-3,
}


def matched_method(
  name: str,
  base: Params,
  fraction: float,
  silo_kind: str = "per-tensor",
  learning_rate: float | None = None,
  seed: int = 0,
) -> Method:
  """Builds method ``name`` with a budget matched to DST at ε = ``fraction``.

  LoRA's rank and the prompt length are the ones whose parameter count is closest to DST's
  budget (at least 1); full fine-tuning and BitFit have a fixed budget.

  Args:
    name: one of :data:`METHOD_NAMES`.
    base: pretrained parameters.
    fraction: ε of the DST run the budget is matched to.
    silo_kind: DST's silo kind (also sets the budget to match).
    learning_rate: overrides the method's default learning rate.
    seed: seed of random initialisations and subsets.

  Returns:
    The method.
  """
  if name not in METHOD_NAMES:
    raise ValueError(f"Unknown method {name!r}; choose one of {METHOD_NAMES}.")
  rate = DEFAULT_LEARNING_RATES[name] if learning_rate is None else learning_rate
  budget = dst_budget(base, fraction, _silo_spec(silo_kind))
  if name == "dst":
    return dynamic_subset(base, rate, fraction, silo_kind)
  if name == "full":
    return full_finetuning(base, rate)
  if name == "bitfit":
    return bitfit(base, rate)
  if name == "random":
    return random_subset(base, rate, fraction, seed)
  if name == "lora":
    return lora(base, rate, max(1, round(budget / lora_params_per_rank(base))), seed)
  hidden_size = _prompt_vocabulary(base).shape[1]
  return prompt_tuning(
    base, rate, min(MAX_PROMPT_LENGTH, max(1, round(budget / hidden_size))), seed
  )
