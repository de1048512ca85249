"""Grouped thresholds: one alert's matching rows of one batch, split by group, vectorised.

An alert with a `threshold` counts its matches per group (per user, say) within a window of
event time. The plan (`plan.py`) hands each such alert's matching rows here once per batch:
the group keys and event times are read from the batch's typed columns with pyarrow (a `take`
and one hash group-by, no Python per event), and the alert's tracker (`groups.py`) gets one
entry per group. Columns the batch already fetched for the rules are reused, not read again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from auditwatch import paths
from auditwatch.rules.ast import Exists
from auditwatch.rules.errors import RuleError
from auditwatch.rules.parse import parse_expression
from auditwatch.schema import EVENT_TIME, INGEST_TIME, TYPED_FIELDS

GROUP_COLUMNS = tuple(
    typed.column
    for typed in TYPED_FIELDS
    if typed.type in (pa.string(), pa.int64()) and typed.column != "auditID"
)
"""The typed single-value columns a threshold may group by (not lists, not per-request ids)."""

Key = tuple[str | int | None, ...]
"""One group: its value in each group-by column, in `groupBy` order (None: no value)."""


def group_column(text: str) -> str:
    """The column `text` (a field as rules write it: `user.username`, `user_username`) names.

    Raises RuleError with the position when `text` is not a field, or not one a threshold can
    group by.
    """
    try:
        parsed = parse_expression(f"{text} exists")
    except RuleError as error:
        raise RuleError(
            "not a field name (written as in rules: user.username, objectRef_namespace)",
            text=text,
            position=error.position,
        ) from None
    typed = None
    if isinstance(parsed, Exists):
        typed = paths.typed_field(parsed.field.segments)
    if typed is None or typed.column not in GROUP_COLUMNS:
        raise RuleError(
            f"cannot group by {text!r}: group by one of {', '.join(GROUP_COLUMNS)} "
            "(dotted spelling works too, e.g. user.username)",
            text=text,
            position=0,
        )
    return typed.column


@dataclass(frozen=True)
class GroupedRows:
    """What one batch's matching rows of one alert are, group by group."""

    keys: list[Key]
    counts: list[int]
    """Matching rows of each group."""
    last_rows: list[int]
    """The last matching row of each group, in batch order (the event its notices show)."""
    times: list[list[int]]
    """Each group's event times (µs since the epoch: `stageTimestamp`, else when received),
    ascending."""


def group_rows(
    column: Callable[[str], pa.Array], rows: pa.Int64Array, group_by: tuple[str, ...]
) -> GroupedRows:
    """`rows` (ascending) of a batch whose columns `column` gives, grouped by `group_by`."""
    times = pc.coalesce(pc.take(column(EVENT_TIME), rows), pc.take(column(INGEST_TIME), rows))
    parts: dict[str, Any] = {
        f"k{i}": pc.take(column(name), rows) for i, name in enumerate(group_by)
    }
    parts |= {"t": times.cast(pa.int64()), "r": rows}
    keys = list(parts)[: len(group_by)]
    grouped = (
        pa.table(parts)
        .group_by(keys, use_threads=False)
        .aggregate([("r", "count"), ("r", "max"), ("t", "list")])
    )
    return GroupedRows(
        keys=list(zip(*(grouped.column(key).to_pylist() for key in keys), strict=True)),
        counts=grouped.column("r_count").to_pylist(),
        last_rows=grouped.column("r_max").to_pylist(),
        times=[sorted(values) for values in grouped.column("t_list").to_pylist()],
    )
