"""Data sources and the bad-input errors users see."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from odmt_t4r.data import DataValidationError, load_source


def test_ml100k_source_counts_and_text():
    raw = load_source("ml-100k")
    assert len(raw.interactions) == 100_000
    assert raw.interactions.user_id.nunique() == 943
    assert len(raw.items) == 1682
    assert raw.modalities == ["id", "text"]
    toy = raw.items.set_index("item_id").loc["1", "text"]
    assert toy == "Toy Story (1995). Genres: Animation, Children's, Comedy."


def _write(tmp_path, kind, inter, items):
    ip, tp = tmp_path / f"inter.{kind}", tmp_path / f"items.{kind}"
    for df, p in ((inter, ip), (items, tp)):
        df.to_csv(p, index=False) if kind == "csv" else df.to_parquet(p, index=False)
    return dict(interactions=str(ip), items=str(tp))


def _good(tmp_path, with_image=True):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    inter = pd.DataFrame({"user_id": [1, 1, 2], "item_id": ["a", "b", "a"], "timestamp": [10, 20, 5]})
    items = pd.DataFrame({"item_id": ["a", "b"], "text": ["red shoe", None]})
    if with_image:
        items["image"] = [str(img), None]
    return inter, items


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_user_files_load_and_normalise_ids(tmp_path, kind):
    inter, items = _good(tmp_path)
    raw = load_source(kind, **_write(tmp_path, kind, inter, items))
    assert raw.interactions.user_id.tolist() == ["1", "1", "2"]  # IDs speak strings, "1" not "1.0"
    assert raw.interactions.timestamp.dtype == np.int64
    assert raw.modalities == ["id", "text", "image"]


def test_session_id_column_is_accepted(tmp_path):
    inter, items = _good(tmp_path, with_image=False)
    raw = load_source("csv", **_write(tmp_path, "csv", inter.rename(columns={"user_id": "session_id"}), items))
    assert "user_id" in raw.interactions


def test_date_strings_are_parsed(tmp_path):
    inter, items = _good(tmp_path, with_image=False)
    inter["timestamp"] = ["2024-01-01 10:00", "2024-01-01 11:00", "2024-01-02"]
    raw = load_source("csv", **_write(tmp_path, "csv", inter, items))
    assert raw.interactions.timestamp.tolist()[0] == 1704103200_000  # epoch milliseconds


@pytest.mark.parametrize("case, column, phrase", [
    ("missing_column", "timestamp", "missing required column"),
    ("null_user", "user_id", "null ID"),
    ("null_item_in_catalog", "item_id", "null ID"),
    ("duplicate_catalog", "item_id", "duplicate catalog rows"),
    ("bad_timestamp", "timestamp", "unparsable timestamps"),
    ("unknown_item", "item_id", "missing from the catalog"),
    ("missing_image", "image", "do not exist"),
    ("not_an_image", "image", "not image files"),
])
def test_bad_input_names_file_column_and_rows(tmp_path, case, column, phrase):
    inter, items = _good(tmp_path)
    if case == "missing_column":
        inter = inter.drop(columns="timestamp")
    elif case == "null_user":
        inter.loc[1, "user_id"] = None
    elif case == "null_item_in_catalog":
        items.loc[1, "item_id"] = None
    elif case == "duplicate_catalog":
        items = pd.concat([items, items.iloc[[0]]])
    elif case == "bad_timestamp":
        inter["timestamp"] = ["2024-01-01", "yesterday", "2024-01-02"]
    elif case == "unknown_item":
        inter.loc[2, "item_id"] = "ghost"
    elif case == "missing_image":
        items.loc[0, "image"] = str(tmp_path / "nope.png")
    elif case == "not_an_image":
        (tmp_path / "notes.txt").write_text("hello")
        items.loc[0, "image"] = str(tmp_path / "notes.txt")
    paths = _write(tmp_path, "csv", inter, items)
    with pytest.raises(DataValidationError) as err:
        load_source("csv", **paths)
    msg = str(err.value)
    assert phrase in msg and f"column '{column}'" in msg
    assert ("inter.csv" in msg) or ("items.csv" in msg)  # names the file
    if case not in ("missing_column",):
        assert "sample of offending rows" in msg


def test_unreadable_image_is_counted_not_silent(tmp_path, capsys):
    inter, items = _good(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not really a png")
    items.loc[1, "image"] = str(broken)
    raw = load_source("csv", **_write(tmp_path, "csv", inter, items))
    assert raw.notes["unreadable_images"] == 1
    assert "b" in raw.notes["unreadable_image_sample"]
    assert "not readable" in capsys.readouterr().err  # a log line: stdout is for results


def test_relative_image_paths_resolve_against_the_catalog_file(tmp_path):
    inter, items = _good(tmp_path)
    items.loc[0, "image"] = "a.png"
    raw = load_source("csv", **_write(tmp_path, "csv", inter, items))
    assert raw.items.loc[0, "image"] == str((tmp_path / "a.png").resolve())


def test_unknown_source_and_missing_arguments():
    with pytest.raises(ValueError, match="unknown source"):
        load_source("movielens-1b")
    with pytest.raises(ValueError, match="--interactions"):
        load_source("csv")
