"""Bundles in BentoML's model store, so that `bentoml build` packages the bundle with the service.

`tsimcne export --register` (or `register_bundle`) copies a verified bundle folder into the store as a
model named after the bundle; the service takes `--arg model_tag=NAME:latest` and opens the stored copy,
which it verifies again like any bundle folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tsimcne_core.bundle_format import MANIFEST, BundleError, bundle_file, open_bundle, sha256_file


def store_name(bundle_name: str) -> str:
    """A valid BentoML model name (lower-case letters, digits, '-', '_', '.') for a bundle name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", bundle_name.lower()).strip("-._")
    return name or "bundle"


def register_bundle(folder: str | Path, name: str | None = None) -> str:
    """Copy a bundle into BentoML's model store; returns the new tag (name:version)."""
    import bentoml

    folder = Path(folder)
    manifest = open_bundle(folder)
    metadata = {
        "bundle": manifest.name,
        "bundle_sha256": sha256_file(folder / MANIFEST),
        "classes": manifest.class_names,
    }
    labels = {"kind": "tsimcne-bundle"}
    with bentoml.models.create(store_name(name or manifest.name), labels=labels, metadata=metadata) as model:
        for file in [MANIFEST, *manifest.files]:
            # Checked again on both sides: the copy writes into the store by these names.
            shutil.copy2(bundle_file(folder, file), bundle_file(Path(model.path), file))
    return str(model.tag)


def bundle_path_from_store(tag: str) -> Path:
    """The folder of a registered bundle; BundleError when the tag is unknown."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        return Path(bentoml.models.get(tag).path)
    except BentoMLException as exc:
        raise BundleError(
            f"model {tag!r} is not in BentoML's model store ({exc}); register a bundle with "
            "`tsimcne export RUN --out models/NAME --register`, or list the store with `bentoml models list`"
        ) from exc
