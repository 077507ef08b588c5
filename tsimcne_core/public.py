"""What the service shows of a bundle's provenance: the data's name, never a path on the machine that made it.

bundle.json keeps full provenance for its owner (the calibration's `source`: "held-out images never
trained on: /home/lab/share/heldout.npz (150)"; the evaluation's `data`: the training data's path); an
HTTP client learns only "... heldout.npz (150)" and the data folder's or file's name.
"""

from __future__ import annotations

import re
from typing import Any

# "<what>: <path> (<count>)", as training/export.py writes a held-out calibration source.
_NAMED_SOURCE = re.compile(r"^(?P<what>[^:]+: )(?P<path>.+) \((?P<count>\d+)\)$")
# Folder prefixes of POSIX or Windows paths: "/a/b/", "a/b/", "C:\\a\\".
_FOLDERS = re.compile(r"(?:[A-Za-z]:)?(?:[^\s:()\\/]*[\\/])+")


def last_component(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1] or path


def public_source(source: str) -> str:
    """A calibration source with any path reduced to its last component."""
    named = _NAMED_SOURCE.match(source)
    if named is not None and re.search(r"[\\/]", named["path"]):
        return f"{named['what']}{last_component(named['path'])} ({named['count']})"
    return _FOLDERS.sub("", source)


def public_folds(training: dict[str, Any]) -> list[dict[str, Any]]:
    """The folds that grew the bundle's reference (`tsimcne journal fold`), for /info: when, from which bundle,
    how many images and rows; not the journal's URL (a path or a database host on the lab's network)."""
    return [{key: value for key, value in fold.items() if key != "journal"} for fold in training.get("folds", [])]


def public_evaluation(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluation for /info, with any path (the evaluated data's) reduced to its last component."""
    if evaluation is None:
        return None
    return {
        key: last_component(value) if isinstance(value, str) and re.search(r"[\\/]", value) else value
        for key, value in evaluation.items()
    }
