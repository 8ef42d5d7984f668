"""The error of the data layer: a dataset file or folder is missing, unreadable or inconsistent."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""
