"""The one Arrow schema every batch of audit events has, from decode to Parquet.

Columns are named the way Parseable flattens JSON (`objectRef_resource`, `user_username`), so
stored data reads the same in DuckDB as in Parseable. The well-known fields of an audit.k8s.io
Event get typed columns for fast rules and queries; `event` keeps the whole event as one line of
JSON (the sender's own text where it was one, see columnar.py), so nothing a cluster sent is ever
lost, whatever its shape. A value whose JSON type differs from its column's type (a `code` sent as
text, say) is null in the typed column and still intact in `event`: a type clash never rejects a
batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TypedField:
    """A typed column and the path in the audit event it is taken from."""

    column: str
    path: tuple[str, ...]
    type: pa.DataType


TYPED_FIELDS: tuple[TypedField, ...] = (
    TypedField("auditID", ("auditID",), pa.string()),
    TypedField("stage", ("stage",), pa.string()),
    TypedField("level", ("level",), pa.string()),
    TypedField("verb", ("verb",), pa.string()),
    TypedField("requestURI", ("requestURI",), pa.string()),
    TypedField("userAgent", ("userAgent",), pa.string()),
    TypedField("user_username", ("user", "username"), pa.string()),
    TypedField("user_uid", ("user", "uid"), pa.string()),
    TypedField("user_groups", ("user", "groups"), pa.list_(pa.string())),
    TypedField("impersonatedUser_username", ("impersonatedUser", "username"), pa.string()),
    TypedField("impersonatedUser_groups", ("impersonatedUser", "groups"), pa.list_(pa.string())),
    TypedField("sourceIPs", ("sourceIPs",), pa.list_(pa.string())),
    TypedField("objectRef_resource", ("objectRef", "resource"), pa.string()),
    TypedField("objectRef_subresource", ("objectRef", "subresource"), pa.string()),
    TypedField("objectRef_namespace", ("objectRef", "namespace"), pa.string()),
    TypedField("objectRef_name", ("objectRef", "name"), pa.string()),
    TypedField("objectRef_apiGroup", ("objectRef", "apiGroup"), pa.string()),
    TypedField("objectRef_apiVersion", ("objectRef", "apiVersion"), pa.string()),
    TypedField("objectRef_uid", ("objectRef", "uid"), pa.string()),
    TypedField("responseStatus_code", ("responseStatus", "code"), pa.int64()),
    TypedField("responseStatus_status", ("responseStatus", "status"), pa.string()),
    TypedField("responseStatus_reason", ("responseStatus", "reason"), pa.string()),
    TypedField("responseStatus_message", ("responseStatus", "message"), pa.string()),
    TypedField("annotations", ("annotations",), pa.map_(pa.string(), pa.string())),
    TypedField("cluster", ("cluster",), pa.string()),
)
"""Typed columns, in schema order. Strings hold only JSON strings, `int64` only JSON integers
(not booleans), lists only arrays of strings (non-string elements become null).

`cluster` is no audit.k8s.io field: the cloud sources (sources.py) and AKS records add it to each
event, naming the cluster it came from, so that one stream can hold a fleet."""

EVENT_TIME = "eventTime"
"""When the apiserver recorded the event: `stageTimestamp`, else `requestReceivedTimestamp`, else
the pre-v1 `timestamp`; null when none parses."""

INGEST_TIME = "p_timestamp"
"""When auditwatch received the event (Parseable's column name). Partitions are cut by it."""

EVENT_JSON = "event"
"""The whole event as one line of JSON (keys as sent)."""

EVENT_SCHEMA = pa.schema(
    [pa.field(f.column, f.type) for f in TYPED_FIELDS]
    + [
        pa.field(EVENT_TIME, TIMESTAMP),
        pa.field(INGEST_TIME, TIMESTAMP, nullable=False),
        pa.field(EVENT_JSON, pa.string(), nullable=False),
    ]
)

TYPED_BY_COLUMN: dict[str, TypedField] = {f.column: f for f in TYPED_FIELDS}
TYPED_BY_PATH: dict[tuple[str, ...], TypedField] = {f.path: f for f in TYPED_FIELDS}
