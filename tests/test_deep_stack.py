"""tests/deep_stack.py: the tests run above a frame with a frame-stack chunk of its own (Python 3.11+)."""

import sys

import pytest

import deep_stack


def _frames():
    frame = sys._getframe()
    while frame is not None:
        yield frame
        frame = frame.f_back


def test_the_tests_run_above_the_large_frame():
    assert any(frame.f_code is deep_stack._bottom.__code__ for frame in _frames()), \
        "tests/conftest.py runs pytest's test loop through deep_stack.call"


def test_the_large_frame_asks_for_its_slots():
    assert deep_stack._bottom.__code__.co_stacksize == deep_stack.SLOTS, "the bottom frame's stack size"


def test_call_returns_and_raises_as_the_function_does():
    assert deep_stack.call(lambda a, b=0: a + b, 2, b=3) == 5, "the function's value"
    with pytest.raises(KeyError, match="missing"):
        deep_stack.call({}.__getitem__, "missing")
