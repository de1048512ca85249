"""`auditwatch lint`: check AuditStream / AuditAlert YAML before it reaches a cluster.

For GitOps pipelines: the same schema (from crds/) and the same builders as the operator, so
what passes here is what the operator accepts. Secrets are usually not in the repository, so
secret references are not resolved; that a stream named by an alert exists is not checked either
(it may live in another repository).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditwatch.config import schema
from auditwatch.config.build import DEFAULT_NAMESPACE, build_alert, build_stream, check_stream
from auditwatch.config.files import (
    YamlFileError,
    kind_problem,
    read_documents,
    resource_name,
    yaml_files,
)
from auditwatch.config.model import AlertSpec, ConfigError

_PLACEHOLDER_SECRET = "https://secret.placeholder.invalid/"
"""What every secret reference resolves to here: a value every secret-fed field accepts."""


def _any_secret(namespace: str | None, name: str, key: str) -> str:
    return _PLACEHOLDER_SECRET


@dataclass
class Tally:
    """How much was checked: the one-line summary of a run without problems."""

    files: int = 0
    resources: int = 0

    def summary(self) -> str:
        return f"{self.files} file(s), {self.resources} resource(s): ok"


def lint(paths: list[Path], tally: Tally | None = None) -> list[str]:
    """`file: Kind/name: problem` lines for every problem in `paths` (directories recurse);
    `tally`, if given, counts the files and resources read."""
    tally = tally or Tally()
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            for file in yaml_files(path):
                problems.extend(lint_file(file, tally))
        elif path.exists():
            problems.extend(lint_file(path, tally))
        else:
            problems.append(f"{path}: no such file or directory")
    return problems


def lint_file(path: Path, tally: Tally | None = None) -> list[str]:
    """The problems of one YAML file: syntax, unknown kinds, schema, field combinations, rules."""
    tally = tally or Tally()
    tally.files += 1
    try:
        documents = read_documents(path)
    except YamlFileError as error:
        return [f"{path}: {error}"]
    problems = []
    for index, document in enumerate(documents):
        if document is None:
            continue
        tally.resources += 1
        if not isinstance(document, dict):
            problems.append(f"{path}: document {index + 1}: not a mapping")
            continue
        name = resource_name(document, index)
        problems.extend(f"{path}: {name}: {problem}" for problem in _document_problems(document))
    return problems


def _document_problems(document: dict[str, Any]) -> list[str]:
    problem = kind_problem(document)
    if problem is not None:
        return [problem]
    kind = document.get("kind")
    if kind not in schema.KINDS:
        return []
    problems = schema.validate(document)
    if problems:
        return problems
    build = build_stream if kind == "AuditStream" else build_alert
    try:
        build(document, _any_secret)
    except ConfigError as error:
        return [error.message]
    return []


def resources_for_tuning(paths: list[Path], name: str) -> AlertSpec:
    """The AuditAlert `name` (`namespace/name`, or a name found once) of the YAML in `paths`, as
    it would run on its AuditStream (also from `paths`): scope and trust lists resolved, secret
    references not (they do not change what an alert matches). ConfigError if either is
    missing or unusable; YAML that does not parse is an error too."""
    documents: list[dict[str, Any]] = []
    for path in paths:
        for file in yaml_files(path) if path.is_dir() else [path]:
            try:
                documents.extend(d for d in read_documents(file) if isinstance(d, dict))
            except YamlFileError as error:
                raise ConfigError("InvalidYAML", f"{file}: {error}") from None
    namespace, _, short = name.rpartition("/")
    alerts = [
        document
        for document in documents
        if document.get("kind") == "AuditAlert"
        and isinstance(metadata := document.get("metadata"), dict)
        and metadata.get("name") == short
        and (not namespace or (metadata.get("namespace") or DEFAULT_NAMESPACE) == namespace)
    ]
    if len(alerts) != 1:
        found = (
            "no AuditAlert" if not alerts else f"{len(alerts)} AuditAlerts (give NAMESPACE/NAME)"
        )
        raise ConfigError("AlertNotFound", f"{found} named {name!r} in the files given")
    alert = build_alert(alerts[0], _any_secret)
    streams = {
        stream.name: stream
        for document in documents
        if document.get("kind") == "AuditStream"
        and (document.get("metadata") or {}).get("name") == alert.stream
        for stream in [build_stream(document, _any_secret)]
    }
    labels = {
        str(document["metadata"]["name"]): dict(document["metadata"].get("labels") or {})
        for document in documents
        if document.get("kind") == "Namespace" and isinstance(document.get("metadata"), dict)
    }
    if not streams:
        raise ConfigError(
            "StreamNotFound",
            f"its AuditStream {alert.stream!r} is not in the files given (needed for what the "
            "alert may see and for its trust lists)",
        )
    return check_stream(alert, streams, labels)
