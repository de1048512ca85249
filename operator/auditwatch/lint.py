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
from auditwatch.config.build import build_alert, build_stream
from auditwatch.config.files import (
    YamlFileError,
    kind_problem,
    read_documents,
    resource_name,
    yaml_files,
)
from auditwatch.config.model import ConfigError

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
