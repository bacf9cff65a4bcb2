"""`odmt prepare` end to end on a small fashion store and on ml-100k."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from odmt_t4r.cli import main
from odmt_t4r.prepare import read_split


@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "fashion"
    rc = main(["prepare", "--source", "fashion", "--n-items", "120", "--out", str(out), "--image-size", "64"])
    assert rc == 0
    return out


def test_prepare_writes_the_contract(small_fashion, capsys):
    d = small_fashion
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "odmt-prepared/1" and m["modalities"] == ["id", "text", "image"]
    assert m["n_index"] == 120 + 3
    for sub in ("train", "valid", "test", "workflows/sessions", "workflows/inference", "features"):
        assert (d / sub).is_dir(), sub
    assert not Path(str(d) + ".partial").exists()
    items = pd.read_parquet(d / "items.parquet")
    assert items.item_idx.tolist() == list(range(3, 123))
    assert not items.image.map(lambda p: Path(p).is_absolute()).any()  # DIR can move
    assert all((d / p).is_file() for p in items.image)
    test = read_split(d / "test")
    assert len(test) == m["counts"]["users_evaluated"]
    assert test["item_id-list"].map(len).max() <= m["max_length"] + 1
    # the target (last item) never appears in the exclusion list's tail position by construction
    assert all(list(s) == list(h) for s, h in zip(test["seen-list"].map(lambda x: x[-m["max_length"]:]),
                                               test["item_id-list"].map(lambda x: x[:-1])))
    text = np.load(d / "features" / "text.npy", mmap_mode="r")
    image = np.load(d / "features" / "image.npy", mmap_mode="r")
    assert text.shape[0] == image.shape[0] == 123 and text.dtype == np.float16
    assert not text[:3].any() and text[3:].any()
    assert set(m["files"]) >= {"items.parquet", "features/text.npy"}


def test_second_prepare_uses_the_feature_cache(small_fashion, tmp_path):
    out = tmp_path / "again"
    assert main(["prepare", "--source", "fashion", "--n-items", "120", "--out", str(out), "--image-size", "64"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert {v["cache"] for v in m["features"]["modalities"].values()} == {"hit"}
    a = np.load(small_fashion / "features" / "image.npy")
    b = np.load(out / "features" / "image.npy")
    assert np.array_equal(a, b)


def test_prepare_ml100k_counts(tmp_path, capsys):
    assert main(["prepare", "--source", "ml-100k", "--out", str(tmp_path / "ml"), "--no-features"]) == 0
    out = capsys.readouterr().out
    assert "943 users, 1,682 items, 100,000 interactions" in out
    assert len(read_split(tmp_path / "ml" / "test")) == 943


def test_failed_prepare_keeps_the_previous_output(small_fashion, tmp_path, capsys):
    inter = tmp_path / "i.csv"
    pd.DataFrame({"user_id": [1], "item_id": ["x"], "timestamp": ["not a time"]}).to_csv(inter, index=False)
    items = tmp_path / "t.csv"
    pd.DataFrame({"item_id": ["x"]}).to_csv(items, index=False)
    before = (small_fashion / "manifest.json").read_text()
    rc = main(["prepare", "--source", "csv", "--interactions", str(inter), "--items", str(items), "--out", str(small_fashion)])
    assert rc == 2
    assert "unparsable timestamps" in capsys.readouterr().err
    assert (small_fashion / "manifest.json").read_text() == before
    assert not Path(str(small_fashion) + ".partial").exists()
