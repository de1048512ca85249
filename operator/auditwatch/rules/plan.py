"""All alerts of a stream evaluated together: one plan per stream, one pass per batch.

Evaluating every alert on its own costs about 1 µs per alert per event, whatever the alert: a
thousand alerts cannot keep up with one busy apiserver. The plan makes the cost grow with the
work a batch really needs, not with the number of alerts:

- **Shared nodes.** Every sub-expression is compiled once for the whole stream (hash-consed by
  its syntax tree), and its result is kept for the batch: `stage = "ResponseComplete"` or the
  seven `...securityContext.privileged = true` tests of a detection copied into every tenant
  are computed once per batch, not once per alert. A node that runs per row remembers which
  rows it has answered, so each row is tested at most once per batch, and only when some alert
  still needs it.
- **Paths walked once, leaves tested per value.** A field without a column
  (`requestObject.spec.containers[*]...`) is read from the raw event once per batch and row for
  every leaf on that path, and only for the rows that passed the cheap operands before it (the
  `and` / `or` narrowing of `evaluate.py`). The event text is not parsed whole: the plan
  compiles every path its alerts read into one `extract.PathReader`, which decodes just those
  keys (about 1 µs against 15-30 for the whole event). The values at a path are gathered for
  all the rows asked at once, one segment after the other from its parent path's, so a row
  without `requestObject.spec` drops out there and costs nothing to the dozens of leaves below
  it; a leaf then tests the values there are (`evaluate._Context.path_values`).
- **Guard index.** The equality guards implied by an alert's top-level conjunction on the
  columns of `GUARD_COLUMNS` (`verb = "create"`, `objectRef.resource in (...)`,
  `not objectRef.subresource exists`, `stage = ...`, `objectRef.namespace = ...`; one level of
  `or` whose every branch has guards gives one alternative per branch) index the alert. A batch
  is grouped by those columns' values once; each distinct value tuple finds, by dictionary
  lookups, the alerts whose guards accept it, and an alert is evaluated only on the rows of the
  groups it was found for. An alert no group finds costs nothing. Guard operands the index
  applies exactly are left out of what remains to evaluate. The alerts a value tuple finds
  are remembered across batches: the same tuples come back batch after batch. A column whose
  guards, over all alerts, accept only a few distinct value sets (the library's two on
  `stage`, its two on `objectRef.namespace` before tenants scope alerts there) is not worth
  grouping by: its guards are evaluated as shared operands instead (MAX_UNINDEXED_GUARDS).
- **Row sets as integers.** What remains of an alert is its other top-level operands, each a
  shared node. Nodes take and give row sets as Python integers (`evaluate.Rows`, bit i: row i),
  where `&` costs 0.05 µs against 2-5 µs for a pyarrow call on a 400-row mask; the operands
  with per-row work run in steps, each node once per step on the union of the rows its alerts
  still need.

The result equals evaluating every alert on every event (`evaluate.compile_rule`, and
`reference.matches` per event): `tests/test_rules_plan.py` checks it on generated rules and events.

Seams for what comes next, each a field of `PlanAlert` or `AlertResult`:
- `scope` (multi-tenancy, issue #10): an alert that only sees the events of one namespace. It
  is one more equality guard on `objectRef_namespace`, so it costs nothing per alert: an alert
  of namespace N is found only by the groups of namespace N. A wider grant is `scope=None`.
- `unless` (exceptions as data, issue #15): an expression of excepted events. The plan matches
  `condition and not unless`, its nodes shared with every other alert's, evaluated only on the
  rows the condition matched, and counts the excepted rows in `AlertResult.excepted`.
- `group_by` (grouped thresholds, issue #12): an alert counted per group over a window. Its
  `AlertResult.groups` holds the matching rows by group with their event times, read from the
  batch's columns (fetched once per batch for all alerts) by `rules/window.py`.
The engine builds the `PlanAlert`s from the AuditAlerts (`engine._stream_plan`): it sets
`scope` from what the alert's stream grants it (`AlertSpec.scope`) and `unless` from its
exceptions and the trust lists they name (`AlertSpec.unless`, `rules/exceptions.py`).
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import pyarrow as pa

from auditwatch import paths
from auditwatch.normalise import EventBatch
from auditwatch.rules.ast import And, Compare, Exists, Expr, Field, Not, Op, Or
from auditwatch.rules.evaluate import (
    VECTORISED,
    Rows,
    _AnnotationLeaf,
    _compile,
    _Context,
    _EventLeaf,
    _Node,
    row_numbers,
)
from auditwatch.rules.extract import PathReader
from auditwatch.rules.window import GroupedRows, group_rows

GUARD_COLUMNS = (
    "objectRef_namespace",
    "objectRef_resource",
    "objectRef_subresource",
    "verb",
    "stage",
)
"""Text columns whose equality guards index alerts: what detections and tenancy select on."""

NAMESPACE = Field(("objectRef", "namespace"))

MAX_UNINDEXED_GUARDS = 4
"""A guard column is left out of the index when all the alerts' guards on it accept at most this
many distinct value sets: those few guards, evaluated as shared operands (a kernel each, ~5 µs
a batch), cost less than grouping every batch by one more column (leaving out the library's
namespace and stage guards, two value sets each, cut the groups of a 400-event batch from 213
to 78: ~80 µs a batch)."""

MAX_KEYS_PER_ALERT = 256
"""Guard value combinations an alert may put in the index; beyond it, the columns with the most
values are left to the evaluation (a `verb not in` spelled as a long `in`, say)."""

MAX_REMEMBERED_KEYS = 65_536
"""Distinct guard values (namespace, resource, subresource, verb, stage) a plan remembers the
alerts of; beyond that it starts over (a cluster with that many is unusual)."""

Guard = dict[str, frozenset[str | None]]
"""Column -> the values an event may have there (None: no value); a missing column: any."""


@dataclass(frozen=True)
class PlanAlert:
    """One alert as the plan sees it: what it matches, in which namespace, with which exceptions."""

    key: str
    condition: Expr
    scope: str | None = None
    """Only events with `objectRef.namespace` equal to this are visible to the alert."""
    unless: Expr | None = None
    """Events the alert excepts: matched by `condition` but not reported, only counted."""
    group_by: tuple[str, ...] | None = None
    """A grouped threshold's columns (`rules/window.py`; () for one group): the result then
    carries its rows by group, read from the batch's columns once."""


@dataclass(frozen=True)
class AlertResult:
    """What one batch did to one alert."""

    alert: int
    """The alert's position in the list the plan was built from."""
    key: str
    matched: Rows = 0
    """The matching rows, as a row set (`evaluate.Rows`): what the engine asks of them (how
    many, the last one) needs no list of them."""
    excepted: int = 0
    """Rows `condition` matched that `unless` excepted."""
    error: Exception | None = None
    """Why this alert could not be evaluated (no rows then); other alerts are not affected."""
    groups: GroupedRows | None = None
    """With `PlanAlert.group_by`: the matching rows by group, with their event times."""

    @property
    def count(self) -> int:
        """How many rows matched."""
        return self.matched.bit_count()

    @property
    def last_row(self) -> int | None:
        """The last matching row, None for none."""
        return self.matched.bit_length() - 1 if self.matched else None

    def rows(self) -> list[int]:
        """The matching rows, ascending."""
        return row_numbers(self.matched)


@dataclass
class _Shared:
    """A node every alert with this sub-expression uses; its result is kept for the batch.

    A vectorised node is computed on the whole batch once. A node with per-row work keeps the
    rows it has answered and, asked about more, computes only those.
    """

    slot: int
    node: _Node
    cost: int = field(init=False)
    """The node's cost, kept: junctions sort and narrow by it on every batch."""

    def __post_init__(self) -> None:
        self.cost = self.node.cost

    def evaluate(self, ctx: _Context, rows: Rows) -> Rows:
        if self.cost == VECTORISED:
            found: Rows | None = ctx.memo.get(self.slot)
            if found is None:
                found = ctx.memo[self.slot] = self.node.evaluate(ctx, ctx.all_rows)
            return found & rows
        done, found = ctx.memo.get(self.slot, (0, 0))
        need = rows & ~done
        if need:
            found |= self.node.evaluate(ctx, need)
            ctx.memo[self.slot] = (done | need, found)
        return found & rows


@dataclass
class _Compiler:
    """Hash-conses compiled nodes across all alerts of a stream."""

    nodes: dict[Expr, _Shared] = field(default_factory=dict)

    def __call__(self, expr: Expr) -> _Shared:
        node = self.nodes.get(expr)
        if node is None:
            compiled = _compile(expr, self)  # operands first: they take the slots before it
            node = self.nodes[expr] = _Shared(len(self.nodes), compiled)
        return node


@dataclass(frozen=True)
class _Entry:
    """An alert compiled into the plan."""

    key: str
    guards: tuple[Guard, ...]
    """Alternatives: rows whose guard columns one of them accepts are the rows evaluated."""
    cheap: tuple[_Shared, ...]
    """What the guards leave to evaluate, vectorised operands: computed once per batch."""
    slow: tuple[_Shared, ...]
    """The operands with per-row work, cheapest first: run on the rows still open."""
    unless: _Shared | None
    group_by: tuple[str, ...] | None


class StreamPlan:
    """The compiled alerts of one stream; build once per alert set, evaluate every batch."""

    def __init__(self, alerts: Sequence[PlanAlert]) -> None:
        """Compile `alerts`; a regex Python cannot compile is a ValueError naming it."""
        compiler = _Compiler()
        indexed = _indexed_columns(alerts)
        self._entries = [_entry(alert, compiler, indexed) for alert in alerts]
        self._reader = PathReader(
            shared.node.event_test.path
            for shared in compiler.nodes.values()
            if isinstance(shared.node, _EventLeaf | _AnnotationLeaf)
        )
        self._unguarded: list[int] = []
        used = {column for entry in self._entries for guard in entry.guards for column in guard}
        self._columns = [column for column in GUARD_COLUMNS if column in used]
        """The guard columns some alert's guards read: a batch is grouped by these alone."""
        shapes: dict[tuple[int, ...], dict[Any, list[int]]] = {}
        for number, entry in enumerate(self._entries):
            for guard in entry.guards:
                if not guard:
                    self._unguarded.append(number)
                    continue
                columns = sorted(guard, key=self._columns.index)
                positions = tuple(self._columns.index(column) for column in columns)
                index = shapes.setdefault(positions, {})
                for combination in itertools.product(*(guard[column] for column in columns)):
                    key = combination if len(combination) > 1 else combination[0]
                    found = index.setdefault(key, [])
                    if not found or found[-1] != number:
                        found.append(number)
        self._index = [(itemgetter(*positions), index) for positions, index in shapes.items()]
        self._alerts_by_key: dict[tuple[str | None, ...], tuple[int, ...]] = {}
        """Guard columns' values -> the alerts the index finds for them. The same values come
        back batch after batch, so each is looked up in every shape of the index once."""

    def __len__(self) -> int:
        return len(self._entries)

    def evaluate(self, batch: EventBatch) -> list[AlertResult]:
        """The alerts `batch` did something to (matches, exceptions, an error), in plan order.

        Alerts it did nothing to are left out: with thousands of alerts, most of them.
        """
        ctx = _Context(batch, self._reader)
        live = self._candidates(ctx) if len(batch) else {}
        errors: dict[int, Exception] = {}
        steps: dict[int, list[_Shared]] = {}
        for number, rows in live.items():
            entry = self._entries[number]
            try:
                for node in entry.cheap:
                    rows = node.evaluate(ctx, rows)
                    if not rows:
                        break
            except Exception as error:  # one alert's failure must not fail the others
                errors[number], rows = error, 0
            live[number] = rows
            if rows and entry.slow:
                steps[number] = list(entry.slow)
        self._run_steps(ctx, live, steps, errors)
        excepted: dict[int, int] = {}
        unless = {
            number: [exception]
            for number, rows in live.items()
            if rows and (exception := self._entries[number].unless) is not None
        }
        if unless:  # exceptions: run only on the rows the rule matched
            excepted = {number: live[number] for number in unless}
            self._run_steps(ctx, excepted, unless, errors)
            for number, exempt in excepted.items():
                live[number] &= ~exempt
        results = []
        for number in sorted({*live, *errors}):
            key = self._entries[number].key
            if number in errors:
                results.append(AlertResult(number, key, error=errors[number]))
                continue
            rows, exempt = live[number], excepted.get(number, 0)
            if rows or exempt:
                group_by = self._entries[number].group_by
                groups = (
                    group_rows(ctx.column, _indices(row_numbers(rows)), group_by)
                    if group_by is not None and rows
                    else None
                )
                results.append(AlertResult(number, key, rows, exempt.bit_count(), groups=groups))
        return results

    def _run_steps(
        self,
        ctx: _Context,
        live: dict[int, int],
        steps: dict[int, list[_Shared]],
        errors: dict[int, Exception],
    ) -> None:
        """Narrow `live` by each alert's per-row operands, in order, one step at a time.

        At each step a node runs once, on the union of the rows its alerts still need.
        """
        while steps:
            union: dict[int, int] = {}
            nodes: dict[int, _Shared] = {}
            for number, remaining in steps.items():
                node = remaining[0]
                nodes[node.slot] = node
                union[node.slot] = union.get(node.slot, 0) | live[number]
            answers: dict[int, int | Exception] = {}
            for slot, node in nodes.items():
                try:
                    answers[slot] = node.evaluate(ctx, union[slot])
                except Exception as error:  # fails the alerts that need it, not the others
                    answers[slot] = error
            for number, remaining in list(steps.items()):
                answer = answers[remaining.pop(0).slot]
                if isinstance(answer, Exception):
                    errors[number], live[number] = answer, 0
                else:
                    live[number] &= answer
                if not live[number] or not remaining:
                    del steps[number]

    def _candidates(self, ctx: _Context) -> dict[int, int]:
        """Alert -> the rows its guards accept, as a bitset; alerts with none are absent."""
        found = dict.fromkeys(self._unguarded, ctx.all_rows)
        if not self._index:
            return found
        # Grouping 400 rows in Python costs less than one Arrow group_by (its set-up alone).
        groups: dict[tuple[str | None, ...], int] = {}
        values = [ctx.column(name).to_pylist() for name in self._columns]
        for key, bit in zip(zip(*values, strict=True), _row_bits(ctx.size), strict=False):
            groups[key] = groups.get(key, 0) | bit
        hits: dict[int, int] = {}
        known = self._alerts_by_key
        for key, rows in groups.items():
            numbers = known.get(key)
            if numbers is None:
                numbers = self._look_up(key)
            for number in numbers:
                hits[number] = hits.get(number, 0) | rows
        for number, rows in hits.items():
            if number not in found:
                found[number] = rows
        return found

    def _look_up(self, key: tuple[str | None, ...]) -> tuple[int, ...]:
        """The alerts whose guards accept guard columns' values `key`, remembered."""
        if len(self._alerts_by_key) >= MAX_REMEMBERED_KEYS:
            self._alerts_by_key.clear()
        numbers = dict.fromkeys(
            number for getter, index in self._index for number in index.get(getter(key), ())
        )
        found = self._alerts_by_key[key] = tuple(numbers)
        return found


def _indices(numbers: list[int]) -> pa.Int64Array:
    """Row numbers as an Arrow array, from their machine integers: 1.6 µs against 3.5 for
    `pa.array` converting each Python int (a grouped alert's rows, for `group_rows`)."""
    data = pa.py_buffer(array("q", numbers))
    indices: pa.Int64Array = pa.Array.from_buffers(pa.int64(), len(numbers), [None, data])
    return indices


_ROW_BITS = [1 << row for row in range(1024)]
"""Each row alone as a row set, for batches up to 1,024 rows (~100 KiB): a shift per row costs a
tenth of grouping a batch."""


def _row_bits(size: int) -> list[Rows]:
    """The row sets of rows 0 .. `size` - 1 alone (a longer list: zip stops at the rows)."""
    return _ROW_BITS if size <= len(_ROW_BITS) else [1 << row for row in range(size)]


def _operands(alert: PlanAlert) -> list[Expr]:
    """What an alert's events must all satisfy: its scope and its condition's conjuncts."""
    scope = () if alert.scope is None else (Compare(NAMESPACE, Op.EQ, alert.scope),)
    condition = alert.condition
    return [*scope, *(condition.operands if isinstance(condition, And) else (condition,))]


def _indexed_columns(alerts: Sequence[PlanAlert]) -> frozenset[str]:
    """The guard columns whose guards, over all alerts, accept more than MAX_UNINDEXED_GUARDS
    distinct value sets: the ones worth grouping every batch by."""
    value_sets: dict[str, set[frozenset[str | None]]] = {}
    for alert in alerts:
        alternatives, _ = _guards(_operands(alert), frozenset(GUARD_COLUMNS))
        for guard in alternatives:
            for column, values in guard.items():
                value_sets.setdefault(column, set()).add(values)
    return frozenset(
        column for column, found in value_sets.items() if len(found) > MAX_UNINDEXED_GUARDS
    )


def _entry(alert: PlanAlert, compiler: _Compiler, indexed: frozenset[str]) -> _Entry:
    guards, rest = _guards(_operands(alert), indexed)
    nodes = sorted((compiler(operand) for operand in rest), key=lambda node: node.cost)
    return _Entry(
        alert.key,
        guards,
        tuple(node for node in nodes if node.cost == VECTORISED),
        tuple(node for node in nodes if node.cost != VECTORISED),
        None if alert.unless is None else compiler(alert.unless),
        alert.group_by,
    )


def _guards(operands: list[Expr], indexed: frozenset[str]) -> tuple[tuple[Guard, ...], list[Expr]]:
    """The guard alternatives of `and`-ed operands on the `indexed` columns, and the operands
    left to evaluate.

    An operand that is a guard is dropped from the rest when the index applies it exactly (a
    guard on a column not indexed is not: it stays an operand);
    an `or` whose every branch has guards splits the alert into one alternative per branch (the
    `or` itself stays in the rest when the branches have other operands, which still count; made
    of guards alone, as the workload detections' `(resource = "pods" and verb = "create" and
    not subresource exists) or (...)` are, it is dropped too).
    """
    base: Guard = {}
    by_column: dict[str, list[Expr]] = {}
    rest: list[Expr] = []
    for operand in operands:
        guard = _guard(operand)
        if guard is None:
            rest.append(operand)
            continue
        column, values = guard
        base[column] = base[column] & values if column in base else values
        by_column.setdefault(column, []).append(operand)
    alternatives = [base]
    split: Expr | None = None
    for operand in rest:
        branches = _branch_guards(operand)
        if branches is not None:
            alternatives = [_intersect(base, branch) for branch in branches]
            split = operand
            break
    alternatives = [guard for guard in alternatives if all(guard.values())]
    inexact = {column for kept in alternatives for column in kept if column not in indexed}
    for kept in alternatives:
        for column in inexact:
            kept.pop(column, None)
    inexact |= _limit(alternatives)
    for column in inexact:
        rest.extend(by_column.get(column, ()))
    if split is not None and not inexact and _only_guards(split):
        rest.remove(split)
    return tuple(alternatives), rest


def _guard(operand: Expr) -> tuple[str, frozenset[str | None]] | None:
    """(column, accepted values) when `operand` is an equality guard on a guard column."""
    if isinstance(operand, Not) and isinstance(operand.operand, Exists):
        column = _guard_column(operand.operand.field)
        return None if column is None else (column, frozenset({None}))
    if not isinstance(operand, Compare) or operand.ignore_case:
        return None
    column = _guard_column(operand.field)
    if column is None:
        return None
    if operand.op is Op.EQ and isinstance(operand.value, str):
        return column, frozenset({operand.value})
    if operand.op is Op.IN and isinstance(operand.value, tuple):
        return column, frozenset(value for value in operand.value if isinstance(value, str))
    return None


def _guard_column(target: Field) -> str | None:
    typed = paths.typed_field(target.segments)
    return typed.column if typed is not None and typed.column in GUARD_COLUMNS else None


def _branch_guards(operand: Expr) -> list[Guard] | None:
    """The guards of each branch of an `or`, or None unless every branch has some."""
    if not isinstance(operand, Or):
        return None
    branches = []
    for branch in operand.operands:
        guard: Guard = {}
        for conjunct in branch.operands if isinstance(branch, And) else (branch,):
            found = _guard(conjunct)
            if found is not None:
                column, values = found
                guard[column] = guard[column] & values if column in guard else values
        if not guard:
            return None
        branches.append(guard)
    return branches


def _only_guards(operand: Expr) -> bool:
    """Whether every conjunct of every branch of the `or` `operand` is a guard."""
    assert isinstance(operand, Or)
    return all(
        _guard(conjunct) is not None
        for branch in operand.operands
        for conjunct in (branch.operands if isinstance(branch, And) else (branch,))
    )


def _intersect(base: Guard, other: Guard) -> Guard:
    merged = dict(base)
    for column, values in other.items():
        merged[column] = merged[column] & values if column in merged else values
    return merged


def _limit(alternatives: list[Guard]) -> set[str]:
    """Drop the widest columns until the index keys fit MAX_KEYS_PER_ALERT; the dropped ones."""
    dropped: set[str] = set()
    while sum(math.prod(map(len, guard.values())) for guard in alternatives) > MAX_KEYS_PER_ALERT:
        widest = max(
            (column for guard in alternatives for column in guard),
            key=lambda column: max(len(guard.get(column, ())) for guard in alternatives),
        )
        dropped.add(widest)
        for guard in alternatives:
            guard.pop(widest, None)
    return dropped
