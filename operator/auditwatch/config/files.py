"""The standalone configuration source: AuditStream, AuditAlert, Secret, Namespace YAML in a folder.

`auditwatch serve --resources DIR` runs without a cluster; the directory plays the apiserver's
part. Every *.yaml / *.yml below it (hidden entries skipped, so a mounted ConfigMap's `..data`
copies are read once) may hold several documents. A file that stops parsing (a half-saved edit)
keeps its last good documents in force, so a typo never silently switches alerts off; a resource
that is itself unusable is reported and, for an alert, marked Invalid with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchfiles
import yaml

from auditwatch.config.build import (
    DEFAULT_NAMESPACE,
    SecretMissing,
    build_alert,
    build_stream,
    check_stream,
    invalid_alert,
)
from auditwatch.config.model import AlertSpec, ConfigError, InvalidAlert, StreamSpec
from auditwatch.config.schema import GROUP, KINDS

YAML_SUFFIXES = frozenset({".yaml", ".yml"})


class _Loader(yaml.SafeLoader):
    """YAML as the apiserver reads it: timestamps stay strings, duplicate keys are errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys: set[str] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# YAML 1.1's `=` (the "value" type), which kubectl's YAML reader takes as the string "=":
# `kubectl kustomize` prints `operator: =` unquoted.
def _value_as_string(loader: _Loader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_Loader.add_constructor("tag:yaml.org,2002:value", _value_as_string)


class YamlFileError(Exception):
    """A file that cannot be read as YAML; the message says where (`line L, column C: ...`)."""


def read_documents(path: Path) -> list[Any]:
    """Every YAML document of `path` (None for empty ones); YamlFileError if any is broken."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise YamlFileError("not UTF-8 text") from None
    except OSError as error:
        raise YamlFileError(error.strerror or str(error)) from None
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise YamlFileError(f"{where}{error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise YamlFileError(str(error)) from None


def yaml_files(directory: Path) -> list[Path]:
    """The *.yaml / *.yml files below `directory`, sorted, hidden files and folders skipped."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.suffix in YAML_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
        and path.is_file()
    )


def resource_name(document: dict[str, Any], index: int) -> str:
    """`Kind/name`, or `Kind/namespace/name` when the document names a namespace."""
    kind = document.get("kind") or "(no kind)"
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        return f"{kind} (document {index + 1})"
    if isinstance(metadata.get("namespace"), str):
        return f"{kind}/{metadata['namespace']}/{metadata['name']}"
    return f"{kind}/{metadata['name']}"


def kind_problem(document: dict[str, Any]) -> str | None:
    """Why auditwatch cannot use this document's kind; None for its kinds and for anything else.

    Only a misspelt kind of auditwatch's API group is a problem. Other documents (a
    kustomization.yaml or Helm values next to the alerts) are not auditwatch's to check and are
    passed over.
    """
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if kind in KINDS or (kind == "Secret" and api_version == "v1"):
        return None
    if isinstance(api_version, str) and api_version.split("/")[0] == GROUP:
        return f"unknown kind {kind!r} (expected {' or '.join(KINDS)})"
    return None


@dataclass(frozen=True)
class ResourceError:
    """A problem with a file, or with one resource in it. `resource` is "" for the whole file."""

    file: Path
    resource: str
    reason: str
    """InvalidYAML, UnknownKind, Duplicate, InvalidSecret, or a ConfigError reason."""
    message: str

    def __str__(self) -> str:
        if self.resource:
            return f"{self.file}: {self.resource}: {self.message}"
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class ConfigSet:
    """Everything a resources directory defines, ready to run, plus what is wrong with it."""

    streams: dict[str, StreamSpec] = field(default_factory=dict)
    alerts: dict[str, AlertSpec] = field(default_factory=dict)
    """Usable alerts by `namespace/name`."""
    invalid_alerts: dict[str, InvalidAlert] = field(default_factory=dict)
    """Alerts (by `namespace/name`) whose status is Invalid, with the reason and message."""
    errors: list[ResourceError] = field(default_factory=list)
    """Every problem found, invalid alerts included."""
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    """Labels of the Namespace documents, for streams that admit alerts by namespace selector."""


@dataclass(frozen=True)
class _Document:
    file: Path
    index: int
    body: dict[str, Any]

    @property
    def name(self) -> str:
        return resource_name(self.body, self.index)


def _secret_values(document: _Document) -> tuple[dict[str, str], list[ResourceError]]:
    """A v1 Secret's values: `data` (base64) overlaid with `stringData`, as the apiserver does."""
    data = document.body.get("data") or {}
    string_data = document.body.get("stringData") or {}
    if not isinstance(data, dict) or not isinstance(string_data, dict):
        message = "data and stringData must be mappings of keys to values"
        return {}, [ResourceError(document.file, document.name, "InvalidSecret", message)]
    values: dict[str, str] = {}
    errors = []
    for key, encoded in data.items():
        try:
            values[str(key)] = base64.b64decode(str(encoded), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            message = f"data.{key}: not base64 of UTF-8 text"
            errors.append(ResourceError(document.file, document.name, "InvalidSecret", message))
    values.update({str(key): str(value) for key, value in string_data.items()})
    return values, errors


def _key(document: _Document) -> str | None:
    """What identifies the resource among its kind: `namespace/name`, or the name of a stream."""
    metadata = document.body.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        return None
    if document.body.get("kind") == "AuditStream":
        return str(metadata["name"])
    return f"{metadata.get('namespace') or DEFAULT_NAMESPACE}/{metadata['name']}"


def assemble(files: dict[Path, list[Any]], errors: list[ResourceError]) -> ConfigSet:
    """A ConfigSet from the documents of each file (earlier files win over later duplicates)."""
    errors = list(errors)
    secrets: dict[str, dict[str, str]] = {}
    by_kind: dict[str, list[tuple[str | None, _Document]]] = {
        kind: [] for kind in (*KINDS, "Secret")
    }
    """The documents auditwatch uses, with their keys; other tools' resources are passed over."""
    seen: set[tuple[str, str]] = set()
    for path, bodies in files.items():
        for index, body in enumerate(bodies):
            if body is None:
                continue
            if not isinstance(body, dict):
                errors.append(
                    ResourceError(path, f"document {index + 1}", "InvalidSpec", "not a mapping")
                )
                continue
            document = _Document(path, index, body)
            problem = kind_problem(body)
            if problem is not None:
                errors.append(ResourceError(path, document.name, "UnknownKind", problem))
                continue
            kind = body.get("kind")
            if kind not in by_kind:
                continue
            key = _key(document)
            if key is not None and (kind, key) in seen:
                errors.append(ResourceError(path, document.name, "Duplicate", "defined twice"))
                continue
            if key is not None:
                seen.add((kind, key))
            by_kind[kind].append((key, document))
    for key, document in by_kind["Secret"]:
        if key is None:
            message = "metadata.name: required field is missing"
            errors.append(ResourceError(document.file, document.name, "InvalidSecret", message))
            continue
        secrets[key], secret_errors = _secret_values(document)
        errors.extend(secret_errors)

    def lookup(namespace: str | None, name: str, key: str) -> str | None:
        namespace = namespace or DEFAULT_NAMESPACE
        values = secrets.get(f"{namespace}/{name}")
        if values is None or key not in values:
            raise SecretMissing.of(namespace, name, key, values)
        return values[key]

    namespace_labels = {
        str(body["metadata"]["name"]): {str(k): str(v) for k, v in labels.items()}
        for bodies in files.values()
        for body in bodies
        if isinstance(body, dict)
        and body.get("kind") == "Namespace"
        and isinstance(body.get("metadata"), dict)
        and isinstance(body["metadata"].get("name"), str)
        and isinstance(labels := body["metadata"].get("labels") or {}, dict)
    }

    streams: dict[str, StreamSpec] = {}
    for _, document in by_kind["AuditStream"]:
        try:
            stream = build_stream(document.body, lookup)
        except ConfigError as error:
            errors.append(ResourceError(document.file, document.name, error.reason, error.message))
            continue
        streams[stream.name] = stream
    alerts: dict[str, AlertSpec] = {}
    invalid_alerts: dict[str, InvalidAlert] = {}
    for key, document in by_kind["AuditAlert"]:
        try:
            alert = check_stream(build_alert(document.body, lookup), streams, namespace_labels)
        except ConfigError as error:
            errors.append(ResourceError(document.file, document.name, error.reason, error.message))
            if key is not None:
                invalid_alerts[key] = invalid_alert(document.body, error)
            continue
        alerts[alert.key] = alert
    return ConfigSet(streams, alerts, invalid_alerts, errors, namespace_labels)


@dataclass(frozen=True)
class _FileState:
    """What one file held when it was last read, and the stat that read saw."""

    stamp: tuple[int, int, int]
    """(mtime_ns, size, inode): unchanged, the file is not read again."""
    documents: list[Any] | None
    """The documents in force: the last good ones when the file does not parse now."""
    error: str | None


SETTLE_NS = 2_000_000_000
"""A file changed this recently is read again even with its stat unchanged: a rewrite of the
same size within the file system's timestamp granularity leaves the stat as it was."""


class DirectorySource:
    """A resources directory, read again on every change, keeping broken files' last good state.

    Only files whose stat changed are read again, and the resources are assembled again only when
    some file's documents did: a directory of thousands of AuditAlerts costs a `stat` per file per
    poll, not a YAML parse and a rule compilation each.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._files: dict[Path, _FileState] = {}
        self._config: ConfigSet | None = None

    def reload(self) -> ConfigSet:
        """Read every changed file now. A file that does not parse counts with its last good
        documents."""
        if not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory}: not a directory")
        now = time.time_ns()
        files: dict[Path, _FileState] = {}
        changed = False
        for path in yaml_files(self.directory):
            known = self._files.get(path)
            state = self._read(path, known, now)
            files[path] = state
            if known is None or (state.documents, state.error) != (known.documents, known.error):
                changed = True
        if set(files) != set(self._files):
            changed = True
        self._files = files
        if self._config is None or changed:
            documents = {path: s.documents for path, s in files.items() if s.documents is not None}
            errors = [
                ResourceError(path, "", "InvalidYAML", s.error)
                for path, s in files.items()
                if s.error is not None
            ]
            self._config = assemble(documents, errors)
        return self._config

    @staticmethod
    def _read(path: Path, known: _FileState | None, now: int) -> _FileState:
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = (0, 0, 0)
        if known is not None and known.stamp == stamp and now - stamp[0] > SETTLE_NS:
            return known
        try:
            return _FileState(stamp, read_documents(path), None)
        except YamlFileError as error:
            kept = None if known is None else known.documents
            message = str(error)
            if kept is not None:
                message += "; the resources it held before stay in force"
            return _FileState(stamp, kept, message)

    async def watch(
        self,
        *,
        debounce_ms: int = 400,
        poll_interval_ms: int = 5000,
        stop_event: asyncio.Event | None = None,
    ) -> AsyncGenerator[ConfigSet, None]:
        """The ConfigSet now, then a new one after every change of the directory's files.

        Yields only when the result differs (saving a file unchanged yields nothing). Besides the
        file notifications, the directory is re-read every `poll_interval_ms`, which also covers
        changes made while the watcher was starting or on filesystems without notifications.
        """
        current = self.reload()
        yield current
        async for _changes in watchfiles.awatch(
            self.directory,
            debounce=debounce_ms,
            step=min(50, debounce_ms),
            rust_timeout=poll_interval_ms,
            yield_on_timeout=True,
            stop_event=stop_event,
        ):
            latest = self.reload()  # a stat per file unless something changed: see reload
            if latest is not current and latest != current:
                current = latest
                yield current


def load_directory(directory: Path) -> ConfigSet:
    """The configuration a resources directory defines (once; DirectorySource to follow changes)."""
    return DirectorySource(directory).reload()
