"""Batched augmentations: reproducible from a seed, geometrically right, values in range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.augment import PRESETS, AugmentationPreset, BatchAugmenter, get_preset, mean_border_colour


@pytest.fixture
def batch(synthetic_arrays) -> torch.Tensor:
    images, _, _ = synthetic_arrays
    return torch.from_numpy(images[:16]).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", ["default", "microscopy"])
def test_same_seed_same_views_other_seed_other_views(batch, name) -> None:
    augment = BatchAugmenter(PRESETS[name], (0.9, 0.85, 0.8))
    one = augment(batch, torch.Generator().manual_seed(1))
    two = augment(batch, torch.Generator().manual_seed(1))
    three = augment(batch, torch.Generator().manual_seed(2))
    assert torch.equal(one, two) and not torch.equal(one, three)
    assert one.shape == (16, 3, 24, 24) and one.dtype == torch.float32
    assert one.min() >= 0 and one.max() <= 1


def test_identity_preset_returns_the_image(batch) -> None:
    out = BatchAugmenter(PRESETS["none"])(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(out, batch.float() / 255, atol=1e-6)


def test_horizontal_and_vertical_flips_are_exact(batch) -> None:
    base = PRESETS["none"]
    flips = AugmentationPreset(**{**base.as_dict(), "name": "flip", "hflip_p": 1.0, "vflip_p": 1.0})
    out = BatchAugmenter(flips)(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(out, batch.float().flip(-1).flip(-2) / 255, atol=1e-5)


def test_rot90_on_non_square_keeps_shape_and_fills_with_border_colour() -> None:
    base = PRESETS["none"]
    rotate = AugmentationPreset(**{**base.as_dict(), "name": "rot", "rot90_p": 1.0})
    image = torch.zeros(1, 3, 8, 16, dtype=torch.uint8)
    out = BatchAugmenter(rotate, fill=(0.25, 0.5, 0.75))(image, torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 8, 16)
    corner = out[0, :, 0, 0]  # outside the rotated 8-wide strip: fill colour
    assert torch.allclose(corner, torch.tensor([0.25, 0.5, 0.75]), atol=1e-5)
    assert torch.allclose(out[0, :, 4, 8], torch.zeros(3), atol=1e-5)  # centre: the black image


def test_crop_scale_makes_zoomed_views(batch) -> None:
    base = PRESETS["none"]
    zoom = AugmentationPreset(**{**base.as_dict(), "name": "zoom", "crop_scale": (0.25, 0.25)})
    out = BatchAugmenter(zoom)(batch, torch.Generator().manual_seed(0))
    assert not torch.allclose(out, batch.float() / 255, atol=0.05)


def test_grayscale_probability_one() -> None:
    base = PRESETS["none"]
    gray = AugmentationPreset(**{**base.as_dict(), "name": "gray", "grayscale_p": 1.0})
    out = BatchAugmenter(gray)(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.Generator())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_jitter_changes_colour_statistics(batch) -> None:
    base = PRESETS["none"]
    jitter = AugmentationPreset(**{**base.as_dict(), "name": "jit", "jitter_p": 1.0})
    out = BatchAugmenter(jitter)(batch, torch.Generator().manual_seed(0))
    change = (out.mean(dim=(2, 3)) - batch.float().mean(dim=(2, 3)) / 255).abs()
    assert change.max() > 0.02


def test_mean_border_colour() -> None:
    images = np.zeros((2, 5, 5, 3), dtype=np.uint8)
    images[:, 0, :, :] = 255  # top row white: 5 of the 16 border pixels
    colour = mean_border_colour(images)
    assert colour == pytest.approx((5 / 16,) * 3)


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(KeyError, match="default, microscopy"):
        get_preset("fancy")


@pytest.mark.parametrize(("op", "factor"), [(0, 1.3), (1, 0.7), (2, 1.4), (3, 0.08), (3, -0.1)])
def test_colour_ops_match_torchvision(op, factor) -> None:
    """Brightness, contrast, saturation and hue equal torchvision's functional ops (the reference's)."""
    import torchvision.transforms.functional as TF

    from training.augment import _apply_colour_op

    x = torch.rand(6, 3, 9, 7, generator=torch.Generator().manual_seed(op))
    ours = _apply_colour_op(op, x.clone(), torch.full((6,), factor))
    reference = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op](x, factor)
    assert torch.allclose(ours, reference, atol=2e-5)


def test_affine_grid_equals_torch() -> None:
    from training.augment import _affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [5, 3, 12, 9], align_corners=False)
    assert torch.allclose(_affine_grid(theta, 12, 9), expected, atol=1e-6)


def test_masked_colour_jitter_equals_the_subset_version(batch) -> None:
    """The GPU's sync-free jitter (whole batch, torch.where) gives the CPU's subset result."""
    from training.augment import _colour_jitter

    x = batch.float() / 255
    preset = PRESETS["default"]
    subset = _colour_jitter(x.clone(), preset, torch.Generator().manual_seed(4), masked=False)
    masked = _colour_jitter(x.clone(), preset, torch.Generator().manual_seed(4), masked=True)
    assert torch.allclose(subset, masked, atol=1e-6) and not torch.allclose(subset, x, atol=1e-3)


def test_keep_size_preset_preserves_cell_area_and_crops_do_not() -> None:
    """A centred disc keeps its area under the keep-size geometry; the reference's resized crops zoom it."""
    yy, xx = np.mgrid[0:24, 0:24]
    disc = ((yy - 11.5) ** 2 + (xx - 11.5) ** 2 <= 5**2).astype(np.uint8) * 255
    images = torch.from_numpy(np.repeat(disc[None, None], 64, axis=0).repeat(3, axis=1))
    colourless = {"jitter_p": 0.0, "grayscale_p": 0.0}

    def areas(name: str) -> torch.Tensor:
        preset = AugmentationPreset(**{**get_preset(name).as_dict(), **colourless})
        out = BatchAugmenter(preset, fill=(0.0, 0.0, 0.0))(images, torch.Generator().manual_seed(0))
        return (out[:, 0] > 0.5).sum(dim=(1, 2)).float()

    kept, cropped = areas("microscopy-keep-size"), areas("microscopy")
    original = float((disc > 127).sum())
    assert (kept - original).abs().max() <= 0.12 * original
    assert cropped.max() > 1.5 * original  # zoomed in by the resized crop


def test_red_cell_sizes_differ_only_in_size() -> None:
    from training.synthetic import make_red_cell_sizes

    images, labels, names = make_red_cell_sizes(60, (28, 28), seed=0)
    assert names == ("microcyte", "normocyte", "macrocyte") and np.bincount(labels).tolist() == [20, 20, 20]
    cell_area = (images.astype(float).mean(axis=3) < 210).sum(axis=(1, 2))  # darker than the background
    means = [cell_area[labels == k].mean() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_switches_change_one_part_of_a_preset() -> None:
    preset = get_preset("microscopy,no-crop,no-grayscale")
    assert preset.crop_scale == (1.0, 1.0) and preset.grayscale_p == 0.0
    assert preset.rotate_degrees == 45.0 and preset.jitter_p == 0.8 and preset.name == "microscopy,no-crop,no-grayscale"
    dihedral = get_preset("default,rot90")
    assert dihedral.rot90_p == 0.5 and dihedral.vflip_p == 0.5 and dihedral.rotate_degrees == 0.0
    with pytest.raises(KeyError, match=r"unknown augmentation switch 'no-zoom'.*no-crop"):
        get_preset("default,no-zoom")
