"""The one error a rule can raise, with where in the rule text it went wrong.

Every failure of the rule parsers (syntax, a regex that does not compile, a bad column config)
is a `RuleError`, so callers (the operator's `Invalid` state, `auditwatch lint`, `test-rule`)
need one `except` and can always show the user the offending column.
"""

from __future__ import annotations

import re


class RuleError(Exception):
    """A rule that cannot be parsed: what went wrong, and where in `text`.

    `position` is a 0-based offset into `text`; `expected` names what the parser wanted there
    (None when the problem is not a missing token, e.g. a bad regex).
    """

    def __init__(
        self, message: str, *, text: str, position: int, expected: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.text = text
        self.position = min(max(position, 0), len(text))
        self.expected = expected

    @property
    def line(self) -> int:
        """1-based line of `position` (rules may span lines in YAML block scalars)."""
        return self.text.count("\n", 0, self.position) + 1

    @property
    def column(self) -> int:
        """1-based column of `position` within its line."""
        return self.position - (self.text.rfind("\n", 0, self.position) + 1) + 1

    def __str__(self) -> str:
        return f"{self.message} at line {self.line}, column {self.column}"

    def __reduce__(self) -> tuple[object, ...]:
        """Keyword-only arguments need help to survive pickling (multiprocessing, caches)."""
        return (_rebuild, (self.message, self.text, self.position, self.expected))

    def pretty(self) -> str:
        """The rule text up to the offending line, a caret under the column, then the message."""
        lines = self.text.split("\n")
        shown = lines[: self.line]
        offending = shown[-1]
        # Keep tabs in the caret line so the caret lines up with tab-indented text.
        indent = "".join("\t" if char == "\t" else " " for char in offending[: self.column - 1])
        return "\n".join([*shown, indent + "^", str(self)])


def _rebuild(message: str, text: str, position: int, expected: str | None) -> RuleError:
    return RuleError(message, text=text, position=position, expected=expected)


def regex_problem(pattern: str, ignore_case: bool) -> str | None:
    """Why `pattern` is not a usable regex (None if it is): both rule forms reject the same ones."""
    try:
        re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except (re.error, RecursionError, OverflowError, ValueError) as error:
        return f"invalid regex: {error}"
    return None
