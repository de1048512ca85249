"""Read from an event's JSON text only the paths the rules look at, not the whole event.

A rule on a field without a column (`requestObject.spec.containers.securityContext.privileged`)
needs the raw event. Parsing a whole 1 KiB event exactly (`exactjson`) costs 15-30 µs; the plan
of a stream knows every path its alerts read, so it compiles them once into a msgspec type that
decodes only those keys and skips the rest of the text (about 1 µs per event). The values at the
end of a path, and below an `*` segment, are kept as their raw JSON text and read by `exactjson`,
so every value is exactly what walking the parsed event gives (`paths.walk`). A text the type
cannot decode (a number beyond a double's range where the type expects one, say) is parsed
whole, as before.
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
        self._fields: dict[type, dict[str, str]] = {}
        """Per generated struct type: JSON key -> attribute."""
        self._decoder = msgspec.json.Decoder(self._type(trie, ()))

    def read(self, text: str) -> Any:
        """The decoded parts of `text`; msgspec.DecodeError / ValidationError when it cannot."""
        return self._decoder.decode(text)

    def values(
        self, root: Any, path: tuple[str, ...], known: dict[tuple[str, ...], Any]
    ) -> list[Any]:
        """What `paths.walk(event, path)` yields, from `root`: the event as `read` gives it, or
        the parsed event. `known` keeps one row's nodes at the prefixes walked before: the
        paths of a detection share most of their way (`requestObject.spec...`), walked once."""
        return [node for node in self._nodes(root, path, known) if node is not None]

    def _nodes(
        self, root: Any, path: tuple[str, ...], known: dict[tuple[str, ...], Any]
    ) -> list[Any]:
        """The values at `path`, lists expanded and raw texts read (so neither is among them)."""
        nodes: list[Any] | None = known.get(path)
        if nodes is None:
            nodes = []
            if not path:
                _expand(root, nodes)
            else:
                key = path[-1]
                for parent in self._nodes(root, path[:-1], known):
                    for child in self._children(parent, key):
                        _expand(child, nodes)
            known[path] = nodes
        return nodes

    def _children(self, value: Any, key: str) -> Iterable[Any]:
        if isinstance(value, dict):
            if key == ANY_KEY:
                return value.values()
            return (value[key],) if key in value else ()
        if isinstance(value, msgspec.Struct):
            attribute = self._fields[type(value)].get(key)
            child = msgspec.UNSET if attribute is None else getattr(value, attribute)
            return () if child is msgspec.UNSET else (child,)
        return ()

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
        )
        self._fields[struct] = dict(zip(keys, attributes, strict=True))
        # Paths are walked through list elements at any depth: a list nested in a list is
        # read whole (rare), other values are decoded only to be passed over.
        element = struct | list[msgspec.Raw] | None | bool | int | float | str
        return struct | list[element] | None | bool | int | float | str  # type: ignore[valid-type]


def _expand(value: Any, into: list[Any]) -> None:
    """`value` into `into`: a raw text as its JSON value, a list element by element."""
    if isinstance(value, msgspec.Raw):
        value = exactjson.loads(bytes(value))
    if isinstance(value, list):
        for element in value:
            _expand(element, into)
    else:
        into.append(value)
