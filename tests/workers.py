"""Launching distributed test workers: processes on this machine, gloo over loopback only, bounded in time.

A test file that is also its own worker (``python FILE WORLD_SIZE RANK INIT_FILE OUT_DIR``) saves
``OUT_DIR/rank{RANK}.pt``; :func:`run_workers` starts WORLD_SIZE of them with a file rendezvous
(no port is opened for it), kills them after ``timeout_s``, and fails the test with every rank's
log if one did not finish or exited with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import traceback

import pytest
import torch


def run_workers(script: str, world_size: int, tmp_path, timeout_s: float, **env_vars: str):
    """Run ``script`` as WORLD_SIZE worker processes -> ([each rank's saved results], the logs' tails)."""
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", **env_vars)
    init_file = tmp_path / "rendezvous"
    logs = [open(tmp_path / f"rank{rank}.log", "w+") for rank in range(world_size)]
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(world_size), str(rank), str(init_file), str(tmp_path)],
            env=env, stdout=logs[rank], stderr=subprocess.STDOUT,
        )
        for rank in range(world_size)
    ]
    try:
        codes = [proc.wait(timeout=timeout_s) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        output += f"--- rank {rank} ---\n{log.read()[-6000:]}\n"
        log.close()
    if codes is None:
        pytest.fail(f"{world_size} distributed workers did not finish within {timeout_s} s\n{output}")
    if any(codes):
        pytest.fail(f"{world_size} distributed workers failed with exit codes {codes}\n{output}")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)], output


@contextlib.contextmanager
def process_group(world_size: int, rank: int, init_file: str, timeout_s: float):
    """In a worker: the gloo process group of the file rendezvous, destroyed on the way out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def skip_without_gloo() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this PyTorch build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend of torch.distributed is not available in this PyTorch build")


def fully_shard_function():
    """FSDP2's fully_shard: public in torch >= 2.6, under torch.distributed._composable before."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def record(results: dict, key: str, rank: int, compute) -> None:
    """In a worker: results[key] = compute(), or {"error": ...} where it raises (printed, for the test to report;
    the other cases go on)."""
    try:
        results[key] = compute()
    except Exception as error:
        traceback.print_exc()
        results[key] = {"error": f"{type(error).__name__}: {error}"}
    print(f"rank {rank}: {key}: {'error' if 'error' in results[key] else 'ran'}", flush=True)


def skip_unless_backend_runs(backend: str) -> None:
    """The workers run on CPU meshes: the triton backend through Triton's interpreter, which some installs cannot
    run (no Triton, or a Triton before 3.8 with numpy 2.4+, as on a GPU machine's image): skipped, saying why."""
    if backend == "triton":
        import manualbp

        reason = manualbp.backends._triton_import_error() or manualbp.backends.interpreter_numpy_reason()
        if reason:
            pytest.skip(f"the triton backend on a CPU mesh needs Triton's interpreter: {reason}")
