"""tests/conftest.py's MANUALBP_FAILURE_LOG: failures written as they are reported, for runs cut short."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_failures_are_logged_as_they_happen(tmp_path):
    for name in ("conftest.py", "deep_stack.py", "fixed_order_dot.py", "interpreter_patch_once.py"):  # conftest, its modules
        (tmp_path / name).write_text((ROOT / "tests" / name).read_text())
    (tmp_path / "test_sample.py").write_text(
        "def test_passes():\n    assert 1 + 1 == 2\n\n\ndef test_fails():\n    assert 1 + 1 == 3, 'arithmetic'\n")
    log = tmp_path / "failures.log"
    env = {**__import__("os").environ, "MANUALBP_FAILURE_LOG": str(log)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, f"one test fails\n{result.stdout}{result.stderr}"
    text = log.read_text()
    assert "=== FAILED test_sample.py::test_fails (call)" in text, f"the failing test named:\n{text}"
    assert "arithmetic" in text and "test_passes" not in text, f"its message, and only failures:\n{text}"
