"""T5X integration of Dynamic Subset Tuning.

T5X is optional and not on PyPI; this package imports it only where it is
needed, and raises an ImportError that says how to install it otherwise. In gin::

  from dst_optax import t5x as dst_t5x
  OPTIMIZER = @optimizers.chain()
  optimizers.chain.transformations = [@optax.adafactor(), @dst_t5x.dynamic_subset_tuning()]
  trainer.Trainer.weight_metrics_computer = @dst_t5x.DstMetricsComputer()

See ``t5x_configs/`` for complete SuperGLUE and WMT runs.
"""

from dst_optax.t5x._export import export_subset, load_checkpoint, stored_seed
from dst_optax.t5x._factory import (
  NAMED_SILOS,
  constrained_mask,
  dynamic_subset_tuning,
  keep_state_dtypes,
  per_layer_silos,
  resolve_silos,
)
from dst_optax.t5x._import import INSTALL_HINT
from dst_optax.t5x._metrics import DstMetricsComputer
from dst_optax.t5x._partitioning import (
  dst_state_axes,
  factored_state_axes,
  register_partition_rules,
)
from dst_optax.t5x._tasks import VOCABULARY_FILES, exact_match, task_with_vocabulary, tsv_task

__all__ = (
  "INSTALL_HINT",
  "NAMED_SILOS",
  "VOCABULARY_FILES",
  "DstMetricsComputer",
  "constrained_mask",
  "dst_state_axes",
  "dynamic_subset_tuning",
  "exact_match",
  "export_subset",
  "factored_state_axes",
  "keep_state_dtypes",
  "load_checkpoint",
  "per_layer_silos",
  "register_partition_rules",
  "resolve_silos",
  "stored_seed",
  "task_with_vocabulary",
  "tsv_task",
)
