"""The `fashion` source: deterministic, valid, and each modality carries the signal the generator put in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from odmt_t4r.data.base import RawData
from odmt_t4r.data.fashion import (BRANDS, CATEGORIES, MATERIALS, OUTFIT_NEXT, SHADES, STYLES,
                                   FashionConfig, category_transitions,
                                   generate_fashion)
from odmt_t4r.data.sources import load_source

pytestmark = pytest.mark.skipif(not Path(FashionConfig.fashion_mnist_dir).is_dir(),
                                reason="Debian package dataset-fashion-mnist not installed")
SMALL = dict(n_items=200, n_users=300)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> RawData:
    return generate_fashion(FashionConfig(**SMALL), tmp_path_factory.mktemp("fashion") / "raw_images").validate()


def _parse(text: str) -> tuple[str, str, str, str, str]:
    """(brand, category, style, shade, material) from "Brand category in shade material, style style. Filler."."""
    brand, rest = text.split(" ", 1)
    category, rest = rest.split(" in ", 1)
    colour, rest = rest.split(", ", 1)
    shade, material = colour.split(" ")
    return brand, category, rest.split(" style.")[0], shade, material


def _consecutive_pairs(raw: RawData) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into raw.items of (previous, next) for each consecutive click of each session."""
    pos = pd.Series(np.arange(len(raw.items)), index=raw.items["item_id"])
    it = raw.interactions.assign(row=pos[raw.interactions["item_id"]].to_numpy())
    prev = it.groupby("user_id", sort=False)["row"].shift()  # rows are in time order within each session
    ok = prev.notna().to_numpy()
    return prev[ok].astype(int).to_numpy(), it["row"].to_numpy()[ok]


def test_deterministic_same_frames_and_png_bytes(tmp_path):
    a = generate_fashion(FashionConfig(**SMALL), tmp_path / "a" / "raw_images")
    b = generate_fashion(FashionConfig(**SMALL), tmp_path / "b" / "raw_images")
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items.drop(columns="image"), b.items.drop(columns="image"))
    for pa, pb in zip(a.items["image"], b.items["image"]):
        assert pa != pb and Path(pa).read_bytes() == Path(pb).read_bytes()


def test_seed_changes_data(tmp_path, raw):
    other = generate_fashion(FashionConfig(seed=1, **SMALL), tmp_path / "raw_images")
    assert not other.interactions.equals(raw.interactions)
    assert (other.items["text"] != raw.items["text"]).mean() > 0.5
    same_png = [Path(p).read_bytes() == Path(q).read_bytes() for p, q in zip(other.items["image"], raw.items["image"])]
    assert np.mean(same_png) < 0.1


def test_validates_with_unique_ids_and_sane_sizes(raw):
    assert raw.name == "fashion" and raw.modalities == ["id", "text", "image"]
    assert raw.items["item_id"].is_unique and len(raw.items) == SMALL["n_items"]
    assert raw.items["item_id"].str.fullmatch(r"F\d{5}").all()
    assert raw.interactions["user_id"].nunique() == SMALL["n_users"]
    assert raw.interactions["timestamp"].dtype == np.int64
    assert (raw.interactions.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()
    lengths = raw.interactions.groupby("user_id").size()
    assert lengths.min() >= 2 and 10 <= lengths.mean() <= 20


def test_images_are_28x28_pngs(raw):
    for p in raw.items["image"]:
        assert Path(p).is_absolute() and p.endswith(".png")
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (28, 28)


def test_text_names_category_and_attributes(raw):
    parsed = [_parse(t) for t in raw.items["text"]]
    assert all(b in BRANDS and c in CATEGORIES and s in STYLES and sh in SHADES and m in MATERIALS
               for b, c, s, sh, m in parsed)
    assert len({p[1] for p in parsed}) == 10


def test_popularity_is_skewed(raw):
    counts = raw.interactions["item_id"].value_counts().reindex(raw.items["item_id"], fill_value=0).sort_values()[::-1]
    top_share = counts.iloc[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.2  # vs 0.1 without skew (about 0.3 here, about 0.5 at the default size)
    assert counts.iloc[len(counts) // 2:].sum() / counts.sum() < 0.35  # the rarer half: a long tail (0.5 if flat)


def test_category_transitions_follow_the_outfit_matrix(raw):
    prev, nxt = _consecutive_pairs(raw)
    cat = np.array([CATEGORIES.index(_parse(t)[1]) for t in raw.items["text"]])
    outfit = np.array([cat[n] in OUTFIT_NEXT[cat[p]] for p, n in zip(prev, nxt)])
    shuffled = np.random.default_rng(0).permutation(nxt)
    chance = np.mean([cat[n] in OUTFIT_NEXT[cat[p]] for p, n in zip(prev, shuffled)])
    assert outfit.mean() > 1.3 * chance
    assert np.allclose(category_transitions().sum(axis=1), 1.0)


def test_visual_similarity_beyond_category(raw):
    """Within the same category (so the category signal is factored out), consecutive photos are closer."""
    px = np.stack([np.asarray(Image.open(p), dtype=float).ravel() for p in raw.items["image"]])
    px -= px.mean(axis=0)
    px /= np.linalg.norm(px, axis=1, keepdims=True)
    cat = np.array([CATEGORIES.index(_parse(t)[1]) for t in raw.items["text"]])
    prev, nxt = _consecutive_pairs(raw)
    same = (cat[prev] == cat[nxt]) & (prev != nxt)
    consecutive = np.einsum("ij,ij->i", px[prev[same]], px[nxt[same]]).mean()
    rng = np.random.default_rng(0)
    a = rng.integers(len(px), size=20000)
    b = np.array([rng.choice(np.flatnonzero(cat == cat[i])) for i in a])
    a, b = a[a != b], b[a != b]
    random_same_cat = np.einsum("ij,ij->i", px[a], px[b]).mean()
    assert consecutive > random_same_cat + 0.05
    all_pairs = np.einsum("ij,ij->i", px[prev], px[nxt]).mean()
    assert all_pairs > np.einsum("ij,ij->i", px[rng.permutation(prev)], px[nxt]).mean() + 0.05


def test_text_similarity_signal(raw):
    """Consecutive items share more text attributes (brand, style, shade, material) than random pairs."""
    attrs = np.array([[p[0], p[2], p[3], p[4]] for p in map(_parse, raw.items["text"])])
    prev, nxt = _consecutive_pairs(raw)
    shuffled = np.random.default_rng(0).permutation(nxt)
    consecutive, chance = (attrs[prev] == attrs[nxt]).sum(1).mean(), (attrs[prev] == attrs[shuffled]).sum(1).mean()
    assert consecutive > 1.25 * chance


def test_missing_folder_error(tmp_path):
    cfg = FashionConfig(fashion_mnist_dir=str(tmp_path / "nope"), **SMALL)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist.*--fashion-mnist-dir"):
        generate_fashion(cfg, tmp_path / "raw_images")


def test_load_source_fashion(tmp_path):
    raw = load_source("fashion", n_items=100, seed=3, workdir=str(tmp_path))
    assert len(raw.items) == 100 and Path(raw.items["image"][0]).parent == (tmp_path / "raw_images").resolve()
    assert raw.interactions["item_id"].isin(raw.items["item_id"]).all()
