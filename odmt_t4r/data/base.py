"""The raw-data contract every source returns, and its validation.

Interactions: `user_id`, `item_id`, `timestamp` (int64 seconds), in input-file row order (the
evaluation tie rule keeps that order for equal timestamps). Items: `item_id` plus optional `text`
and `image` (a path to an image file). IDs are normalised to strings so that requests and answers
speak the user's raw IDs whatever their original type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
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

    def validate(self, check_images: bool = True) -> "RawData":
        """Normalises dtypes and raises DataValidationError on anything a later stage would trip on."""
        self.interactions = validate_interactions(self.interactions, self.interactions_path)
        self.items = validate_items(self.items, self.items_path, check_images=check_images, notes=self.notes)
        unknown = ~self.interactions["item_id"].isin(self.items["item_id"])
        if unknown.any():
            raise DataValidationError(
                self.interactions_path, "item_id",
                f"{int(unknown.sum())} interactions refer to items missing from the catalog {self.items_path}",
                self.interactions[unknown],
            )
        return self


def validate_interactions(df: pd.DataFrame, path: str) -> pd.DataFrame:
    df = df.copy()
    if "user_id" not in df.columns and "session_id" in df.columns:
        df = df.rename(columns={"session_id": "user_id"})
    missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(path, missing[0], f"missing required column(s) {missing}; found {list(df.columns)}")
    for col in ("user_id", "item_id"):
        bad = df[col].isna()
        if bad.any():
            raise DataValidationError(path, col, f"{int(bad.sum())} rows have a null ID", df[bad])
        df[col] = _as_id_strings(df[col])
    df["timestamp"] = parse_timestamps(df["timestamp"], path)
    return df[list(INTERACTION_COLUMNS)].reset_index(drop=True)


def parse_timestamps(ts: pd.Series, path: str) -> pd.Series:
    """Numbers are taken as epoch seconds; strings are parsed as dates. Returns int64 seconds."""
    if pd.api.types.is_numeric_dtype(ts):
        bad = ts.isna() | ~pd.Series(pd.notna(ts) & (ts.abs() < 1e13), index=ts.index)
        if bad.any():
            raise DataValidationError(path, "timestamp", f"{int(bad.sum())} unparsable timestamps", ts[bad].to_frame())
        return ts.astype("int64")
    parsed = pd.to_datetime(ts, errors="coerce", utc=True)
    bad = parsed.isna()
    if bad.any():
        raise DataValidationError(path, "timestamp", f"{int(bad.sum())} unparsable timestamps", ts[bad].to_frame())
    return (parsed.astype("int64") // 10**9).astype("int64")


def validate_items(df: pd.DataFrame, path: str, check_images: bool = True, notes: dict | None = None) -> pd.DataFrame:
    df = df.copy()
    if "item_id" not in df.columns:
        raise DataValidationError(path, "item_id", f"missing required column 'item_id'; found {list(df.columns)}")
    bad = df["item_id"].isna()
    if bad.any():
        raise DataValidationError(path, "item_id", f"{int(bad.sum())} catalog rows have a null ID", df[bad])
    df["item_id"] = _as_id_strings(df["item_id"])
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
              f"(sample: {unreadable[:_SAMPLE_ROWS]})")
    return resolved


def _as_id_strings(s: pd.Series) -> pd.Series:
    # Floats that are whole numbers (from a CSV column with nulls elsewhere) print without ".0".
    if pd.api.types.is_float_dtype(s) and (s.dropna() % 1 == 0).all():
        s = s.astype("int64")
    return s.astype(str)
