"""bundle.json names the bundle's files; a name that leaves the folder is refused when a bundle is opened
and when it is copied into BentoML's model store (which writes files by those names)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tsimcne_core.bundle_format import MANIFEST, BundleError, open_bundle

pytestmark = pytest.mark.slow  # uses the trained service_bundle


def _listing(bundle: Path, copy: Path, name: str, target: Path) -> Path:
    """A copy of `bundle` whose bundle.json also lists `name`, with the right checksum of `target`."""
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"][name] = hashlib.sha256(target.read_bytes()).hexdigest()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    "name", ["{outside}", "../outside.bin", "inner/../../outside.bin", "inner/inside.bin"], ids=str.strip
)
def test_names_outside_the_folder_are_refused_when_opening(service_bundle, tmp_path, name) -> None:
    """Each name points at a real file with the right checksum: before, the bundle opened (and hashed a
    file anywhere on the machine); now the name itself is refused."""
    bundle, _ = service_bundle
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of the bundle")
    name = name.format(outside=outside)
    copy = _listing(bundle, tmp_path / "copy", name, outside)
    (copy / "inner").mkdir()
    shutil.copy(outside, copy / "inner" / "inside.bin")
    with pytest.raises(BundleError, match=r"is not a plain file name inside the bundle folder") as info:
        open_bundle(copy)
    assert repr(name) in str(info.value) and MANIFEST in str(info.value)


def test_model_store_copy_refuses_names_outside_the_folder(service_bundle, tmp_path, monkeypatch) -> None:
    """Before, the copy wrote the listed file wherever its name pointed (with the old code: at /)."""
    from serving.model_store import register_bundle

    bundle, _ = service_bundle
    home = tmp_path / "home" / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    name = f"planted-{uuid.uuid4().hex}.txt"
    planted = tmp_path / name
    planted.write_text("written by the copy into the store")
    copy = _listing(bundle, tmp_path / "a" / "b" / "bundle", f"../../../{name}", planted)
    try:
        with pytest.raises(BundleError, match="not a plain file name"):
            register_bundle(copy)
    finally:
        found = subprocess.run(["find", "/", "-xdev", "-maxdepth", "8", "-name", name], capture_output=True, text=True)
        written = [Path(line) for line in found.stdout.splitlines() if Path(line) != planted]
        for path in written:
            path.unlink()  # never leave the planted file behind, even when the test fails
    assert written == []


def test_plain_names_pass_and_others_fail_on_their_own() -> None:
    from tsimcne_core.bundle_format import bundle_file

    folder = Path("/srv/models/demo")
    assert bundle_file(folder, "model.onnx") == folder / "model.onnx"
    for name in ("", ".", "..", "/etc/passwd", "a/b", "..\\x", "C:\\x", "x\0y", " model.onnx"):
        with pytest.raises(BundleError, match="not a plain file name"):
            bundle_file(folder, name)
