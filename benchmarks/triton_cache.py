"""Carry a Triton cache built without a GPU (precompile.py) to the GPU run, and count what the run loaded from it.

    python benchmarks/triton_cache.py pack .triton-cache .triton-cache.tgz      # here, after precompile.py
    python benchmarks/triton_cache.py unpack .triton-cache.tgz .triton-cache    # on the GPU machine (gpu_common.sh)
    python benchmarks/triton_cache.py summary EVENTS                            # on the GPU machine, at the end

pack keeps what loading a kernel reads (its metadata, its cubin, the group file naming them) and the manifest: the
IR files (ttir, ttgir, llir, ptx, source: ~90% of the bytes) stay behind. unpack rewrites the group files' paths,
which Triton stores absolute, to where the cache now lies, and says whether this machine's Triton computes the same
keys (triton_key(): the Triton wheel, which differs per Python version; the cache-invalidating environment
variables): where it does not, every kernel will miss and be compiled as before.

summary reads the events that triton_cache_probe/sitecustomize.py writes for every compile in every Python process
(with TRITON_CACHE_EVENTS naming the file): per kernel name, how many were loaded from the cache and how many compiled.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
import tarfile

KEPT = (".json", ".cubin")  # a kernel's metadata (and its group file) and its binary: what a cache hit reads


def pack(cache_dir: str, path: str) -> int:
    """Pack cache_dir's kernels (metadata and binaries) and manifest into the tar.gz at path: its size in bytes."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        for name in sorted(os.listdir(cache_dir)):
            full = os.path.join(cache_dir, name)
            if name == "manifest.json" or (os.path.isfile(full) and name.endswith(".json")):
                tar.add(full, arcname=name)
            elif os.path.isdir(full):
                for file in sorted(os.listdir(full)):
                    if file.endswith(KEPT) and ".tmp." not in file:
                        tar.add(os.path.join(full, file), arcname=f"{name}/{file}")
    return os.path.getsize(path)


def relocate(cache_dir: str) -> int:
    """Point every group file's children at cache_dir (Triton writes them as absolute paths); a child that was not
    carried (an IR file) is dropped from its group. Returns the number of kernels (group files)."""
    groups = 0
    for name in os.listdir(cache_dir):
        folder = os.path.join(cache_dir, name)
        if not os.path.isdir(folder):
            continue
        for file in os.listdir(folder):
            if not file.startswith("__grp__"):
                continue
            path = os.path.join(folder, file)
            with open(path) as handle:
                group = json.load(handle)
            children = {}
            for child in group.get("child_paths", {}):
                here = os.path.join(os.path.abspath(folder), child)
                if os.path.exists(here):
                    children[child] = here
            with open(path, "w") as handle:
                json.dump({"child_paths": children}, handle)
            groups += 1
    return groups


def key_differences(info: dict) -> list:
    """What of the manifest's key inputs this machine's Triton has otherwise: [] where its keys can match."""
    import platform

    import triton
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # Triton 3.3 keeps it beside the compiler
        from triton.compiler.compiler import triton_key

    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        env = get_cache_invalidating_env_vars()
    except ImportError:
        env = None
    differences = []
    if triton.__version__ != info.get("triton"):
        differences.append(f"triton {triton.__version__} here, {info.get('triton')} in the cache")
    if triton_key() != info.get("triton_key"):
        differences.append(f"triton_key() differs (the Triton wheel: Python {platform.python_version()} here, "
                           f"{info.get('python')} where the cache was built)")
    if env is not None and env != info.get("env"):
        differences.append(f"cache-invalidating environment variables: {env} here, {info.get('env')} in the cache")
    backend = _backend_hash()
    if backend is not None and backend != info.get("backend"):
        differences.append(f"the CUDA backend (ptxas version, GPU arch) is {backend} here, {info.get('backend')} in "
                           f"the cache")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import precompile

    built = info.get("source", {}).get("kernels", {})
    changed = sorted(name for name, digest in precompile.kernel_sources(root).items() if built.get(name) != digest)
    if changed:
        differences.append(f"triton_kernels/ changed since the cache was built ({', '.join(changed)}): their "
                           f"kernels miss (rebuild it from this tree)")
    return differences


def _backend_hash():
    """This machine's CUDA backend hash (ptxas version and the GPU's arch), or None without a GPU."""
    try:
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return make_backend(GPUTarget("cuda", major * 10 + minor, 32)).hash()
    except Exception:  # noqa: BLE001 - no CUDA backend here: nothing to compare
        return None


def unpack(path: str, cache_dir: str) -> dict:
    """Extract the pack into cache_dir, relocate it, check its keys against this machine: the manifest, with
    'kernels_here' and 'differences' added."""
    os.makedirs(cache_dir, exist_ok=True)
    with tarfile.open(path, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and not os.path.isabs(m.name) and ".." not in m.name]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.12 (and backports)
        tar.extractall(cache_dir, members=members, **safe)
    with open(os.path.join(cache_dir, "manifest.json")) as handle:
        info = json.load(handle)
    info["kernels_here"] = relocate(cache_dir)
    info["differences"] = key_differences(info)
    return info


def summary(events_path: str) -> str:
    """The events file's loads and compiles, in total and per kernel name."""
    counts = collections.defaultdict(collections.Counter)
    if os.path.exists(events_path):
        with open(events_path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 2:
                    counts[parts[1]][parts[0]] += 1
    hits = sum(c["hit"] for c in counts.values())
    misses = sum(c["miss"] for c in counts.values())
    out = io.StringIO()
    out.write(f"triton cache: {hits} kernels loaded from the cache, {misses} compiled on this machine"
              f"{' (no compile events recorded)' if not counts else ''}\n")
    for name, c in sorted(counts.items()):
        out.write(f"triton cache:   {name}: {c['hit']} loaded, {c['miss']} compiled\n")
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("cache_dir")
    p.add_argument("path")
    u = sub.add_parser("unpack")
    u.add_argument("path")
    u.add_argument("cache_dir")
    s = sub.add_parser("summary")
    s.add_argument("events")
    args = parser.parse_args(argv)
    if args.command == "pack":
        size = pack(args.cache_dir, args.path)
        print(f"triton cache: packed {args.path}: {size / 2**20:.1f} MiB")
    elif args.command == "unpack":
        info = unpack(args.path, args.cache_dir)
        print(f"triton cache: {info['kernels_here']} kernels carried into {args.cache_dir} (built {info.get('built')} "
              f"from {info.get('source', {}).get('commit', '?')[:12]}"
              f"{' (dirty)' if info.get('source', {}).get('dirty') else ''}, Python {info.get('python')}, triton "
              f"{info.get('triton')}, for {', '.join(info.get('scripts', []))})")
        for difference in info["differences"]:
            print(f"triton cache: WILL MISS: {difference}")
        if not info["differences"]:
            print("triton cache: this machine's Triton computes keys from the same inputs (triton_key, environment)")
    else:
        print(summary(args.events), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
