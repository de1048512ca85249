"""The two patch formats kopf sends: JSON merge-patch (RFC 7386) and JSON-patch (RFC 6902).

Failures raise PatchError with the HTTP status the apiserver answers: 422 for a failed `test` op
or an unappliable path (kopf's optimistic-concurrency check depends on exactly that), 400 for a
patch document of the wrong shape.
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(Exception):
    """A patch that cannot be applied; `code` is the HTTP status to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 merge-patch: dicts merge recursively, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(document: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON-patch to a copy of `document` and return the copy."""
    if not isinstance(operations, list):
        raise PatchError(400, "a JSON-patch must be a list of operations")
    result = copy.deepcopy(document)
    for index, operation in enumerate(operations):
        if not isinstance(operation, dict) or not isinstance(operation.get("path"), str):
            raise PatchError(400, f"JSON-patch operation #{index} has no 'path': {operation!r}")
        result = _apply_operation(result, operation)
    return result


def _apply_operation(document: Any, operation: dict[str, Any]) -> Any:
    op = operation.get("op")
    path = _split_pointer(operation["path"])
    if op == "test":
        actual = _get(document, path)
        if actual != operation.get("value"):
            raise PatchError(
                422,
                f"testing value {operation['path']} failed: "
                f"expected {operation.get('value')!r}, found {actual!r}",
            )
        return document
    if op == "add":
        return _add(document, path, copy.deepcopy(_required_value(operation)))
    if op == "remove":
        return _remove(document, path)[0]
    if op == "replace":
        _get(document, path)  # the target must exist for a replace
        return _add(_remove(document, path)[0], path, copy.deepcopy(_required_value(operation)))
    if op in ("move", "copy"):
        source = operation.get("from")
        if not isinstance(source, str):
            raise PatchError(400, f"JSON-patch {op!r} needs a 'from' pointer")
        source_path = _split_pointer(source)
        value = copy.deepcopy(_get(document, source_path))
        if op == "move":
            document = _remove(document, source_path)[0]
        return _add(document, path, value)
    raise PatchError(400, f"unknown JSON-patch operation {op!r}")


def _required_value(operation: dict[str, Any]) -> Any:
    if "value" not in operation:
        raise PatchError(400, f"JSON-patch {operation.get('op')!r} needs a 'value'")
    return operation["value"]


def _split_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(400, f"JSON pointer {pointer!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer[1:].split("/")]


def _list_index(container: list[Any], token: str, *, for_insert: bool) -> int:
    if for_insert and token == "-":
        return len(container)
    if not token.isdigit():
        raise PatchError(422, f"{token!r} is not a list index")
    index = int(token)
    limit = len(container) if for_insert else len(container) - 1
    if index > limit:
        raise PatchError(422, f"list index {index} is out of range")
    return index


def _get(document: Any, path: list[str]) -> Any:
    node = document
    for token in path:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(422, f"the path /{'/'.join(path)} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(node, token, for_insert=False)]
        else:
            raise PatchError(422, f"the path /{'/'.join(path)} does not exist")
    return node


def _add(document: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent = _get(document, path[:-1])
    token = path[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, token, for_insert=True), value)
    else:
        raise PatchError(422, f"cannot add into a scalar at /{'/'.join(path)}")
    return document


def _remove(document: Any, path: list[str]) -> tuple[Any, Any]:
    if not path:
        raise PatchError(422, "cannot remove the whole document")
    parent = _get(document, path[:-1])
    token = path[-1]
    if isinstance(parent, dict):
        if token not in parent:
            raise PatchError(422, f"the path /{'/'.join(path)} does not exist")
        return document, parent.pop(token)
    if isinstance(parent, list):
        return document, parent.pop(_list_index(parent, token, for_insert=False))
    raise PatchError(422, f"the path /{'/'.join(path)} does not exist")
