"""The small-kernel ResNet-18 and its stage transitions match the reference exactly in shape and size."""

from __future__ import annotations

import torch

from training.network import TSimCNENet, count_parameters


def test_reference_parameter_counts() -> None:
    model = TSimCNENet(width=64, out_dim=128)
    assert count_parameters(model.backbone) == 11_168_832
    assert count_parameters(model) == 11_825_344
    model.to_map_output(2)
    assert count_parameters(model) == 11_696_194
    assert count_parameters(model, trainable_only=True) == 2_050


def test_output_shapes_for_square_and_non_square_inputs() -> None:
    model = TSimCNENet(width=4, out_dim=128).eval()
    for height, width in ((28, 28), (32, 32), (28, 40)):
        z, h = model(torch.rand(3, 3, height, width))
        assert z.shape == (3, 128) and h.shape == (3, 32)


def test_stem_keeps_resolution_and_has_no_max_pool() -> None:
    model = TSimCNENet(width=4)
    stem_out = model.backbone.stem(torch.rand(1, 3, 28, 28))
    assert stem_out.shape[-2:] == (28, 28)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_stage_two_layer_is_standard_normal_and_trunk_frozen() -> None:
    model = TSimCNENet(width=4)
    model.to_map_output(2, generator=torch.Generator().manual_seed(0))
    weight = model.head[-1].weight
    assert weight.shape == (2, 1024)
    assert abs(weight.std().item() - 1.0) < 0.05 and abs(weight.mean().item()) < 0.05
    assert model.head[-1].bias.abs().max().item() <= 1024**-0.5
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any(name.startswith("backbone") for name in frozen) and "head.0.weight" in frozen


def test_stage_two_updates_batchnorm_statistics_but_not_weights() -> None:
    model = TSimCNENet(width=4)
    model.to_map_output(2)
    model.train()
    before = model.backbone.stem[1].running_mean.clone()
    conv_before = model.backbone.stem[0].weight.clone()
    z, _ = model(torch.rand(8, 3, 16, 16))
    z.sum().backward()
    assert not torch.equal(before, model.backbone.stem[1].running_mean)
    assert model.backbone.stem[0].weight.grad is None and torch.equal(conv_before, model.backbone.stem[0].weight)
    assert model.head[-1].weight.grad is not None


def test_stage_two_layer_is_drawn_on_the_cpu_generator_whatever_the_model_lives_on() -> None:
    """The seeded CPU generator draws the new layer before it moves to the model's device and dtype: the
    same seed gives the same layer (this once failed on CUDA: a CPU generator cannot fill a GPU tensor)."""
    layers = []
    for dtype in (torch.float32, torch.float64):
        model = TSimCNENet(width=4).to(dtype)
        model.to_map_output(2, generator=torch.Generator().manual_seed(7))
        assert model.head[-1].weight.dtype == dtype
        layers.append(model.head[-1].weight.float())
    assert torch.equal(layers[0], layers[1])


def test_stem_stride_two_halves_every_stage_and_keeps_the_parameters() -> None:
    """The CPU recipes' stem: same layers and parameters, every stage at half the resolution."""
    reference, fast = TSimCNENet(width=4), TSimCNENet(width=4, stem_stride=2)
    assert count_parameters(fast) == count_parameters(reference)
    assert fast.backbone.stem(torch.rand(1, 3, 28, 28)).shape[-2:] == (14, 14)
    z, h = fast.eval()(torch.rand(2, 3, 28, 28))
    assert z.shape == (2, 128) and h.shape == (2, 32)
