"""JSON text to Python values without altering a number, and the nesting auditwatch keeps.

orjson reads an integer beyond 64 bits as a float (`1180591620717411303424` becomes
`1.1805916207174113e+21`) and refuses a number beyond a double's range (`1e999`), yet both are
valid JSON an apiserver may relay in a `requestObject`. Events are kept whole, so such a number
is read as an `orjson.Fragment` of its own text: orjson writes it back unchanged (the `event`
column, the alert state file, `auditwatch query`), and no typed column takes it (it is not an
int64, a string, a list or an object), exactly as the fast path (columnar.py) leaves it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

MAX_DEPTH = 254
"""Deepest nesting of arrays and objects in an event (the event object itself is level 1)
that auditwatch takes: what orjson writes back (it stops at 255). Deeper is refused with 400."""

_LONG_DIGITS = re.compile(rb"\d{20}")
"""Only a number with 20 digits in a row can exceed 64 bits (2**64 has 20): the cheap sign
that the slower exact parse is needed (a 20-digit run inside a string merely costs time)."""
_LONG_DIGITS_TEXT = re.compile(r"\d{20}")
_INFINITE = "number is infinity"
"""The start of orjson's message for a number beyond a double's range."""
_UINT64_MAX = 2**64 - 1
_INT64_MIN = -(2**63)


def loads(data: bytes | str) -> Any:
    """The JSON value of `data`, numbers exact; raises orjson.JSONDecodeError as orjson does.

    orjson reads everything first (it is the judge of what is valid JSON); Python's json reads
    again only text holding a number orjson would alter.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        if not error.msg.startswith(_INFINITE):
            raise
        return _exact(data)
    pattern: Any = _LONG_DIGITS_TEXT if isinstance(data, str) else _LONG_DIGITS
    if pattern.search(data) is None:
        return value
    return _exact(data)


def _exact(data: bytes | str) -> Any:
    try:
        return json.loads(data, parse_int=_integer, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise orjson.JSONDecodeError(
            f"nesting deeper than {MAX_DEPTH} levels", _text(data), 0
        ) from None
    except json.JSONDecodeError as error:
        raise orjson.JSONDecodeError(error.msg, error.doc, error.pos) from None
    except ValueError as error:  # NaN or Infinity, which orjson would refuse too
        raise orjson.JSONDecodeError(str(error), _text(data), 0) from None


def _text(data: bytes | str) -> str:
    return data if isinstance(data, str) else data.decode(errors="replace")


def _integer(text: str) -> int | orjson.Fragment:
    try:
        value = int(text)
    except ValueError:  # over Python's 4,300 digits for a conversion
        return orjson.Fragment(text)
    return value if _INT64_MIN <= value <= _UINT64_MAX else orjson.Fragment(text)


def _float(text: str) -> float | orjson.Fragment:
    value = float(text)
    return value if math.isfinite(value) else orjson.Fragment(text)


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")
