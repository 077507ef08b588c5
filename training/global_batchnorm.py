"""BatchNorm over the whole batch of all processes (synchronised BatchNorm), on any device.

With negatives gathered across processes but BatchNorm statistics per process, the two views of an
image always share a process and so share batch statistics that other images' views do not: the
network can tell positives apart through the statistics instead of the content. SimCLR (Chen et al.
2020, §2.2 "Global BN") avoids that leak by normalising with the statistics of the global batch; so do
we, under torchrun, unless `--no-sync-bn`.

torch.nn.SyncBatchNorm refuses CPU tensors, which would leave the multi-process path untestable here;
`GlobalBatchNorm2d` computes the same thing with two differentiable all-reduces (the global mean, then
the global mean squared deviation), so the tested code is the code that runs on GPUs. Outside a
multi-process training step (eval mode, one process) it is exactly nn.BatchNorm2d, and its state
dict has the same keys, so checkpoints and the ONNX export do not change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics cover every process's batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        values = x.float()
        count = torch.tensor([values.numel() / channels], device=x.device, dtype=torch.float32)
        sums = torch.cat([values.sum(dim=(0, 2, 3)), count])
        sums = dist_fn.all_reduce(sums)  # differentiable: gradients reach every process's inputs
        total = sums[-1]
        mean = sums[:channels] / total
        centred = values - mean.view(1, -1, 1, 1)
        variance = dist_fn.all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / total
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.0
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative average, as nn.BatchNorm2d
                    momentum = 1.0 / float(self.num_batches_tracked)
                unbiased = variance * total / torch.clamp(total - 1, min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = centred * torch.rsqrt(variance + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def use_global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d in `module` for a GlobalBatchNorm2d holding the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device=child.weight.device if child.affine else None)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            use_global_batchnorm(child)
    return module
