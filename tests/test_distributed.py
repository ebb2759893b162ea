"""DistributedDataParallel and FSDP2 (fully_shard) on models of manualbp layers.

Two processes on the CPU, gloo over loopback only (GLOO_SOCKET_IFNAME=lo, a file
rendezvous: no port is opened for the rendezvous), bounded by a timeout. Each runs
a few optimizer steps on its half of every batch; the parameters must then equal
those of the same training on one process, for the manualbp model and for the
nn.Linear model it was made from. float64 and the reference backend: the point
is the distributed plumbing, not the kernels.

This file is also the worker: ``python test_distributed.py WORLD_SIZE RANK INIT_FILE OUT_DIR``.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import manualbp

from workers import fully_shard_function, process_group, run_workers, skip_without_gloo

WORLD_SIZE = 2
STEPS = 3
BATCH = 8  # global batch; each rank takes BATCH // WORLD_SIZE rows
SIZES = [6, 8, 8, 3]
TIMEOUT_S = 240


def torch_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(SIZES[0], SIZES[1]), nn.GELU(),
        nn.Linear(SIZES[1], SIZES[2]), nn.GELU(),
        nn.Linear(SIZES[2], SIZES[3]),
    ).double()


def manualbp_models() -> dict:
    """The two manualbp versions of torch_model(), with its weights."""
    converted = manualbp.convert(torch_model(), backend="reference")
    mlp = manualbp.MLP(SIZES, activation="gelu", dtype=torch.float64, backend="reference")
    mlp.load_state_dict(torch_model().state_dict())  # same state_dict keys as the nn.Sequential
    return {"converted": converted, "mlp": mlp}


def batch(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, SIZES[0], dtype=torch.float64, generator=generator)
    target = torch.randn(BATCH, SIZES[-1], dtype=torch.float64, generator=generator)
    return x, target


def train(model: nn.Module, rank: int = 0, world_size: int = 1) -> None:
    """STEPS steps of SGD with momentum on rank's share of each batch (the whole batch on one process)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = BATCH // world_size
    for step in range(STEPS):
        x, target = batch(step)
        x, target = x[rank * share:(rank + 1) * share], target[rank * share:(rank + 1) * share]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), target)  # a mean: DDP/FSDP average over ranks
        loss.backward()
        optimizer.step()


def full_state(model: nn.Module) -> dict:
    """name -> full parameter tensor (FSDP2's DTensors gathered)."""
    state = {}
    for name, p in model.named_parameters():
        p = p.detach()
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        state[name] = p.clone()
    return state


def worker(world_size: int, rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    fully_shard = fully_shard_function()

    with process_group(world_size, rank, init_file, TIMEOUT_S // 2):
        results = {}
        for kind, model in manualbp_models().items():
            ddp = DistributedDataParallel(copy.deepcopy(model))
            train(ddp, rank, world_size)
            results[f"ddp/{kind}"] = full_state(ddp.module)

            sharded = copy.deepcopy(model)
            mesh = init_device_mesh("cpu", (world_size,))
            if kind == "converted":
                for layer in sharded:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mesh=mesh)  # one FSDP unit per layer, as in a real model
            fully_shard(sharded, mesh=mesh)  # the root (for the MLP: one unit, one autograd node)
            train(sharded, rank, world_size)
            results[f"fsdp2/{kind}"] = full_state(sharded)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    skip_without_gloo()
    try:
        fully_shard_function()
    except ImportError as error:
        pytest.skip(f"this PyTorch has no FSDP2 fully_shard: {error}")
    results, _ = run_workers(__file__, WORLD_SIZE, tmp_path_factory.mktemp("distributed"), TIMEOUT_S,
                             MANUALBP_BACKEND="reference")
    return results


@pytest.fixture(scope="module")
def single_process_results() -> dict:
    results = {}
    reference = torch_model()
    train(reference)
    results["torch"] = full_state(reference)
    for kind, model in manualbp_models().items():
        train(model)
        results[kind] = full_state(model)
    return results


# The same sums of float64 products in another order: a few ulps of the parameters' scale.
RTOL, ATOL = 1e-11, 1e-12


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("kind", ["converted", "mlp"])
def test_distributed_training_matches_one_process(distributed_results, single_process_results, mode, kind):
    single = single_process_results
    for rank, results in enumerate(distributed_results):
        got = results[f"{mode}/{kind}"]
        assert set(got) == set(single[kind]), f"{mode}/{kind}: parameter names differ"
        for name, value in got.items():
            initial = manualbp_models()[kind].state_dict()[name]
            assert not torch.equal(value, initial), f"{mode}/{kind} rank {rank}: {name} did not train"
            torch.testing.assert_close(
                value, single[kind][name], rtol=RTOL, atol=ATOL,
                msg=lambda m: f"{mode}/{kind} rank {rank}: {name} differs from one-process training\n{m}",
            )
            # ... and from the nn.Linear model it was made from (same state_dict keys).
            torch.testing.assert_close(
                value, single["torch"][name], rtol=RTOL, atol=ATOL,
                msg=lambda m: f"{mode}/{kind} rank {rank}: {name} differs from nn.Linear training\n{m}",
            )


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
