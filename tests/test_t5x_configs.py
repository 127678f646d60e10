"""The gin files of t5x_configs/: they parse, and their DST bindings resolve.

The static checks and the evaluation of ``dst.gin`` run without T5X (T5X's three
modules that ``dst.gin`` imports are replaced by minimal stand-ins then). With
T5X installed, every model file is combined with every run file and loaded
with T5X's own gin files, as ``t5x.train`` would.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import pathlib
import re
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

gin = pytest.importorskip("gin")
from gin import config_parser  # noqa: E402  (needs the importorskip above)

import dst_optax.t5x  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "t5x_configs"
GIN_FILES = sorted(CONFIGS.rglob("*.gin"))
MODEL_FILES = sorted((CONFIGS / "models").glob("*.gin"))
TASK_RUNS = ("superglue", "wmt_ende", "wmt_enfr", "wmt_enro")
# Macros that the run files read and every model file must define.
MODEL_FILE_MACROS = {
  "PRETRAINED_CHECKPOINT",
  "TASK_VOCABULARY",
  "LOSS_NORMALIZING_FACTOR",
  "NUM_PARTITIONS",
}
# T5X's own gin files that ours include (checked against T5X when installed).
STOCK_T5X_INCLUDES = re.compile(
  r"t5x/configs/runs/finetune\.gin|t5x/examples/t5/(t5_1_1|mt5)/(tiny|small|base|large|xl|xxl)\.gin"
)
HAVE_T5X = importlib.util.find_spec("t5x") is not None


class _RecordingDelegate(config_parser.ParserDelegate):
  """Parses references and macros into tagged tuples instead of resolving them."""

  def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> tuple:
    return ("@", scoped_configurable_name, evaluate)

  def macro(self, macro_name: str) -> tuple:
    return ("%", macro_name)


def _statements(path: pathlib.Path) -> list[Any]:
  parser = config_parser.ConfigParser(path.read_text(), _RecordingDelegate())
  return list(parser)


def _tagged(value: Any, tag: str) -> list[str]:
  """Names of the references (``"@"``) or macros (``"%"``) inside a parsed value."""
  if isinstance(value, tuple) and value[:1] == (tag,):
    return [value[1]]
  if isinstance(value, (list, tuple)):
    return [name for item in value for name in _tagged(item, tag)]
  if isinstance(value, dict):
    return [name for item in value.values() for name in _tagged(item, tag)]
  return []


def _macros_defined(path: pathlib.Path) -> set[str]:
  return {
    s.selector
    for s in _statements(path)
    if isinstance(s, config_parser.BindingStatement) and not s.arg_name
  }


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_gin_file_parses_and_includes_exist(path):
  statements = _statements(path)
  assert statements, "empty gin file"
  assert any(
    isinstance(s, config_parser.ImportStatement) and s.module == "__gin__.dynamic_registration"
    for s in statements
  ), "T5X gin files use dynamic registration"
  for include in (s for s in statements if isinstance(s, config_parser.IncludeStatement)):
    if include.filename.startswith("t5x_configs/"):
      assert (REPO / include.filename).is_file(), include.filename
    else:
      assert STOCK_T5X_INCLUDES.fullmatch(include.filename), include.filename


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_dst_bindings_name_real_parameters(path):
  statements = _statements(path)
  aliases = {
    s.alias or s.module
    for s in statements
    if isinstance(s, config_parser.ImportStatement) and s.module == "dst_optax.t5x"
  }
  for statement in statements:
    if not isinstance(statement, config_parser.BindingStatement):
      continue
    owner, _, name = statement.selector.rpartition(".")
    if owner in aliases:
      target = getattr(dst_optax.t5x, name)
      assert statement.arg_name in inspect.signature(target).parameters, statement
    for reference in _tagged(statement.value, "@"):
      owner, _, name = reference.rpartition(".")
      if owner in aliases:
        assert callable(getattr(dst_optax.t5x, name)), reference


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_files_define_what_runs_read(path):
  assert _macros_defined(path) >= MODEL_FILE_MACROS
  family, size = path.stem.rsplit("_", 1)
  assert f"t5x/examples/t5/{family}/{size}.gin" in {
    s.filename for s in _statements(path) if isinstance(s, config_parser.IncludeStatement)
  }
  assert f"/{family}_{size}/checkpoint_1000000" in path.read_text()


def test_run_files_read_only_macros_they_or_model_files_define():
  defined = set(MODEL_FILE_MACROS)
  referenced = set()
  for path in (CONFIGS / "dst.gin", *sorted((CONFIGS / "runs").glob("*.gin"))):
    defined |= _macros_defined(path)
    for statement in _statements(path):
      if isinstance(statement, config_parser.BindingStatement):
        referenced.update(_tagged(statement.value, "%"))
  # The rest come from T5X's finetune.gin and model gins.
  t5x_macros = {"gin.REQUIRED", "OPTIMIZER", "VOCABULARY", "MODEL"}
  assert referenced - defined - t5x_macros == set()


def _chain(transformations):
  return optax.chain(*transformations)


class _Trainer:
  def __init__(self, weight_metrics_computer=None):
    self.weight_metrics_computer = weight_metrics_computer


class _RestoreCheckpointConfig:
  def __init__(self, assignment_map=None, fallback_to_scratch=False):
    self.assignment_map = assignment_map
    self.fallback_to_scratch = fallback_to_scratch


@pytest.fixture
def t5x_for_dst_gin(monkeypatch):
  """T5X's ``optimizers``, ``trainer`` and ``utils``: real ones or stand-ins.

  Returns the ``optimizers`` module. The stand-ins carry only what ``dst.gin``
  binds, so gin still checks every binding against a real signature.
  """
  if HAVE_T5X:
    from t5x import optimizers

    yield optimizers
  else:
    package = types.ModuleType("t5x")
    package.__spec__ = importlib.machinery.ModuleSpec("t5x", loader=None)
    # The factory registers DST's partition rule in this table.
    rules = type("OptaxStatePartitionRules", (), {"_RULES": {}})
    stand_ins = {
      "optimizers": {"chain": _chain, "OptaxStatePartitionRules": rules},
      "trainer": {"Trainer": _Trainer},
      "utils": {"RestoreCheckpointConfig": _RestoreCheckpointConfig},
    }
    for name, attributes in stand_ins.items():
      module = types.ModuleType(f"t5x.{name}")
      for attribute, value in attributes.items():
        setattr(module, attribute, value)
      setattr(package, name, module)
      monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "t5x", package)
    yield package.optimizers
  gin.clear_config()


def test_dst_gin_builds_the_dst_optimizer(t5x_for_dst_gin):
  gin.parse_config_files_and_bindings(
    [str(CONFIGS / "dst.gin")],
    ["FRACTION_OF_FREE_PARAMS = 0.25", "DST_SILOS = 'rows'", "LEARNING_RATE = 0.1"],
  )
  optimizer = gin.get_configurable(t5x_for_dst_gin.chain)()
  tx = getattr(optimizer, "optax_optimizer", optimizer)  # T5X wraps it in OptaxWrapper.
  rules = t5x_for_dst_gin.OptaxStatePartitionRules._RULES
  assert rules[dst_optax.DynamicSubsetTuningState] is dst_optax.t5x.dst_state_axes
  params = {"kernel": jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)}
  grads = {"kernel": jax.random.normal(jax.random.key(0), (4, 8))}
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  # floor(0.25 * 8) = 2 per row; Adafactor moves every coordinate, so 2 are kept.
  np.testing.assert_array_equal(dst_optax.find_state(state).num_changed, [2, 2, 2, 2])
  moved = ~np.isclose(new_params["kernel"], params["kernel"], rtol=2.0**-23, atol=0.0)
  assert np.all(np.sum(moved, axis=1) <= 2)

  metrics = gin.query_parameter("trainer.Trainer.weight_metrics_computer")
  assert metrics.configurable.wrapped is dst_optax.t5x.DstMetricsComputer
  assignment_map = gin.query_parameter("utils.RestoreCheckpointConfig.assignment_map")
  (pattern, replacement), *_ = assignment_map
  assert replacement is None
  assert re.fullmatch(pattern, "state/param_states/0/0/v_row/encoder/layers_0/mlp/wi/kernel")
  assert not re.fullmatch(pattern, "target/encoder/layers_0/mlp/wi/kernel")
  assert not re.fullmatch(pattern, "state/step")
  assert gin.query_parameter("utils.RestoreCheckpointConfig.fallback_to_scratch")


needs_t5x = pytest.mark.skipif(
  not HAVE_T5X,
  reason="T5X is not installed (it is not on PyPI; see t5x_configs/README.md): "
  "the run files include T5X's own gin files",
)


@pytest.fixture
def t5x_gin(monkeypatch):
  """Gin set up as ``t5x.train`` sets it up: its search paths and ``__main__``."""
  import t5x
  from t5x import train

  # T5X's run gins write `import __main__ as train_script`.
  monkeypatch.setitem(sys.modules, "__main__", train)
  gin.clear_config()
  for search_path in (str(REPO), str(pathlib.Path(t5x.__file__).parents[1])):
    gin.add_config_file_search_path(search_path)
  yield
  gin.clear_config()


@gin.configurable
def _run_probe(optimizer, task, checkpoint, partitions, steps, lengths) -> dict[str, Any]:
  """Collects, through gin, the values a T5X run would be built from."""
  return dict(
    optimizer=optimizer,
    task=task,
    checkpoint=checkpoint,
    partitions=partitions,
    steps=steps,
    lengths=lengths,
  )


def _load_run(model: str, run: str, checkpoint: str) -> dict[str, Any]:
  """Parses a model file and a run file; returns what T5X would train with."""
  gin.parse_config_files_and_bindings(
    [f"t5x_configs/models/{model}.gin", f"t5x_configs/runs/{run}.gin"],
    [
      'MODEL_DIR = "/tmp/unused"',
      f"PRETRAINED_CHECKPOINT = {checkpoint!r}",
      "_run_probe.optimizer = %OPTIMIZER",
      "_run_probe.task = %MIXTURE_OR_TASK_NAME",
      "_run_probe.checkpoint = %INITIAL_CHECKPOINT_PATH",
      "_run_probe.partitions = %NUM_PARTITIONS",
      "_run_probe.steps = %TRAIN_STEPS",
      "_run_probe.lengths = %TASK_FEATURE_LENGTHS",
    ],
  )
  return _run_probe()


@needs_t5x
@pytest.mark.parametrize("run", TASK_RUNS)
@pytest.mark.parametrize("model", [p.stem for p in MODEL_FILES])
def test_run_loads_with_only_model_and_checkpoint_changed(t5x_gin, model, run):
  from t5x import optimizers

  checkpoint = f"gs://bucket/{model}/checkpoint_1000000"
  if run == "superglue" and model.startswith("mt5"):
    with pytest.raises(ValueError, match="mixture"):
      _load_run(model, run, checkpoint)
    return
  loaded = _load_run(model, run, checkpoint)
  assert isinstance(loaded["optimizer"], optimizers.OptaxWrapper)
  dst_state = loaded["optimizer"].optax_optimizer.init({"w": jnp.zeros((32, 32))})
  assert isinstance(dst_state[-1], dst_optax.DynamicSubsetTuningState)
  assert loaded["checkpoint"] == checkpoint
  assert loaded["steps"] > 1_000_000
  assert loaded["partitions"] >= 1
  assert loaded["lengths"]["inputs"] >= 256
  expected_suffix = "_mt5" if model.startswith("mt5") else ""
  assert loaded["task"].endswith(f"v003{expected_suffix}") or loaded["task"] == (
    "super_glue_v102_proportional"
  )
