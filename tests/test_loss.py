"""InfoNCE against a direct transcription of the reference formula, and across processes."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.loss import InfoNCELoss


def reference_formula(z: torch.Tensor, kernel) -> torch.Tensor:
    """Reference doc §2: tempered alignment plus half of each view's raw uniformity, explicit sums."""
    z = z.double()
    b = z.shape[0] // 2
    a, bb = z[:b], z[b:]
    total = 0.0
    for i in range(b):
        total -= torch.log(kernel(a[i], bb[i]))
        denominator_b = sum(kernel(bb[i], a[j]) for j in range(b)) + sum(
            kernel(bb[i], bb[j]) for j in range(b) if j != i
        )
        denominator_a = sum(kernel(a[i], a[j]) for j in range(b) if j != i) + sum(kernel(a[i], bb[j]) for j in range(b))
        total += 0.5 * torch.log(denominator_b) + 0.5 * torch.log(denominator_a)
    return total / b


def cauchy(x, y):
    return 1.0 / (1.0 + ((x - y) ** 2).sum())


def cosine(x, y):
    return torch.exp(torch.nn.functional.cosine_similarity(x, y, dim=0) / 0.5)


@pytest.mark.parametrize(
    ("metric", "kernel", "dim"), [("cauchy", cauchy, 2), ("cauchy", cauchy, 128), ("cosine", cosine, 16)]
)
def test_matches_reference_formula(metric, kernel, dim) -> None:
    z = torch.randn(12, dim, generator=torch.Generator().manual_seed(1)) * 3
    ours = InfoNCELoss(metric)(z)
    assert torch.allclose(ours.double(), reference_formula(z, kernel), rtol=1e-5, atol=1e-5)


def test_bf16_input_is_computed_in_fp32_and_stays_finite_far_apart() -> None:
    z = (torch.randn(64, 2) * 1e4).bfloat16()
    loss = InfoNCELoss("cauchy")(z)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_positive_pairs_closer_means_lower_loss() -> None:
    rng = torch.Generator().manual_seed(0)
    anchors = torch.randn(16, 2, generator=rng) * 5
    near = torch.cat([anchors, anchors + 0.01])
    far = torch.cat([anchors, anchors.roll(1, 0)])
    assert InfoNCELoss()(near) < InfoNCELoss()(far)


def test_rejects_odd_view_counts() -> None:
    with pytest.raises(ValueError, match="even number"):
        InfoNCELoss()(torch.randn(5, 2))


def _distributed_worker(rank: int, world: int, init_file: str, z_full: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b_total = z_full.shape[0] // 2
    b_local = b_total // world
    rows = list(range(rank * b_local, (rank + 1) * b_local))
    z_local = torch.cat([z_full[rows], z_full[[r + b_total for r in rows]]]).clone().requires_grad_(True)
    loss = InfoNCELoss("cauchy", gather_distributed=True)(z_local)
    loss.backward()
    torch.save((rank, loss.item(), z_local.grad.clone()), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_gathered_negatives_equal_single_process_loss_and_gradients() -> None:
    world, b_total = 2, 8
    z_full = torch.randn(2 * b_total, 2, generator=torch.Generator().manual_seed(5))
    single_z = z_full.clone().requires_grad_(True)
    single = InfoNCELoss("cauchy")(single_z)
    single.backward()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.start_processes(
            _distributed_worker, args=(world, init_file, z_full, folder), nprocs=world, start_method="spawn"
        )
        results = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    mean_loss = sum(loss for _, loss, _ in results) / world
    assert mean_loss == pytest.approx(single.item(), rel=1e-5)
    b_local = b_total // world
    for rank, _, grad in results:
        rows = list(range(rank * b_local, (rank + 1) * b_local))
        expected = torch.cat([single_z.grad[rows], single_z.grad[[r + b_total for r in rows]]])
        # DDP averages parameter gradients over ranks, so each rank's gradient is world x its share.
        assert torch.allclose(grad / world, expected, atol=1e-6)
