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
from dst_optax._transform import (
  DynamicSubsetTuningState,
  dynamic_subset_tuning,
  project_to_budget,
)

__version__ = "0.1.0"

__all__ = (
  "DynamicSubsetTuningState",
  "Global",
  "Group",
  "PerSlice",
  "PerTensor",
  "Unconstrained",
  "absolute_distance",
  "columns",
  "dynamic_subset_tuning",
  "find_state",
  "layer_groups",
  "layer_index_from_path",
  "project_to_budget",
  "relative_distance",
  "rows",
  "subset_stats",
)
