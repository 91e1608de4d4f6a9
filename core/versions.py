"""The library versions a number depends on: recorded in every results ``meta.json``, residual cache and
training checkpoint, so a number can always be traced to the versions that produced it."""

from __future__ import annotations

from importlib import metadata

VERSIONED = ("forethought", "torch", "transformers", "transformer-lens", "scikit-learn", "numpy", "pandas")


def package_versions() -> dict[str, str | None]:
    """{distribution: installed version, or None where it is not installed} for :data:`VERSIONED`."""
    versions: dict[str, str | None] = {}
    for package in VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
