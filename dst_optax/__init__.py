"""dst_optax: Dynamic Subset Tuning (Stahlberg, Lichtarge, Kumar 2024) for optax."""

from dst_optax._distances import absolute_distance, relative_distance
from dst_optax._groups import layer_groups, layer_index_from_path
from dst_optax._silos import (
  Global,
  Group,
  PerSlice,
  PerTensor,
  Unconstrained,
  columns,
  rows,
)
from dst_optax._stats import find_state, subset_stats
from dst_optax._subset import (
  DevicePatch,
  Overlap,
  Subset,
  SubsetError,
  TensorSubset,
  apply_subset,
  check_seed,
  compose,
  compose_subsets,
  device_patches,
  revert_subset,
  seed_fingerprints,
  switch_subset,
  tensor_fingerprint,
)
from dst_optax._subset_extract import (
  ParamSource,
  extract_subset,
  extract_subset_from_state,
  extract_subset_streaming,
  load_params,
  memory_source,
  safetensors_source,
  save_params,
)
from dst_optax._subset_io import file_summary, load_subset, save_subset
from dst_optax._subset_orbax import extract_subset_from_orbax, orbax_source
from dst_optax._transform import (
  DynamicSubsetTuningState,
  dynamic_subset_tuning,
  project_to_budget,
)

__version__ = "0.1.0"

__all__ = (
  "DevicePatch",
  "DynamicSubsetTuningState",
  "Global",
  "Group",
  "Overlap",
  "ParamSource",
  "PerSlice",
  "PerTensor",
  "Subset",
  "SubsetError",
  "TensorSubset",
  "Unconstrained",
  "absolute_distance",
  "apply_subset",
  "check_seed",
  "columns",
  "compose",
  "compose_subsets",
  "device_patches",
  "dynamic_subset_tuning",
  "extract_subset",
  "extract_subset_from_orbax",
  "extract_subset_from_state",
  "extract_subset_streaming",
  "file_summary",
  "find_state",
  "layer_groups",
  "layer_index_from_path",
  "load_params",
  "load_subset",
  "memory_source",
  "orbax_source",
  "project_to_budget",
  "relative_distance",
  "revert_subset",
  "rows",
  "safetensors_source",
  "save_params",
  "save_subset",
  "seed_fingerprints",
  "subset_stats",
  "switch_subset",
  "tensor_fingerprint",
)
