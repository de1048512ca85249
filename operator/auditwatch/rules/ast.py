"""The rule language's syntax tree: what every parser produces and every evaluator consumes.

Both rule forms (Parseable's `column` config and the `composite` text) parse into these nodes, so
the printer, the vectorised evaluator and the per-event evaluator see one language.
`And` / `Or` are n-ary and flattened on construction (use `conjunction` / `disjunction`): the two
operators are associative, and a flat list is what the evaluator narrows its row mask over.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Scalar = str | int | float | bool
"""A literal in a rule. `bool` is its own type: `true` never equals `1`."""


class Op(enum.Enum):
    """Comparison operators. The value is the canonical spelling in the text form."""

    EQ = "="
    NE = "!="
    CONTAINS = "=%"
    NOT_CONTAINS = "!%"
    REGEX = "~"
    NOT_REGEX = "!~"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    STARTS_WITH = "startswith"
    ENDS_WITH = "endswith"
    IN = "in"
    NOT_IN = "not in"


STRING_ONLY_OPS = frozenset(
    {Op.CONTAINS, Op.NOT_CONTAINS, Op.REGEX, Op.NOT_REGEX, Op.STARTS_WITH, Op.ENDS_WITH}
)
"""Operators that only make sense on text."""

ORDER_OPS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE})
"""Operators that only make sense on numbers."""

SET_OPS = frozenset({Op.IN, Op.NOT_IN})
"""Operators whose value is a tuple of scalars."""


ANY_KEY = "*"
"""A field segment that stands for every value of an object (`requestObject.data.*`), as a list
is walked element by element. (A key literally named `*` cannot be addressed.)"""


@dataclass(frozen=True)
class Field:
    """A reference to a value in an audit event.

    `segments` are the keys as written: `objectRef.resource` is ("objectRef", "resource");
    Parseable's flattened `objectRef_resource` is the single segment ("objectRef_resource",),
    which the evaluator resolves against the event schema. Keeping the spelling lets the printer
    give back what the user wrote. A segment `ANY_KEY` matches every key of an object.
    """

    segments: tuple[str, ...]

    @property
    def dotted(self) -> str:
        """A human-readable name (not necessarily parseable: see the printer for that)."""
        return ".".join(self.segments)


@dataclass(frozen=True)
class Compare:
    """`field op value`. True when any value the field resolves to satisfies it.

    A missing field or null makes every comparison false (Parseable's rule), including `!=`,
    `!%`, and `not in`. `ignore_case` applies to text comparisons only.
    """

    field: Field
    op: Op
    value: Scalar | tuple[Scalar, ...]
    ignore_case: bool = False


@dataclass(frozen=True)
class Exists:
    """`field exists`: the field is present and not null (for arrays: has a non-null element)."""

    field: Field


@dataclass(frozen=True)
class Not:
    """Logical negation: `!( ... )` or `not ...`; true for a comparison on a missing field."""

    operand: Expr


@dataclass(frozen=True)
class And:
    """All operands hold. Always has two or more operands, none of them an `And`."""

    operands: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    """At least one operand holds. Always has two or more operands, none of them an `Or`."""

    operands: tuple[Expr, ...]


Expr = Compare | Exists | Not | And | Or


def conjunction(operands: list[Expr] | tuple[Expr, ...]) -> Expr:
    """`a and b and ...`, flattened; a single operand is returned as it is."""
    flat: list[Expr] = []
    for operand in operands:
        flat.extend(operand.operands if isinstance(operand, And) else (operand,))
    if not flat:
        raise ValueError("a conjunction needs at least one operand")
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def disjunction(operands: list[Expr] | tuple[Expr, ...]) -> Expr:
    """`a or b or ...`, flattened; a single operand is returned as it is."""
    flat: list[Expr] = []
    for operand in operands:
        flat.extend(operand.operands if isinstance(operand, Or) else (operand,))
    if not flat:
        raise ValueError("a disjunction needs at least one operand")
    return flat[0] if len(flat) == 1 else Or(tuple(flat))


@dataclass(frozen=True)
class Rule:
    """A parsed AuditAlert rule: the condition, and how many matches it takes to fire.

    `repeats` is the column-rule key of Parseable's, counted auditwatch's way: N matching events
    within the alert's `resolveAfter`, not N in a row (docs/rules.md, section 3); composite rules
    fire on the first match.
    """

    condition: Expr
    repeats: int = 1
