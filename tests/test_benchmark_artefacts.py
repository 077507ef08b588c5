"""The flagging benchmark's artefact generators keep shape and type and really change the image."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.flagging import artefacts
from training.synthetic import make_synthetic_cells

KINDS = {**artefacts.STRONG, **artefacts.SUBTLE, **artefacts.UNSEEN, "near duplicate": artefacts.near_duplicate}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_changes_the_image_and_keeps_its_shape(name: str) -> None:
    images, _, _ = make_synthetic_cells(4, (28, 28), seed=1)
    rng = np.random.default_rng(0)
    for image in images:
        changed = KINDS[name](image, rng)
        assert changed.shape == image.shape and changed.dtype == np.uint8
    assert any(not np.array_equal(KINDS[name](image, rng), image) for image in images)
