"""Training configuration and named recipes.

One pydantic model holds every setting; the same object is written to runs/<name>/config.json and
into every checkpoint, so a run can be resumed, audited and exported without guessing.

Recipes set defaults that explicit CLI options override:
- "reference": the paper's schedule and network (ResNet-18, 1000/50/450 epochs, batch 1024). GPU-sized.
- "cpu": a width-16 ResNet-18 whose stem has stride 2 (a quarter of the compute per image: four times the
  epochs in the same time), trained for a 30-minute budget: the epochs are planned from timed steps, so
  the run takes 30 minutes on a slow or a fast CPU alike (benchmarks/README.md has the figures);
  microscopy augmentations; twice the reference's lr per batch size (0.06 per 256 images: a schedule of
  tens of epochs instead of 1000; measured over 3 seeds, a better backbone and silhouette at the same
  kNN), stage 3 at lr/10 (measured better than lr/100 for a short stage 3).
- "demo": a width-8 net on the synthetic cells; the README's end-to-end command (a few minutes on CPU).
- "tiny": a width-4 net for tests (seconds).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tsimcne_core.errors import UnknownNameError, UserError, invalid_settings

REFERENCE_LR_PER_256 = 0.03


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="folder, .npz, .csv manifest, or 'synthetic[:N]'")
    image_size: tuple[int, int] | None = Field(None, description="(height, width); None = the data's own size")
    resize_method: Literal["bicubic", "bilinear", "nearest", "lanczos", "area"] = "bicubic"
    skip_bad: bool = False
    allow_upscale: bool = False
    augmentation: str = "default"
    width: int = Field(64, ge=1, description="ResNet-18 base width; 64 is the reference network")
    stem_stride: Literal[1, 2] = Field(1, description="stride of the first conv; 1 is the reference network")
    epochs: tuple[int, int, int] = (1000, 50, 450)
    time_budget_s: float | None = Field(
        None, gt=0, description="wall-clock budget; epochs are then planned from timed steps (training/budget.py)"
    )
    batch_size: int = Field(1024, ge=2, description="images per optimisation step (2x as many views)")
    base_lr: float | None = Field(None, gt=0, description="stage 1/2 lr; None = lr_per_256 * batch / 256")
    lr_per_256: float = Field(
        REFERENCE_LR_PER_256, gt=0, description="the lr for every 256 images of a batch, when base_lr is not given"
    )
    stage3_lr_factor: float = Field(1e-3, gt=0, description="stage 3 lr = base lr * this (reference: 1/1000)")
    warmup_epochs: tuple[int, int, int] = (10, 0, 10)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float | None = Field(4.0, description="clip every gradient element to +-value (reference: 4)")
    metric: Literal["cauchy", "cosine"] = "cauchy"
    temperature: float = Field(0.5, gt=0, description="cosine metric only")
    pretrain_dim: int = Field(128, ge=2)
    out_dim: int = Field(2, ge=1)
    sync_bn: bool = Field(True, description="under torchrun, BatchNorm statistics over all processes' batches")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    checkpoint_every: int = Field(10, ge=1, description="epochs between periodic checkpoints")

    @field_validator("epochs", "warmup_epochs")
    @classmethod
    def _non_negative(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v < 0 for v in value):
            raise ValueError("epochs must be >= 0 for every stage")
        return value

    @model_validator(mode="after")
    def _some_training(self) -> TrainConfig:
        if self.epochs[0] < 1:
            raise ValueError("stage 1 needs at least one epoch")
        return self

    def lr_for_stage(self, stage: int, batch_size: int) -> float:
        """Reference 'auto_batch' rule: eta = 0.03 * B / 256 for stages 1-2, eta * factor for stage 3."""
        eta = self.base_lr if self.base_lr is not None else self.lr_per_256 * batch_size / 256
        return eta * self.stage3_lr_factor if stage == 3 else eta


RECIPES: dict[str, dict[str, Any]] = {
    "reference": {"width": 64, "epochs": (1000, 50, 450), "batch_size": 1024, "augmentation": "default"},
    "cpu": {
        "width": 16,
        "stem_stride": 2,
        "epochs": (30, 5, 10),  # replaced by the plan for the time budget unless --epochs is given
        "time_budget_s": 1800.0,
        "batch_size": 512,
        "augmentation": "microscopy",
        "lr_per_256": 2 * REFERENCE_LR_PER_256,  # lr 0.12 at batch 512 (benchmarks/README.md section 13)
        "stage3_lr_factor": 1e-1,
    },
    "demo": {
        "width": 8,
        "epochs": (30, 8, 10),
        "batch_size": 256,
        "augmentation": "microscopy",
        "stage3_lr_factor": 1e-2,
        "checkpoint_every": 5,
    },
    "tiny": {
        "width": 4,
        "epochs": (3, 2, 2),
        "batch_size": 32,
        "augmentation": "default",
        "stage3_lr_factor": 1e-2,
        "checkpoint_every": 1,
    },
}

RECIPE_NOTES = {
    "reference": "the paper: ResNet-18, 1000/50/450 epochs, batch 1024 (GPU-sized)",
    "cpu": "width-16 ResNet-18 with a stride-2 stem, batch 512 at lr 0.12, microscopy augmentations, trained "
    "for 30 minutes (--time-budget; epochs planned from timed steps) on whatever CPU it runs on",
    "demo": "width-8 ResNet-18, 30/8/10 epochs, batch 256: the README demo on synthetic cells",
    "tiny": "width-4 ResNet-18, 3/2/2 epochs, batch 32: for tests",
}


def build_config(recipe: str, overrides: dict[str, Any]) -> TrainConfig:
    """Recipe defaults, then every override that is not None."""
    if recipe not in RECIPES:
        raise UnknownNameError(f"unknown recipe {recipe!r}; available: {', '.join(RECIPES)}")
    values = dict(RECIPES[recipe])
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "time_budget_s" in given:
        raise UserError("give either --epochs or --time-budget, not both")
    if "epochs" in given:
        values["time_budget_s"] = None  # explicit epochs replace a recipe's budget
    values.update(given)
    return config_from(values)


def config_from(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig(**values), a bad value raised as a UserError naming the setting and the rule."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise invalid_settings(exc) from None
