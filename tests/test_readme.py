"""The README's usage example runs as written."""

import pathlib
import re


def test_readme_usage_example_runs(capsys):
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
  assert blocks, "README has no python example"
  exec(compile(blocks[0], "README.md", "exec"), {})
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  # 1% of 256x128 and of 128: 327 + 1 free coordinates.
  assert "'changed': 328" in lines[-1] and "'budget': 328" in lines[-1]
