"""Tensor parallel (DTensor) on manualbp.GatedMLP, both backends, next to the same Llama-style MLP of nn.Linear.

Each case builds the MLP twice from the same weights -- manualbp.GatedMLP and down_proj(act(gate_proj(x)) *
up_proj(x)) of nn.Linear -- puts both under the same parallel plan, runs one forward and backward, and keeps the
output, the input's gradient and every parameter's gradient (``full_tensor()``); the test asks them to agree
within float64 1e-10. Two processes on a 1-D CPU mesh, gloo over loopback (tests/workers.py), one launch:

  tp/llama_plan       parallelize_module with the Llama plan: gate_proj and up_proj ColwiseParallel, down_proj
                      RowwiseParallel (hooks: GatedMLP calls each projection as a module, then its gating
                      operators on the local shards)
  dtensor/col_row     the same placements without hooks: gate_proj and up_proj weights (and biases) sharded by
                      rows, Shard(0), down_proj's by columns, Shard(1); the input a replicated DTensor. The gated
                      operators' column-wise sharding rule runs (A sharded on I), down_proj's row-wise one gives
                      a partial sum
  dtensor/rows        every parameter a replicated DTensor, the input sharded by rows: the rows rule
  fsdp2               FSDP2's fully_shard on the MLP, each rank its half of the batch (the fused gating runs on
                      the gathered parameters)

This file is also the worker: ``python test_gated_parallel.py WORLD_SIZE RANK INIT_FILE OUT_DIR``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # the triton backend on the CPU: before manualbp's kernels exist

import pytest
import torch
from torch import nn

import manualbp

from checks import operator_calls
from workers import fully_shard_function, process_group, record, run_workers, skip_unless_backend_runs, skip_without_gloo

BACKENDS = ("reference", "triton")
CASES = {"tp/llama_plan": "silu", "dtensor/col_row": "gelu_tanh", "dtensor/rows": "relu", "fsdp2": "silu"}
HIDDEN, INTERMEDIATE, ROWS = 6, 8, 4  # even, so that every shard has the same size
TIMEOUT_S = 300
RTOL = ATOL = 1e-10


class LlamaStyleMLP(nn.Module):
    def __init__(self, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, dtype=torch.float64)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, dtype=torch.float64)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, dtype=torch.float64)
        self.act_fn = manualbp.activations.torch_module(activation)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def models(activation: str, backend: str):
    torch.manual_seed(0)
    reference = LlamaStyleMLP(activation)
    ours = manualbp.GatedMLP(HIDDEN, INTERMEDIATE, activation, bias=True, dtype=torch.float64, backend=backend)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def parallelize(case: str, model: nn.Module, mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, HIDDEN, dtype=torch.float64, generator=generator)
    grad_output = torch.randn(ROWS, HIDDEN, dtype=torch.float64, generator=generator)
    if case == "tp/llama_plan":
        plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
        return parallelize_module(model, mesh, plan), x.requires_grad_(), grad_output
    if case == "dtensor/col_row":
        placements = {"gate_proj": Shard(0), "up_proj": Shard(0), "down_proj.weight": Shard(1),
                      "down_proj.bias": Replicate()}

        def partition(name, module, mesh):
            for key, parameter in list(module.named_parameters(recurse=False)):
                placement = placements.get(name, placements.get(f"{name}.{key}"))
                module.register_parameter(key, nn.Parameter(distribute_tensor(parameter.detach(), mesh, [placement])))

        model = distribute_module(model, mesh, partition)
        assert isinstance(model.gate_proj.weight, DTensor), "the weights are DTensors"
        return model, distribute_tensor(x, mesh, [Replicate()]).requires_grad_(), grad_output
    if case == "dtensor/rows":
        model = distribute_module(model, mesh)
        return model, distribute_tensor(x, mesh, [Shard(0)]).requires_grad_(), grad_output
    if case == "fsdp2":
        fully_shard_function()(model, mesh=mesh)
        half = ROWS // 2 * mesh.get_local_rank()
        return model, x[half:half + ROWS // 2].contiguous().requires_grad_(), grad_output[half:half + ROWS // 2]
    raise ValueError(case)


def plain(t) -> torch.Tensor:
    t = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    assert type(t) is torch.Tensor, type(t)
    return t


def run(model, x, grad_output) -> dict:
    output = model(x)
    full = output.full_tensor() if hasattr(output, "full_tensor") else output
    (full * grad_output).sum().backward()
    result = {"output": plain(output), "input.grad": plain(x.grad)}
    result.update({f"{name}.grad": plain(p.grad) for name, p in model.named_parameters()})
    return result


def worker(world_size: int, rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with process_group(world_size, rank, init_file, TIMEOUT_S // 3):
        mesh = init_device_mesh("cpu", (world_size,))
        results = {}
        for case, activation in CASES.items():
            for backend in BACKENDS:
                def compute(case=case, activation=activation, backend=backend):
                    reference, ours = models(activation, backend)
                    expected = run(*parallelize(case, reference, mesh))
                    with operator_calls() as calls:
                        got = run(*parallelize(case, ours, mesh))
                    return {"torch": expected, "manualbp": got, "operators": sorted({name for name, _ in calls})}

                record(results, f"{case}/{backend}", rank, compute)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    skip_without_gloo()
    return run_workers(__file__, 2, tmp_path_factory.mktemp("gated_tp"), TIMEOUT_S, TRITON_INTERPRET="1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_gated_mlp_under_tensor_parallel(results, case, backend):
    skip_unless_backend_runs(backend)
    per_rank, logs = results
    key = f"{case}/{backend}"
    for rank, result in enumerate(per_rank):
        got = result[key]
        if "error" in got:
            pytest.fail(f"{key} rank {rank}: {got['error']}\n{logs}")
        mine, expected = got["manualbp"], got["torch"]
        # with the plan's hooks each projection runs as a module, then the gating alone, on the local shards
        node = "gate_backward" if case == "tp/llama_plan" else "gated_backward"
        assert node in got["operators"], f"{key}: operators {got['operators']}"
        assert set(mine) == set(expected), f"{key}: kept {sorted(mine)}, the Llama MLP's {sorted(expected)}"
        for name, value in expected.items():
            assert value.abs().sum() > 0, f"{key} rank {rank}: {name} of the Llama MLP is zero"
            torch.testing.assert_close(mine[name], value, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{key} rank {rank}: {name}: {m}")


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
