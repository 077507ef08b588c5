"""Synchronised BatchNorm: two processes with half the batch each equal one process with all of it."""

from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from training.global_batchnorm import GlobalBatchNorm2d, use_global_batchnorm
from training.network import TSimCNENet


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))


def _weights(shape: torch.Size) -> torch.Tensor:
    """A loss weight for every output element of the whole batch (so the loss is not symmetric)."""
    shape = (shape[0], 4, *shape[2:])
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape).sin()


def _worker(rank: int, world: int, init_file: str, x: torch.Tensor, out_dir: str, sync: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _block().train()
    if sync:
        use_global_batchnorm(model)
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    out = model(part)
    (out * _weights(x.shape).chunk(world)[rank]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    running = [model[1].running_mean.clone(), model[1].running_var.clone()]
    torch.save((out.detach(), part.grad, grads, running), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run(x: torch.Tensor, sync: bool) -> list[tuple]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _worker, args=(2, os.path.join(folder, "init"), x, folder, sync), nprocs=2, start_method="spawn"
        )
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def test_two_processes_equal_one_process_over_the_whole_batch() -> None:
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    single = _block().train()
    x_single = x.clone().requires_grad_(True)
    out = single(x_single)
    (out * _weights(x.shape)).sum().backward()

    synced = _run(x, sync=True)
    assert torch.allclose(torch.cat([r[0] for r in synced]), out.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([r[1] for r in synced]), x_single.grad, atol=1e-5)
    for index, parameter in enumerate(single.parameters()):  # DDP would sum these over ranks
        assert torch.allclose(synced[0][2][index] + synced[1][2][index], parameter.grad, atol=1e-4)
    assert torch.allclose(synced[0][3][0], single[1].running_mean, atol=1e-6)
    assert torch.allclose(synced[0][3][1], single[1].running_var, atol=1e-5)

    per_process = _run(x, sync=False)  # the leak it removes: each half normalised by its own statistics
    assert not torch.allclose(torch.cat([r[0] for r in per_process]), out.detach(), atol=1e-3)


def test_single_process_and_eval_mode_are_plain_batchnorm() -> None:
    model = TSimCNENet(width=4)
    converted = use_global_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, GlobalBatchNorm2d) for m in converted.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )
    assert converted.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(4, 3, 16, 16)
    for mode in (True, False):
        model.train(mode)
        converted.train(mode)
        assert torch.allclose(model(x)[0], converted(x)[0], atol=1e-6)
