"""Subsets for serving: apply time and file bytes on a T5-base-sized model (CPU).

For ε in ``--fractions`` it builds a subset of a ~248M parameter T5 v1.1-base
shaped seed (random values; per-tensor budgets ``floor(ε · size)`` at random
positions, as DST leaves them) and measures median wall times of

* ``copy``: a plain copy of the parameters (NumPy), the unit of the ratios;
* ``apply``: ``apply_subset(seed, subset, verify=False)`` (NumPy: copy + scatter);
* ``device_copy`` / ``device_apply``: the same on JAX CPU arrays (jitted);
* ``switch``: ``switch_subset`` from one task's subset to another's in the
  served buffers (donated, so it costs time in the subsets' size);
* ``load``: reading and validating the subset file; ``fingerprint``: hashing the
  seed once to check subsets against it;

and file bytes with delta-varint and raw int32 indices, per changed
coordinate, against the ideal (4-byte index + value) and against a LoRA adapter
of about the same number of parameters (A and B on every attention query and
value matrix, saved the same way; its rank is rounded, so compare per parameter).

Run ``python benchmarks/subset.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from dst_optax import _subset, _subset_io

# T5 v1.1 base: d_model, d_ff (gated GELU), vocabulary, layers per stack.
D_MODEL, D_FF, VOCABULARY, NUM_LAYERS = 768, 2048, 32128, 12
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def t5_base_shapes() -> dict[str, tuple[int, ...]]:
  """Tensor shapes of T5 v1.1 base (untied embedding and logits): about 248M params."""
  shapes: dict[str, tuple[int, ...]] = {
    "token_embedder": (VOCABULARY, D_MODEL),
    "decoder/logits_dense": (D_MODEL, VOCABULARY),
  }
  attention = {name: (D_MODEL, D_MODEL) for name in ("query", "key", "value", "out")}
  mlp = {"wi_0": (D_MODEL, D_FF), "wi_1": (D_MODEL, D_FF), "wo": (D_FF, D_MODEL)}
  for layer in range(NUM_LAYERS):
    prefix = f"encoder/layer_{layer}"
    for name, shape in {**attention, **mlp}.items():
      shapes[f"{prefix}/{name}"] = shape
    shapes[f"{prefix}/pre_attention_norm"] = shapes[f"{prefix}/pre_mlp_norm"] = (D_MODEL,)
    prefix = f"decoder/layer_{layer}"
    for block in ("self_attention", "encoder_decoder_attention"):
      for name, shape in attention.items():
        shapes[f"{prefix}/{block}/{name}"] = shape
    for name, shape in mlp.items():
      shapes[f"{prefix}/mlp/{name}"] = shape
    for norm in ("pre_self_attention_norm", "pre_cross_attention_norm", "pre_mlp_norm"):
      shapes[f"{prefix}/{norm}"] = (D_MODEL,)
  shapes["encoder/encoder_norm"] = shapes["decoder/decoder_norm"] = (D_MODEL,)
  return shapes


def random_seed(shapes: dict[str, tuple[int, ...]], dtype, rng: np.random.Generator):
  return {
    path: rng.standard_normal(math.prod(shape), np.float32).astype(dtype).reshape(shape)
    for path, shape in shapes.items()
  }


def random_subset(seed: dict[str, np.ndarray], fraction: float, rng) -> _subset.Subset:
  """A subset as DST leaves one: floor(ε · size) changed coordinates per tensor."""
  tensors = {}
  for path, leaf in seed.items():
    budget = math.floor(fraction * leaf.size)
    indices = np.sort(rng.choice(leaf.size, budget, replace=False)).astype(np.int32)
    values = (leaf.reshape(-1)[indices].astype(np.float32) + 0.01).astype(leaf.dtype)
    tensors[path] = _subset.TensorSubset(
      indices, values, leaf.shape, budget, "PerTensor()", _subset.tensor_fingerprint(leaf)
    )
  return _subset.Subset(tensors, fraction, "PerTensor()", "absolute")


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def lora_bytes(shapes: dict[str, tuple[int, ...]], num_params: int, dtype, directory) -> dict:
  """File bytes of a LoRA adapter on the attention query and value matrices (PEFT's
  default targets for T5) with the rank closest to ``num_params`` parameters (at least 1).
  """
  matrices = {path: shape for path, shape in shapes.items() if path.endswith(("/query", "/value"))}
  params_per_rank = sum(sum(shape) for shape in matrices.values())
  rank = max(1, round(num_params / params_per_rank))
  adapter = {}
  for path, (fan_in, fan_out) in matrices.items():
    adapter[f"{path}.lora_A.weight"] = np.zeros((rank, fan_in), dtype)
    adapter[f"{path}.lora_B.weight"] = np.zeros((fan_out, rank), dtype)
  file = os.path.join(directory, "lora.safetensors")
  safetensors.numpy.save_file(adapter, file)
  return {"rank": rank, "params": rank * params_per_rank, "file_bytes": os.path.getsize(file)}


def measure(fraction: float, dtype_name: str, repeats: int, directory: str, rng) -> dict:
  dtype = DTYPES[dtype_name]
  shapes = t5_base_shapes()
  seed = random_seed(shapes, dtype, rng)
  num_params = sum(leaf.size for leaf in seed.values())
  task_a, task_b = random_subset(seed, fraction, rng), random_subset(seed, fraction, rng)
  num_changed = sum(tensor.num_changed for tensor in task_a.tensors.values())
  result: dict[str, Any] = {
    "fraction": fraction,
    "dtype": dtype_name,
    "num_params": num_params,
    "num_changed": num_changed,
  }
  for encoding in _subset_io.INDEX_ENCODINGS:
    file = os.path.join(directory, f"subset_{encoding}.safetensors")
    _subset_io.save_subset(task_a, file, encoding)
    sizes = _subset_io.file_summary(file)
    result[f"file_bytes_{encoding}"] = sizes["file_bytes"]
    result[f"bytes_per_free_param_{encoding}"] = sizes["file_bytes"] / num_changed
    result[f"payload_bytes_per_free_param_{encoding}"] = sizes["bytes_per_free_param"]
    if encoding == _subset_io.INDEX_ENCODINGS[0]:
      result["load_s"] = median_seconds(lambda file=file: _subset_io.load_subset(file), repeats)
  result["ideal_bytes_per_free_param"] = 4 + np.dtype(dtype).itemsize
  result["lora"] = lora_bytes(shapes, num_changed, dtype, directory)
  result["lora_bytes_per_param"] = result["lora"]["file_bytes"] / result["lora"]["params"]
  if dtype_name != "float32":
    return result

  result["copy_s"] = median_seconds(lambda: {p: np.copy(x) for p, x in seed.items()}, repeats)
  result["apply_s"] = median_seconds(
    lambda: _subset.apply_subset(seed, task_a, verify=False), repeats
  )
  result["fingerprint_s"] = median_seconds(lambda: _subset.seed_fingerprints(seed), 1)
  device_seed = {path: jnp.asarray(leaf) for path, leaf in seed.items()}
  copy_on_device = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  patches_a, patches_b = _subset.device_patches(task_a), _subset.device_patches(task_b)
  result["device_patches_s"] = median_seconds(lambda: _subset.device_patches(task_a), repeats)
  jax.block_until_ready(copy_on_device(device_seed))
  result["device_copy_s"] = median_seconds(lambda: copy_on_device(device_seed), repeats)
  apply_on_device = lambda: _subset.switch_subset(device_seed, device_seed, patches_a, donate=False)
  jax.block_until_ready(apply_on_device())
  result["device_apply_s"] = median_seconds(apply_on_device, repeats)
  served = _subset.switch_subset(copy_on_device(device_seed), device_seed, patches_a)
  served = _subset.switch_subset(served, device_seed, patches_b, patches_a)
  switch_times = []
  for repeat in range(repeats):
    new, old = (patches_a, patches_b) if repeat % 2 == 0 else (patches_b, patches_a)
    start = time.perf_counter()
    served = jax.block_until_ready(_subset.switch_subset(served, device_seed, new, old))
    switch_times.append(time.perf_counter() - start)
  result["switch_s"] = statistics.median(switch_times)
  expected = _subset.apply_subset(seed, task_a if repeats % 2 == 1 else task_b, verify=False)
  for path, leaf in expected.items():
    np.testing.assert_array_equal(np.asarray(served[path]), leaf, err_msg=path)
  return result


def print_table(results: list[dict]) -> None:
  print(
    f"{'ε':>7} {'dtype':>9} {'changed':>11} {'varint B/p':>10} {'raw B/p':>8} {'ideal':>6} "
    f"{'LoRA B/p':>8} {'copy':>8} {'apply':>8} {'dev copy':>9} {'dev apply':>9} {'switch':>8} "
    f"{'load':>7}"
  )
  for r in results:
    times = [r.get(name) for name in ("copy_s", "apply_s", "device_copy_s", "device_apply_s")]
    times += [r.get("switch_s"), r["load_s"]]
    shown = ["-" if t is None else f"{t * 1e3:.1f}ms" for t in times]
    print(
      f"{r['fraction']:>7g} {r['dtype']:>9} {r['num_changed']:>11,} "
      f"{r['bytes_per_free_param_delta_varint']:>10.2f} {r['bytes_per_free_param_raw']:>8.2f} "
      f"{r['ideal_bytes_per_free_param']:>6} {r['lora_bytes_per_param']:>8.2f} "
      f"{shown[0]:>8} {shown[1]:>8} {shown[2]:>9} {shown[3]:>9} {shown[4]:>8} {shown[5]:>7}"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fractions", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
  parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--output", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results/subset.json"
  )
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  results = []
  with tempfile.TemporaryDirectory() as directory:
    for dtype_name in args.dtypes:
      for fraction in args.fractions:
        results.append(measure(fraction, dtype_name, args.repeats, directory, rng))
        print(json.dumps(results[-1]), flush=True)
  print_table(results)
  args.output.parent.mkdir(parents=True, exist_ok=True)
  machine = {
    "platform": platform.platform(),
    "cpus": os.cpu_count(),
    "load_average": os.getloadavg(),
    "jax": jax.__version__,
  }
  args.output.write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
  main()
