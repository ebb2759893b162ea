"""On the GPU run's PYTHONPATH (gpu_common.sh): each Python process that compiles or loads a Triton kernel appends one
line per kernel to the file TRITON_CACHE_EVENTS names, "hit NAME" (loaded from the cache) or "miss NAME" (compiled
here), which benchmarks/triton_cache.py summary counts. Without TRITON_CACHE_EVENTS it does nothing."""

import os

if os.environ.get("TRITON_CACHE_EVENTS"):
    try:
        import triton

        def _record(*, src=None, cache_hit=False, **details):
            with open(os.environ["TRITON_CACHE_EVENTS"], "a") as events:
                events.write(f"{'hit' if cache_hit else 'miss'} {getattr(src, 'name', '?')}\n")

        triton.knobs.compilation.listener = _record
    except Exception as error:  # noqa: BLE001 - a probe must never stop the run
        print(f"triton cache probe: not installed ({type(error).__name__}: {error})")
