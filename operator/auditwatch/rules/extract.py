"""Read from an event's JSON text only the paths the rules look at, not the whole event.

A rule on a field without a column (`requestObject.spec.containers.securityContext.privileged`)
needs the raw event. Parsing a whole 1 KiB event exactly (`exactjson`) costs 15-30 µs; the plan
of a stream knows every path its alerts read, so it compiles them once into a msgspec type that
decodes only those keys and skips the rest of the text (about 1 µs per event). The values at the
end of a path, and below an `*` segment, are kept as their raw JSON text and read by `exactjson`,
so every value is exactly what walking the parsed event gives (`paths.walk`). A text the type
cannot decode (a number beyond a double's range where the type expects one, say) is parsed
whole, as before. `children` walks one segment of a path on decoded and parsed events alike, so
the evaluator gathers a path's values for many rows a segment at a time (`evaluate.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from auditwatch import exactjson
from auditwatch.rules.ast import ANY_KEY


@dataclass
class _Trie:
    """The paths below one key: the keys they go on with, and whether one ends here."""

    children: dict[str, _Trie] = field(default_factory=dict)
    ends: bool = False


class PathReader:
    """Decodes event texts into the parts the given paths walk through."""

    def __init__(self, event_paths: Iterable[tuple[str, ...]]) -> None:
        self.paths = frozenset(event_paths)
        trie = _Trie()
        for path in self.paths:
            node = trie
            for key in path:
                node = node.children.setdefault(key, _Trie())
            node.ends = True
        self._decoder = msgspec.json.Decoder(self._type(trie, ()))

    def read(self, text: bytes | memoryview) -> Any:
        """The decoded parts of `text`; msgspec.DecodeError / ValidationError when it cannot."""
        return self._decoder.decode(text)

    def _type(self, node: _Trie, at: tuple[str, ...]) -> Any:
        """The type decoding what the paths below `node` need of a value."""
        if node.ends or ANY_KEY in node.children:
            return msgspec.Raw  # the value itself, or all of its keys: read it whole
        keys = sorted(node.children)
        attributes = [f"k{index}" for index in range(len(keys))]
        fields = [
            (attribute, self._type(node.children[key], (*at, key)), msgspec.UNSET)
            for attribute, key in zip(attributes, keys, strict=True)
        ]
        struct = msgspec.defstruct(
            "At_" + "_".join(at) if at else "Event",
            fields,
            rename=dict(zip(attributes, keys, strict=True)),
            namespace={"attributes": dict(zip(keys, attributes, strict=True))},
        )
        # Paths are walked through list elements at any depth: a list nested in a list is
        # read whole (rare), other values are decoded only to be passed over.
        element = struct | list[msgspec.Raw] | None | bool | int | float | str
        return struct | list[element] | None | bool | int | float | str  # type: ignore[valid-type]


def root_nodes(event: Any) -> list[Any]:
    """What the paths start from: an event as `PathReader.read` gives it, or the parsed event."""
    nodes: list[Any] = []
    _expand(event, nodes)
    return nodes


def children(nodes: list[Any], key: str) -> list[Any]:
    """The values at `key` below each of `nodes` (from `root_nodes` or an earlier `children`):
    what `paths.walk` yields one segment further, lists expanded, raw texts read, no nulls."""
    found: list[Any] = []
    for node in nodes:
        if isinstance(node, dict):
            if key == ANY_KEY:
                for child in node.values():
                    _expand(child, found)
            elif key in node:
                _expand(node[key], found)
        elif isinstance(node, msgspec.Struct):
            # Decoded types read no `*` key: a value whose keys are all needed is a raw text.
            attribute = type(node).attributes.get(key)  # type: ignore[attr-defined]
            child = msgspec.UNSET if attribute is None else getattr(node, attribute)
            if child is not msgspec.UNSET:
                _expand(child, found)
    return found


def _expand(value: Any, into: list[Any]) -> None:
    """`value` into `into`: a raw text as its JSON value, a list element by element."""
    if isinstance(value, msgspec.Raw):
        value = exactjson.loads(bytes(value))
    if isinstance(value, list):
        for element in value:
            _expand(element, into)
    elif value is not None:
        into.append(value)
