"""The version of this sessiond, as installed (pyproject.toml's `version`)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["version"]


def version() -> str:
    """The installed distribution's version ("0+unknown" when run from a bare tree)."""
    try:
        return metadata.version("sessiond")
    except metadata.PackageNotFoundError:
        return "0+unknown"
