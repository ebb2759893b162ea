"""Triton's CPU interpreter patches ``triton.language`` once per kernel launch, not once per device function call.

Before it runs a kernel, the interpreter replaces the builtins of ``triton.language`` (``tl.load``, ``tl.dot``,
the tensor methods ...) with interpreted versions: ``_patch_lang(fn)``, which walks every member of ``tl``,
``tl.tensor``, ``tl.math`` and ``tl.core.tensor_descriptor_base`` (``inspect.getmembers``, a sort, a check per
member). It does so again on *every call of a @triton.jit device function* inside the kernel, although those
modules are the same objects and already patched: the second walk finds no builtin left to replace (a patched
member is a plain function) and re-sets the same helpers. manualbp's kernels are built from small shared parts
(house style), about 25 device function calls a launch, so in the tests those walks were about half of the
interpreter's time (cProfile, a gelu layer's forward and backward in float64: 2.8 s of 5.9 s).

:func:`install` (tests/conftest.py calls it) makes ``_patch_lang`` a no-op for a device function call inside a
running kernel whose launch has already patched the same language modules; the launch's own patch, and its
restore where the Triton release restores (3.4+), are untouched. Nothing the kernels compute changes:
tests/test_fixed_order_dot.py runs a kernel of device function calls with and without it and compares the bits.
``MANUALBP_TEST_FULL_INTERPRETER=1`` leaves the interpreter as released.
"""

from __future__ import annotations

import os
import threading

_STATE = threading.local()  # .patched: the language modules the running launch has patched (None: no launch)
_MODULES: dict = {}  # a device function -> _language_modules(it)


class _NoScope:
    """What a skipped _patch_lang returns: a scope with nothing to restore (Triton 3.4+ restores launch scopes)."""

    def restore(self) -> None:
        pass


def _language_modules(fn) -> frozenset:
    """The ids of triton.language and triton.language.core among fn's globals: what _patch_lang(fn) patches."""
    import triton.language as tl

    return frozenset(id(value) for value in fn.__globals__.values() if value is tl or value is tl.core)


def install() -> bool:
    """Skip the redundant patches (module docstring). Returns whether it did: False without Triton, with
    MANUALBP_TEST_FULL_INTERPRETER=1, or where the interpreter lacks what this wraps."""
    if os.environ.get("MANUALBP_TEST_FULL_INTERPRETER") == "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton (macOS/Windows): nothing runs interpreted
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None or getattr(patch_lang, "patch_once", False):
        return bool(patch_lang is not None and getattr(patch_lang, "patch_once", False))
    launch = executor.__call__

    def patch_lang_once(fn):
        patched = getattr(_STATE, "patched", None)
        if patched is not None:  # inside a launch
            modules = _MODULES.get(fn)
            if modules is None:
                modules = _MODULES[fn] = _language_modules(fn)
            if modules <= patched:
                return _NoScope()
            patched |= modules
        return patch_lang(fn)

    def launch_patching_once(self, *args, **kwargs):
        outer = getattr(_STATE, "patched", None)
        _STATE.patched = set()  # the launch's own _patch_lang call below patches, and records its modules
        try:
            return launch(self, *args, **kwargs)
        finally:
            _STATE.patched = outer

    patch_lang_once.patch_once = True
    interpreter._patch_lang = patch_lang_once
    executor.__call__ = launch_patching_once
    return True


def installed() -> bool:
    """Whether the interpreter's _patch_lang is :func:`install`'s."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    return getattr(getattr(interpreter, "_patch_lang", None), "patch_once", False)
