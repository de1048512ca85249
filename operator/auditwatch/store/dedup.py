"""Recognising events already kept, so the apiserver's re-sends are stored once.

The apiserver re-sends a whole batch when an answer was an error or came too late (up to 5
attempts, backoff from 10 s: all within a few minutes). The key of an event is (auditID, stage);
an event without auditID has no identity and is never dropped.

The index is bounded two ways: keys are forgotten once their ingest time is older than `window`
behind the newest ingest time seen, and at most `max_keys` are kept (oldest forgotten first).
Memory is about 150 bytes per key (1 million keys: ~150 MB).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import cast

import pyarrow as pa
import pyarrow.compute as pc

DEFAULT_WINDOW = timedelta(minutes=15)
DEFAULT_MAX_KEYS = 1_000_000
_SEPARATOR = "\x1f"


def event_keys(table: pa.Table) -> list[str | None]:
    """`auditID<US>stage` per row (None without auditID), built in one vectorised pass."""
    stage = pc.fill_null(table["stage"], "")
    return pc.binary_join_element_wise(table["auditID"], stage, _SEPARATOR).to_pylist()  # type: ignore[no-any-return]


@dataclass
class Classified:
    """Which rows of a batch are new, and the keys those rows add once kept."""

    mask: list[bool]
    new_keys: list[str]
    kept_keys: list[str] = field(default_factory=list)
    """Keys of rows left out because an earlier batch kept them."""

    @property
    def all_new(self) -> bool:
        return all(self.mask)

    @property
    def any_new(self) -> bool:
        return any(self.mask)


class DedupIndex:
    """The keys of recently kept events (not thread-safe: the stream's lock guards it)."""

    def __init__(
        self, window: timedelta = DEFAULT_WINDOW, max_keys: int = DEFAULT_MAX_KEYS
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.window_us = int(window / timedelta(microseconds=1))
        self.max_keys = max_keys
        self._seen: set[str] = set()
        self._groups: deque[tuple[int, list[str]]] = deque()
        self._newest_us = 0

    def __len__(self) -> int:
        return len(self._seen)

    def classify(self, table: pa.Table) -> Classified:
        """Mark each row new unless its key was kept before or appeared earlier in this batch."""
        keys = event_keys(table)
        distinct = set(keys)
        if len(distinct) == len(keys) and None not in distinct and distinct.isdisjoint(self._seen):
            return Classified([True] * len(keys), cast("list[str]", keys))  # no None in them
        seen = self._seen
        in_batch: set[str] = set()
        mask: list[bool] = []
        new_keys: list[str] = []
        kept_keys: list[str] = []
        for key in keys:
            if key is None:
                mask.append(True)
            elif key in seen:
                kept_keys.append(key)
                mask.append(False)
            elif key in in_batch:
                mask.append(False)
            else:
                in_batch.add(key)
                new_keys.append(key)
                mask.append(True)
        return Classified(mask, new_keys, kept_keys)

    def forget(self, keys: list[str]) -> None:
        """Undo `add(keys, ...)` (the same list): their events were not kept after all."""
        self._seen.difference_update(keys)
        for index in range(len(self._groups) - 1, -1, -1):  # most likely the last one
            if self._groups[index][1] is keys:
                del self._groups[index]
                break

    def add(self, keys: list[str], ingest_us: int) -> None:
        """Remember keys kept at ingest time `ingest_us` (µs since epoch), then forget old ones."""
        if keys:
            self._seen.update(keys)
            self._groups.append((ingest_us, keys))
        self._newest_us = max(self._newest_us, ingest_us)
        horizon = self._newest_us - self.window_us
        groups = self._groups
        while groups and (groups[0][0] < horizon or len(self._seen) > self.max_keys):
            _, expired = groups.popleft()
            self._seen.difference_update(expired)
