"""`auditwatch lint`: check AuditStream / AuditAlert YAML before it reaches a cluster.

For GitOps pipelines: the same schema (from crds/) and the same builders as the operator, so
what passes here is what the operator accepts. Secrets are usually not in the repository, so
secret references are not resolved; that a stream named by an alert exists is not checked either
(it may live in another repository).
"""

from __future__ import annotations

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


def lint(paths: list[Path]) -> list[str]:
    """`file: Kind/name: problem` lines for every problem in `paths` (directories recurse)."""
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            for file in yaml_files(path):
                problems.extend(lint_file(file))
        elif path.exists():
            problems.extend(lint_file(path))
        else:
            problems.append(f"{path}: no such file or directory")
    return problems


def lint_file(path: Path) -> list[str]:
    """The problems of one YAML file: syntax, unknown kinds, schema, field combinations, rules."""
    try:
        documents = read_documents(path)
    except YamlFileError as error:
        return [f"{path}: {error}"]
    problems = []
    for index, document in enumerate(documents):
        if document is None:
            continue
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
