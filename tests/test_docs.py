"""The README's Python snippets run as written, so the documentation cannot rot."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path):
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks(ROOT / "README.md"))))
def test_readme_python_block_runs(index):
    code = _python_blocks(ROOT / "README.md")[index]
    assert "assert " in code, "each README snippet checks its own result"
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md[python block {index}]", "exec"), namespace)  # its asserts must hold


def test_readme_names_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in readme, "README shows the test command"
    assert command in ci, ".ci/run runs the README's test command"
