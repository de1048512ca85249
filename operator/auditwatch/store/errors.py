"""Errors of the store that callers act on."""

from __future__ import annotations


class StorageUnavailable(Exception):
    """The store cannot keep data right now (disk error, staging full).

    The receiver answers 503 with Retry-After: the sender keeps the batch and retries, so nothing
    is lost and nothing was acknowledged.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreLocked(Exception):
    """Another process already owns this data directory (two writers would corrupt staging)."""
