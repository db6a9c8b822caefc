"""Errors a user can fix: the CLI prints them as one paragraph and exits 2."""

from __future__ import annotations


class XRealError(Exception):
    """Base class for errors caused by bad input or configuration, not by a bug."""


class LabelError(XRealError, ValueError):
    """An unknown or inconsistent pathology or anatomy label."""


class MaskError(XRealError, ValueError):
    """A mask, label map, run-length encoding or box that cannot be used."""


class ManifestError(XRealError, ValueError):
    """A manifest that cannot be read at all (not Parquet, empty, wrong version)."""
