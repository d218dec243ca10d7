"""Payload indexes: declared payload fields held as typed columns, so a filter never parses a payload.

A field is declared with a type (`label:keyword`, `year:int`, `score:float`, `ok:bool`) when an
index is built or imported, or later (`zspace index field add`). Each declared field is a column
over item ids (numpy arrays: the value, and whether the item has one); a condition becomes one
vectorised comparison over the column, about a millisecond at a million items, where reading
and parsing every payload in SQLite took 0.5–1 s. Keywords are dictionary-coded (an int32 code
per item), so `==` and `in` compare integers.

Values are coerced to the declared type when an item is written (int 7, 7.0 and "7" are the int
7; a number in a keyword field is its JSON text, "7"); a value that cannot be is refused with
the payload's field named, so a column never disagrees with its payloads. A missing field or a
null is "no value", which no condition matches.

Columns are derived data: the item store (payloads, and the declared fields in its `fields`
table) stays the truth. A snapshot saves them beside the FAISS snapshot so opening a big index
reads arrays instead of a million payloads; the changes after it are replayed like FAISS's.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspace.errors import shown
from zspace.index.contract import FilterError
from zspace.index.errors import IndexError_
from zspace.index.filters import RANGE_OPERATORS, Condition, check_field, number_of

FIELD_TYPES = ("keyword", "int", "float", "bool")
_NUMPY = {"keyword": np.int32, "int": np.int64, "float": np.float64, "bool": np.int8}
_COMPARE = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


@dataclass(frozen=True)
class FieldSpec:
    """A declared payload field: its name and type (one of FIELD_TYPES)."""

    name: str
    type: str

    def __str__(self) -> str:
        return f"{self.name}:{self.type}"


def field_spec(text: str, part: str = "--field") -> FieldSpec:
    """NAME:TYPE, as a user writes it; IndexError_ naming `part` otherwise."""
    name, sep, kind = str(text).rpartition(":")
    if not sep or kind not in FIELD_TYPES:
        raise IndexError_(f"{part}: expected NAME:TYPE with TYPE one of {', '.join(FIELD_TYPES)}, got {shown(str(text))}")
    try:
        check_field(name, part)
    except FilterError as exc:
        raise IndexError_(str(exc)) from None
    return FieldSpec(name, kind)


def field_specs(texts, part: str = "--field") -> list[FieldSpec]:
    specs = [t if isinstance(t, FieldSpec) else field_spec(t, part) for t in texts or ()]
    seen = set()
    for s in specs:
        if s.name in seen:
            raise IndexError_(f"{part}: field {shown(s.name)} declared twice")
        seen.add(s.name)
    return specs


def coerce(spec: FieldSpec, value, part: str):
    """A payload value as the declared type stores it (None: no value); IndexError_ naming `part` if it cannot be."""
    if value is None:
        return None
    t = spec.type
    if t == "bool":
        if isinstance(value, bool):
            return value
    elif isinstance(value, (dict, list)) or isinstance(value, bool):
        pass
    elif t == "keyword":
        return value if isinstance(value, str) else json.dumps(value)
    else:
        n = number_of(value)
        if n is not None:
            if t == "float":
                return float(n)
            if isinstance(n, int) or (isinstance(n, float) and n.is_integer() and abs(n) < 2**63):
                return int(n)
    text = json.dumps(value, ensure_ascii=False)
    raise IndexError_(f"{part}: field {shown(spec.name)} is indexed as {t}, and "
                      f"{text if len(text) <= 40 else text[:40] + '...'} is not {'an' if t == 'int' else 'a'} {t}")


class Column:
    """One declared field over item ids: `values[id]` and `present[id]`; keywords coded through `words`."""

    def __init__(self, spec: FieldSpec, capacity: int = 1024):
        self.spec = spec
        self.values = np.zeros(capacity, _NUMPY[spec.type])
        self.present = np.zeros(capacity, bool)
        self.words: list[str] = []          # keyword code -> string
        self.code_of: dict[str, int] = {}   # string -> keyword code

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.present.nbytes + sum(len(w) + 60 for w in self.words)

    def grow(self, capacity: int) -> None:
        if capacity > len(self.values):
            capacity = max(capacity, 2 * len(self.values))
            values = np.zeros(capacity, self.values.dtype)
            values[: len(self.values)] = self.values
            present = np.zeros(capacity, bool)
            present[: len(self.present)] = self.present
            self.values, self.present = values, present

    def set(self, ids: np.ndarray, values: list) -> None:
        """Store coerced values (None: no value) for `ids`."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        self.grow(int(ids.max()) + 1)
        has = np.array([v is not None for v in values], bool)
        self.present[ids] = has
        if self.spec.type == "keyword":
            codes = [self._code(v) if v is not None else 0 for v in values]
            self.values[ids] = np.asarray(codes, np.int32)
        else:
            self.values[ids] = np.asarray([0 if v is None else v for v in values], self.values.dtype)

    def _code(self, word: str) -> int:
        code = self.code_of.get(word)
        if code is None:
            code = self.code_of[word] = len(self.words)
            self.words.append(word)
        return code

    def clear(self, ids) -> None:
        ids = np.asarray(ids, np.int64)
        ids = ids[ids < len(self.present)]
        self.present[ids] = False

    def mask(self, cond: Condition, size: int) -> np.ndarray:
        """Which ids (0 .. size-1) satisfy `cond`: one vectorised comparison over the column."""
        self.grow(size)
        values, present = self.values[:size], self.present[:size]
        t, op = self.spec.type, cond.op
        if op in RANGE_OPERATORS:
            return present & self._range(values, op, cond.value, cond)
        targets = cond.value if op == "in" else (cond.value,)
        if t == "keyword":
            wanted = [self.code_of[w] for v in targets for w in _keyword_forms(v) if w in self.code_of]
        elif t == "bool":
            wanted = [int(v) for v in targets if isinstance(v, bool)]
        else:
            numbers = [n for v in targets if not isinstance(v, bool) and (n := number_of(v)) is not None]
            if t == "int":  # an int column equals only integral numbers: compare as int64, no float pass over it
                numbers = [int(n) for n in numbers if float(n).is_integer() and abs(n) < 2**63]
            wanted = numbers
        hit = _one_of(values, sorted(set(wanted)))
        return present & (~hit if op == "!=" else hit)

    def _range(self, values: np.ndarray, op: str, value, cond: Condition) -> np.ndarray:
        t = self.spec.type
        if t == "keyword":
            if not isinstance(value, str):
                raise FilterError(f"filter {cond}: {self.spec.name} is indexed as keyword; compare it with a string")
            passing = np.array([_COMPARE[op](w, value) for w in self.words] + [False], bool)
            return passing[np.where(values < len(self.words), values, len(self.words))]
        if t == "bool" or isinstance(value, str):
            raise FilterError(f"filter {cond}: {self.spec.name} is indexed as {t}; "
                              f"`{op}` {'does not apply to booleans' if t == 'bool' else 'needs a number'}")
        if t == "int" and isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return _COMPARE[op](values.astype(np.float64), value)
        return _COMPARE[op](values, value)

    def count_values(self, size: int) -> int:
        return int(np.count_nonzero(self.present[:size]))

    # ------------------------------------------------------------ persistence (derived data: see the module docstring)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"values": self.values, "present": self.present,
                "words": np.frombuffer(json.dumps(self.words).encode(), np.uint8)}

    @classmethod
    def from_arrays(cls, spec: FieldSpec, arrays: dict[str, np.ndarray]) -> Column:
        col = cls(spec, 1)
        values, present = arrays["values"], arrays["present"]
        if values.dtype != col.values.dtype or present.shape != values.shape:
            raise ValueError(f"column {spec} in the snapshot has dtype {values.dtype}, expected {col.values.dtype}")
        col.values, col.present = np.array(values), np.array(present, bool)
        col.words = json.loads(bytes(arrays["words"]).decode())
        col.code_of = {w: i for i, w in enumerate(col.words)}
        return col


def _one_of(values: np.ndarray, wanted: list) -> np.ndarray:
    """values == any of `wanted`: one comparison for one value (the common case); for several integers
    within a few million of each other, one lookup table read per item (np.isin compares once per value)."""
    if not wanted:
        return np.zeros(len(values), bool)
    if len(wanted) == 1:
        return values == values.dtype.type(wanted[0])
    if values.dtype.kind == "i":
        lo, hi = int(min(wanted)), int(max(wanted))
        if hi - lo < 1 << 22:
            table = np.zeros(hi - lo + 2, bool)  # the last slot: every value outside [lo, hi]
            table[np.asarray(wanted, np.int64) - lo] = True
            offsets = values.astype(np.int64) - lo if values.dtype != np.int64 else values - lo
            np.clip(offsets, -1, hi - lo + 1, out=offsets)
            return table[offsets]  # -1 reads the last slot too: False
    return np.isin(values, np.asarray(wanted, values.dtype))


def _keyword_forms(value) -> list[str]:
    """The keyword strings an equality with `value` matches: 7 -> "7"; "7" -> "7"; true -> none (a keyword is text)."""
    if isinstance(value, bool):
        return []
    return [value if isinstance(value, str) else json.dumps(value)]


def extract(specs: list[FieldSpec], payloads: list[dict], part: str = "payloads") -> dict[str, list]:
    """field name -> each payload's coerced value (None: none), IndexError_ naming payloads[i].field on a bad one."""
    out: dict[str, list] = {}
    for spec in specs:
        name, exact = spec.name, _EXACT[spec.type]
        values = [p.get(name) for p in payloads]
        # Values already of the declared type (nearly all, in practice) pass as they are; the rest are coerced.
        out[name] = [v if type(v) is exact or v is None else coerce(spec, v, f"{part}[{i}].{name}")
                     for i, v in enumerate(values)]
    return out


_EXACT = {"keyword": str, "int": int, "float": float, "bool": bool}


def columns_bytes(columns: dict[str, Column]) -> bytes:
    """All columns as one .npz file's bytes (the caller writes them atomically)."""
    buf = io.BytesIO()
    arrays = {}
    for i, col in enumerate(columns.values()):
        for part, a in col.arrays().items():
            arrays[f"{i}.{part}"] = a
    arrays["specs"] = np.frombuffer(json.dumps([[c.spec.name, c.spec.type] for c in columns.values()]).encode(), np.uint8)
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_columns(path: Path) -> dict[str, Column]:
    with np.load(path) as z:
        specs = [FieldSpec(n, t) for n, t in json.loads(bytes(z["specs"]).decode())]
        return {s.name: Column.from_arrays(s, {p: z[f"{i}.{p}"] for p in ("values", "present", "words")})
                for i, s in enumerate(specs)}

