"""DST subset statistics in T5X's training summaries."""

from __future__ import annotations

import dataclasses
from typing import Any

import dst_optax
from dst_optax.t5x import _import


@dataclasses.dataclass(frozen=True)
class DstMetricsComputer:
  """A T5X ``weight_metrics_computer`` that logs the DST subset every step.

  Bind it in gin as ``trainer.Trainer.weight_metrics_computer``; T5X then writes
  ``dst/changed``, ``dst/budget``, ``dst/entered``, ``dst/exited``, ``dst/churn``,
  ``dst/frozen_silos`` and ``dst/search_passes`` (see :func:`dst_optax.subset_stats`)
  to TensorBoard, averaged over each summary period.

  Attributes:
    weight_metrics: another computer whose metrics are kept, e.g. T5X's
      ``trainer.WeightMetricsComputer()``; ``None`` logs only DST's.
    prefix: the summary name prefix.
  """

  weight_metrics: Any | None = None
  prefix: str = "dst"

  def compute_metrics(
    self, gradients: Any, old_train_state: Any, new_train_state: Any
  ) -> dict[str, Any]:
    """Returns T5X metrics for the step that produced ``new_train_state``.

    Args:
      gradients: the step's gradients (passed to ``weight_metrics`` only).
      old_train_state: the T5X train state before the step.
      new_train_state: the T5X train state after the step; its optimizer state
        must hold exactly one DST state.

    Returns:
      A dict from summary names to ``t5x.metrics.AveragePerStep`` metrics.
    """
    metrics_lib = _import.require("t5x.metrics")
    metrics = {}
    if self.weight_metrics is not None:
      metrics.update(
        self.weight_metrics.compute_metrics(gradients, old_train_state, new_train_state)
      )
    stats = dst_optax.subset_stats(new_train_state.param_states)
    # T5X logs the step itself.
    del stats["step"]
    metrics.update(
      {
        f"{self.prefix}/{name}": metrics_lib.AveragePerStep.from_model_output(value)
        for name, value in stats.items()
      }
    )
    return metrics
