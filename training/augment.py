"""Batched contrastive augmentations that run on tensors, on the training device.

The reference runs a per-image PIL chain in DataLoader workers that are re-spawned every epoch; on a
GPU that starves the accelerator and on CPU it competes with training. Here one call augments a whole
batch: every geometric step (90° rotation, any-angle rotation, random resized crop, flips) is composed
into one affine matrix per image and applied with a single `grid_sample`, then colour jitter (per-image
random order of brightness, contrast, saturation, hue, as torchvision does) and random grayscale.

Presets (`PRESETS`, listed by `tsimcne presets`):
- "default": the reference chain (doc §4.1): RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3), h-flip 0.5,
  colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2.
- "microscopy": Nwabufo et al. (doc §4.2): rotate 90° with p 0.5, rotate by U[-45°, 45°] with corners
  filled by the dataset's mean border colour, then the default chain plus v-flip 0.5. Together they
  cover every orientation, which suits cells that have no "up".
- "microscopy-keep-size": the microscopy chain without zoom (no resized crop; shifts up to 12.5 % of
  the side instead), for collections where cell size is diagnostic (micro- vs macrocytes): a crop
  resized from 20 % of the image teaches the network to ignore size (benchmarks/README.md measures it).
- "none": identity (for debugging and tests).

Deviation (docs/deviations.md): the geometric steps are resampled once, bilinearly, instead of once per
step (the reference uses nearest for the rotation, bilinear for the crop).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.chunks import iter_chunks
from tsimcne_core.bundle_format import PIXEL_DIVISOR
from tsimcne_core.errors import UnknownNameError


@dataclass(frozen=True)
class AugmentationPreset:
    name: str
    description: str
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.0  # shift by up to this fraction of the side (with crop_scale (1, 1): no zoom at all)
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    rot90_p: float = 0.0
    rotate_degrees: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, AugmentationPreset] = {
    "default": AugmentationPreset(
        "default", "reference chain: resized crop (0.2-1), h-flip, colour jitter (p 0.8), grayscale (p 0.2)"
    ),
    "microscopy": AugmentationPreset(
        "microscopy",
        "default + 90° rotation (p 0.5), rotation U[-45°, 45°] filled with the mean border colour, v-flip",
        vflip_p=0.5,
        rot90_p=0.5,
        rotate_degrees=45.0,
    ),
    "microscopy-keep-size": AugmentationPreset(
        "microscopy-keep-size",
        "microscopy without zoom: rotations and flips, shifts up to 12.5 %, colour; for when cell size is "
        "diagnostic (e.g. micro- vs macrocytes), which resized crops teach the network to ignore",
        crop_scale=(1.0, 1.0),
        translate=0.125,
        vflip_p=0.5,
        rot90_p=0.5,
        rotate_degrees=45.0,
    ),
    "none": AugmentationPreset(
        "none",
        "no augmentation (identity); for debugging",
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip_p=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
    ),
}


# Switches that turn one part of a preset on or off: `--augmentation microscopy,no-crop` (ablations, and
# collections that need one change, e.g. `default,rot90` for cells without an "up").
MODIFIERS: dict[str, tuple[str, dict]] = {
    "no-crop": ("no resized crop", {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}),
    "no-jitter": ("no colour jitter", {"jitter_p": 0.0}),
    "no-grayscale": ("no random grayscale", {"grayscale_p": 0.0}),
    "no-rotation": ("no rotations", {"rot90_p": 0.0, "rotate_degrees": 0.0}),
    "rot90": ("90° rotations and v-flips (all 8 dihedral orientations)", {"rot90_p": 0.5, "vflip_p": 0.5}),
}


def get_preset(name: str) -> AugmentationPreset:
    """A preset by name, optionally followed by comma-separated MODIFIERS (e.g. 'microscopy,no-crop')."""
    base, *switches = [part.strip() for part in name.split(",")]
    if base not in PRESETS:
        raise UnknownNameError(f"unknown augmentation preset {base!r}; available: {', '.join(PRESETS)}")
    preset = PRESETS[base]
    if not switches:
        return preset
    unknown = [switch for switch in switches if switch not in MODIFIERS]
    if unknown:
        raise UnknownNameError(
            f"unknown augmentation switch {unknown[0]!r} in {name!r}; available: {', '.join(MODIFIERS)}"
        )
    values = preset.as_dict()
    for switch in switches:
        values.update(MODIFIERS[switch][1])
    notes = "; ".join(MODIFIERS[switch][0] for switch in switches)
    return AugmentationPreset(**{**values, "name": name, "description": f"{preset.description}; {notes}"})


def mean_border_colour(images: np.ndarray) -> tuple[float, float, float]:
    """Dataset mean of each image's mean border pixel (top/bottom rows, left/right columns), in [0, 1].

    Summed exactly in integers over pieces of the array (training/chunks.py), so a memory-mapped
    collection of any size needs one piece in memory, and in-memory and stored copies of the same images
    give the same colour to the last bit (every image has the same number of border pixels, so the mean
    of all border pixels is the mean of the images' means)."""
    sums = np.zeros(3, dtype=np.uint64)
    count = 0
    for _, block in iter_chunks(images):
        top, bottom = block[:, 0, :, :], block[:, -1, :, :]
        left, right = block[:, 1:-1, 0, :], block[:, 1:-1, -1, :]
        for part in (top, bottom, left, right):
            sums += part.reshape(-1, part.shape[-1]).sum(axis=0, dtype=np.uint64)
            count += part.shape[0] * part.shape[1]
    return tuple(float(c) for c in sums.astype(np.float64) / max(count, 1) / PIXEL_DIVISOR)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _crop_boxes(
    n: int, height: int, width: int, preset: AugmentationPreset, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """torchvision's RandomResizedCrop box sampling (10 attempts, centre-crop fallback), vectorised.

    A scale range of exactly (1, 1) means "no crop": the whole image, whatever its aspect ratio.
    """
    if preset.crop_scale[0] >= 1.0:
        full = torch.ones(n, device=device)
        return full * 0, full * 0, full * height, full * width
    attempts = 10
    area = height * width * _uniform(n * attempts, *preset.crop_scale, generator, device).view(n, attempts)
    log_ratio = _uniform(
        n * attempts, math.log(preset.crop_ratio[0]), math.log(preset.crop_ratio[1]), generator, device
    )
    ratio = torch.exp(log_ratio).view(n, attempts)
    w = torch.round(torch.sqrt(area * ratio))
    h = torch.round(torch.sqrt(area / ratio))
    valid = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(valid.int(), dim=1)
    found = valid.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    in_ratio = width / height
    if in_ratio < preset.crop_ratio[0]:
        fw, fh = width, round(width / preset.crop_ratio[0])
    elif in_ratio > preset.crop_ratio[1]:
        fw, fh = round(height * preset.crop_ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(torch.rand(n, generator=generator, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=generator, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.round((height - h) / 2))
    left = torch.where(found, left, torch.round((width - w) / 2))
    return top, left, h, w


def _geometry(
    n: int, height: int, width: int, preset: AugmentationPreset, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Per-image 2x3 matrices mapping normalised output coordinates to normalised input coordinates.

    Forward chain: rot90 -> rotate(angle) -> crop+resize -> h-flip -> v-flip. Sampling inverts it:
    output point -> undo flips -> crop box in the rotated frame -> undo rotations -> input point.
    Coordinates are pixel offsets from the image centre, so rotations stay rigid on non-square images.
    """
    dtype = torch.float32
    top, left, h, w = _crop_boxes(n, height, width, preset, generator, device)
    hflip = torch.where(torch.rand(n, generator=generator, device=device) < preset.hflip_p, -1.0, 1.0)
    vflip = torch.where(torch.rand(n, generator=generator, device=device) < preset.vflip_p, -1.0, 1.0)
    angle = torch.zeros(n, device=device, dtype=dtype)
    if preset.rot90_p > 0:
        angle = angle + torch.where(
            torch.rand(n, generator=generator, device=device) < preset.rot90_p, math.pi / 2, 0.0
        )
    if preset.rotate_degrees > 0:
        angle = angle + _uniform(n, -preset.rotate_degrees, preset.rotate_degrees, generator, device) * math.pi / 180

    half_w, half_h = width / 2.0, height / 2.0
    # Output normalised -> centred output pixels, then flips and crop scale: point in the rotated frame.
    sx = hflip * (w / width) * half_w
    sy = vflip * (h / height) * half_h
    cx = left + w / 2 - half_w
    cy = top + h / 2 - half_h
    if preset.translate > 0:
        cx = cx + _uniform(n, -preset.translate, preset.translate, generator, device) * width
        cy = cy + _uniform(n, -preset.translate, preset.translate, generator, device) * height
    # Undo rotation by angle (sampling rotates the point by -angle), then centred pixels -> normalised input.
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.empty(n, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0] = cos * sx / half_w
    theta[:, 0, 1] = sin * sy / half_w
    theta[:, 0, 2] = (cos * cx + sin * cy) / half_w
    theta[:, 1, 0] = -sin * sx / half_h
    theta[:, 1, 1] = cos * sy / half_h
    theta[:, 1, 2] = (-sin * cx + cos * cy) / half_h
    return theta


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, (n, c, height, width), align_corners=False) as two broadcast products
    (affine_grid's batched matmul measured 4x slower on CPU for 28 px images)."""
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
    t = theta[:, :, :, None, None]  # (n, 2, 3, 1, 1)
    grid = t[:, :, 0] * xs[None, None, None, :] + t[:, :, 1] * ys[None, None, :, None] + t[:, :, 2]
    return grid.permute(0, 2, 3, 1)  # (n, height, width, 2): (x, y) per output pixel


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # torchvision's weights


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Continuous form of the HSV sector table: channel n in (5, 3, 1) is v - v*s*clamp(min(k, 4-k), 0, 1)
    with k = (n + 6h) mod 6; equal to the piecewise definition, without building six candidate planes."""
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def _apply_colour_op(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * f).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level of the image
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (f * x + (1 - f) * mean).clamp(0, 1)
    if op == 2:  # saturation: blend with the grey image
        return (f * x + (1 - f) * _grayscale(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)  # hue: rotate the hue channel
    hsv = torch.stack(((hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]), 1)
    return _hsv_to_rgb(hsv)


def _colour_jitter(
    x: torch.Tensor, preset: AugmentationPreset, generator: torch.Generator, masked: bool | None = None
) -> torch.Tensor:
    """Colour jitter with a random order of the four operations per image (torchvision's ColorJitter).

    Two equivalent ways to apply it, chosen by device (`masked=None`):
    - CPU: in place on x (a fresh tensor from the geometric step), each operation on the subset of images
      that has it in the current round: every image gets each operation once;
    - GPU: every operation on the whole batch in every round, kept where chosen (torch.where). Four times
      the arithmetic, which costs nothing on tiny images, but no `nonzero`: each of those would stop the
      CPU until the GPU caught up (16 times per view), starving the GPU of queued work.
    """
    n, device = x.shape[0], x.device
    masked = device.type != "cpu" if masked is None else masked
    apply = torch.rand(n, generator=generator, device=device) < preset.jitter_p
    factors = []
    for strength in (preset.brightness, preset.contrast, preset.saturation):
        drawn = _uniform(n, max(0.0, 1 - strength), 1 + strength, generator, device)
        factors.append(torch.where(apply, drawn, torch.ones_like(drawn)))
    hue = _uniform(n, -preset.hue, preset.hue, generator, device)
    factors.append(torch.where(apply, hue, torch.zeros_like(hue)))
    order = torch.argsort(torch.rand(n, 4, generator=generator, device=device), dim=1)
    active = [preset.brightness > 0, preset.contrast > 0, preset.saturation > 0, preset.hue > 0]
    for position in range(4):  # each image gets one op per round
        for op in range(4):
            if not active[op]:
                continue
            selected = (order[:, position] == op) & apply
            if masked:
                x = torch.where(selected.view(-1, 1, 1, 1), _apply_colour_op(op, x, factors[op]), x)
                continue
            chosen = torch.nonzero(selected).squeeze(1)
            if chosen.numel():
                x[chosen] = _apply_colour_op(op, x[chosen], factors[op][chosen])
    return x


class BatchAugmenter:
    """Augments uint8 or float image batches (N, 3, H, W) into float views in [0, 1].

    All randomness comes from the generator passed to `__call__`, so a seeded generator gives the same
    views on every run (the basis of exact resume).
    """

    def __init__(self, preset: AugmentationPreset, fill: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        self.preset = preset
        self.fill = fill

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.float() / PIXEL_DIVISOR if images.dtype == torch.uint8 else images.float()
        n, _, height, width = x.shape
        preset = self.preset
        theta = _geometry(n, height, width, preset, generator, x.device)
        grid = _affine_grid(theta, height, width)
        if preset.rotate_degrees > 0 or preset.rot90_p > 0:
            fill = torch.tensor(self.fill, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        else:
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = x.clamp(0, 1)
        if preset.jitter_p > 0:
            x = _colour_jitter(x, preset, generator)
        if preset.grayscale_p > 0:
            gray = torch.rand(n, generator=generator, device=x.device) < preset.grayscale_p
            x = torch.where(gray.view(-1, 1, 1, 1), _grayscale(x).expand(-1, 3, -1, -1), x)
        return x.contiguous()
