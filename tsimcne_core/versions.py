"""Installed package versions, as bundles record them (what made the bundle) and /info shows them (what serves it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

NOT_INSTALLED = "not installed"


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return NOT_INSTALLED


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Versions of those of `names` that are installed."""
    found = {name: package_version(name) for name in names}
    return {name: value for name, value in found.items() if value != NOT_INSTALLED}
