"""What produced a result: library versions, read without importing the libraries."""

from __future__ import annotations

import platform
from importlib import metadata

TRACKED_PACKAGES = ("nnsight", "torch", "transformers")


def package_version(name: str) -> str:
    """The installed version of `name`, or "not installed"; never imports the package."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    """Versions of python and of the libraries whose upgrades change findings."""
    versions = {name: package_version(name) for name in TRACKED_PACKAGES}
    versions["python"] = platform.python_version()
    return versions
