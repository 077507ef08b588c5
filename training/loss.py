"""Contrastive InfoNCE losses of t-SimCNE (Böhm, Berens, Kobak, ICLR 2023) and SimCLR.

Input z has shape (2b, d): rows [0, b) are view 1 of b images, rows [b, 2b) view 2, so (i, i + b) is a
positive pair. For each of the 2b anchors the loss is

    -log( k(anchor, positive) / sum_{m != anchor} k(anchor, m) ),

averaged over anchors: every other view in the batch (2b - 2 negatives plus the positive) sits in the
denominator, exactly as in the reference. Kernels:
- "cauchy" (t-SimCNE, the reference's "euclidean"): k(x, y) = 1 / (1 + |x - y|^2);
- "cosine" (SimCLR NT-Xent): k(x, y) = exp(cos(x, y) / tau), tau = 0.5.

Everything runs in log-space and fp32 (log k = -log1p(d^2); log-sum-exp over a -inf-masked diagonal),
whatever dtype the network produced. With `gather_distributed=True` under torch.distributed, the
candidates are the views of all ranks (gathered with gradients), so negatives span the global batch,
while each rank keeps its own anchors; the mean over ranks equals the single-device loss.

Example:
    >>> z = torch.randn(8, 2)   # 4 images, 2 views each
    >>> loss = InfoNCELoss("cauchy")(z)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

METRICS = ("cauchy", "cosine")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (all_reduce + slice)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        ctx.rows = z.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' z concatenated in rank order (gradients flow back to each rank), and this rank."""
    return _GatherWithGrad.apply(z), dist.get_rank()


class InfoNCELoss(nn.Module):
    def __init__(self, metric: str = "cauchy", temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        self.metric = metric
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def log_kernel(self, anchors: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """log k between every anchor row and every candidate row, shape (n_anchors, n_candidates)."""
        if self.metric == "cauchy":
            squared = (
                anchors.pow(2).sum(1, keepdim=True) + candidates.pow(2).sum(1)[None, :] - 2.0 * anchors @ candidates.T
            ).clamp_min(0.0)
            return -torch.log1p(squared)
        a = nn.functional.normalize(anchors, dim=1)
        c = nn.functional.normalize(candidates, dim=1)
        return (a @ c.T) / self.temperature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        n_views = z.shape[0]
        if n_views % 2 or n_views < 4:
            raise ValueError(f"expected an even number >= 4 of views (2 per image), got {n_views}")
        half = n_views // 2
        local = torch.arange(n_views, device=z.device)
        positive = (local + half) % n_views  # column of each anchor's positive among the local views
        candidates, offset = z, 0
        if self.gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            candidates, rank = _gather_with_grad(z)
            offset = rank * n_views  # every rank must contribute the same number of views
        log_k = self.log_kernel(z, candidates)
        self_mask = torch.zeros_like(log_k, dtype=torch.bool)
        self_mask[local, local + offset] = True
        log_k = log_k.masked_fill(self_mask, float("-inf"))
        log_positive = log_k[local, positive + offset]
        return (torch.logsumexp(log_k, dim=1) - log_positive).mean()
