"""The README's Python examples run, in order, in one namespace (as a reader would paste them)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) >= 5
  namespace = {}
  for i, code in enumerate(blocks):
    try:
      exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    except Exception as e:
      raise AssertionError(f"README.md python block {i + 1} failed: {e!r}\n{code}") from e
  out = capsys.readouterr().out
  assert "left/acc" in out and "Jacobian rows of the trunk" in out
