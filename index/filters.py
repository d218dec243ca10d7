"""The filter language: conditions on payload fields, combined with AND, the same on every backend.

A filter is a tuple of `Condition`s that must all hold. A condition names a top-level payload
field, an operator and a value: `==`, `!=` and `in` compare JSON scalars with the number/string
tolerance users rely on (7 matches 7 and "7": a command line cannot tell them apart); `<`, `<=`,
`>`, `>=` compare numbers with numbers and strings with strings. An item without the field (or
with null there) matches no condition, `!=` included, as in SQL: "year != 2000" should not
return the items that have no year. Null is not a value a condition can name (Milvus cannot
match it either).

Callers give filters in the shapes that suit them (`as_filter`): the CLI's text
(`label=3`, `year >= 2000`, `cat in (1, 2)`), the Python client's {"label": 3}, a structured
request's conditions, or the old single (field, value) equality; each backend then translates
the one checked form.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from zspace.errors import shown
from zspace.index.contract import MAX_FIELD_CHARS, FilterError, check_text

OPERATORS = ("==", "!=", "in", "<", "<=", ">", ">=")
RANGE_OPERATORS = ("<", "<=", ">", ">=")
MAX_CONDITIONS = 16   # AND of this many at most: a filter is a few conditions, not a program
MAX_IN_VALUES = 1024  # values of one `in`


@dataclass(frozen=True)
class Condition:
    """One condition: `field op value`; for `in`, value is a tuple of scalars."""

    field: str
    op: str
    value: object

    def __str__(self) -> str:
        if self.op == "in":
            return f"{self.field} in ({', '.join(json.dumps(v, ensure_ascii=False) for v in self.value)})"
        return f"{self.field} {self.op} {json.dumps(self.value, ensure_ascii=False)}"


Filter = tuple[Condition, ...]


def check_scalar(value, part: str) -> None:
    """A value a condition can compare: a string, a finite number, true or false."""
    if isinstance(value, str):
        check_text(value, part, FilterError)
    elif value is None:
        raise FilterError(f"{part}: null cannot be matched (an item without the field, or with null there, "
                          "matches no condition); give a string, number, true or false")
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise FilterError(f"{part}: integer out of the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(f"{part}: must be a finite number")
    else:
        kind = {"list": "array", "dict": "object", "tuple": "array"}.get(type(value).__name__, type(value).__name__)
        raise FilterError(f"{part}: expected a string, number, true or false, got a JSON {kind}")


def check_field(field, part: str) -> None:
    if not isinstance(field, str) or not field or len(field) > MAX_FIELD_CHARS:
        raise FilterError(f"{part}: expected a payload field name of 1 to {MAX_FIELD_CHARS} characters")
    if any(c in field for c in '"\\') or any(ord(c) < 32 for c in field):
        raise FilterError(f"{part}: must not contain quotes, backslashes or control characters")
    check_text(field, part, FilterError)


def condition(field, op: str, value, part: str = "filter") -> Condition:
    """A checked Condition; FilterError naming `part` (and the field, operator or value in it) otherwise."""
    check_field(field, f"{part} field")
    op = "==" if op == "=" else op
    if op not in OPERATORS:
        raise FilterError(f"{part} operator: expected one of {', '.join(OPERATORS)}, got {shown(str(op))}")
    if op == "in":
        if not isinstance(value, (list, tuple)) or not value:
            raise FilterError(f"{part} value: `in` takes a non-empty list of values, as [1, 2, 3]")
        if len(value) > MAX_IN_VALUES:
            raise FilterError(f"{part} value: {len(value)} values, over the limit of {MAX_IN_VALUES} for `in`")
        for i, v in enumerate(value):
            check_scalar(v, f"{part} value [{i}]")
        return Condition(field, op, tuple(value))
    check_scalar(value, f"{part} value")
    if op in RANGE_OPERATORS and isinstance(value, bool):
        raise FilterError(f"{part} value: `{op}` compares numbers or strings, got {json.dumps(value)}")
    return Condition(field, op, value)


def as_filter(where, part: str | None = None) -> Filter:
    """Any accepted filter shape as one checked Filter (empty: no filter).

    None; a Condition or a sequence of them; a (field, value) pair (equality, the old form);
    a dict of field -> value (each an equality, or a list meaning `in`); a string or a list of
    strings in the CLI's syntax (see `parse_condition`). Errors name `part` (the caller's name
    for the filter: "filter" in an HTTP body) or, by default, `where`."""
    name = part or "where"
    if where is None:
        return ()
    if isinstance(where, Condition):
        conditions = [where]
    elif isinstance(where, str):
        conditions = [parse_condition(where, part or "--where")]
    elif isinstance(where, dict):
        conditions = [condition(f, "in" if isinstance(v, list) else "==", v, f"{name}[{shown(str(f))}]")
                      for f, v in where.items()]
    elif isinstance(where, tuple) and len(where) == 2 and isinstance(where[0], str) and \
            not isinstance(where[1], Condition):
        conditions = [condition(where[0], "==", where[1])]
    elif isinstance(where, (list, tuple)):
        conditions = []
        for i, c in enumerate(where):
            if isinstance(c, str):
                conditions.append(parse_condition(c, f"{name}[{i}]"))
            elif isinstance(c, Condition):
                conditions.append(condition(c.field, c.op, c.value, f"{name}[{i}]"))
            else:
                raise FilterError(f"{name}[{i}]: expected a condition such as 'label == 3', got {type(c).__name__}")
    else:
        raise FilterError(f"{name}: expected conditions such as {{'label': 3}} or ['year >= 2000'], "
                          f"got {type(where).__name__}")
    if len(conditions) > MAX_CONDITIONS:
        raise FilterError(f"{name}: {len(conditions)} conditions, over the limit of {MAX_CONDITIONS}")
    return tuple(conditions)


_CONDITION = re.compile(r"\s*(?P<field>[^\s=!<>]+)\s*(?P<op>==|=|!=|<=|>=|<|>|\s+in\s+|\s+in(?=\())\s*(?P<value>.*?)\s*",
                        re.DOTALL)


def parse_condition(text: str, part: str = "--where") -> Condition:
    """`FIELD OP VALUE` as typed on a command line: label=3, label==3, year>=2000, cat in (1, 2), name!=bob.

    VALUE is JSON where it parses as JSON, else the text itself (label=coat); `in` takes a
    parenthesised or bracketed list of such values."""
    if not isinstance(text, str):
        raise FilterError(f"{part}: expected a condition such as 'label == 3', got {type(text).__name__}")
    m = _CONDITION.fullmatch(text)
    if not m or not m.group("value"):
        raise FilterError(f"{part}: expected FIELD OP VALUE with OP one of =, ==, !=, <, <=, >, >=, in; "
                          f"as label=3, year>=2000 or cat in (1, 2); got {shown(text)}")
    op, raw = m.group("op").strip(), m.group("value")
    if op == "in":
        inner = raw[1:-1] if len(raw) >= 2 and (raw[0], raw[-1]) in (("(", ")"), ("[", "]")) else None
        if inner is None:
            raise FilterError(f"{part}: `in` takes a list in parentheses, as cat in (1, 2, 3); got {shown(raw)}")
        value = [_value(v.strip()) for v in _split_list(inner)] if inner.strip() else []
    else:
        value = _value(raw)
    return condition(m.group("field"), op, value, part)


def _value(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _split_list(inner: str) -> list[str]:
    """Split `1, "a,b", c` at the commas outside double quotes."""
    parts, current, quoted, escaped = [], [], False, False
    for c in inner:
        if c == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(c)
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
    parts.append("".join(current))
    return parts


def number_of(value) -> float | int | None:
    """A filter or payload value as a number where it is one or a string of one (the tolerance), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        n = json.loads(value)
    except ValueError:
        return None
    return n if isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) else None


def equal_forms(value) -> list:
    """The payload values an equality with `value` matches: 7 -> [7, "7"], "7" -> ["7", 7], "coat" -> ["coat"]."""
    if isinstance(value, bool):
        return [value]
    if isinstance(value, (int, float)):
        return [value, json.dumps(value)]
    n = number_of(value)
    return [value] if n is None else [value, n]


def describe(where: Filter) -> str:
    return " AND ".join(str(c) for c in where) if where else "(none)"
