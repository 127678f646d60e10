"""The README's Python examples run as written, in order."""

import pathlib
import re

import chex


def test_readme_examples_run(capsys, tmp_path, monkeypatch):
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
  assert len(blocks) == 2, "expected the usage and the subset examples"
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  # 1% of 256x128 and of 128: 327 + 1 free coordinates.
  assert "'changed': 328" in lines[-1] and "'budget': 328" in lines[-1]
  chex.assert_trees_all_equal(namespace["rebuilt"], namespace["params"])
  assert (tmp_path / "task.subset").stat().st_size > 0
