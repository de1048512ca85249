"""Rule text and rule configs to the syntax tree (`ast`), with positioned errors.

The composite grammar is Parseable's, unchanged, plus the extensions real detections need
(dotted and bracketed fields, `not`, `in`, `startswith`, `endswith`, `exists`, negative and
decimal numbers, booleans, `"..."i`); docs/rules.md is the user-facing description. Every
failure is a `RuleError` pointing at the offending column: pyparsing's own exceptions, and
recursion on absurdly nested input, never reach the caller.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyparsing as pp

from auditwatch.rules import ast
from auditwatch.rules.column import parse_column
from auditwatch.rules.errors import RuleError, regex_problem

IDENT = re.compile(r"[\w-]+")
"""Parseable's identifier: letters, digits, '-', '_' (Rust's `is_alphanumeric`: any script)."""

KEYWORDS = frozenset(
    {"and", "or", "not", "in", "startswith", "endswith", "exists", "true", "false"}
)
"""Words with a meaning of their own; as a field they are still accepted where unambiguous."""

MAX_NESTING = 32
"""Deepest parenthesis nesting accepted: far beyond real rules, well within Python's stack."""

_STRING = r'"(?:[^"\\]|\\.)*"'
_STRING_LITERAL = re.compile(_STRING, re.DOTALL)
_WHITESPACE = " \t\r\n"
_LEFT = r"(?:(?<=[ \t\r\n()])|^)"
_RIGHT = r"(?=[ \t\r\n()]|\Z)"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}
_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_FIELD_SEGMENT = re.compile(r"\.?([\w-]+|\*)|\[(" + _STRING + r")\]", re.DOTALL)
_OPERATOR_CHARS = "=!<>%~"


@dataclass(frozen=True)
class _Literal:
    """A value as written, with where it starts (for type and regex errors)."""

    value: ast.Scalar
    ignore_case: bool
    position: int


@dataclass(frozen=True)
class _Tail:
    """What follows the field in a comparison: operator and value(s)."""

    op: ast.Op | None  # None: `exists`
    literals: tuple[_Literal, ...]


def _unescape(text: str, start: int, end: int) -> str:
    """The value of the string literal body `text[start:end]` (JSON escapes, no quotes)."""
    parts: list[str] = []
    index = start
    while True:
        backslash = text.find("\\", index, end)
        if backslash < 0:
            parts.append(text[index:end])
            return "".join(parts)
        parts.append(text[index:backslash])
        char = text[backslash + 1]
        if char == "u":
            code, index = _code_point(text, backslash, end)
            parts.append(chr(code))
        elif char in _ESCAPES:
            parts.append(_ESCAPES[char])
            index = backslash + 2
        else:
            shown = char if char.isprintable() else f"U+{ord(char):04X}"
            raise RuleError(
                f"invalid escape '\\{shown}' in a string "
                '(use \\" \\\\ \\/ \\n \\r \\t \\b \\f or \\uXXXX)',
                text=text,
                position=backslash,
            )


def _code_point(text: str, backslash: int, end: int) -> tuple[int, int]:
    """The code point of the `\\uXXXX` escape at `backslash` (pairing surrogates, as JSON)."""
    match = _UNICODE_ESCAPE.match(text, backslash, end)
    if match is None:
        raise RuleError("\\u needs four hex digits", text=text, position=backslash)
    code = int(match.group(1), 16)
    if 0xDC00 <= code <= 0xDFFF:
        raise RuleError("unpaired surrogate in \\u escape", text=text, position=backslash)
    if 0xD800 <= code <= 0xDBFF:
        low = _UNICODE_ESCAPE.match(text, match.end(), end)
        if low is None or not 0xDC00 <= int(low.group(1), 16) <= 0xDFFF:
            raise RuleError("unpaired surrogate in \\u escape", text=text, position=backslash)
        code = 0x10000 + ((code - 0xD800) << 10) + (int(low.group(1), 16) - 0xDC00)
        return code, low.end()
    return code, match.end()


def _string_action(text: str, loc: int, tokens: pp.ParseResults) -> _Literal:
    written: str = tokens[0]
    ignore_case = written.endswith("i")
    body_end = loc + len(written) - (2 if ignore_case else 1)
    return _Literal(_unescape(text, loc + 1, body_end), ignore_case, loc)


def _number_action(text: str, loc: int, tokens: pp.ParseResults) -> _Literal:
    written: str = tokens[0]
    value: int | float
    try:
        value = float(written) if "." in written else int(written)
    except ValueError:  # more digits than Python converts
        raise RuleError("number too long", text=text, position=loc) from None
    if not math.isfinite(value):
        raise RuleError("number too large", text=text, position=loc)
    return _Literal(value, False, loc)


def _boolean_action(text: str, loc: int, tokens: pp.ParseResults) -> _Literal:
    return _Literal(tokens[0] == "true", False, loc)


def _field_action(text: str, loc: int, tokens: pp.ParseResults) -> ast.Field:
    written: str = tokens[0]
    segments: list[str] = []
    for match in _FIELD_SEGMENT.finditer(written):
        if match.group(1) is not None:
            segments.append(match.group(1))
        else:
            body_start = loc + match.start(2) + 1
            segments.append(_unescape(text, body_start, loc + match.end(2) - 1))
    return ast.Field(tuple(segments))


def _tail_action(text: str, loc: int, tokens: pp.ParseResults) -> _Tail:
    word: str = tokens[0]
    if word == "exists":
        return _Tail(None, ())
    op = ast.Op("not in" if word.startswith("not") else word)
    return _Tail(op, tuple(tokens[1:]))


def _comparison_action(text: str, loc: int, tokens: pp.ParseResults) -> ast.Expr:
    field: ast.Field = tokens[0]
    tail: _Tail = tokens[1]
    if tail.op is None:
        return ast.Exists(field)
    for literal in tail.literals:
        _check_type(text, tail.op, literal)
    strings = [literal for literal in tail.literals if isinstance(literal.value, str)]
    ignore_case = any(literal.ignore_case for literal in strings)
    for literal in strings:
        if literal.ignore_case != ignore_case:
            raise RuleError(
                'either every string of the list is case-insensitive ("..."i) or none is',
                text=text,
                position=literal.position,
            )
    if tail.op in (ast.Op.REGEX, ast.Op.NOT_REGEX):
        literal = tail.literals[0]
        problem = regex_problem(str(literal.value), literal.ignore_case)
        if problem is not None:
            raise RuleError(problem, text=text, position=literal.position)
    value: ast.Scalar | tuple[ast.Scalar, ...]
    if tail.op in ast.SET_OPS:
        value = tuple(literal.value for literal in tail.literals)
    else:
        value = tail.literals[0].value
    return ast.Compare(field, tail.op, value, ignore_case)


def _check_type(text: str, op: ast.Op, literal: _Literal) -> None:
    """Reject values the operator cannot compare with (`a =% 5`, `a < "x"`, `a ~ true`)."""
    value = literal.value
    if op in ast.STRING_ONLY_OPS and not isinstance(value, str):
        raise RuleError(
            f"'{op.value}' compares text: the value must be a string",
            text=text,
            position=literal.position,
            expected="a string",
        )
    if op in ast.ORDER_OPS and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise RuleError(
            f"'{op.value}' compares numbers: the value must be a number",
            text=text,
            position=literal.position,
            expected="a number",
        )


def _keyword(pattern: str) -> pp.Regex:
    """A keyword: whitespace, a parenthesis or the text's edge on both sides."""
    return pp.Regex(_LEFT + "(?:" + pattern + ")" + _RIGHT)


def _build_grammar() -> pp.ParserElement:
    """The composite grammar, built once; `and` binds tighter than `or`, `not` tighter still."""
    string = pp.Regex(_STRING + r"(?:i(?![\w-]))?", re.DOTALL).set_name("a string")
    string.set_parse_action(_string_action)
    number = pp.Regex(r"-?[0-9]+(?:\.[0-9]+)?").set_parse_action(_number_action)
    boolean = pp.Regex(r"(?:true|false)(?![\w-])").set_parse_action(_boolean_action)
    value = (string | number | boolean).set_name("a string, a number, true or false")

    field = pp.Regex(
        r"(?:[\w-]+|\[" + _STRING + r"\])(?:\.[\w-]+|\.\*|\[" + _STRING + r"\])*", re.DOTALL
    ).set_name("a field name")
    field.set_parse_action(_field_action)

    symbol = pp.Regex(r"=%|!=|!%|!~|<=|>=|=|<|>|~")
    lparen = pp.Suppress("(").set_name("'('")
    values = (
        lparen
        - value
        - pp.ZeroOrMore(pp.Suppress(",") - value)
        - pp.Suppress(")").set_name("',' or ')'")
    )
    tail = (
        (symbol - value)
        | (_keyword("startswith|endswith") - string)
        | (_keyword(r"not[ \t\r\n]+in") - values)
        | (_keyword("in") - values)
        | _keyword("exists")
    ).set_name("an operator")
    tail.set_parse_action(_tail_action)
    comparison = (field + tail).set_parse_action(_comparison_action)

    expression = pp.Forward()
    unary = pp.Forward()
    close = pp.Suppress(")").set_name("'and', 'or' or ')'")
    negated = pp.Suppress("!(") - expression - close
    grouped = lparen - expression - close
    atom = negated.set_parse_action(lambda t: ast.Not(t[0])) | grouped | comparison
    # `not` is not reserved (Parseable allows any identifier as a field), so `not = "x"`
    # falls back to a comparison on a field named "not".
    unary <<= (
        (pp.Suppress(_keyword("not")) + unary).set_parse_action(lambda t: ast.Not(t[0])) | atom
    ).set_name("a comparison, 'not', '(' or '!('")
    term = (unary + pp.ZeroOrMore(pp.Suppress(_keyword("and")) - unary)).set_parse_action(
        lambda t: ast.conjunction(list(t))
    )
    expression <<= (term + pp.ZeroOrMore(pp.Suppress(_keyword("or")) - term)).set_parse_action(
        lambda t: ast.disjunction(list(t))
    )
    rule = expression + pp.StringEnd().set_name("'and', 'or' or the end of the rule")
    rule.parse_with_tabs()  # keep offsets true to the text the user wrote
    rule.streamline()
    return rule


_GRAMMAR = _build_grammar()


def parse_expression(text: str) -> ast.Expr:
    """The syntax tree of a composite rule; `RuleError` (only) if `text` is not a valid rule."""
    if not isinstance(text, str):
        raise RuleError(
            f"a composite rule is text, not {type(text).__name__}", text=str(text), position=0
        )
    if not text.strip(_WHITESPACE):
        raise RuleError("the rule is empty", text=text, position=0, expected="a comparison")
    _check_nesting(text)
    try:
        result = _GRAMMAR.parse_string(text)
    except pp.ParseBaseException as error:
        raise _syntax_error(text, error.loc, error.msg) from None
    except RecursionError:
        raise RuleError("the rule is nested too deeply", text=text, position=0) from None
    expr: ast.Expr = result[0]
    return expr


def _check_nesting(text: str) -> None:
    """Refuse deep nesting up front, with its position, rather than overflow the stack."""
    depth = 0
    index = 0
    while index < len(text):
        char = text[index]
        if char == '"':
            closing = _STRING_LITERAL.match(text, index)
            if closing is None:
                return  # the parser reports the unterminated string
            index = closing.end()
            continue
        if char == "(":
            depth += 1
            if depth > MAX_NESTING:
                raise RuleError(
                    f"parentheses nested more than {MAX_NESTING} deep", text=text, position=index
                )
        elif char == ")":
            depth -= 1
        index += 1


def _syntax_error(text: str, position: int, pyparsing_message: str) -> RuleError:
    """A pyparsing failure as a RuleError, recognising the common mistakes by name."""
    expected = pyparsing_message.removeprefix("Expected ").strip() or None
    if not text[position:].strip(_WHITESPACE):  # at the end: point just after the last token
        position = len(text.rstrip(_WHITESPACE))
    message = f"expected {expected}" if expected else "syntax error"
    rest = text[position:]
    operator_start = position
    while operator_start > 0 and text[operator_start - 1] in _OPERATOR_CHARS:
        operator_start -= 1
    if rest.startswith("'"):
        message = "strings are written in double quotes"
    elif rest.startswith('"') and _STRING_LITERAL.match(rest) is None:
        message = "unterminated string"
    elif rest.startswith(")") and expected is not None and "end of the rule" in expected:
        message = "unmatched ')'"
    elif rest and rest[0] in _OPERATOR_CHARS and operator_start < position:
        end = position
        while end < len(text) and text[end] in _OPERATOR_CHARS:
            end += 1
        message = f"unknown operator '{text[operator_start:end]}'"
        position = operator_start
    else:
        glued = _glued_keyword(text, position)
        if glued is not None:
            message = f"'{glued}' needs whitespace or a parenthesis on both sides"
    return RuleError(message, text=text, position=position, expected=expected)


def _glued_keyword(text: str, position: int) -> str | None:
    """A keyword starting or ending at `position` that touches a neighbouring token."""
    start = position
    while start > 0 and IDENT.fullmatch(text[start - 1]):
        start -= 1
    for word in (IDENT.match(text, position), IDENT.match(text, start)):
        if word is None or word.group() not in KEYWORDS - {"true", "false"}:
            continue
        before = text[word.start() - 1] if word.start() else " "
        after = text[word.end()] if word.end() < len(text) else " "
        if before not in _WHITESPACE + "()" or after not in _WHITESPACE + "()":
            return word.group()
    return None


def parse_rule(rule_type: str, config: str | Mapping[str, Any]) -> ast.Rule:
    """An AuditAlert's `rule` ({type, config}) as an `ast.Rule`; `RuleError` if it is invalid."""
    if rule_type == "composite":
        if not isinstance(config, str):
            raise RuleError(
                "a composite rule's config is the rule text (a string)",
                text=repr(config),
                position=0,
            )
        return ast.Rule(parse_expression(config))
    if rule_type == "column":
        return parse_column(config)
    raise RuleError(
        f"unknown rule type {rule_type!r}: use 'composite' or 'column'",
        text=str(rule_type),
        position=0,
    )
