"""The raw-data contract every source returns, and its validation.

Interactions: `user_id`, `item_id`, `timestamp` (int64 epoch milliseconds, so millisecond inputs keep
their order), in input-file row order (the evaluation tie rule keeps that order for equal timestamps).
Items: `item_id` plus optional `text` and `image` (a path to an image file). IDs are strings, exactly
as written (see `as_id_strings`), so requests and answers speak the user's raw IDs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ID_COLUMNS = ("user_id", "session_id", "item_id")
TIMESTAMP_FLAG = "--timestamp-format"
EPOCH_UNITS = {"epoch-s": 1000, "epoch-ms": 1}  # --timestamp-format values for numbers: milliseconds per unit
_MS_FROM = 1e11  # epoch seconds reach this in year 5138, epoch milliseconds in 1973: the unit is unambiguous
_MS_UNTIL = 1e14  # year 5138 in milliseconds; larger numbers are micro- or nanoseconds
_NUMBER = r"[+-]?\d+(?:\.\d*)?"
_ISO_8601 = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?: ?(?:Z|[+-]\d{2}(?::?\d{2})?))?"
_DAY_MONTH = r"\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}(?:[T ,].*)?"
ACCEPTED_TIMESTAMPS = (f"accepted: epoch seconds or milliseconds, ISO 8601 (2024-03-04 or 2024-03-04T10:15:00Z), "
                       f"or the format given with {TIMESTAMP_FLAG} (strftime, e.g. '%d/%m/%Y %H:%M', or epoch-s / epoch-ms)")
MODALITIES = ("text", "image")
_SAMPLE_ROWS = 5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


class DataValidationError(ValueError):
    """Bad user input: the message names the file, the column and a sample of offending rows."""

    def __init__(self, source: str, column: str | None, problem: str, sample: pd.DataFrame | None = None):
        where = f"{source}" + (f", column '{column}'" if column else "")
        msg = f"{where}: {problem}"
        if sample is not None and len(sample):
            msg += f"\n  sample of offending rows (of {len(sample)}):\n" + _indent(sample.head(_SAMPLE_ROWS).to_string())
        super().__init__(msg)
        self.source, self.column, self.problem = source, column, problem


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@dataclass
class RawData:
    """What a source hands to `odmt prepare`: validated interactions and item catalog."""

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    interactions_path: str = "<interactions>"
    items_path: str = "<items>"
    notes: dict = field(default_factory=dict)  # counted fallbacks and other facts for the manifest

    @property
    def modalities(self) -> list[str]:
        """The branches this data supports: always `id`, plus each content column present."""
        return ["id"] + [m for m in MODALITIES if m in self.items.columns and self.items[m].notna().any()]

    def validate(self, check_images: bool = True, timestamp_format: str | None = None) -> "RawData":
        """Normalises dtypes and raises DataValidationError on anything a later stage would trip on."""
        self.interactions = validate_interactions(self.interactions, self.interactions_path, timestamp_format)
        self.items = validate_items(self.items, self.items_path, check_images=check_images, notes=self.notes)
        unknown = ~self.interactions["item_id"].isin(self.items["item_id"])
        if unknown.any():
            raise DataValidationError(
                self.interactions_path, "item_id",
                f"{int(unknown.sum())} interactions refer to items missing from the catalog {self.items_path}",
                self.interactions[unknown],
            )
        return self

    def check_history_lengths(self, min_interactions: int) -> None:
        """Leave-one-out needs users with `min_interactions` or more; users below it are left out,
        but when that is every user nothing is left to train or evaluate on."""
        counts = self.interactions["user_id"].value_counts(sort=False)
        if (counts >= min_interactions).any():
            return
        raise DataValidationError(
            self.interactions_path, "user_id",
            f"every user has fewer than {min_interactions} interactions (the longest has {int(counts.max())}); "
            "leave-one-out needs one to train on, a validation target and a test target",
            counts.rename("interactions").rename_axis("user_id").reset_index(),
        )


def validate_interactions(df: pd.DataFrame, path: str, timestamp_format: str | None = None) -> pd.DataFrame:
    df = df.copy()
    if "user_id" not in df.columns and "session_id" in df.columns:
        df = df.rename(columns={"session_id": "user_id"})
    missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(path, missing[0], f"missing required column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise DataValidationError(path, None, "has no interaction rows (only a header?)")
    for col in ("user_id", "item_id"):
        df[col] = _checked_ids(df[col], path, col, "rows")
    df["timestamp"] = parse_timestamps(df["timestamp"], path, timestamp_format)
    return df[list(INTERACTION_COLUMNS)].reset_index(drop=True)


def parse_timestamps(ts: pd.Series, path: str, timestamp_format: str | None = None) -> pd.Series:
    """Returns int64 epoch milliseconds. Accepted, one format per column: numbers (epoch seconds, or
    milliseconds when every value is >= 1e11), ISO 8601 strings, datetime columns (naive = UTC), or an
    explicit `timestamp_format`: a strftime format, or epoch-s / epoch-ms. Strings such as 03/04/2024
    are refused without a format: their day/month order is ambiguous."""
    if pd.api.types.is_datetime64_any_dtype(ts):
        return _datetimes_to_ms(pd.to_datetime(ts, utc=True), ts, path, "missing timestamps")
    if timestamp_format in EPOCH_UNITS:
        return _epoch_ms(_as_strings(ts).str.strip(), ts, path, EPOCH_UNITS[timestamp_format])
    if timestamp_format:
        parsed = pd.to_datetime(_as_strings(ts).str.strip(), format=timestamp_format, errors="coerce", utc=True)
        return _datetimes_to_ms(parsed, ts, path, f"timestamps do not match {TIMESTAMP_FLAG} {timestamp_format!r}")
    if pd.api.types.is_numeric_dtype(ts) and not pd.api.types.is_bool_dtype(ts):
        return _epoch_ms(ts, ts, path)
    text = _as_strings(ts).str.strip()
    kinds = _timestamp_kinds(text)
    bad = kinds.isna()
    if bad.any():
        raise DataValidationError(path, "timestamp", f"{int(bad.sum())} unparsable timestamps; {ACCEPTED_TIMESTAMPS}", ts[bad].to_frame())
    counts = kinds.value_counts()
    if len(counts) > 1:  # the rows not in the column's main format are the offending ones
        found = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        raise DataValidationError(path, "timestamp", f"mixed timestamp formats in one column ({found}); give one format, "
                                  f"or name it with {TIMESTAMP_FLAG}; {ACCEPTED_TIMESTAMPS}", ts[kinds != counts.index[0]].to_frame())
    kind = counts.index[0]
    if kind == "day/month dates":
        raise DataValidationError(path, "timestamp", f"dates such as {text.iloc[0]!r} are not ISO 8601 and their day/month "
                                  f"order is ambiguous; give their format with {TIMESTAMP_FLAG}, e.g. '%d/%m/%Y' or '%m/%d/%Y'", ts.to_frame())
    if kind == "epoch numbers":
        return _epoch_ms(text, ts, path)
    # pandas 2 (the GPU route's) infers one format from the first value unless told the column is ISO 8601
    iso = {"format": "ISO8601"} if int(pd.__version__.split(".")[0]) >= 2 else {}
    return _datetimes_to_ms(pd.to_datetime(text, errors="coerce", utc=True, **iso), ts, path, "invalid ISO 8601 dates")


def _timestamp_kinds(text: pd.Series) -> pd.Series:
    """Each value's format; NaN where it has none of the accepted ones."""
    kinds = pd.Series(np.nan, index=text.index, dtype=object)
    for kind, pattern in (("day/month dates", _DAY_MONTH), ("ISO 8601 dates", _ISO_8601), ("epoch numbers", _NUMBER)):
        kinds[text.str.fullmatch(pattern).fillna(False).astype(bool)] = kind  # later patterns win: ISO over day/month
    return kinds


def _epoch_ms(values: pd.Series, ts: pd.Series, path: str, ms_per_unit: int | None = None) -> pd.Series:
    """Epoch numbers -> int64 milliseconds; the unit comes from `ms_per_unit` or else from the magnitude."""
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = ~np.isfinite(numbers) | (numbers.abs() >= _MS_UNTIL)
    if bad.any():
        raise DataValidationError(path, "timestamp", f"{int(bad.sum())} timestamps are not epoch seconds or milliseconds "
                                  f"(missing, not a number, or >= 1e14: micro- and nanoseconds are not accepted); "
                                  f"{ACCEPTED_TIMESTAMPS}", ts[bad].to_frame())
    if ms_per_unit is None:
        is_ms = numbers.abs() >= _MS_FROM
        if is_ms.any() and not is_ms.all():
            minority = is_ms if is_ms.sum() <= (~is_ms).sum() else ~is_ms
            raise DataValidationError(path, "timestamp", f"mixed epoch units in one column: {int(is_ms.sum())} values look like "
                                      f"milliseconds (>= 1e11) and {int((~is_ms).sum())} like seconds; name the unit with "
                                      f"{TIMESTAMP_FLAG} epoch-s or epoch-ms", ts[minority].to_frame())
        ms_per_unit = 1 if is_ms.all() else 1000
    return (numbers * ms_per_unit).round().astype("int64")


def _datetimes_to_ms(parsed: pd.Series, ts: pd.Series, path: str, problem: str) -> pd.Series:
    bad = parsed.isna()
    if bad.any():
        raise DataValidationError(path, "timestamp", f"{int(bad.sum())} {problem}; {ACCEPTED_TIMESTAMPS}", ts[bad].to_frame())
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).astype("int64")


def validate_items(df: pd.DataFrame, path: str, check_images: bool = True, notes: dict | None = None) -> pd.DataFrame:
    df = df.copy()
    if "item_id" not in df.columns:
        raise DataValidationError(path, "item_id", f"missing required column 'item_id'; found {list(df.columns)}")
    if df.empty:
        raise DataValidationError(path, None, "has no catalog rows (only a header?)")
    df["item_id"] = _checked_ids(df["item_id"], path, "item_id", "catalog rows")
    dup = df["item_id"].duplicated(keep=False)
    if dup.any():
        raise DataValidationError(path, "item_id", f"{int(df['item_id'].duplicated().sum())} duplicate catalog rows", df[dup])
    if "text" in df.columns:
        df["text"] = df["text"].astype("object").where(df["text"].notna(), None)
    if "image" in df.columns and check_images:
        df["image"] = _check_image_paths(df, path, notes if notes is not None else {})
    keep = ["item_id"] + [c for c in MODALITIES if c in df.columns]
    return df[keep + [c for c in df.columns if c not in keep]].reset_index(drop=True)


def _check_image_paths(df: pd.DataFrame, path: str, notes: dict) -> pd.Series:
    """Missing files are an error; files that exist but do not decode are counted and left for the
    image encoder's fallback (a zero feature), reported in the manifest, never silent."""
    from PIL import Image

    base = Path(path).parent if path and not path.startswith("<") else Path(".")
    paths = df["image"].astype("object")
    resolved = paths.map(lambda p: None if p is None or (isinstance(p, float) and pd.isna(p)) else str((base / str(p)).resolve()) if not Path(str(p)).is_absolute() else str(p))
    exists = resolved.map(lambda p: p is None or Path(p).is_file())
    if not exists.all():
        raise DataValidationError(path, "image", f"{int((~exists).sum())} image paths do not exist", df.loc[~exists, ["item_id", "image"]])
    not_image = resolved.map(lambda p: p is not None and Path(p).suffix.lower() not in IMAGE_SUFFIXES)
    if not_image.any():
        raise DataValidationError(path, "image", f"{int(not_image.sum())} image paths are not image files "
                                  f"(expected one of {sorted(IMAGE_SUFFIXES)})", df.loc[not_image, ["item_id", "image"]])
    unreadable = []
    for item, p in zip(df["item_id"], resolved):
        if p is None:
            continue
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception:
            unreadable.append(item)
    if unreadable and len(unreadable) == resolved.notna().sum():
        raise DataValidationError(path, "image", "no image path points to a readable image", df.loc[df["item_id"].isin(unreadable), ["item_id", "image"]])
    if unreadable:
        notes["unreadable_images"] = len(unreadable)
        notes["unreadable_image_sample"] = unreadable[:_SAMPLE_ROWS]
        print(f"warning: {path}: {len(unreadable)} images are not readable images; they get a zero image feature "
              f"(sample: {unreadable[:_SAMPLE_ROWS]})", file=sys.stderr)
    return resolved


def _checked_ids(ids: pd.Series, path: str, column: str, rows: str) -> pd.Series:
    """The column as ID strings; a missing or empty ID is refused (it could not be asked for)."""
    out = as_id_strings(ids)
    bad = ids.isna() | (out == "")
    if bad.any():
        raise DataValidationError(path, column, f"{int(bad.sum())} {rows} have an empty or null ID", ids[bad].to_frame())
    return out


def as_id_strings(ids: pd.Series) -> pd.Series:
    """IDs as strings, one way for every source. Strings (all CSV IDs) are kept exactly as written;
    integers are written in decimal ("007" survives only as a string); whole floats as integers
    (7.0 -> "7"), other floats in Python's shortest round-trip form (1.5 -> "1.5"); bytes as UTF-8."""
    if pd.api.types.infer_dtype(ids, skipna=True) == "string":
        return ids.astype(object)
    if pd.api.types.is_integer_dtype(ids) and not ids.isna().any():
        return ids.astype("int64" if pd.api.types.is_signed_integer_dtype(ids) else "uint64").astype(str).astype(object)
    return _as_strings(ids)


def _as_strings(s: pd.Series) -> pd.Series:
    return s.astype(object).map(_as_string)


def _as_string(v) -> str | None:
    if pd.api.types.is_scalar(v) and pd.isna(v):
        return None
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if float(v).is_integer() else repr(float(v))
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8")
    return str(v)


def note_empty_image_cells(items: pd.DataFrame, path, notes: dict) -> int:
    """Counts the catalog items with an empty image cell when others have an image: each gets a zero image
    feature, as an image that does not decode does. Recorded in `notes` (the manifest's, next to
    `unreadable_images`) and warned about on stderr in the same words; returns the count."""
    if "image" not in items.columns:
        return 0
    # features/build.py `_present`, without importing torch: a null or blank cell is no image
    has = items["image"].map(lambda v: not (v is None or (not isinstance(v, str) and pd.isna(v))) and bool(str(v).strip()))
    if not has.any() or has.all():
        return 0
    empty = items.loc[~has, "item_id"].astype(str).tolist()
    sample = empty[:5]
    notes["empty_image_cells"] = len(empty)
    notes["empty_image_cell_sample"] = sample
    print(f"warning: {path}: {len(empty)} of {len(items)} items have an empty image cell; they get a zero image "
          f"feature (sample: {sample})", file=sys.stderr)
    return len(empty)
