"""Evaluate a rule over a whole batch of events at once, with pyarrow.compute on the typed columns.

Every answer equals `reference.matches` on each event; this module only makes it fast:
- comparisons on typed columns (verb, objectRef_*, user_username, responseStatus_code, the
  list columns, `annotations[...]`) are array kernels, compiled once per rule;
- fields without a column (`requestObject...`) are tested per event, but only on rows that can
  still change the answer: `and` evaluates its cheap operands first and hands the slow ones just
  the rows still true, `or` hands them just the rows not yet true;
- where a kernel cannot give the exact language meaning (a regex RE2 cannot run with Python's
  semantics, case-insensitive text outside ASCII), those rows alone go through the per-value test.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from auditwatch import paths
from auditwatch.normalise import EventBatch
from auditwatch.rules import reference
from auditwatch.rules.ast import ANY_KEY, ORDER_OPS, And, Compare, Exists, Expr, Not, Op, Or
from auditwatch.rules.extract import PathReader
from auditwatch.schema import EVENT_JSON, TypedField

VECTORISED, PARTLY_PER_ROW, PER_ROW = 0, 1, 2
"""Costs of a node: how much of it runs per row in Python (the `and`/`or` narrowing order)."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RE2_MAX_REPEAT = 1000
ANNOTATIONS = "annotations"
_RE_PARSER: Any = importlib.import_module("re._parser")
"""Python's own regex parser (private, hence untyped): what a pattern means to `re`."""

Kernel = Callable[[pa.Array], tuple[pa.Array, pa.Array | None]]
"""Array of values -> (matched, undecided): undecided values need the per-value test."""


class _Context:
    """One batch being evaluated: its columns, fetched and combined once for all nodes."""

    def __init__(self, batch: EventBatch, reader: PathReader | None = None) -> None:
        self.batch = batch
        self.reader = reader
        """Reads just the rules' paths from the event texts (the plan's); None: parse events."""
        self._roots: dict[int, Any] = {}
        self._known: dict[int, dict[tuple[str, ...], Any]] = {}
        self.size = len(batch)
        self._columns: dict[str, pa.Array] = {}
        self._false: pa.BooleanArray | None = None
        self._values: dict[tuple[str, ...], dict[int, list[Any]]] = {}
        self.memo: dict[int, Any] = {}
        """Results of shared nodes (`plan.py`), by node: computed once per batch."""

    def column(self, name: str) -> pa.Array:
        if name not in self._columns:
            chunked = self.batch.table.column(name)
            self._columns[name] = (
                chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
            )
        return self._columns[name]

    def mention(self, key: str, rows: pa.BooleanArray) -> pa.BooleanArray:
        """`rows`, narrowed to those whose event JSON has the text `"key"`.

        A row without it has no such key anywhere, which spares parsing its event.
        """
        if rows.true_count == 0:
            return rows
        texts = pc.filter(self.column(EVENT_JSON), rows)
        # RE2 finds a plain literal faster than Arrow's substring kernel.
        mentioned = pc.match_substring_regex(texts, re.escape(f'"{key}"'))
        return pc.replace_with_mask(rows, rows, mentioned)

    def path_values(self, path: tuple[str, ...], row: int) -> list[Any]:
        """Every value at `path` in row `row`'s event, walked once per batch for all leaves."""
        by_row = self._values.get(path)
        if by_row is None:
            by_row = self._values[path] = {}
        values = by_row.get(row)
        if values is None:
            if self.reader is None:
                values = list(paths.walk(self.batch.event(row), path))
            else:
                values = self.reader.values(self._root(row), path, self._known.setdefault(row, {}))
            by_row[row] = values
        return values

    def _root(self, row: int) -> Any:
        """Row `row`'s event as the reader decodes it, or parsed when the batch holds it parsed
        already or the reader cannot decode the text."""
        root = self._roots.get(row)
        if root is None:
            assert self.reader is not None
            root = self.batch.parsed_event(row)
            if root is None:
                try:
                    root = self.reader.read(self.column(EVENT_JSON)[row].as_py())
                except (msgspec.DecodeError, msgspec.ValidationError):
                    root = self.batch.event(row)
            self._roots[row] = root
        return root

    def all_false(self) -> pa.BooleanArray:
        if self._false is None:
            self._false = pa.repeat(pa.scalar(False), self.size)
        return self._false


@dataclass(frozen=True)
class _PathTest:
    """A per-value test on the values at a path of the raw event (a field without a column)."""

    path: tuple[str, ...]
    test: reference.ValueTest

    def __call__(self, ctx: _Context, row: int) -> bool:
        return any(self.test(value) for value in ctx.path_values(self.path, row))


class _Node(Protocol):
    @property
    def cost(self) -> int:
        """VECTORISED, PARTLY_PER_ROW or PER_ROW."""

    def evaluate(self, ctx: _Context, rows: pa.BooleanArray | None) -> pa.BooleanArray:
        """Row results without nulls; only rows where `rows` is true (all when None) count."""


@dataclass(frozen=True)
class CompiledRule:
    """A rule expression compiled for batches: compile once, evaluate every batch."""

    expr: Expr
    _root: _Node

    def evaluate(self, batch: EventBatch) -> pa.BooleanArray:
        """Which rows of `batch` match (no nulls, one entry per row)."""
        if len(batch) == 0:
            return pa.array([], type=pa.bool_())
        result: pa.BooleanArray = self._root.evaluate(_Context(batch), None)
        return result


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
    if kernel is not None:
        cost = PARTLY_PER_ROW if isinstance(leaf, Compare) and leaf.ignore_case else VECTORISED
        return _ColumnLeaf(typed.column, is_list, kernel, test, cost)
    if is_text and isinstance(leaf, Compare) and _is_regex(leaf):
        return _ColumnLeaf(typed.column, is_list, _undecided_kernel, test, PER_ROW)
    return _Constant(False)


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
        if op is Op.IN:
            return _folding(ignore_case, lambda v: pc.is_in(v, value_set=value_set))
        return _folding(
            ignore_case,
            lambda v: pc.and_(pc.invert(pc.is_in(v, value_set=value_set)), pc.is_valid(v)),
        )
    if not isinstance(literal, str) or op in ORDER_OPS:
        return None
    if op in (Op.REGEX, Op.NOT_REGEX):
        return _regex_kernel(literal, ignore_case, negate=op is Op.NOT_REGEX)
    text = literal.casefold() if ignore_case else literal
    kernels: dict[Op, Callable[[pa.Array], pa.Array]] = {
        Op.EQ: lambda v: pc.equal(v, text),
        Op.NE: lambda v: pc.not_equal(v, text),
        Op.CONTAINS: lambda v: pc.match_substring(v, text),
        Op.NOT_CONTAINS: lambda v: pc.invert(pc.match_substring(v, text)),
        Op.STARTS_WITH: lambda v: pc.starts_with(v, text),
        Op.ENDS_WITH: lambda v: pc.ends_with(v, text),
    }
    return _folding(ignore_case, kernels[op])


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
        body = _Re2Writer(ascii_only=insensitive).sequence(parsed.data, top=True)
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

    def sequence(self, items: Any, top: bool = False) -> str:
        out = []
        for index, (opcode, arg) in enumerate(items):
            last_at_top = top and index == len(items) - 1
            out.append(self.item(str(opcode), arg, last_at_top))
        return "".join(out)

    def item(self, name: str, arg: Any, last_at_top: bool) -> str:
        if name == "LITERAL":
            return self.char(arg)
        if name == "NOT_LITERAL":
            return f"[^{self.char(arg)}]"
        if name == "ANY":
            return r"[^\n]"
        if name == "IN":
            return self.char_class(arg)
        if name == "BRANCH":
            return "(?:" + "|".join(self.sequence(branch) for branch in arg[1]) + ")"
        if name == "SUBPATTERN":
            _group, add_flags, del_flags, sub = arg
            if add_flags or del_flags:
                raise _NotRe2
            return f"(?:{self.sequence(sub)})"
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            return self.repeat(arg, lazy=name == "MIN_REPEAT")
        if name == "AT":
            return self.anchor(str(arg), last_at_top)
        raise _NotRe2

    def char(self, code: int) -> str:
        if self.ascii_only and code > 127:
            raise _NotRe2
        return f"\\x{{{code:x}}}"

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

    def anchor(self, name: str, last_at_top: bool) -> str:
        if name in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
            return r"\A"
        if name == "AT_END_STRING":
            return r"\z"
        if name == "AT_END" and last_at_top:
            # Python's `$` also matches before a final newline; as the pattern's last item,
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

    def evaluate(self, ctx: _Context, rows: pa.BooleanArray | None) -> pa.BooleanArray:
        return pa.repeat(pa.scalar(self.value), ctx.size)


@dataclass(frozen=True)
class _ColumnLeaf:
    """A comparison on a typed column; list columns match when any element does."""

    column: str
    is_list: bool
    kernel: Kernel
    test: reference.ValueTest
    cost: int

    def evaluate(self, ctx: _Context, rows: pa.BooleanArray | None) -> pa.BooleanArray:
        cells = ctx.column(self.column)
        if self.is_list:
            matched, undecided = _any_element(cells, self.kernel)
        else:
            matched, undecided = self.kernel(cells)
        matched = _false_where_null(matched)
        if undecided is None:
            return matched
        redo = _and_rows(_false_where_null(undecided), rows)
        if redo.true_count == 0:
            return matched
        results = [
            any(self.test(value) for value in reference.cell_values(cell))
            for cell in pc.filter(cells, redo).to_pylist()
        ]
        return pc.replace_with_mask(matched, redo, pa.array(results, type=pa.bool_()))


def _any_element(lists: pa.Array, kernel: Kernel) -> tuple[pa.Array, pa.Array | None]:
    """Run `kernel` on every element and say, per list, whether any element matched."""
    matched, undecided = kernel(_elements(lists, lists.values))
    return (
        _any_per_list(lists, matched),
        None if undecided is None else _any_per_list(lists, undecided),
    )


def _elements(lists: pa.Array, children: pa.Array) -> pa.Array:
    """The part of a list (or map) array's child array that its rows span."""
    start = lists.offsets[0].as_py()
    return children.slice(start, lists.offsets[-1].as_py() - start)


def _any_per_list(lists: pa.Array, flags: pa.Array) -> pa.Array:
    """Per non-null list, whether any of its elements' flags is true (running counts differ)."""
    counts = pc.cumulative_sum(pc.cast(_false_where_null(flags), pa.int64()))
    running = pa.concat_arrays([pa.array([0], type=pa.int64()), counts])
    offsets = pc.subtract(lists.offsets, lists.offsets[0])
    size = len(lists)
    ends = pc.take(running, offsets.slice(1, size))
    starts = pc.take(running, offsets.slice(0, size))
    return pc.and_(pc.greater(pc.subtract(ends, starts), 0), pc.is_valid(lists))


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

    def evaluate(self, ctx: _Context, rows: pa.BooleanArray | None) -> pa.BooleanArray:
        annotations = ctx.column(ANNOTATIONS)
        key = pa.scalar(self.key, type=pa.string())
        values = pc.map_lookup(annotations, key, "first")
        matched, undecided = self.kernel(values)
        has_key = _any_per_list(
            annotations, pc.equal(_elements(annotations, annotations.keys), key)
        )
        redo = pc.and_(has_key, pc.is_null(values))
        if undecided is not None:
            redo = pc.or_(redo, _false_where_null(undecided))
        no_map = ctx.mention(ANNOTATIONS, _and_rows(pc.is_null(annotations), rows))
        redo = pc.or_(_and_rows(redo, rows), no_map)
        return _redo_events(ctx, _false_where_null(matched), redo, self.event_test)


@dataclass(frozen=True)
class _EventLeaf:
    """A comparison on a field with no column: tested on the raw events of the given rows."""

    event_test: _PathTest
    cost: int = PER_ROW

    def evaluate(self, ctx: _Context, rows: pa.BooleanArray | None) -> pa.BooleanArray:
        if rows is None and ctx.reader is None:
            events = ctx.batch.events  # every row parsed at once: faster than row by row
            return pa.array([self.event_test(ctx, row) for row in range(len(events))], pa.bool_())
        if rows is None:
            rows = pc.invert(ctx.all_false())
        return _redo_events(ctx, ctx.all_false(), rows, self.event_test)


def _redo_events(
    ctx: _Context,
    results: pa.BooleanArray,
    redo: pa.BooleanArray,
    event_test: _PathTest,
) -> pa.BooleanArray:
    """`results`, with the rows in `redo` replaced by the event test on their raw events."""
    if redo.true_count == 0:
        return results
    redone = [event_test(ctx, row) for row in pc.indices_nonzero(redo).to_pylist()]
    return pc.replace_with_mask(results, redo, pa.array(redone, type=pa.bool_()))


def _and_rows(mask: pa.BooleanArray, rows: pa.BooleanArray | None) -> pa.BooleanArray:
    return mask if rows is None else pc.and_(mask, rows)


def _false_where_null(mask: pa.BooleanArray) -> pa.BooleanArray:
    """Null as false. Most masks have no null, and `fill_null` is a slow kernel (coalesce:
    ~8 µs on a 400-row batch, a good part of a simple rule's cost)."""
    if mask.null_count == 0:
        return mask
    return pc.and_kleene(mask, pc.is_valid(mask))


@dataclass(frozen=True)
class _Not:
    operand: _Node

    @property
    def cost(self) -> int:
        return self.operand.cost

    def evaluate(self, ctx: _Context, rows: pa.BooleanArray | None) -> pa.BooleanArray:
        return pc.invert(self.operand.evaluate(ctx, rows))


@dataclass(frozen=True)
class _Junction:
    """`and` / `or`, cheapest operands first: a slow operand only sees the rows still undecided
    (true so far for `and`, not yet true for `or`)."""

    operands: list[_Node]
    conjunctive: bool

    @property
    def cost(self) -> int:
        return max(operand.cost for operand in self.operands)

    def evaluate(self, ctx: _Context, rows: pa.BooleanArray | None) -> pa.BooleanArray:
        combine = pc.and_ if self.conjunctive else pc.or_
        result: pa.BooleanArray | None = None
        for operand in self.operands:
            if operand.cost == VECTORISED or result is None:
                narrowed = rows
            else:
                undecided = result if self.conjunctive else pc.invert(result)
                narrowed = _and_rows(undecided, rows)
                if narrowed.true_count == 0:
                    break
            value = operand.evaluate(ctx, narrowed)
            result = value if result is None else combine(result, value)
        assert result is not None
        return result
