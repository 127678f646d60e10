"""Tables and plots of fine-tuning results, shared by ``dst-optax demo`` and the benchmark."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from dst_optax.demo import _train

_COLUMNS = ("method", "accuracy", "trainable", "changed", "storage", "time")


def _human_bytes(num_bytes: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if num_bytes < 1000 or unit == "GB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1000
  raise AssertionError("unreachable")


def format_table(results: Sequence[_train.RunResult]) -> str:
  """A fixed-width text table: accuracy, trainable and changed params, storage and time.

  Args:
    results: runs to list, in order.

  Returns:
    The table, one line per run after a header.
  """
  rows = [_COLUMNS] + [
    (
      r.label,
      f"{100 * r.accuracy:.1f}%",
      f"{r.num_trainable:,}",
      f"{r.num_changed:,}",
      _human_bytes(r.storage_bytes),
      f"{r.train_seconds:.0f} s",
    )
    for r in results
  ]
  widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
  lines = [
    "  ".join(
      cell.ljust(w) if i == 0 else cell.rjust(w)
      for i, (cell, w) in enumerate(zip(row, widths, strict=True))
    )
    for row in rows
  ]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def plot_demo(results: Sequence[_train.RunResult], path: pathlib.Path) -> None:
  """Saves training-loss curves and test accuracies (with trainable params) side by side.

  Args:
    results: runs to plot; runs without steps (zero-shot) have no loss curve.
    path: image file to write (format from its suffix).
  """
  import matplotlib

  matplotlib.use("Agg")  # Files only; never needs a display.
  import matplotlib.pyplot as plt

  figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
  for index, result in enumerate(results):  # Colour C{index} marks a run in both panels.
    if result.losses:
      window = max(1, len(result.losses) // 20)
      smoothed = [
        sum(result.losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
        for i in range(len(result.losses))
      ]
      loss_axes.plot(smoothed, color=f"C{index}", label=result.label)
  loss_axes.set(xlabel="step", ylabel="training loss (moving average)", title="Training")
  loss_axes.legend()
  labels = [f"{r.label}\n{r.num_trainable:,} params" for r in results]
  accuracies = [100 * r.accuracy for r in results]
  bars = accuracy_axes.barh(labels, accuracies, color=[f"C{i}" for i in range(len(results))])
  accuracy_axes.bar_label(bars, fmt="%.1f%%", padding=3)
  accuracy_axes.set(
    xlim=(min(50.0, *accuracies), 100), xlabel="test accuracy (%)", title="Movie-review sentiment"
  )
  accuracy_axes.invert_yaxis()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
