"""The Python snippets and commands of README.md, docs/usage.md and docs/derivation.md run as written, so the
documentation cannot rot."""

import pathlib
import re

import pytest

from checks import optional_import

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path):
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


# Packages a snippet may use that a stack may lack, or have in a version that does not import on its torch (peft on
# torch 2.7 with a newer torchao): the snippet then skips, naming why, as the tests of those packages do.
_OPTIONAL = ("peft", "torchao", "transformers", "onnx", "onnxscript", "onnxruntime")


def _run_block(name, index):
    code = _python_blocks(ROOT / name)[index]
    assert "assert " in code, f"each {name} snippet checks its own result"
    for package in sorted(set(re.findall(r"^(?:import|from) (\w+)", code, flags=re.M)) & set(_OPTIONAL)):
        optional_import(package, f"{package} is not installed")
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


DERIVATION = ROOT / "docs" / "derivation.md"


@pytest.mark.parametrize("index", range(len(_python_blocks(DERIVATION))))
def test_derivation_python_block_runs(index):
    code = _python_blocks(DERIVATION)[index]
    assert "assert " in code, "each docs/derivation.md snippet checks its own result"
    exec(compile(code, f"docs/derivation.md[python block {index}]", "exec"), {"__name__": f"derivation_block_{index}"})


def _explain_commands():
    """Every concrete `python -m manualbp explain ...` command shown in the docs (not the placeholder forms)."""
    commands = []
    for path in (ROOT / "README.md", ROOT / "docs" / "usage.md", DERIVATION):
        for command in re.findall(r"python -m manualbp explain ([^`\n]*)", path.read_text()):
            if "N0,N1" not in command and "..." not in command and "|" not in command:
                commands.append(command.strip())
    return sorted(set(commands))


@pytest.mark.parametrize("command", _explain_commands())
def test_docs_explain_command_runs(command, capsys):
    from manualbp.__main__ import main

    assert main(["explain", *command.split()]) == 0, f"`python -m manualbp explain {command}` exits 0"
    assert re.search(r"all \d+ checks hold", capsys.readouterr().out), f"{command}: every check holds"
