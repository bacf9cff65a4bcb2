"""Attribute filters: a request's `filter`, a small JSON object over the served catalog's attributes
(data/attributes.py), evaluated to the items it allows: a bool mask over index rows, which joins the request's
exclude / include lists in retrieval.ItemRules (`allow`), so it is applied before the top-k like them.

Grammar (docs/operations.md#attribute-filters-filter-and-new-arrivals): one JSON object; its keys AND
together; {} allows everything.
    {"<attribute>": CONDITION, ...}
    text    "dress" | ["dress", "coat"]           the item's value is one of these
            {"not": "dress"} | {"not": [...]}     the item has a value, and not one of these
    number  80 | [40, 80]                         one of these values
            {"min": 10, "max": 80}                a range, bounds included, either bound alone
            {"not": 80} | {"not": [...]}
    date    {"min": "2024-03-01", "max": "2024-03-31T18:00:00Z"}   ISO 8601; UTC unless it names an offset;
                                                  a max given as a date alone includes that whole day
    bool    true | false
An item whose attribute is null (an empty cell, an item added without it) matches no condition on that
attribute, "not" included. A value no item has matches nothing (not an error, like an unknown item ID).
Refused with ValueError("filter: ..."): text that is not JSON, not an object, an attribute the served catalog
does not have, a condition of the wrong shape or type for its attribute.

`AttributeIndex` is built once per served catalog (at model load): per attribute, the rows of each value (one
argsort of its codes) and, for numbers and dates, the rows sorted by value; a condition then costs the
number of rows it selects (a few scatters), not a pass over the catalog per value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

MAX_FILTER_BYTES = 65_536  # a filter is a few conditions: anything larger is a mistake
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")
_SHAPES = {"text": 'a string, a list of strings, or {"not": ...}',
           "number": 'a number, a list of numbers, {"min": .., "max": ..}, or {"not": ...}',
           "date": '{"min": "YYYY-MM-DD[THH:MM:SS][Z]", "max": ...}',
           "bool": "true or false"}


@dataclass(frozen=True)
class Condition:
    """One attribute's condition: op "in" / "not_in" (value codes) or "range" (lo, hi inclusive)."""

    attribute: str
    op: str
    codes: tuple = ()
    lo: float = -np.inf
    hi: float = np.inf


class _Column:
    """One attribute's precomputed index over index rows."""

    def __init__(self, kind: str, values):
        import pandas as pd

        self.kind = kind
        series = pd.Series(values).reset_index(drop=True)
        self.present = series.notna().to_numpy(dtype=bool)
        if kind in ("number", "date"):
            numbers = _as_numbers(series, kind)
            rows = np.flatnonzero(self.present)
            order = np.argsort(numbers[rows], kind="stable")
            self.sorted_rows, self.sorted_values = rows[order], numbers[rows][order]
        if kind != "date":
            keys = series.astype(object).where(series.notna(), None)
            if kind == "number":
                keys = pd.Series(_as_numbers(series, kind)).where(series.notna().to_numpy(), None)
            codes, uniques = pd.factorize(keys, use_na_sentinel=True)
            self.code_of = {(bool(u) if kind == "bool" else float(u) if kind == "number" else str(u)): i
                            for i, u in enumerate(uniques.tolist())}
            self.value_rows = np.argsort(codes, kind="stable")
            self.bounds = np.searchsorted(codes[self.value_rows], np.arange(-1, len(uniques) + 1))

    def rows_of(self, code: int) -> np.ndarray:
        return self.value_rows[self.bounds[code + 1]:self.bounds[code + 2]]

    def mask(self, cond: Condition, n_rows: int) -> np.ndarray:
        if cond.op == "range":
            lo = np.searchsorted(self.sorted_values, cond.lo, "left")
            hi = np.searchsorted(self.sorted_values, cond.hi, "right")
            out = np.zeros(n_rows, dtype=bool)
            out[self.sorted_rows[lo:hi]] = True
            return out
        out = self.present.copy() if cond.op == "not_in" else np.zeros(n_rows, dtype=bool)
        for code in cond.codes:
            out[self.rows_of(code)] = cond.op == "in"
        return out


def _as_numbers(series, kind: str) -> np.ndarray:
    """float64 per row (NaN where null): numbers as they are, dates as epoch milliseconds."""
    import pandas as pd

    if kind == "date":
        stamps = pd.to_datetime(series, utc=True)
        ms = (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
        return ms.astype("float64").to_numpy()
    return pd.to_numeric(series, errors="coerce").astype("float64").to_numpy()


class AttributeIndex:
    """The served catalog's attributes, indexed for filters (see the module docstring)."""

    def __init__(self, frame, n_rows: int | None = None):
        """frame: one row per index row (0..n_rows-1), one column per attribute (data/attributes.py's
        `served_attributes`; reserved rows null)."""
        from odmt_t4r.data.attributes import attribute_kind

        self.n_rows = int(n_rows if n_rows is not None else len(frame))
        if len(frame) != self.n_rows:
            raise ValueError(f"the attribute table has {len(frame)} rows, the served catalog {self.n_rows}")
        self.columns = {str(c): _Column(attribute_kind(frame[c]), frame[c].to_numpy()) for c in frame.columns}

    @classmethod
    def for_run(cls, run, data_dir=None) -> "AttributeIndex":
        """The index of a RUN's catalog (its prepared DIR's items and the items add-items added to it)."""
        from odmt_t4r.data.attributes import run_attributes

        return cls(run_attributes(run, data_dir))

    def rules(self, spec, exclude=None, include=None):
        """retrieval.ItemRules for `OdmtRecommender.recommend(..., rules=...)` in-process: the filter `spec`
        (a dict or JSON text) and, optionally, index rows to exclude / include (int64 tensors)."""
        import torch

        from odmt_t4r.model.retrieval import ItemRules

        mask = self.allowed(self.parse(spec))
        return ItemRules(exclude=exclude, include=include, allow=None if mask is None else torch.from_numpy(mask))

    @property
    def kinds(self) -> dict[str, str]:
        return {name: col.kind for name, col in self.columns.items()}

    def parse(self, text) -> list[Condition]:
        """A filter (JSON text, UTF-8 bytes, or an already decoded dict) -> its conditions; ValueError
        "filter: ..." when it is malformed (see the module docstring)."""
        spec = _decode(text)
        conditions = []
        for name, cond in spec.items():
            if name not in self.columns:
                known = ", ".join(f"{n} ({k})" for n, k in self.kinds.items()) or "none"
                raise ValueError(f"filter: unknown attribute {name!r}; the served catalog has: {known}")
            conditions.append(self._condition(name, self.columns[name], cond))
        return conditions

    def allowed(self, conditions: list[Condition]) -> np.ndarray | None:
        """bool [n_rows]: the rows every condition allows (None for no condition: everything)."""
        mask = None
        for cond in conditions:
            m = self.columns[cond.attribute].mask(cond, self.n_rows)
            mask = m if mask is None else mask & m
        return mask

    def _condition(self, name: str, col: _Column, cond) -> Condition:
        def wrong(detail: str = "") -> ValueError:
            return ValueError(f"filter: {name!r} is a {col.kind} attribute: give {_SHAPES[col.kind]}, not "
                              f"{json.dumps(cond)[:80]}{detail}")

        if isinstance(cond, dict):
            keys = set(cond)
            if keys == {"not"} and col.kind in ("text", "number"):
                return Condition(name, "not_in", self._codes(col, cond["not"], wrong))
            if keys and keys <= {"min", "max"} and col.kind in ("number", "date"):
                lo, hi = (self._bound(col, cond.get(b), b, wrong) for b in ("min", "max"))
                return Condition(name, "range", lo=lo, hi=hi)
            raise wrong()
        if col.kind == "date":
            raise wrong()
        return Condition(name, "in", self._codes(col, cond, wrong))

    @staticmethod
    def _codes(col: _Column, values, wrong) -> tuple:
        values = values if isinstance(values, list) else [values]
        codes = []
        for v in values:
            if col.kind == "text" and isinstance(v, str):
                key = v
            elif col.kind == "number" and _is_number(v):
                key = float(v)
            elif col.kind == "bool" and isinstance(v, bool):
                key = v
            else:
                raise wrong()
            if key in col.code_of:  # a value no item has matches nothing
                codes.append(col.code_of[key])
        return tuple(dict.fromkeys(codes))

    @staticmethod
    def _bound(col: _Column, value, which: str, wrong) -> float:
        if value is None:
            return -np.inf if which == "min" else np.inf
        if col.kind == "number":
            if not _is_number(value):
                raise wrong()
            return float(value)
        if not isinstance(value, str):
            raise wrong()
        try:
            stamp = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise wrong(f" ({value!r} is not an ISO 8601 date)") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        if which == "max" and _DATE_ONLY.fullmatch(value.strip()):
            stamp += timedelta(days=1) - timedelta(milliseconds=1)  # a date alone: the whole day
        return stamp.timestamp() * 1000.0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _decode(text) -> dict:
    if isinstance(text, dict):
        spec = text
    else:
        if isinstance(text, np.ndarray):
            if text.size != 1:
                raise ValueError(f"filter: one JSON object per request, got {text.size} values")
            text = text.reshape(-1)[0]
        if isinstance(text, (bytes, bytearray)):
            if len(text) > MAX_FILTER_BYTES:
                raise ValueError(f"filter: {len(text):,} bytes; at most {MAX_FILTER_BYTES:,}")
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("filter: not UTF-8 text") from None
        if len(str(text)) > MAX_FILTER_BYTES:
            raise ValueError(f"filter: {len(str(text)):,} characters; at most {MAX_FILTER_BYTES:,}")
        try:
            spec = json.loads(str(text))
        except ValueError as exc:
            raise ValueError(f"filter: not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"filter: must be a JSON object such as {{\"category\": [\"dress\"]}}, got {type(spec).__name__}")
    return spec


def filter_text(spec) -> str:
    """A filter as the JSON text the wire carries (a dict is dumped; text is passed on as it is)."""
    return spec if isinstance(spec, str) else json.dumps(spec, separators=(",", ":"))
