"""Cloud push deliveries: Amazon Data Firehose (EKS) and Pub/Sub push (GKE) bodies as audit events.

Managed clusters do not let us configure the apiserver's audit webhook; their audit events come
out of the cloud's logging, in the cloud's envelope. These decoders turn one delivery into the
audit.k8s.io Events it carries, with the same atomic contract as `decode.py`: any bad record
rejects the whole body with a message naming it, and nothing of it is kept.

Every event from here gets a top-level `cluster` key (no audit.k8s.io Event has one) naming the
cluster it came from: from the envelope when it says (EKS log group `/aws/eks/<name>/cluster`,
GKE `resource.labels.cluster_name`), else the AuditStream's `spec.cluster`. See docs/sources.md.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from auditwatch.decode import DecodeError, collector_paused, decode_json, decompress

SourceKind = Literal["firehose", "pubsub"]

_GZIP_MAGIC = b"\x1f\x8b"
_EKS_LOG_GROUP = re.compile(r"^/aws/eks/([^/]+)/cluster$")
GCP_LOG_ENTRY = "gcp.logEntry"
"""The key under which a mapped GKE event keeps the LogEntry it was made from."""

GRPC_TO_HTTP = {
    0: 200,  # OK
    1: 499,  # CANCELLED
    2: 500,  # UNKNOWN
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 501,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}
"""google.rpc.Code to the HTTP status the apiserver answered (google/rpc/code.proto's mapping)."""


@dataclass(frozen=True)
class Source:
    """Which cloud envelope a body is in, and the cluster to name when the envelope does not."""

    kind: SourceKind
    cluster: str | None = None


def decode_source(data: bytes, source: Source, cap: int) -> list[dict[str, Any]]:
    """The audit events in a decompressed delivery body; DecodeError names the bad part."""
    with collector_paused():
        body = _json_object(data, "the body")
        if source.kind == "firehose":
            return _firehose(body, source.cluster, cap)
        return _pubsub(body, source.cluster)


def _json_object(data: bytes | str, where: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise DecodeError(f"{where} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise DecodeError(f"{where} is not a JSON object")
    return value


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise DecodeError(f"{where} is not a base64 string")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except binascii.Error as err:
        raise DecodeError(f"{where} is not valid base64: {err}") from None


def _firehose(body: dict[str, Any], cluster: str | None, cap: int) -> list[dict[str, Any]]:
    """Firehose HTTP endpoint delivery: each record a CloudWatch Logs subscription payload
    (gzip unless Firehose decompresses it), or only the extracted messages (the events)."""
    records = body.get("records")
    if not isinstance(records, list):
        raise DecodeError("the body has no records array (not a Firehose delivery)")
    events: list[dict[str, Any]] = []
    budget = cap
    for index, record in enumerate(records):
        where = f"records[{index}].data"
        if not isinstance(record, dict):
            raise DecodeError(f"records[{index}] is not an object")
        data = _base64(record.get("data"), where)
        if data.startswith(_GZIP_MAGIC):
            try:
                data = decompress(data, "gzip", budget)
            except DecodeError as err:
                raise type(err)(f"{where}: {err}") from None
        budget -= len(data)
        if budget < 0:
            raise DecodeError(f"{where}: the records decode to more than {cap} bytes")
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            value = None  # several extracted messages, one per line: decode_json reads them
        if isinstance(value, dict) and "messageType" in value:
            events.extend(_cloudwatch(value, where, cluster))
            continue
        if isinstance(value, dict):  # one extracted message: the event
            events.append(_with_cluster(value, cluster))
            continue
        try:
            extracted = decode_json(data)
        except DecodeError as err:
            raise DecodeError(f"{where}: {err}") from None
        events.extend(_with_cluster(event, cluster) for event in extracted)
    return events


def _cloudwatch(payload: dict[str, Any], where: str, cluster: str | None) -> list[dict[str, Any]]:
    """A CloudWatch Logs subscription payload: CONTROL_MESSAGE carries no events."""
    kind = payload["messageType"]
    if kind == "CONTROL_MESSAGE":
        return []
    if kind != "DATA_MESSAGE":
        raise DecodeError(f"{where}: unknown messageType {kind!r}")
    log_group = payload.get("logGroup")
    if isinstance(log_group, str) and (found := _EKS_LOG_GROUP.match(log_group)):
        cluster = found.group(1)
    log_events = payload.get("logEvents")
    if not isinstance(log_events, list):
        raise DecodeError(f"{where}: DATA_MESSAGE without a logEvents array")
    events = []
    for index, log_event in enumerate(log_events):
        message = log_event.get("message") if isinstance(log_event, dict) else None
        if not isinstance(message, str):
            raise DecodeError(f"{where}: logEvents[{index}] has no message string")
        event = _json_object(message, f"{where}: logEvents[{index}].message")
        events.append(_with_cluster(event, cluster))
    return events


def _with_cluster(event: dict[str, Any], cluster: str | None) -> dict[str, Any]:
    if cluster is not None:
        event["cluster"] = cluster
    return event


def _pubsub(body: dict[str, Any], cluster: str | None) -> list[dict[str, Any]]:
    """A Pub/Sub push request: one message whose data is a Cloud Logging LogEntry."""
    message = body.get("message")
    if not isinstance(message, dict):
        raise DecodeError("the body has no message object (not a Pub/Sub push request)")
    entry = _json_object(_base64(message.get("data"), "message.data"), "message.data")
    return [gke_event(entry, cluster)]


def gke_event(entry: dict[str, Any], cluster: str | None = None) -> dict[str, Any]:
    """The audit.k8s.io Event a GKE Cloud Audit Logs entry records, the entry kept under
    `gcp.logEntry`. GKE sends no stage, so the event has none (rules must not need one)."""
    payload = entry.get("protoPayload")
    if not isinstance(payload, dict) or not isinstance(payload.get("methodName"), str):
        raise DecodeError("message.data: a LogEntry without protoPayload.methodName (no audit log)")
    method: str = payload["methodName"]
    if not method.startswith("io.k8s."):
        raise DecodeError(f"message.data: methodName {method!r} is not a Kubernetes API call")
    event: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "verb": method.rsplit(".", 1)[1],
    }
    # insertId names this entry (a re-delivery has the same one): the store de-duplicates on it.
    # operation.id is shared by the first and last entries of one long request, which the
    # store would then keep only one of (GKE sends no stage to tell them apart).
    operation = entry.get("operation")
    audit_id = entry.get("insertId")
    if not isinstance(audit_id, str) and isinstance(operation, dict):
        audit_id = operation.get("id")
    if isinstance(audit_id, str):
        event["auditID"] = audit_id
    reference = _object_ref(payload.get("resourceName"))
    if reference:
        event["objectRef"] = reference
    name = payload.get("resourceName")
    if isinstance(name, str):
        event["requestURI"] = "/" + name
    authentication = payload.get("authenticationInfo")
    if isinstance(authentication, dict) and isinstance(authentication.get("principalEmail"), str):
        event["user"] = {"username": authentication["principalEmail"]}
    metadata = payload.get("requestMetadata")
    if isinstance(metadata, dict):
        if isinstance(metadata.get("callerIp"), str):
            event["sourceIPs"] = [metadata["callerIp"]]
        if isinstance(metadata.get("callerSuppliedUserAgent"), str):
            event["userAgent"] = metadata["callerSuppliedUserAgent"]
    status = payload.get("status")
    code = status.get("code", 0) if isinstance(status, dict) else 0
    if isinstance(code, int):
        response: dict[str, Any] = {"code": GRPC_TO_HTTP.get(code, 500)}
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            response["message"] = status["message"]
        event["responseStatus"] = response
    for source_key, key in (("request", "requestObject"), ("response", "responseObject")):
        if isinstance(payload.get(source_key), dict):
            event[key] = payload[source_key]
    labels = entry.get("labels")
    if isinstance(labels, dict):
        event["annotations"] = labels
    if isinstance(entry.get("timestamp"), str):
        event["requestReceivedTimestamp"] = event["stageTimestamp"] = entry["timestamp"]
    resource = entry.get("resource")
    resource_labels = resource.get("labels") if isinstance(resource, dict) else None
    if isinstance(resource_labels, dict) and isinstance(resource_labels.get("cluster_name"), str):
        cluster = resource_labels["cluster_name"]
    event[GCP_LOG_ENTRY] = entry
    return _with_cluster(event, cluster)


def _object_ref(resource_name: Any) -> dict[str, str]:
    """objectRef from `resourceName` (`<group>/<version>[/namespaces/<ns>]/<resource>[/<name>
    [/<subresource>]]`, the group `core` for the core API, which audit events leave empty)."""
    reference: dict[str, str] = {}
    if isinstance(resource_name, str):
        parts = resource_name.split("/")
        if len(parts) >= 3:
            group, version, rest = parts[0], parts[1], parts[2:]
            reference["apiVersion"] = version
            if group != "core":
                reference["apiGroup"] = group
            if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
                reference["namespace"] = rest[1]
                rest = rest[2:]
            if rest:
                reference["resource"] = rest[0]
            if len(rest) >= 2:
                reference["name"] = rest[1]
            if len(rest) >= 3:
                reference["subresource"] = rest[2]
    return reference
