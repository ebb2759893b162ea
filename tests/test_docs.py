"""The Python snippets of README.md and docs/usage.md run as written, so the documentation cannot rot."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path):
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run_block(name, index):
    code = _python_blocks(ROOT / name)[index]
    assert "assert " in code, f"each {name} snippet checks its own result"
    namespace = {"__name__": f"{name.replace('/', '_').replace('.', '_')}_block_{index}"}
    exec(compile(code, f"{name}[python block {index}]", "exec"), namespace)  # its asserts must hold


@pytest.mark.parametrize("index", range(len(_python_blocks(ROOT / "README.md"))))
def test_readme_python_block_runs(index):
    _run_block("README.md", index)


@pytest.mark.parametrize("index", range(len(_python_blocks(ROOT / "docs" / "usage.md"))))
def test_usage_python_block_runs(index):
    _run_block("docs/usage.md", index)


def test_readme_names_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in readme, "README shows the test command"
    assert command in ci, ".ci/run runs the README's test command"
