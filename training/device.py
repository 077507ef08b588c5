"""Device choice, precision and the settings that measured fastest.

- CUDA: bf16 autocast and channels_last (tensor cores; the loss stays fp32).
- CPU: bf16 autocast when the processor has native bf16 (AVX512-BF16 / AMX), which measured 2.5x faster
  than fp32 for a ResNet-18 training step on a 2-core AVX512-BF16 machine (benchmarks/README.md); without
  it bf16 is emulated and ~10x slower than fp32 (measured on an AVX2-only EPYC), so fp32 is used there.
  channels_last stays off on CPU: on an AVX2-only EPYC it made a width-16 fp32 step 23 % faster, but its
  oneDNN kernels gave gradients 0.4-2 % away from fp64 (plain layout: 1e-5) and corrupted the heap for
  base widths 4 and 5 (glibc abort); on the AVX512-BF16 machine it made no difference.
  Threads = usable cores.
- torch.compile (`--compile`, auto = on for CUDA only): fuses BatchNorm, ReLU and the residual adds of
  the training step. On the AVX2 EPYC it made the width-16 step ~24 % faster but crashed for widths 4-5
  (it uses the same channels-last oneDNN kernels), so CPUs keep eager mode unless asked.
- CPU allocator: glibc serves every large tensor with a fresh mmap and unmaps it on free, so each
  training step page-faults its activations in again (~20 % of the reference's CPU time is kernel time).
  `tune_cpu_allocator` keeps freed memory in the heap instead (measured: 3.7x fewer page faults and
  sys time 21 s -> 8 s over four ResNet-18 steps at batch 512).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import torch

from tsimcne_core.cores import usable_cores
from tsimcne_core.errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = fp32
    channels_last: bool
    compile: bool = False  # torch.compile the network for training steps

    def describe(self) -> str:
        precision = "bf16 autocast" if self.autocast_dtype == torch.bfloat16 else "fp32"
        layout = "channels_last" if self.channels_last else "NCHW"
        if self.compile:
            layout += ", torch.compile"
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.device} ({precision}, {layout}{threads})"

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Stop glibc from returning large blocks to the OS after every step; True if applied."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 40) == 1
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    _allocator_tuned = applied
    return applied


def resolve_runtime(
    device: str, precision: str, channels_last: str, local_rank: int = 0, compile: str = "off"
) -> Runtime:
    """Turn 'auto|cpu|cuda' and the precision/layout options into a concrete Runtime."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was requested but no CUDA GPU is usable here (torch.cuda.is_available() is False)"
        )
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        native_bf16 = torch.cuda.is_bf16_supported()
    else:
        torch_device = torch.device("cpu")
        tune_cpu_allocator()
        torch.set_num_threads(max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
        native_bf16 = cpu_has_native_bf16()
    if precision == "bf16" and not native_bf16 and use_cuda:
        raise UserError("--precision bf16 was requested but this GPU has no bf16 support")
    use_bf16 = precision == "bf16" or (precision == "auto" and native_bf16)
    layout = channels_last == "on" or (channels_last == "auto" and use_cuda)
    compiled = compile == "on" or (compile == "auto" and use_cuda)
    return Runtime(torch_device, torch.bfloat16 if use_bf16 else None, layout, compiled)
