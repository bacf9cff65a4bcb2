"""Catalog attributes: the items file's columns other than item_id, text and image (a category, a brand, a
price, an `available` flag, a `since` date, ...), kept by `odmt prepare`, `prepare --append-to` and
`odmt add-items`, shipped with the model by `odmt export`, and filtered on per request (model/item_filter.py).

Each attribute has one kind, read off its values when the file is read:
    bool    every value true / false (a CSV's true/false, True/False)
    number  every value a number (stored as float64)
    date    the column `since` (ISO 8601 dates or times, or epoch seconds / milliseconds; stored as UTC
            datetimes), and datetime columns of a parquet catalog
    text    anything else (stored as strings, exactly as written)
An empty cell is null: no filter on that attribute ever matches it. A file appended to a catalog, or added
to a model, must give an attribute the kind the catalog gave it (a text attribute takes numbers as text).

NEW_ARRIVAL is derived, never read from a file: True for the items `odmt add-items` added after the model
was trained (the RUN's added_items.parquet), False for the trained catalog. add-items records a `since` for
each item it adds: the file's, or, where the file has none, the time add-items ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from odmt_t4r.data.base import DataValidationError, parse_timestamps

NOT_ATTRIBUTES = ("item_id", "text", "image", "item_idx", "train_count", "assumed_count")  # content and derived columns
SINCE = "since"  # the date attribute of "new arrivals"
NEW_ARRIVAL = "new_arrival"  # derived: the item was added by `odmt add-items` after training
RESERVED = (NEW_ARRIVAL,)
KINDS = ("bool", "number", "date", "text")
_TRUE, _FALSE = {"true"}, {"false"}


def attribute_columns(items: pd.DataFrame) -> list[str]:
    return [c for c in items.columns if c not in NOT_ATTRIBUTES]


def attribute_kind(values: pd.Series) -> str:
    """The kind of a normalized attribute column (see the module docstring)."""
    if pd.api.types.is_bool_dtype(values) or str(values.dtype) == "boolean":
        return "bool"
    if pd.api.types.is_datetime64_any_dtype(values):
        return "date"
    if pd.api.types.is_numeric_dtype(values):
        return "number"
    return "text"


def normalize_attributes(items: pd.DataFrame, path: str, kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """Each attribute column in its kind's dtype; `kinds` {column: kind}: the catalog's, which a column
    of the same name must keep (an all-empty column takes it). Raises DataValidationError naming the column."""
    items = items.copy()
    for column in attribute_columns(items):
        if column in RESERVED:
            raise DataValidationError(path, column, f"'{column}' is derived by odmt (items added by add-items); "
                                      "rename the column")
        items[column] = _normalized(items[column], path, column, (kinds or {}).get(column))
    return items


def _normalized(values: pd.Series, path: str, column: str, want: str | None) -> pd.Series:
    present = values.notna() & (values.astype(str).str.strip() != "") if values.dtype == object else values.notna()
    if not present.any() and want:
        return _empty(len(values), want, values.index)
    kind = want or _inferred_kind(values[present], column)
    if kind == "text":
        out = pd.Series(None, index=values.index, dtype=object)
        out[present] = values[present].map(_text)
        return out
    if kind == "date":
        given = values[present]
        if pd.api.types.is_datetime64_any_dtype(given):
            ms = (pd.to_datetime(given, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
        else:
            ms = parse_timestamps(given.reset_index(drop=True), f"{path}, attribute '{column}'")
        ns = np.full(len(values), np.iinfo(np.int64).min, dtype=np.int64)  # int64 min is NaT
        ns[present.to_numpy()] = np.asarray(ms, dtype=np.int64) * 1_000_000  # integers: no float rounding in ns
        return pd.Series(pd.to_datetime(ns, unit="ns", utc=True), index=values.index)
    if kind == "number":
        numbers = pd.to_numeric(values.where(present), errors="coerce")
        bad = present & numbers.isna()
        if bad.any() or pd.api.types.is_bool_dtype(values):
            raise DataValidationError(path, column, f"is a number attribute of the catalog; {int(bad.sum())} values are "
                                      "not numbers", values[bad].to_frame())
        return numbers.astype("float64")
    flags = values.where(present).map(_boolean)
    bad = present & flags.isna()
    if bad.any():
        raise DataValidationError(path, column, f"is a true/false attribute of the catalog; {int(bad.sum())} values "
                                  "are not true or false", values[bad].to_frame())
    return flags.astype("boolean")


def _inferred_kind(values: pd.Series, column: str) -> str:
    if column == SINCE or pd.api.types.is_datetime64_any_dtype(values):
        return "date"
    if pd.api.types.is_bool_dtype(values) or values.map(_boolean).notna().all():
        return "bool"
    if pd.api.types.is_numeric_dtype(values):
        return "number"
    return "text"


def _boolean(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    text = str(v).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _text(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))  # a number read into a text attribute: 7.0 was written 7
    return str(v)


def _empty(n: int, kind: str, index) -> pd.Series:
    dtype = {"bool": "boolean", "number": "float64", "date": "datetime64[ns, UTC]", "text": object}[kind]
    return pd.Series(pd.array([None] * n, dtype=dtype) if kind == "bool" else None, index=index, dtype=dtype)


def attribute_kinds(items: pd.DataFrame) -> dict[str, str]:
    """{attribute: kind} of a normalized catalog."""
    return {c: attribute_kind(items[c]) for c in attribute_columns(items)}


def served_attributes(data_dir: str | Path, added: pd.DataFrame | None, n_rows: int) -> pd.DataFrame:
    """The attributes of every served index row (index 0..n_rows-1; the reserved rows all null): the prepared
    catalog's (items.parquet), then the added items' (`added`: a RUN's added_items.parquet, or None), and
    NEW_ARRIVAL. The executor ships this frame; filters are evaluated on it."""
    from odmt_t4r.contract import PreparedDir

    catalog = PreparedDir(data_dir).items()
    parts = [catalog] + ([added] if added is not None and len(added) else [])
    kinds: dict[str, str] = {}
    for part in parts:
        for column, kind in attribute_kinds(part).items():
            kinds.setdefault(column, kind)  # the prepared catalog's kind first (add-items checked the rest)
    table = pd.concat([normalize_attributes(p[["item_idx", *attribute_columns(p)]], "served attributes", kinds)
                       for p in parts], ignore_index=True)
    frame = normalize_attributes(table.set_index("item_idx").reindex(range(n_rows)), "served attributes", kinds)
    new = pd.Series(pd.NA, index=frame.index, dtype="boolean")
    new[catalog["item_idx"].to_numpy()] = False
    if len(parts) > 1:
        new[added["item_idx"].to_numpy()] = True
    frame[NEW_ARRIVAL] = new
    return frame[[c for c in frame.columns if c != "item_id"]]


def run_attributes(run: str | Path, data_dir: str | Path | None = None) -> pd.DataFrame:
    """`served_attributes` of a RUN: its prepared DIR's catalog and the items add-items added to it."""
    from odmt_t4r.contract import ADDED_ITEMS, run_data_dir, run_item_ids

    data_dir = run_data_dir(run, data_dir)
    path = Path(run) / ADDED_ITEMS
    added = pd.read_parquet(path) if path.is_file() else None
    return served_attributes(data_dir, added, len(run_item_ids(run, data_dir)))
