"""The shipped flag (tsimcne_core/flag_evidence.py, calibrated by training/flag_calibration.py): calibrated
false-flag rate, each kind of evidence, duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from training.flag_calibration import calibrate_detector
from training.index_building import RECALL_TARGET, plan_feature_index, recall_at_k
from tsimcne_core import feature_index as feature_index_module
from tsimcne_core.bundle_format import BundleError
from tsimcne_core.calibration import FeatureIndex
from tsimcne_core.feature_index import feature_index, open_feature_index
from tsimcne_core.flag_evidence import METHOD, Detector, FeatureSpace, channel_statistics
from tsimcne_core.neighbours import ExactIndex, FaissIndex, build_index, ivf_cells, kth_neighbour_distance


def _collection(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features in 3 clusters, pixel statistics of model inputs with natural spread, map coordinates."""
    centres = np.random.default_rng(42).normal(0, 1, (3, 16))  # the same collection every call
    which = rng.integers(3, size=n)
    features = centres[which] + 0.15 * rng.normal(size=(n, 16))
    batch = np.clip(0.6 + 0.05 * rng.normal(size=(n, 1, 1, 1)) + 0.1 * rng.normal(size=(n, 3, 8, 8)), 0, 1)
    coords = centres[which, :2] * 10 + rng.normal(size=(n, 2))
    return features, channel_statistics(batch.astype(np.float32)), coords


@pytest.fixture(scope="module")
def fitted() -> tuple[Detector, np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(0)
    ref, calib = _collection(rng, 3000), _collection(rng, 1000)
    space = FeatureSpace.fit(ref[0], dims=8)
    calibration = calibrate_detector(*calib, *ref, source="test", space=space, target_rate=0.05)
    assert calibration.method == METHOD and calibration.images == 1000
    return Detector(calibration, space.project(ref[0]), space), rng, ref[2]


def test_false_flag_rate_on_fresh_clean_images_is_near_target(fitted) -> None:
    detector, rng, ref_coords = fitted
    features, statistics, coords = _collection(rng, 4000)
    position = kth_neighbour_distance(coords, ref_coords, detector.calibration.position.k)
    flagged = detector.evidence(detector.feature_distance(features), statistics, position).score > 1
    assert 0.02 <= flagged.mean() <= 0.075  # at most 1.5x the 5 % target, and not vacuous


def test_each_kind_of_evidence_flags_on_its_own(fitted) -> None:
    detector, rng, _ = fitted
    features, statistics, _ = _collection(rng, 50)
    zero = np.zeros(50)
    far_features = features + 3.0 * rng.normal(size=features.shape)
    assert (detector.evidence(detector.feature_distance(far_features), statistics, zero).score > 1).mean() > 0.9
    bright = channel_statistics(np.full((50, 3, 8, 8), 0.95, dtype=np.float32))
    found = detector.evidence(detector.feature_distance(features), bright, zero)
    assert (found.score > 1).all() and (found.pixels > found.features).all()
    far_on_map = np.full(50, 100.0)
    assert (detector.evidence(detector.feature_distance(features), statistics, far_on_map).score > 1).all()


def test_duplicates_within_a_batch(fitted) -> None:
    detector, rng, _ = fitted
    features, _, _ = _collection(rng, 6)
    batch = np.concatenate([features, features[:1] + 1e-4])
    twins = detector.duplicates(batch)
    assert twins[-1] == 0 and twins[0] == 6
    assert (twins[1:6] == -1).all()
    assert (detector.duplicates(features[:1]) == -1).all()


def test_feature_space_keeps_neighbour_distances() -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 64))  # rank 6 in 64-D
    space = FeatureSpace.fit(features, dims=8)
    projected = space.project(features)
    from tsimcne_core.neighbours import pairwise_distances, unit_rows

    unit = unit_rows(features)
    assert np.allclose(pairwise_distances(projected[:20], projected), pairwise_distances(unit[:20], unit), atol=1e-4)


def test_the_feature_index_is_recorded_and_served_as_calibrated(fitted) -> None:
    detector, _, _ = fitted
    record = detector.calibration.features.index
    assert record is not None and record.kind == "faiss-flat" and record.recall == 1.0
    assert (record.reference_size, record.recall_k, record.recall_queries) == (3000, 15, 1000)
    # Served with exact search as calibrated: numpy's, over the features (faster on a CPU than FAISS's flat).
    assert isinstance(detector.index, ExactIndex) and detector.index_info["kind"] == "faiss-flat"


def test_above_the_exact_limit_an_ivf_index_is_tuned_to_the_recall_target() -> None:
    rng = np.random.default_rng(5)
    ref, calib = _collection(rng, 3000), _collection(rng, 600)
    space = FeatureSpace.fit(ref[0], dims=8)
    calibration = calibrate_detector(*calib, *ref, source="test", space=space, target_rate=0.05, index_exact_limit=1000)
    record = calibration.features.index
    assert record.kind == "faiss-ivf" and record.recall >= RECALL_TARGET
    assert record.nlist == ivf_cells(3000) and 8 <= record.nprobe <= record.nlist and record.refine == 4
    assert calibration.model_validate_json(calibration.model_dump_json()) == calibration  # as bundle.json keeps it
    # Serving rebuilds the very index the calibration measured with: the same cells, nprobe and answers.
    detector = Detector(calibration, space.project(ref[0]), space)
    assert isinstance(detector.index, FaissIndex) and (detector.index.nlist, detector.index.nprobe) == (
        record.nlist,
        record.nprobe,
    )
    planned, _ = plan_feature_index(space.project(ref[0]), space.project(calib[0]), 15, exact_limit=1000)
    np.testing.assert_array_equal(
        detector.feature_distance(calib[0]), planned.kth_distance(space.project(calib[0]), 15)
    )
    exact = build_index(space.project(ref[0]), dtype=np.float32)
    assert recall_at_k(detector.index, exact, space.project(calib[0]), 15) == pytest.approx(record.recall)


def test_bundles_without_an_index_record_or_without_faiss_are_searched_exactly(monkeypatch) -> None:
    rng = np.random.default_rng(6)
    reference = rng.normal(size=(500, 8)).astype(np.float32)
    assert isinstance(feature_index(reference, None), ExactIndex)  # exported before issue 14
    record = FeatureIndex(
        kind="faiss-ivf", nlist=12, nprobe=4, refine=4, reference_size=500, recall=0.995, recall_k=15, recall_queries=50
    )
    assert isinstance(feature_index(reference, record), FaissIndex)
    monkeypatch.setattr(feature_index_module, "faiss_available", lambda: False)  # opened where faiss-cpu is missing
    assert isinstance(feature_index(reference, record), ExactIndex)


def test_a_saved_index_is_opened_memory_mapped_and_checked_against_its_record(tmp_path) -> None:
    """open_feature_index reads the bundle's index file (not rebuilt; nprobe from bundle.json) and refuses,
    naming the file, one that does not match the record or the reference features."""
    reference = np.random.default_rng(7).normal(size=(2000, 8)).astype(np.float32)
    built = FaissIndex(reference, "ivf", nprobe=3)
    built.save(tmp_path / "reference_features.faiss")
    fields = {"reference_size": 2000, "recall": 1.0, "recall_k": 15, "recall_queries": 10}
    record = FeatureIndex(kind="faiss-ivf", nlist=built.nlist, nprobe=5, refine=4, **fields)
    index, info = open_feature_index(reference, record, tmp_path / "reference_features.faiss")
    assert isinstance(index, FaissIndex) and index.memory_mapped and index.nprobe == 5
    assert info["source"] == "bundle file, memory-mapped" and info["device"] == "cpu"
    _, rebuilt = open_feature_index(reference, record)  # older bundles: no file
    assert rebuilt["source"] == "rebuilt from bundle.json"
    with pytest.raises(BundleError, match=r"reference_features\.faiss: holds 2000 vectors"):
        open_feature_index(reference[:1000], record, tmp_path / "reference_features.faiss")
    # A flat record's file is read where FAISS searches it (a GPU); on a CPU numpy searches the features.
    flat = FeatureIndex(kind="faiss-flat", **fields)
    with pytest.raises(BundleError, match=r"reference_features\.faiss: a ivf index, but .* faiss-flat"):
        open_feature_index(reference, flat, tmp_path / "reference_features.faiss", gpu=True)
    (tmp_path / "broken.faiss").write_bytes(b"not an index")
    with pytest.raises(BundleError, match=r"broken\.faiss: not a readable FAISS index"):
        open_feature_index(reference, flat, tmp_path / "broken.faiss", gpu=True)
    on_cpu, info = open_feature_index(reference, flat, tmp_path / "broken.faiss")
    assert isinstance(on_cpu, ExactIndex) and info["source"] == "the bundle's features (exact numpy search)"


@pytest.mark.parametrize("shape", [(8, 3, 784), (2, 3, 1), (3, 3, 5), (4, 3, 1024)])
def test_percentiles_are_numpys_to_the_bit(shape) -> None:
    from tsimcne_core.flag_evidence import percentiles

    values = (np.random.default_rng(1).integers(0, 256, shape) / 255).astype(np.float32)
    expected = np.percentile(values.astype(np.float64), [1, 99], axis=2)
    assert np.array_equal(percentiles(values, (1, 99)), expected)
