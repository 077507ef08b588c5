"""Linear evaluation of a representation: how much class information its frozen features carry.

The SimCLR / MedMNIST convention: a linear classifier on frozen backbone features, fitted on a training
split and scored on a held-out test split. Here it is scikit-learn's multinomial logistic regression
on standardised features; the regularisation strength is picked on a validation split from a small
grid, then the probe is refitted on training + validation and scored once on the test split. k-NN
accuracy (k = 15, Euclidean) on the same features and split is reported beside it.

Splits: a dataset read from an npz with official `train_/val_/test_` arrays (MedMNIST's layout) keeps
its official split (ids start with `train/`, `val/`, `test/`); any other dataset gets a seeded,
stratified 70 / 10 / 20 % split, the proportions of MedMNIST's BloodMNIST (11,959 / 1,712 / 3,421).

This differs from the ICLR paper's headline "Linear (augm.)" (an SGD-trained linear layer with
augmentation, 100 epochs): that needs the network and GPU time; the logistic-regression probe is the
paper's other linear figure ("sklearn LogisticRegression on H"), cheap enough to run after every run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tsimcne_core.errors import UserError

SPLIT_SEED = 0
SPLIT_SHARES = (0.7, 0.1, 0.2)
C_GRID = (0.01, 0.1, 1.0, 10.0)
PROBE_K = 15


@dataclass(frozen=True)
class ProbeResult:
    linear_accuracy: float
    knn_accuracy: float
    regularisation_c: float
    n_train: int
    n_val: int
    n_test: int
    n_features: int
    split: str

    def as_dict(self) -> dict:
        return asdict(self)


def split_indices(ids: list[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(train, val, test) index arrays and a description of where the split came from."""
    prefixes = np.array([i.split("/", 1)[0] if "/" in i else "" for i in ids])
    official = {name: np.flatnonzero(prefixes == name) for name in ("train", "val", "test")}
    if len(official["train"]) and len(official["test"]) and sum(map(len, official.values())) == len(ids):
        return official["train"], official["val"], official["test"], "official train/val/test arrays"
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    try:
        n_test, n_val = round(len(labels) * SPLIT_SHARES[2]), round(len(labels) * SPLIT_SHARES[1])
        rest, test = train_test_split(everything, test_size=n_test, random_state=SPLIT_SEED, stratify=labels)
        train, val = train_test_split(rest, test_size=n_val, random_state=SPLIT_SEED, stratify=labels[rest])
    except ValueError as exc:  # a class too small to appear in every split
        raise UserError(f"linear evaluation needs at least ~10 images per class for a 70/10/20 split ({exc})") from exc
    return train, val, test, "stratified 70/10/20 %, seed 0"


def linear_probe(features: np.ndarray, labels: np.ndarray, ids: list[str]) -> ProbeResult:
    """Fit the probe on the training split, choose C on validation, score on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    train, val, test, split = split_indices(ids, labels)
    if not len(val):  # an official split without validation arrays: hold out 10 % of training
        from sklearn.model_selection import train_test_split

        train, val = train_test_split(train, test_size=0.125, random_state=SPLIT_SEED, stratify=labels[train])

    def fit(rows: np.ndarray, c: float) -> tuple[StandardScaler, LogisticRegression]:
        scaler = StandardScaler().fit(features[rows])
        model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(features[rows]), labels[rows])
        return scaler, model

    def score(fitted: tuple[StandardScaler, LogisticRegression], rows: np.ndarray) -> float:
        scaler, model = fitted
        return float(model.score(scaler.transform(features[rows]), labels[rows]))

    best_c = max(C_GRID, key=lambda c: score(fit(train, c), val))
    train_val = np.concatenate([train, val])
    linear = score(fit(train_val, best_c), test)
    knn = KNeighborsClassifier(n_neighbors=min(PROBE_K, len(train_val))).fit(features[train_val], labels[train_val])
    return ProbeResult(
        linear_accuracy=linear,
        knn_accuracy=float(knn.score(features[test], labels[test])),
        regularisation_c=best_c,
        n_train=len(train),
        n_val=len(val),
        n_test=len(test),
        n_features=features.shape[1],
        split=split,
    )
