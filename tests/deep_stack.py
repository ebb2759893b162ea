"""Python 3.11+ keeps its frames in 16 KiB chunks of a per-thread stack, and frees a chunk the moment its first frame
returns (CPython's _PyThreadState_PopFrame): a call that crosses a chunk's end maps a new chunk, and its return
unmaps it. A test whose hot calls sit at that depth (gradcheck through autograd, the Triton interpreter's nested
device functions) maps and unmaps on nearly every call: 657,000 mmap and as many munmap in one gated-layer gradcheck
(strace), a third of its time in the kernel.

:func:`call` runs a function above one frame that asks for about half a MiB of stack slots: Python then gives that
frame a chunk of 1 MiB of its own, and every frame the function pushes fits in the rest of it, so no call within
crosses a chunk's end. tests/conftest.py runs pytest's test loop so. Nothing a test computes changes: only where
Python keeps its frames.
"""

from __future__ import annotations

SLOTS = 1 << 16  # stack slots asked for by the bottom frame: 512 KiB, so Python allots it a chunk of 1 MiB


def _bottom(fn, args, kwargs):
    return fn(*args, **kwargs)


_bottom.__code__ = _bottom.__code__.replace(co_stacksize=SLOTS)


def call(fn, *args, **kwargs):
    """fn(*args, **kwargs), called above a frame whose chunk of Python's frame stack leaves ~0.5 MiB for its calls."""
    return _bottom(fn, args, kwargs)
