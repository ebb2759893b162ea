"""The Python snippets and commands of README.md, docs/usage.md and docs/derivation.md run as written, every shell
command of README.md and docs/ runs or parses, every relative link and anchor resolves, and every number README.md
reports is in docs/performance.md with its source: so the documentation cannot rot."""

import os
import pathlib
import re
import subprocess
import sys
import unicodedata

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


# --------------------------------------------------------------------------------------
# README.md: short, and its first screen says what, how fast and how to try
# --------------------------------------------------------------------------------------

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _without_fences(text):
    """The Markdown outside fenced code blocks (their lines blanked, so line numbers stay)."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def _fenced_blocks(text):
    """The contents of the fenced code blocks of a Markdown text, in order."""
    blocks, current = [], None
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _sections(text):
    """{'## heading': its text up to the next heading of level 2 or higher}, outside fenced code."""
    found, name = {}, None
    for line in _without_fences(text).split("\n"):
        if re.match(r"#{1,2} ", line):
            name = line.strip()
            found[name] = ""
        elif name:
            found[name] += line + "\n"
    return found


def test_readme_is_at_most_250_lines_and_starts_with_what_how_fast_and_how_to_try():
    lines = README.read_text().split("\n")
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: at most 250 (the rest belongs in docs/)"
    first_screen = "\n".join(lines[:60])
    assert "**Status:**" in "\n".join(lines[:30]), "the status line (how fast) is in README.md's first 30 lines"
    assert "## Install" in first_screen, "the install section starts on README.md's first screen (60 lines)"
    for heading in ("## Install", "## The two commands", "## Usage", "## What works", "## Performance"):
        assert heading in lines, f"README.md has the section {heading!r}"
    order = [lines.index(h) for h in ("## Install", "## The two commands", "## Usage", "## What works",
                                      "## Performance")]
    assert order == sorted(order), "README.md's sections in the order: install, commands, usage, what works, performance"
    usage = _python_blocks(README)[0]
    assert len(usage.strip().split("\n")) <= 20, "README.md's usage example is at most 20 lines"


# --------------------------------------------------------------------------------------
# Every number README.md reports comes with its source in docs/performance.md
# --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _numbers(text):
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets are addresses, not figures
    return set(_NUMBER.findall(text))


def test_every_measured_number_in_readme_is_in_docs_performance():
    performance = _numbers((ROOT / "docs" / "performance.md").read_text())  # its tables, fenced or not
    sections = _sections(README.read_text())
    status = next(p for p in README.read_text().split("\n\n") if p.startswith("**Status:**"))
    measured = {"the status line": status,
                "The two commands (prose)": sections["## The two commands"],
                "Performance": sections["## Performance"]}  # its ### subsections included
    for where, text in measured.items():
        missing = sorted(_numbers(text) - performance, key=float)
        assert not missing, f"README.md, {where}: {missing} do not appear in docs/performance.md with their source"


def test_the_number_check_finds_a_number_without_a_source():
    assert _numbers("0.24–0.42× eager, [plot](x/bench_1.png)") == {"0.24", "0.42"}, "numbers, not link targets"
    assert "1.377" not in _numbers("1.3770"), "a number is matched whole"


# --------------------------------------------------------------------------------------
# Links: every relative link and #anchor in README.md and docs/*.md resolves (GitHub's rules)
# --------------------------------------------------------------------------------------

def github_anchor(heading):
    """The id GitHub gives a heading: its text as rendered, lower-cased, without punctuation but - and _,
    spaces made hyphens (a duplicate gets -1, -2, ... from _anchors)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text stays
    text = text.replace("`", "").replace("*", "")
    text = "".join(c for c in text.lower()
                   if c.isalnum() or c in "-_ " or unicodedata.category(c).startswith("M"))
    return text.replace(" ", "-")


def _anchors(path):
    seen, anchors = {}, set()
    for line in _without_fences(path.read_text()).split("\n"):
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            base = github_anchor(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
    anchors.update(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", path.read_text()))
    return anchors


def broken_links(path):
    """The relative links of a Markdown file whose file or #anchor does not exist, as 'target: why'."""
    text = _without_fences(path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of this repository
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    return broken


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p.name}" for p in DOCS])
def test_every_relative_link_and_anchor_resolves(name):
    path = ROOT / name
    assert not broken_links(path), f"{name}: broken links {broken_links(path)}"


def test_the_link_check_finds_a_missing_file_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## What does TRITON_INTERPRET do?\n\n## A + b: `c.d`\n")
    page.write_text("# Title\n\n## Title\n\n[ok](other.md#what-does-triton_interpret-do) [ok](other.md#a--b-cd) "
                    "[ok](#title-1) [web](https://example.com/x#y) `[code](nowhere.md)`\n"
                    "[gone](missing.md) [bad](other.md#no-such-heading) [bad](#nothing)\n"
                    "```\n[fenced](fenced.md)\n```\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#no-such-heading: no heading with that anchor in other.md",
                                  "#nothing: no heading with that anchor in page.md"], \
        "the checker reports exactly the missing file and the two missing anchors"


# --------------------------------------------------------------------------------------
# The commands of README.md (and docs/) run, or their options parse
# --------------------------------------------------------------------------------------

def _shell_commands(path):
    """Each command of the ```bash blocks of a Markdown file, split at &&, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.split("\n"):
            line = re.sub(r"\s+#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 reads pyproject.toml with tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _script_options(script):
    """The options a benchmark or example script's argparse parser declares (read from its source)."""
    import ast

    options = {"-h", "--help"}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-"))
    return options


def _environment_names():
    """Environment variables the repository's code reads (MANUALBP_*, GPU_CHECK_SECONDS, ...)."""
    text = "".join(p.read_text() for d in ("manualbp", "benchmarks", "tests", "triton_kernels")
                   for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh") and p.name != "test_docs.py")
    return set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", text))


def check_command(command, pytest_help):
    """Why `command` (one of the docs' shell commands) would not run as written, or None. Nothing is installed
    and nothing slow runs: pip's extras and options, pytest's options, markers and paths, a script's options and
    the environment variables set before it are checked against what the repository declares."""
    words = command.split()
    while words and re.match(r"[A-Z_][A-Z0-9_]*=", words[0]):
        name = words.pop(0).split("=")[0]
        if name not in _environment_names():
            return f"{name} is read by nothing in the repository"
    if not words:
        return "no command"
    if words[:2] == ["git", "clone"] or words[0] == "cd":
        return None  # the shell's own set-up, with the repository's address left to the reader
    if words[:2] == ["pip", "install"]:
        extras = _pyproject()["project"]["optional-dependencies"]
        for spec in re.findall(r'"\.\[([^\]]*)\]"', command):
            unknown = [e for e in spec.split(",") if e not in extras]
            if unknown:
                return f"pip extras {unknown} are not in pyproject.toml"
        options = [w for w in words[2:] if w.startswith("-")]
        unknown = [o for o in options if o not in ("-e", "--index-url", "--quiet", "-q", "--no-deps")]
        return f"pip options {unknown} not checked here" if unknown else None
    if words[:3] == ["python", "-m", "pytest"]:
        arguments = words[3:]
        for i, word in enumerate(arguments):
            if word.startswith("-") and word.split("=")[0] not in pytest_help:
                return f"pytest has no option {word}"
            if i and arguments[i - 1] == "-m":
                markers = {m.split(":")[0] for m in _pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
                if set(re.findall(r"\w+", word)) - markers - {"not", "and", "or"}:
                    return f"pytest marker expression {word!r} names an undeclared marker"
            if word.startswith("tests/") and not (ROOT / word.split("::")[0]).exists():
                return f"{word} does not exist"
        return None
    if words[:3] == ["python", "-m", "manualbp"]:
        return None  # run by test_docs_explain_command_runs
    if words[0] in ("python", "bash") and len(words) > 1:
        script = ROOT / words[1]
        if not script.is_file():
            return f"{words[1]} does not exist"
        if words[0] == "bash":
            result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            return f"bash -n {words[1]}: {result.stderr}" if result.returncode else None
        unknown = [w.split("=")[0] for w in words[2:] if w.startswith("-")
                   and w.split("=")[0] not in _script_options(script)]
        return f"{words[1]} has no option {unknown}" if unknown else None
    return "not a command this check knows: teach check_command, or run it in a test of its own"


@pytest.fixture(scope="module")
def pytest_help():
    result = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"pytest --help: {result.stderr[-2000:]}"
    return set(re.findall(r"(?<![\w-])(-{1,2}[\w-]+)", result.stdout))


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p.name}" for p in DOCS])
def test_shell_commands_in_the_docs_parse(name, pytest_help):
    commands = _shell_commands(ROOT / name)
    problems = {c: check_command(c, pytest_help) for c in commands}
    assert not {c: p for c, p in problems.items() if p}, f"{name}: commands that would not run as written"


def test_the_command_check_finds_what_would_not_run(pytest_help):
    assert check_command('pip install -e ".[examples]"', pytest_help) is None, "a known extra"
    assert "nosuchextra" in check_command('pip install -e ".[nosuchextra]"', pytest_help), "an unknown extra"
    assert "--no-such" in check_command("python -m pytest --no-such-flag", pytest_help), "an unknown pytest flag"
    assert "marker" in check_command("python -m pytest -m nosuchmarker", pytest_help), "an unknown marker"
    assert check_command("python -m pytest -x -q -m stacks", pytest_help) is None, "known flags and marker"
    assert "--size" in check_command("python benchmarks/bench_dense.py --size 4", pytest_help), "bench_dense has no --size"
    assert check_command("python benchmarks/bench_matmul.py --size 4096", pytest_help) is None, "bench_matmul has --size"
    assert check_command("MANUALBP_TMA=1 GPU_CHECK_SECONDS=900 bash benchmarks/gpu_check.sh", pytest_help) is None, \
        "variables the repository reads, a script that parses"
    assert "read by nothing" in check_command("MANUALBP_NO_SUCH=1 python -m pytest", pytest_help), "an unread variable"
    assert "does not exist" in check_command("bash benchmarks/no_such.sh", pytest_help), "a missing script"
    assert "knows" in check_command("make docs", pytest_help), "an unknown kind of command is not passed unchecked"


def test_readme_has_the_two_commands():
    commands = _shell_commands(README)
    for command in ('pip install -e ".[examples]"', "python examples/train_digits.py", 'pip install -e ".[test]"',
                    "python -m pytest"):
        assert command in commands, f"README.md shows `{command}`"


def test_readme_demo_command_prints_what_readme_shows(tmp_path):
    """`python examples/train_digits.py`, run as README.md shows it (about 10 s on a 2-core CPU): the same
    lines, every number and path aside (times vary, and accuracies may move with the torch build)."""
    for package in ("sklearn", "tqdm", "matplotlib"):
        optional_import(package, f"{package} is not installed: the demo needs pip install -e \".[examples]\"")
    shown = next(b for b in _fenced_blocks(README.read_text()) if b.startswith("digits:"))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MANUALBP_BACKEND")}  # a user's
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_digits.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the demo exits 0: {result.stderr[-2000:]}"

    def shape(text):
        text = re.sub(r"/\S+", "PATH", text)
        return [re.sub(r"\d+(?:\.\d+)?(?:e-?\d+)?", "N", line) for line in text.strip().split("\n")]

    assert shape(result.stdout) == shape(shown), "the demo prints the lines README.md shows"
    assert "identical at every step" in result.stdout, "on the CPU both trainings agree at every step, as shown"
