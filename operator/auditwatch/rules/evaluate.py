"""Evaluate a rule over a whole batch of events at once, with pyarrow.compute on the typed columns.

Every answer equals `reference.matches` on each event; this module only makes it fast:
- comparisons on typed columns (verb, objectRef_*, user_username, responseStatus_code, the
  list columns, `annotations[...]`) are array kernels, compiled once per rule;
- fields without a column (`requestObject...`) are read from the raw events, but only on rows
  that can still change the answer: `and` evaluates its cheap operands first and hands the slow
  ones just the rows still true, `or` hands them just the rows not yet true. The values at a
  path are gathered once per batch for every leaf on it, segment by segment, so a row that has
  no `requestObject.spec` is dropped at that segment and never reaches a leaf below it: a leaf
  tests the values there are, not the rows it was asked about;
- row sets are Python integers (`Rows`: bit i for row i) between nodes: `&` on one costs about
  0.05 µs where a pyarrow call on a 400-row mask costs 2-5 µs, and a batch of rules makes
  hundreds of such steps;
- a costly text comparison (a regex, a substring: RE2 compiles its pattern on every call; any
  comparison ignoring case) on a column with few distinct values in the batch tests each
  distinct value once with the exact per-value test, and each leaf remembers its answers
  across batches: users, agents, request URIs and source addresses come back batch after
  batch (a list column's elements are tested the same way). So does a cheap comparison on a
  column many leaves read (`KERNELS_BEFORE_ENCODING`). A value's answers become the row set
  without a pyarrow call: the column's per-row value positions, one byte each, translated
  to "0" / "1" and read as a binary number (`_Distinct`);
- where a kernel cannot give the exact language meaning (a regex RE2 cannot run with Python's
  semantics, case-insensitive text outside ASCII), those rows alone go through the per-value test.
"""

from __future__ import annotations

import importlib
import itertools
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from auditwatch import paths
from auditwatch.normalise import EventBatch
from auditwatch.rules import extract, reference
from auditwatch.rules.ast import ANY_KEY, ORDER_OPS, And, Compare, Exists, Expr, Not, Op, Or
from auditwatch.rules.extract import PathReader
from auditwatch.schema import EVENT_JSON, TypedField

VECTORISED, PARTLY_PER_ROW, PER_ROW = 0, 1, 2
"""Costs of a node: how much of it runs per row in Python (the `and`/`or` narrowing order)."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RE2_MAX_REPEAT = 1000
ANNOTATIONS = "annotations"
_BIT_FLAGS = bytes.maketrans(b"01", b"\x00\x01")
_MENTIONS_ANNOTATIONS = f'"{ANNOTATIONS}"'.encode()
FEW_ROWS = 32
"""Up to this many rows, `row_numbers` takes them off one by one rather than scanning all bits."""
DISTINCT_SHARE = 4
"""A column is tested per distinct value when it has at most one per this many rows."""
KERNELS_BEFORE_ENCODING = 2
"""Cheap comparisons on a column that run their kernel in a batch before the column is encoded
for the rest to test its distinct values (`_Context.distinct`)."""
_BIT_CHARS = bytes.maketrans(b"\x00\x01", b"01")
_LOW_BYTE = 0 if sys.byteorder == "little" else 3
"""Where an int32's lowest byte is in memory."""
MAX_KNOWN_VALUES = 4096
"""Answers a leaf remembers per distinct value (across batches) before it starts over."""
_RE_PARSER: Any = importlib.import_module("re._parser")
"""Python's own regex parser (private, hence untyped): what a pattern means to `re`."""

Kernel = Callable[[pa.Array], tuple[pa.Array, pa.Array | None]]
"""Array of values -> (matched, undecided): undecided values need the per-value test."""


Rows = int
"""A set of rows of one batch, bit i for row i."""


def rows_of(mask: pa.BooleanArray) -> Rows:
    """The rows where `mask` is true (null: false), in 0.3 µs for 400 rows; a null is read off
    the validity bitmap, not with two kernels (4 µs)."""
    validity, data = mask.buffers()
    value = int.from_bytes(data, "little")
    if mask.null_count:
        value &= int.from_bytes(validity, "little")
    offset: int = mask.offset
    return value >> offset & ((1 << len(mask)) - 1)


def mask_of(rows: Rows, size: int) -> pa.BooleanArray:
    """`rows` as a mask of `size` rows, for the pyarrow kernels that take one."""
    data = pa.py_buffer(rows.to_bytes((size + 7) // 8, "little"))
    mask: pa.BooleanArray = pa.Array.from_buffers(pa.bool_(), size, [None, data])
    return mask


def row_numbers(rows: Rows) -> list[int]:
    """The rows of `rows`, ascending: a few taken off one by one (0.1 µs each: a batch's
    matches, mostly), more found all in C (5 µs for 400 rows, a Python loop costs 35)."""
    if rows.bit_count() <= FEW_ROWS:
        numbers = []
        while rows:
            lowest = rows & -rows
            numbers.append(lowest.bit_length() - 1)
            rows ^= lowest
        return numbers
    flags = bin(rows)[:1:-1].encode().translate(_BIT_FLAGS)  # bit 0 first, as bytes 0 / 1
    return list(itertools.compress(itertools.count(), flags))


def rows_from(numbers: Iterable[int], size: int) -> Rows:
    """The row set of `numbers` (rows of a `size`-row batch), at a cost per number."""
    bits = bytearray((size + 7) // 8)
    for row in numbers:
        bits[row >> 3] |= 1 << (row & 7)
    return int.from_bytes(bits, "little")


class _Context:
    """One batch being evaluated: its columns, fetched and combined once for all nodes."""

    def __init__(self, batch: EventBatch, reader: PathReader | None = None) -> None:
        self.batch = batch
        self.reader = reader
        """Reads just the rules' paths from the event texts (the plan's); None: parse events."""
        self.size = len(batch)
        self.all_rows: Rows = (1 << self.size) - 1
        self._columns: dict[str, pa.Array] = {}
        self._distinct: dict[str, _Distinct | None] = {}
        self._asked: dict[str, int] = {}
        self._parents: dict[str, list[int]] = {}
        self._found: dict[tuple[str, ...], tuple[Rows, dict[int, list[Any]]]] = {}
        self._annotations: dict[str, tuple[pa.Array, Rows]] = {}
        self._unmapped: Rows | None = None
        self._texts: tuple[memoryview, memoryview] | None = None
        self.memo: dict[int, Any] = {}
        """Results of shared nodes (`plan.py`), by node: computed once per batch."""

    def column(self, name: str) -> pa.Array:
        if name not in self._columns:
            chunked = self.batch.table.column(name)
            self._columns[name] = (
                chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
            )
        return self._columns[name]

    def distinct(self, name: str, eager: bool = True) -> _Distinct | None:
        """Column `name`'s distinct values in the batch, once for every leaf on it; None when
        there is more than one per DISTINCT_SHARE values (testing each would not pay off).

        Encoding a column costs about as much as one cheap kernel (7-12 µs on 400 rows, a
        kernel 5-10), so for cheap comparisons (not `eager`) it waits until the column has
        had KERNELS_BEFORE_ENCODING of them in the batch: a column one or two leaves read
        keeps its kernels, one that many read (the library's eight on `user.username`) tests
        each distinct value once per leaf after that (2 µs each, no pyarrow call).
        """
        if name not in self._distinct:
            if not eager and self._asked.get(name, 0) < KERNELS_BEFORE_ENCODING:
                self._asked[name] = self._asked.get(name, 0) + 1
                return None
            cells = self.column(name)
            values = _elements(cells, cells.values) if pa.types.is_list(cells.type) else cells
            encoded = pc.dictionary_encode(values)
            dictionary, positions = encoded.dictionary, encoded.indices
            found = None
            if len(dictionary) * DISTINCT_SHARE <= len(values):
                found = _Distinct(
                    dictionary.to_pylist(),
                    positions,
                    _codes(positions) if len(dictionary) <= 256 else None,
                    _valid_rows(values),
                )
            self._distinct[name] = found
        return self._distinct[name]

    def list_rows(self, name: str, elements: Rows) -> Rows:
        """The rows of list column `name` with one of `elements` (bit i: element i of
        `_elements`), through each element's row, found once per batch and column."""
        parents = self._parents.get(name)
        if parents is None:
            lists = self.column(name)
            parents = self._parents[name] = pc.list_parent_indices(lists).to_pylist()
        found = rows_from(map(parents.__getitem__, row_numbers(elements)), self.size)
        return found & _valid_rows(self.column(name))  # Arrow lets a null list span elements

    def annotation(self, key: str) -> tuple[pa.Array, Rows]:
        """The text value of annotation `key` per row (null: none, or not text), and the rows
        whose value must be read from the raw event instead: those where the key holds
        something else than text, and `_unmapped_annotations` (none when the batch says its
        column holds every event's annotations). Once per batch and key, for every leaf on it."""
        known = self._annotations.get(key)
        if known is None:
            annotations = self.column(ANNOTATIONS)
            scalar = pa.scalar(key, type=pa.string())
            # A map's keys are an object's, so unique: "last" finds the same value as "first"
            # in a quarter of the time (15 µs against 57 on 400 rows)
            values = pc.map_lookup(annotations, scalar, "last")
            unread = _valid_rows(annotations) & ~_valid_rows(values)
            if unread:  # rarely: most events have the key, or no annotations at all
                maps = pc.filter(annotations, mask_of(unread, self.size)).to_pylist()
                unread = rows_from(
                    (
                        row
                        for row, items in zip(row_numbers(unread), maps, strict=True)
                        if any(name == key for name, _ in items)
                    ),
                    self.size,
                )
            if not self.batch.annotations_complete:
                unread |= self._unmapped_annotations()
            known = self._annotations[key] = (values, unread)
        return known

    def _unmapped_annotations(self) -> Rows:
        """The rows whose `annotations` is not an object (no map) but whose text mentions
        `"annotations"`, once per batch: a row without that text has no annotation anywhere,
        which spares reading its event."""
        if self._unmapped is None:
            no_map = row_numbers(self.all_rows & ~_valid_rows(self.column(ANNOTATIONS)))
            found: Iterable[int] = ()
            if no_map:
                # `bytes.find` over each row's span, mapped in C: 65 µs for 240 rows of 1 KiB
                # where `re.search` row by row took 115 (the copy to bytes costs 10).
                offsets, data = self._event_texts()
                text = bytes(data)
                starts = [offsets[row] for row in no_map]
                ends = [offsets[row + 1] for row in no_map]
                at = map(text.find, itertools.repeat(_MENTIONS_ANNOTATIONS), starts, ends)
                found = itertools.compress(no_map, map((-1).__ne__, at))
            self._unmapped = rows_from(found, self.size)
        return self._unmapped

    def _event_texts(self) -> tuple[memoryview, memoryview]:
        """The `event` column's buffers (`_text_buffers`), once per batch."""
        if self._texts is None:
            self._texts = _text_buffers(self.column(EVENT_JSON))
        return self._texts

    def path_values(self, path: tuple[str, ...], rows: Rows) -> dict[int, list[Any]]:
        """Row -> the values at `path` in its event, for the rows of `rows` that have some.

        Gathered once per batch and row, one segment at a time from the values at the path's
        parent (shared by every path below it): rows drop out at the first segment they lack.
        """
        done, found = self._found.get(path) or (0, {})
        need = rows & ~done
        if need:
            parents = self.path_values(path[:-1], need) if len(path) > 1 else self._roots(need)
            key = path[-1]
            for row, nodes in parents.items():
                values = extract.children(nodes, key)
                if values:
                    found[row] = values
            self._found[path] = (done | need, found)
            done |= need
        if done == rows:
            return found
        return {row: values for row, values in found.items() if rows >> row & 1}

    def _roots(self, rows: Rows) -> dict[int, list[Any]]:
        """Row -> its event's root (`extract.root_nodes`): decoded by the reader, or parsed
        when the batch holds it parsed already or the reader cannot decode the text."""
        numbers = row_numbers(rows)
        if self.reader is None:
            parse = self.batch.events if len(numbers) == self.size else None
            return {
                row: extract.root_nodes(self.batch.event(row) if parse is None else parse[row])
                for row in numbers
            }
        offsets, data = self._event_texts()
        parsed, read, root_nodes = self.batch.parsed_event, self.reader.read, extract.root_nodes
        roots = {}
        for row in numbers:  # about 100 rows a batch for the library: locals, no attributes
            event = parsed(row)
            if event is None:
                try:
                    event = read(data[offsets[row] : offsets[row + 1]])
                except (msgspec.DecodeError, msgspec.ValidationError):
                    event = self.batch.event(row)
            roots[row] = root_nodes(event)
        return roots


@dataclass(frozen=True)
class _Distinct:
    """A column's distinct values in one batch, for the leaves that test each value once."""

    values: list[Any]
    positions: pa.Array
    """Per row (per element of a list column): the position of its value in `values`, null
    for null."""
    codes: bytes | None
    """The positions as one byte each, the last first (None beyond 256 values): translated to
    a leaf's answers as "0" / "1", they are its row (element) set in binary, read by `int`
    without a pyarrow call."""
    valid: Rows
    """The rows (elements) that are not null: a null one's code means nothing."""

    def passing(self, answers: list[bool]) -> Rows:
        """The rows (elements) whose value's answer is true (with `codes`)."""
        assert self.codes is not None
        table = bytes(answers).translate(_BIT_CHARS).ljust(256, b"0")
        return int(self.codes.translate(table), 2) & self.valid


def _valid_rows(array: pa.Array) -> Rows:
    """The rows of `array` that are not null, read off its validity bitmap."""
    if not array.null_count:
        return (1 << len(array)) - 1
    offset: int = array.offset
    return int.from_bytes(array.buffers()[0], "little") >> offset & ((1 << len(array)) - 1)


def _codes(indices: pa.Int32Array) -> bytes:
    """Dictionary indices below 256 as one byte each, the last first: their lowest bytes."""
    assert indices.type == pa.int32()  # what `dictionary_encode` gives
    start = indices.offset * 4
    data = memoryview(indices.buffers()[1])[start : start + 4 * len(indices)]
    return bytes(data)[_LOW_BYTE::4][::-1]


def _text_buffers(texts: pa.Array) -> tuple[memoryview, memoryview]:
    """A string array's offsets (from its first row) and bytes: row i's text is
    `data[offsets[i]:offsets[i + 1]]`, read without a pyarrow call per row."""
    width = 8 if pa.types.is_large_string(texts.type) else 4
    _, offsets, data = texts.buffers()
    end = (texts.offset + len(texts) + 1) * width
    numbers = memoryview(offsets)[:end].cast("q" if width == 8 else "i")
    return numbers[texts.offset :], memoryview(data)


@dataclass(frozen=True)
class _PathTest:
    """A per-value test on the values at a path of the raw event (a field without a column)."""

    path: tuple[str, ...]
    test: reference.ValueTest

    def __call__(self, ctx: _Context, rows: Rows) -> Rows:
        """The rows of `rows` with some value at the path that passes the test: the test runs
        once per value there is, rows without any cost nothing."""
        test = self.test
        found = ctx.path_values(self.path, rows)
        if not found:  # most leaves, most batches: the rows asked lack the path
            return 0
        return rows_from((row for row, values in found.items() if any(map(test, values))), ctx.size)


class _Node(Protocol):
    @property
    def cost(self) -> int:
        """VECTORISED, PARTLY_PER_ROW or PER_ROW."""

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        """The rows of `rows` that match (none outside it)."""


@dataclass(frozen=True)
class CompiledRule:
    """A rule expression compiled for batches: compile once, evaluate every batch."""

    expr: Expr
    _root: _Node

    def evaluate(self, batch: EventBatch) -> pa.BooleanArray:
        """Which rows of `batch` match (no nulls, one entry per row)."""
        if len(batch) == 0:
            return pa.array([], type=pa.bool_())
        ctx = _Context(batch)
        return mask_of(self._root.evaluate(ctx, ctx.all_rows), ctx.size)


def compile_rule(expr: Expr) -> CompiledRule:
    """Compile `expr`; a regex Python cannot compile is a ValueError naming it."""
    return CompiledRule(expr, _compile(expr))


def _compile(expr: Expr, child: Callable[[Expr], _Node] | None = None) -> _Node:
    """The node for `expr`; its operands are compiled by `child` (the plan's shared nodes)."""
    child = child or _compile
    if isinstance(expr, Not):
        return _Not(child(expr.operand))
    if isinstance(expr, And | Or):
        operands = sorted((child(operand) for operand in expr.operands), key=_cost)
        return _Junction(operands, conjunctive=isinstance(expr, And))
    if isinstance(expr, Compare | Exists):
        return _compile_leaf(expr)
    raise TypeError(f"not a rule expression: {expr!r}")


def _cost(node: _Node) -> int:
    return node.cost


def _compile_leaf(leaf: Compare | Exists) -> _Node:
    test = _value_test(leaf)
    typed = paths.typed_field(leaf.field.segments)
    if typed is not None:
        return _compile_typed(leaf, typed, test)
    path = paths.event_path(leaf.field.segments)
    event_test = _PathTest(path, test)
    if len(path) == 2 and path[0] == ANNOTATIONS and path[1] != ANY_KEY:
        kernel = _exists_kernel if isinstance(leaf, Exists) else _text_kernel(leaf)
        if kernel is not None:
            return _AnnotationLeaf(path[1], kernel, event_test)
    return _EventLeaf(event_test)


def _value_test(leaf: Compare | Exists) -> reference.ValueTest:
    """The reference per-value test; `exists` holds for any value the field resolves to."""
    if isinstance(leaf, Exists):
        return _always
    try:
        return reference.value_test(leaf)
    except re.error as err:
        raise ValueError(f"invalid regex {leaf.value!r} for {leaf.field.dotted}: {err}") from err


def _compile_typed(leaf: Compare | Exists, typed: TypedField, test: reference.ValueTest) -> _Node:
    is_list = pa.types.is_list(typed.type)
    is_text = pa.types.is_string(typed.type) or is_list
    kernel: Kernel | None = None
    if isinstance(leaf, Exists):
        kernel = _exists_kernel
    elif is_text:
        kernel = _text_kernel(leaf)
    elif pa.types.is_integer(typed.type):
        kernel = _int_kernel(leaf)
    costly = is_text and isinstance(leaf, Compare) and _is_costly(leaf)
    # A list's elements tested per value save nothing on a cheap kernel: they still need two
    # kernels to find their rows.
    by_value = isinstance(leaf, Compare) and (costly or not is_list)
    if kernel is not None:
        cost = PARTLY_PER_ROW if isinstance(leaf, Compare) and leaf.ignore_case else VECTORISED
        return _ColumnLeaf(typed.column, is_list, kernel, test, cost, by_value, costly)
    if is_text and isinstance(leaf, Compare) and _is_regex(leaf):
        return _ColumnLeaf(
            typed.column, is_list, _undecided_kernel, test, PER_ROW, by_value, costly
        )
    return _Constant(False)


def _is_costly(leaf: Compare) -> bool:
    """Whether a text comparison costs more as a kernel than testing a few distinct values
    (~10 µs on 400 rows): RE2 compiles a regex or substring pattern on every call (10-15 µs of
    a 25-40 µs call), case folding adds three kernels; `=`, `in`, `startswith` cost 3-8 µs."""
    return leaf.ignore_case or leaf.op in (Op.REGEX, Op.NOT_REGEX, Op.CONTAINS, Op.NOT_CONTAINS)


def _always(value: Any) -> bool:
    return True


def _is_regex(leaf: Compare) -> bool:
    """A text regex: when it has no kernel, RE2 cannot run it and Python must."""
    return leaf.op in (Op.REGEX, Op.NOT_REGEX) and isinstance(leaf.value, str)


def _undecided_kernel(values: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    return pa.repeat(pa.scalar(False), len(values)), pc.is_valid(values)


def _exists_kernel(values: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    return pc.is_valid(values), None


def _text_kernel(leaf: Compare) -> Kernel | None:
    """A kernel over text values, or None when no text value can match / RE2 cannot run it."""
    op, literal, ignore_case = leaf.op, leaf.value, leaf.ignore_case
    if op in (Op.IN, Op.NOT_IN):
        assert isinstance(literal, tuple)
        texts = [item for item in literal if isinstance(item, str)]
        if not texts:
            return None
        value_set = pa.array([text.casefold() for text in texts] if ignore_case else texts)
        members = pc.SetLookupOptions(value_set)  # built once: a third of the call's cost
        if op is Op.IN:
            return _folding(ignore_case, lambda v: pc.is_in(v, options=members))
        return _folding(
            ignore_case,
            lambda v: pc.and_(pc.invert(pc.is_in(v, options=members)), pc.is_valid(v)),
        )
    if not isinstance(literal, str) or op in ORDER_OPS:
        return None
    if op in (Op.REGEX, Op.NOT_REGEX):
        return _regex_kernel(literal, ignore_case, negate=op is Op.NOT_REGEX)
    text = literal.casefold() if ignore_case else literal
    # The scalar and options are built once: per call they cost as much as the kernel itself
    # (`pc.equal` on 400 rows: 3.5 µs with a scalar, 7.7 with a str). A substring is found by
    # RE2 as a literal: 30 µs against 43 for Arrow's substring kernel on 400 request URIs.
    scalar = pa.scalar(text, type=pa.string())
    substring = pc.MatchSubstringOptions(_re2_literal(text))
    prefix = pc.MatchSubstringOptions(text)
    kernels: dict[Op, Callable[[pa.Array], pa.Array]] = {
        Op.EQ: lambda v: pc.equal(v, scalar),
        Op.NE: lambda v: pc.not_equal(v, scalar),
        Op.CONTAINS: lambda v: pc.match_substring_regex(v, options=substring),
        Op.NOT_CONTAINS: lambda v: pc.invert(pc.match_substring_regex(v, options=substring)),
        Op.STARTS_WITH: lambda v: pc.starts_with(v, options=prefix),
        Op.ENDS_WITH: lambda v: pc.ends_with(v, options=prefix),
    }
    return _folding(ignore_case, kernels[op])


def _re2_literal(text: str) -> str:
    """An RE2 pattern matching `text` literally (every character as a code point escape)."""
    return "".join(f"\\x{{{ord(char):x}}}" for char in text)


def _folding(ignore_case: bool, kernel: Callable[[pa.Array], pa.Array]) -> Kernel:
    """Run `kernel` as is, or on lowercased ASCII text with other text left undecided.

    For ASCII text, lowercasing is exactly Python's casefold; elsewhere the two differ
    (`ß` folds to `ss`), so non-ASCII values get the per-value test.
    """
    if not ignore_case:
        return lambda values: (kernel(values), None)

    def folded(values: pa.Array) -> tuple[pa.Array, pa.Array | None]:
        ascii_text = pc.string_is_ascii(values)
        matched = pc.and_(kernel(pc.ascii_lower(values)), ascii_text)
        return matched, pc.invert(ascii_text)

    return folded


def _regex_kernel(pattern: str, ignore_case: bool, negate: bool) -> Kernel | None:
    re2 = _re2_pattern(pattern, ignore_case)
    if re2 is None:
        return None
    case_insensitive = re2.startswith("(?i)")

    def search(values: pa.Array) -> pa.Array:
        found = pc.match_substring_regex(values, re2)
        return pc.invert(found) if negate else found

    if not case_insensitive:
        return lambda values: (search(values), None)

    def ascii_only(values: pa.Array) -> tuple[pa.Array, pa.Array | None]:
        ascii_text = pc.string_is_ascii(values)
        return pc.and_(search(values), ascii_text), pc.invert(ascii_text)

    return ascii_only


class _NotRe2(Exception):
    """A regex construct whose RE2 meaning could differ from Python's."""


def _re2_pattern(pattern: str, ignore_case: bool) -> str | None:
    """An RE2 pattern that matches exactly what Python's `re.search(pattern)` matches, or None.

    Rather than trusting the two syntaxes to agree (`{,3}`, `[[:alpha:]]`, `$` and `\\d` all
    differ), the pattern is parsed with Python's own parser and written back with only
    constructs that mean the same in RE2. Case-insensitive patterns must be ASCII and only
    run on ASCII text, where the two engines' case folding agree.
    """
    flags = re.IGNORECASE if ignore_case else 0
    parsed = _RE_PARSER.parse(pattern, flags)
    extra_flags = int(parsed.state.flags) & ~(re.UNICODE | re.IGNORECASE)
    if extra_flags:
        return None
    insensitive = bool(int(parsed.state.flags) & re.IGNORECASE)
    try:
        body = _Re2Writer(ascii_only=insensitive).sequence(parsed.data, ends_pattern=True)
    except _NotRe2:
        return None
    re2 = ("(?i)" if insensitive else "") + body
    try:
        pc.match_substring_regex(pa.array([""]), re2)
    except pa.ArrowInvalid:
        return None
    return re2


@dataclass(frozen=True)
class _Re2Writer:
    ascii_only: bool

    def sequence(self, items: Any, ends_pattern: bool = False) -> str:
        """`items` in RE2; `ends_pattern`: nothing of the whole pattern follows them."""
        out = []
        for index, (opcode, arg) in enumerate(items):
            last = ends_pattern and index == len(items) - 1
            out.append(self.item(str(opcode), arg, last))
        return "".join(out)

    def item(self, name: str, arg: Any, ends_pattern: bool) -> str:
        if name == "LITERAL":
            return self.char(arg)
        if name == "NOT_LITERAL":
            return f"[^{self.char(arg)}]"
        if name == "ANY":
            return r"[^\n]"
        if name == "IN":
            return self.char_class(arg)
        if name == "BRANCH":
            branches = (self.sequence(branch, ends_pattern) for branch in arg[1])
            return "(?:" + "|".join(branches) + ")"
        if name == "SUBPATTERN":
            _group, add_flags, del_flags, sub = arg
            if add_flags or del_flags:
                raise _NotRe2
            return f"(?:{self.sequence(sub, ends_pattern)})"
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            return self.repeat(arg, lazy=name == "MIN_REPEAT")
        if name == "AT":
            return self.anchor(str(arg), ends_pattern)
        raise _NotRe2

    def char(self, code: int) -> str:
        if self.ascii_only and code > 127:
            raise _NotRe2
        return _re2_literal(chr(code))

    def char_class(self, items: Any) -> str:
        out = []
        for opcode, arg in items:
            name = str(opcode)
            if name == "NEGATE":
                out.append("^")
            elif name == "LITERAL":
                out.append(self.char(arg))
            elif name == "RANGE":
                out.append(f"{self.char(arg[0])}-{self.char(arg[1])}")
            else:
                raise _NotRe2
        return "[" + "".join(out) + "]"

    def repeat(self, arg: Any, lazy: bool) -> str:
        low, high, sub = arg
        unbounded = str(high) == "MAXREPEAT"
        if low > RE2_MAX_REPEAT or (not unbounded and high > RE2_MAX_REPEAT):
            raise _NotRe2
        bounds = f"{{{low},}}" if unbounded else f"{{{low},{high}}}"
        return f"(?:{self.sequence(sub)}){bounds}" + ("?" if lazy else "")

    def anchor(self, name: str, ends_pattern: bool) -> str:
        if name in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
            return r"\A"
        if name == "AT_END_STRING":
            return r"\z"
        if name == "AT_END" and ends_pattern:
            # Python's `$` also matches before a final newline; with nothing of the pattern
            # after it (the last item, or the last of a group or branch that is: `(/|$)`),
            # consuming that newline changes nothing.
            return r"\n?\z"
        raise _NotRe2


def _int_kernel(leaf: Compare) -> Kernel | None:
    """A kernel over int64 values with Python's exact int/float comparison, or None."""
    literal = leaf.value
    if leaf.op in (Op.IN, Op.NOT_IN):
        assert isinstance(literal, tuple)
        numbers = [
            item for item in literal if isinstance(item, int | float) and not isinstance(item, bool)
        ]
        if not numbers:
            return None
        exact = [n for n in map(_as_int64, numbers) if n is not None]
        value_set = pa.array(exact, type=pa.int64())
        if leaf.op is Op.IN:
            return lambda v: (pc.is_in(v, value_set=value_set), None)
        return lambda v: (
            pc.and_(pc.invert(pc.is_in(v, value_set=value_set)), pc.is_valid(v)),
            None,
        )
    if reference.value_kind(literal) is not float or leaf.op not in _INT_KERNELS:
        return None
    assert isinstance(literal, int | float)
    bound = _int_bound(leaf.op, literal)
    if isinstance(bound, bool):
        constant = bound
        return lambda v: (pc.and_(pc.is_valid(v), pa.scalar(constant)), None)
    op, threshold = bound
    compare = _INT_KERNELS[op]
    scalar = pa.scalar(threshold, type=pa.int64())
    return lambda v: (compare(v, scalar), None)


_INT_KERNELS: dict[Op, Callable[[pa.Array, pa.Scalar], pa.Array]] = {
    Op.EQ: pc.equal,
    Op.NE: pc.not_equal,
    Op.LT: pc.less,
    Op.LE: pc.less_equal,
    Op.GT: pc.greater,
    Op.GE: pc.greater_equal,
}


def _as_int64(number: int | float) -> int | None:
    """`number` as an int64 when it is exactly one."""
    if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
        return None
    value = int(number)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _int_bound(op: Op, literal: int | float) -> tuple[Op, int] | bool:
    """`int64 op literal` as a comparison with an int64, or a constant for every int64."""
    exact = _as_int64(literal)
    if exact is not None:
        return op, exact
    if math.isnan(literal):
        return op is Op.NE
    if isinstance(literal, int) or math.isinf(literal):
        above_all = literal > 0
        return {
            Op.EQ: False,
            Op.NE: True,
            Op.LT: above_all,
            Op.LE: above_all,
            Op.GT: not above_all,
            Op.GE: not above_all,
        }[op]
    # A fraction: no int equals it; order comparisons move to the neighbouring integer.
    if op in (Op.EQ, Op.NE):
        return op is Op.NE
    if op in (Op.LT, Op.LE):
        return _int_bound(Op.LE, math.floor(literal))
    return _int_bound(Op.GE, math.ceil(literal))


@dataclass(frozen=True)
class _Constant:
    value: bool
    cost: int = VECTORISED

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        return rows if self.value else 0


@dataclass(frozen=True)
class _ColumnLeaf:
    """A comparison on a typed column; list columns match when any element does.

    A comparison on a column with few distinct values in the batch (users, verbs, codes,
    request URIs of a busy client) tests each distinct value once with the exact per-value
    test, remembering the answers across batches, instead of running the kernel on every row:
    a costly one (`costly`: a regex, a substring, ignoring case; on the elements of a list
    column too, as `sourceIPs`) always, a cheap one on a text or integer column once the
    column's first cheap leaves ran their kernels in the batch (`_Context.distinct`).
    """

    column: str
    is_list: bool
    kernel: Kernel
    test: reference.ValueTest
    cost: int
    by_value: bool = False
    costly: bool = False
    known: dict[Any, bool] = field(default_factory=dict, compare=False, repr=False)
    """Distinct value -> the test's answer, with `by_value`."""

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        distinct = ctx.distinct(self.column, eager=self.costly) if self.by_value else None
        cells = ctx.column(self.column)
        if distinct is not None:
            answers = self._answers(distinct.values)
            if not any(answers):  # most tests pass no value of a batch: no pyarrow call
                return 0
            if distinct.codes is not None:
                passing = distinct.passing(answers)
            else:
                passing = rows_of(pc.take(pa.array(answers, pa.bool_()), distinct.positions))
            return (ctx.list_rows(self.column, passing) if self.is_list else passing) & rows
        if self.is_list:
            matched, undecided = self.kernel(_elements(cells, cells.values))
            found = ctx.list_rows(self.column, rows_of(matched)) & rows
            redo = 0 if undecided is None else ctx.list_rows(self.column, rows_of(undecided)) & rows
        else:
            matched, undecided = self.kernel(cells)
            found = rows_of(matched) & rows
            redo = 0 if undecided is None else rows_of(undecided) & rows
        if not redo:
            return found
        redone = [
            row
            for row, cell in zip(
                row_numbers(redo),
                pc.filter(cells, mask_of(redo, ctx.size)).to_pylist(),
                strict=True,
            )
            if any(self.test(value) for value in reference.cell_values(cell))
        ]
        return found & ~redo | rows_from(redone, ctx.size)

    def _answers(self, values: list[Any]) -> list[bool]:
        """Whether each value passes the test, each tested once while its answer is kept."""
        known = self.known
        if len(known) + len(values) > MAX_KNOWN_VALUES:
            known.clear()
        answers = []
        for value in values:
            answer = known.get(value)
            if answer is None:
                answer = known[value] = self.test(value)
            answers.append(answer)
        return answers


def _elements(lists: pa.Array, children: pa.Array) -> pa.Array:
    """The part of a list (or map) array's child array that its rows span."""
    start = lists.offsets[0].as_py()
    return children.slice(start, lists.offsets[-1].as_py() - start)


@dataclass(frozen=True)
class _AnnotationLeaf:
    """A text comparison on one annotation, through the `annotations` map column.

    The map holds every key of the event's annotations object, with null for a value that is
    not text (a list of strings, say): those rows, rows whose annotations are not an object,
    and undecided values are answered from the raw event.
    """

    key: str
    kernel: Kernel
    event_test: _PathTest
    cost: int = PARTLY_PER_ROW

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        values, unread = ctx.annotation(self.key)
        matched, undecided = self.kernel(values)
        redo = (unread if undecided is None else unread | rows_of(undecided)) & rows
        found = rows_of(matched) & rows & ~redo
        return found | self.event_test(ctx, redo) if redo else found


@dataclass(frozen=True)
class _EventLeaf:
    """A comparison on a field with no column: tested on the values at its path in the raw
    events of the given rows."""

    event_test: _PathTest
    cost: int = PER_ROW

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        return self.event_test(ctx, rows)


@dataclass(frozen=True)
class _Not:
    operand: _Node

    @property
    def cost(self) -> int:
        return self.operand.cost

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        return rows & ~self.operand.evaluate(ctx, rows)


@dataclass(frozen=True)
class _Junction:
    """`and` / `or`, cheapest operands first: a slow operand only sees the rows still undecided
    (true so far for `and`, not yet true for `or`)."""

    operands: list[_Node]
    conjunctive: bool

    @property
    def cost(self) -> int:
        return max(operand.cost for operand in self.operands)

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        if self.conjunctive:
            for operand in self.operands:
                rows = operand.evaluate(ctx, rows)
                if not rows:
                    break
            return rows
        found = 0
        for operand in self.operands:
            undecided = rows & ~found
            if not undecided:
                break
            found |= operand.evaluate(ctx, undecided)
        return found
