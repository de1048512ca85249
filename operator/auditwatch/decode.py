"""Turn an HTTP body or an audit log file into the audit events it carries.

Senders differ: the apiserver's webhook posts an `EventList`, its log backend writes one event per
line, Vector and Fluent Bit wrap each line in an envelope, Azure AKS exports records whose
`properties.log` holds the event as a string. Every one of these shapes is accepted, compressed or
not, so a cluster can be pointed at auditwatch without a translation step in between.

Decoding is atomic: a body with any bad part yields no events at all, and the error names the
part (line number, array index, JSON position), so the sender sees a 400 it can act on and nothing
half-kept is ever acknowledged.
"""

from __future__ import annotations

import gc
import re
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import zstandard

from auditwatch import exactjson

MiB = 1024 * 1024
DEFAULT_MAX_DECODED_BYTES = 64 * MiB

_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_SIZE = 4 * MiB

EVENT_MARKERS = frozenset(("auditID", "verb", "stage", "requestURI"))
"""Keys every audit.k8s.io Event (v1 and older) carries and no envelope does."""

NON_SPACE = re.compile(rb"\S")
"""Anything but the whitespace `bytes.isspace` skips (blank lines are not NDJSON lines)."""

_AKS_CLUSTER = re.compile(r"/managedclusters/([^/]+)", re.IGNORECASE)
"""The cluster name in an AKS record's `resourceId` (Azure upper-cases it in exports)."""

_ENVELOPE_KEYS = ("message", "log")
"""Where Vector (`message`) and Fluent Bit (`log`) put the line they read."""


class DecodeError(ValueError):
    """The body is not audit events in a shape auditwatch accepts; the message says where."""


class BodyTooLarge(DecodeError):
    """The body decodes to more bytes than allowed (a decompression bomb, or simply too big)."""


class UnsupportedEncoding(DecodeError):
    """The Content-Encoding is not one auditwatch can decode (the receiver answers 415)."""


def decode_body(
    body: bytes,
    content_encoding: str | None = None,
    *,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> list[dict[str, Any]]:
    """The audit events in an HTTP body, in order.

    `content_encoding` is the Content-Encoding header: identity (or absent), gzip / x-gzip, zstd,
    or a comma-separated list of those in the order they were applied (undone right to left).
    Decompression streams and stops at `max_decoded_bytes`, so a small body cannot expand into
    gigabytes.

    Accepted shapes: one event object, a JSON array of them, an `EventList` (`items`),
    newline-delimited JSON whose every line is one of these, a pretty-printed object over many
    lines, and the envelopes below; a UTF-8 BOM is ignored.

    Envelope or event: an object holding any of `auditID`, `verb`, `stage`, `requestURI` is an
    audit event and is kept as it is. Otherwise an object is an envelope when it has
    `records` (a list: the AKS export, each record `{"properties": {"log": "<event>"}}`),
    `properties.log` (a single AKS record), or `message` / `log` (Vector, Fluent Bit) as a
    string; that string must hold a JSON object, which is the event. An AKS record's event gets
    a `cluster` key, the cluster named in its `resourceId` (…/managedClusters/<name>),
    lower-cased. An envelope that wraps anything else (plain text, an array) is an error, not
    an event: it means the pipeline in front of auditwatch forwards the wrong logs. Any other
    object is kept as an event: whatever the cluster sends is stored, and typed columns are null
    where it differs from an audit event.
    """
    return decode_json(decompress(body, content_encoding, max_decoded_bytes))


def decode_file(path: str | Path) -> list[dict[str, Any]]:
    """The audit events in a file (the CLI reads logs with it): gzip and zstd found by magic bytes.

    Same shapes as `decode_body`. A DecodeError's message starts with the file name; an
    unreadable file raises OSError (whose message names the file too).
    """
    data = Path(path).read_bytes()
    try:
        if data.startswith(_GZIP_MAGIC):
            data = _gunzip(data, sys.maxsize)
        elif data.startswith(_ZSTD_MAGIC):
            data = _unzstd(data, sys.maxsize)
        return decode_json(data)
    except DecodeError as err:
        raise type(err)(f"{path}: {err}") from err


def decompress(body: bytes, content_encoding: str | None, cap: int) -> bytes:
    """Undo `content_encoding` (see `decode_body`), never producing more than `cap` bytes."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    data = body
    for coding in reversed(codings):
        if coding in ("", "identity"):
            continue
        if coding in ("gzip", "x-gzip"):
            data = _gunzip(data, cap)
        elif coding == "zstd":
            data = _unzstd(data, cap)
        else:
            raise UnsupportedEncoding(
                f"unsupported Content-Encoding {coding!r} (use gzip, zstd or identity)"
            )
    if len(data) > cap:
        raise BodyTooLarge(f"body is larger than {cap} bytes")
    return data


def _too_large(cap: int) -> BodyTooLarge:
    return BodyTooLarge(f"body decompresses to more than {cap} bytes")


def _gunzip(data: bytes, cap: int) -> bytes:
    """gzip, every member of a multi-member stream, never producing more than `cap` bytes."""
    chunks: list[bytes] = []
    total = 0
    pending = data
    try:
        while True:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while not inflater.eof:
                budget = min(cap + 1 - total, _READ_SIZE)
                chunk = inflater.decompress(pending, budget)
                total += len(chunk)
                if total > cap:
                    raise _too_large(cap)
                chunks.append(chunk)
                pending = inflater.unconsumed_tail
                if not pending and len(chunk) < budget:
                    break
            if not inflater.eof:
                raise DecodeError("gzip body is truncated")
            pending = inflater.unused_data
            if not pending.strip(b"\0"):
                return b"".join(chunks)
    except zlib.error as err:
        raise DecodeError(f"body is not valid gzip: {err}") from None


def _unzstd(data: bytes, cap: int) -> bytes:
    """zstd, all frames, never producing more than `cap` bytes.

    The bounded stream reader does the decompression but says nothing of a truncated last
    frame, so a second pass (now known to be small) checks that every frame is complete.
    """
    decompressor = zstandard.ZstdDecompressor()
    try:
        chunks: list[bytes] = []
        total = 0
        with decompressor.stream_reader(data, read_across_frames=True) as reader:
            while chunk := reader.read(min(cap + 1 - total, _READ_SIZE)):
                total += len(chunk)
                if total > cap:
                    raise _too_large(cap)
                chunks.append(chunk)
        pending = data
        while pending:
            frame = decompressor.decompressobj()
            frame.decompress(pending)
            if not frame.eof:
                raise DecodeError("zstd body is truncated")
            pending = frame.unused_data
    except zstandard.ZstdError as err:
        raise DecodeError(f"body is not valid zstd: {err}") from None
    return b"".join(chunks)


def decode_json(data: bytes) -> list[dict[str, Any]]:
    """The audit events in decompressed JSON text (the shapes of `decode_body`)."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    first = NON_SPACE.search(data)
    if first is None:
        raise DecodeError("empty body")
    events: list[dict[str, Any]] = []
    with collector_paused():
        if _is_ndjson(data, first.start()):
            _decode_lines(data, events)
        else:
            try:
                whole = exactjson.loads(data)
            except orjson.JSONDecodeError as err:
                raise _invalid_json(err, "") from None
            _collect(whole, None, "", events)
    return events


@contextmanager
def collector_paused() -> Iterator[None]:
    """Keep Python's cycle collector out of JSON parsing.

    Parsing allocates hundreds of thousands of dicts and lists, each allocation counts towards
    the next collection, and the collector then walks all of them again and again: that was
    40% of decoding time. Parsed JSON holds no reference cycles, so nothing is lost by waiting
    until the parse is done; the previous state is restored afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _is_ndjson(data: bytes, first: int) -> bool:
    """Whether the body is NDJSON: its first non-blank line, at `first`, is a JSON value on its
    own and more follows, so the body cannot be one JSON document.

    Telling so by the first line, rather than by a failed parse of the whole body, matters:
    orjson's error copies the whole body into a str (15% of decoding).
    """
    end = data.find(b"\n", first)
    if end == -1 or NON_SPACE.search(data, end) is None:
        return False
    try:
        exactjson.loads(data[data.rfind(b"\n", 0, first) + 1 : end])
    except orjson.JSONDecodeError:
        return False
    return True


def _decode_lines(data: bytes, events: list[dict[str, Any]]) -> None:
    """NDJSON: every non-blank line is one JSON value; a bad one is named by its line number."""
    lines = [
        (number, line)
        for number, line in enumerate(data.split(b"\n"), start=1)
        if line and not line.isspace()
    ]
    values: list[Any] = []
    for number, line in lines:
        try:
            values.append(exactjson.loads(line))
        except orjson.JSONDecodeError as err:
            raise _invalid_json(err, f"line {number}, ") from None
    for (number, _), value in zip(lines, values, strict=True):
        _collect(value, number, "", events)


def _collect(value: Any, line: int | None, path: str, events: list[dict[str, Any]]) -> None:
    """Append the events in one top-level JSON value (the body or an NDJSON line)."""
    if isinstance(value, list):
        _collect_items(value, line, path, events)
    elif isinstance(value, dict):
        _collect_object(value, line, path, events)
    else:
        raise _not_an_event(value, line, path)


def _collect_items(
    items: list[Any], line: int | None, path: str, events: list[dict[str, Any]]
) -> None:
    """The elements of an array or `items`: the path is only formatted for an error."""
    for index, item in enumerate(items):
        if isinstance(item, dict):
            if _is_event(item):
                events.append(item)
            else:
                _collect_object(item, line, f"{path}[{index}]", events)
        else:
            raise _not_an_event(item, line, f"{path}[{index}]")


def _is_event(obj: dict[str, Any]) -> bool:
    return "auditID" in obj or not obj.keys().isdisjoint(EVENT_MARKERS)


def _collect_object(
    obj: dict[str, Any], line: int | None, path: str, events: list[dict[str, Any]]
) -> None:
    if _is_event(obj):
        events.append(obj)
        return
    if obj.get("kind") == "EventList":
        items = obj.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            raise DecodeError(f"{_describe(line, _join(path, 'items'))} is not an array")
        _collect_items(items, line, _join(path, "items"), events)
        return
    records = obj.get("records")
    if isinstance(records, list):
        for index, record in enumerate(records):
            record_path = _join(path, f"records[{index}]")
            if not (isinstance(record, dict) and _aks_log(record) is not None):
                raise DecodeError(
                    f"{_describe(line, record_path)} is not an AKS record with a "
                    "properties.log string"
                )
            events.append(_unwrap(record, line, record_path))
        return
    events.append(_unwrap(obj, line, path) if _is_envelope(obj) else obj)


def _aks_log(obj: dict[str, Any]) -> str | None:
    properties = obj.get("properties")
    if isinstance(properties, dict):
        log = properties.get("log")
        if isinstance(log, str):
            return log
    return None


def _is_envelope(obj: dict[str, Any]) -> bool:
    return _aks_log(obj) is not None or any(isinstance(obj.get(key), str) for key in _ENVELOPE_KEYS)


def _unwrap(envelope: dict[str, Any], line: int | None, path: str) -> dict[str, Any]:
    """The event an envelope (AKS record, Vector / Fluent Bit line) carries as a JSON string."""
    payload = _aks_log(envelope)
    key = "properties.log"
    if payload is None:
        key = next(k for k in _ENVELOPE_KEYS if isinstance(envelope.get(k), str))
        payload = envelope[key]
    try:
        event = exactjson.loads(payload)
    except orjson.JSONDecodeError as err:
        raise DecodeError(f"{_describe(line, _join(path, key))} is not JSON: {err}") from None
    if not isinstance(event, dict):
        where = _describe(line, _join(path, key))
        raise DecodeError(f"{where} holds {_json_type(event)}, not an event object")
    resource_id = envelope.get("resourceId")
    found = _AKS_CLUSTER.search(resource_id) if isinstance(resource_id, str) else None
    if key == "properties.log" and found:
        event["cluster"] = found.group(1).lower()
    return event


def _invalid_json(err: orjson.JSONDecodeError, where: str) -> DecodeError:
    """orjson's complaint with its position; `where` is the NDJSON line, if any."""
    if not where:
        where = f"line {err.lineno}, "
    return DecodeError(f"invalid JSON at {where}column {err.colno}: {err.msg}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(line: int | None, path: str) -> str:
    if line is None:
        return path or "the body"
    return f"line {line}: {path}" if path else f"line {line}"


def _not_an_event(value: Any, line: int | None, path: str) -> DecodeError:
    return DecodeError(f"{_describe(line, path)} is {_json_type(value)}, not an event object")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
