"""Frozen modality features: layout, masks, fallbacks, content-hash caching and pluggable encoders."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from odmt_t4r.features import (
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    EfficientNetLiteImageEncoder,
    FeatureConfig,
    ImageDecodeWarning,
    ImageEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    build_item_features,
    feature_hashes,
    load_item_features,
    register_image_encoder,
)

N_INDEX = 9  # items 3..7 plus an unused row 8
CONFIG = FeatureConfig(max_text_tokens=8, image_size=64, batch_size=2, progress=False)
SHORT_TEXT = "a red cotton shirt"  # [CLS] a red cotton shirt [SEP] = 6 of 8 tokens
LONG_TEXT = "a very long description of a pair of warm woollen winter socks for hiking in the mountains"


def write_catalog(folder: Path) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), mode="RGB").save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really an image")
    return pd.DataFrame({
        "item_idx": [3, 4, 5, 6, 7],
        "text": [SHORT_TEXT, LONG_TEXT, None, "blue jeans", "wool socks"],
        "image": [str(folder / "grey.png"), str(folder / "rgb.png"), str(folder / "rgba.png"), None,
                  str(folder / "broken.png")],
    })


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (MiniLM + EfficientNet-Lite0) shared by the read-only tests."""
    root = tmp_path_factory.mktemp("features")
    items = write_catalog(root / "images")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = build_item_features(items, N_INDEX, root / "out", CONFIG, cache_dir=root / "cache")
    return SimpleNamespace(root=root, items=items, manifest=manifest, warnings=caught,
                           features=load_item_features(root / "out"))


def test_arrays_have_the_documented_shapes_and_dtypes(built):
    f = built.features
    assert f.text.shape == (N_INDEX, 8, 384) and f.text.dtype == np.float16
    assert f.text_mask.shape == (N_INDEX, 8) and f.text_mask.dtype == bool
    assert f.image.shape == (N_INDEX, 2 * 2 + 1, 1280) and f.image.dtype == np.float16  # 64px -> 2x2 map + CLS
    assert f.image_mask.shape == (N_INDEX,) and f.image_mask.dtype == bool
    assert isinstance(f.text, np.memmap)  # large catalogs stay on disk
    assert not isinstance(load_item_features(built.root / "out", mmap=False).text, np.memmap)
    m = built.manifest
    assert m["modalities"]["text"]["encoder"]["name"] == "all-MiniLM-L6-v2"
    assert m["modalities"]["image"]["encoder"]["name"] == "efficientnet-lite0"
    assert m["modalities"]["image"]["files"]["image.npy"] == {"shape": [N_INDEX, 5, 1280], "dtype": "float16"}


def test_reserved_rows_and_items_without_a_modality_are_zero_and_masked(built):
    f = built.features
    for row in (0, 1, 2, 8):
        assert not f.text[row].any() and not f.text_mask[row].any()
        assert not f.image[row].any() and not f.image_mask[row]
    assert not f.text[5].any() and not f.text_mask[5].any()  # item 5 has no text
    assert not f.image[6].any() and not f.image_mask[6]  # item 6 has no image


def test_text_mask_marks_real_tokens_and_padding_is_zero(built):
    f = built.features
    short = np.asarray(f.text_mask[3])
    assert short.tolist() == [True] * 6 + [False] * 2  # CLS, 4 words, SEP, then padding
    assert not f.text[3, ~short].any() and np.abs(f.text[3, short]).sum(-1).min() > 0
    assert f.text_mask[4].all()  # truncated to max_text_tokens


def test_grey_and_rgba_images_are_encoded_with_the_pooled_vector_as_cls(built):
    f = built.features
    assert f.image_mask[[3, 4, 5]].all()
    for row in (3, 4, 5):
        tokens = np.asarray(f.image[row], dtype=np.float32)
        assert np.abs(tokens).sum() > 0
        np.testing.assert_allclose(tokens[0], tokens[1:].mean(0), atol=1e-2)


def test_an_unreadable_image_is_a_zero_row_that_is_counted_and_warned(built):
    f = built.features
    assert not f.image[7].any() and not f.image_mask[7]
    assert f.text_mask[7].any()  # the item keeps its other modality
    assert built.manifest["fallbacks"]["image_unreadable"] == 1
    listed = built.manifest["modalities"]["image"]["fallbacks"]["items"]
    assert [x["item_idx"] for x in listed] == [7] and "broken.png" in listed[0]["path"]
    assert any(issubclass(w.category, ImageDecodeWarning) and "1 of 4" in str(w.message) for w in built.warnings)


def test_a_cache_hit_runs_no_encoder_and_returns_identical_arrays(built, monkeypatch):
    def refuse(self, batch):
        raise AssertionError("encoder ran on a cache hit")

    monkeypatch.setattr(MiniLMTextEncoder, "encode", refuse)
    monkeypatch.setattr(EfficientNetLiteImageEncoder, "encode", refuse)
    with pytest.warns(ImageDecodeWarning):  # the fallback is reported again, never silently cached away
        again = build_item_features(built.items, N_INDEX, built.root / "out_again", CONFIG,
                                    cache_dir=built.root / "cache")
    assert again["content_hash"] == built.manifest["content_hash"]
    assert {m["cache"] for m in again["modalities"].values()} == {"hit"}
    assert again["fallbacks"] == built.manifest["fallbacks"]
    second = load_item_features(built.root / "out_again")
    for name in ("text", "text_mask", "image", "image_mask"):
        np.testing.assert_array_equal(getattr(second, name), getattr(built.features, name))


def test_nothing_half_written_is_left_behind(built):
    leftovers = [p for p in [*built.root.joinpath("out").iterdir(), *built.root.joinpath("cache").rglob("*")]
                 if p.name.startswith(".")]
    assert leftovers == []


def test_one_changed_text_or_image_byte_changes_only_that_hash(built, tmp_path):
    base = feature_hashes(built.items, N_INDEX, CONFIG)
    assert base["content_hash"] == built.manifest["content_hash"]

    new_text = built.items.copy()
    new_text.loc[0, "text"] = SHORT_TEXT + "!"
    changed = feature_hashes(new_text, N_INDEX, CONFIG)
    assert changed["text"] != base["text"] and changed["image"] == base["image"]
    assert changed["content_hash"] != base["content_hash"]

    grey = np.array(Image.open(built.items.loc[0, "image"]))
    grey[0, 0] ^= 1
    Image.fromarray(grey).save(tmp_path / "grey.png")
    new_image = built.items.copy()
    new_image.loc[0, "image"] = str(tmp_path / "grey.png")
    changed = feature_hashes(new_image, N_INDEX, CONFIG)
    assert changed["image"] != base["image"] and changed["text"] == base["text"]

    shutil.copyfile(built.items.loc[0, "image"], tmp_path / "moved.png")  # same bytes, new place
    moved = built.items.copy()
    moved.loc[0, "image"] = str(tmp_path / "moved.png")
    assert feature_hashes(moved, N_INDEX, CONFIG)["image"] == base["image"]

    assert feature_hashes(built.items, N_INDEX, FeatureConfig(max_text_tokens=9, image_size=64))["text"] != base["text"]
    assert feature_hashes(built.items, N_INDEX + 1, CONFIG)["content_hash"] != base["content_hash"]


def test_extraction_is_deterministic(built, tmp_path):
    items = built.items.iloc[:2]
    build_item_features(items, N_INDEX, tmp_path / "out", CONFIG, cache_dir=tmp_path / "fresh_cache")
    fresh = load_item_features(tmp_path / "out")
    np.testing.assert_array_equal(fresh.text[3:5], built.features.text[3:5])
    np.testing.assert_array_equal(fresh.image[3:5], built.features.image[3:5])


class ToyText:
    """Token j of a text = len(text) + j; two real tokens."""

    name, version, dim = "toy-text", "1", 4

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        tokens = np.array([[[len(t) + j] * self.dim for j in range(3)] for t in texts], dtype=np.float32)
        return tokens, np.array([[True, True, False]] * len(texts))


class ToyImage:
    """One CLS token = mean red value; the pipeline hands it decoded RGB images."""

    name, version, dim = "toy-image", "1", 2

    def encode(self, images):
        means = [np.asarray(im, dtype=np.float32)[..., 0].mean() / 255 for im in images]
        return np.array([[[m, 1.0]] for m in means], dtype=np.float32), np.ones((len(images), 1), dtype=bool)


def test_a_custom_encoder_plugs_in_through_the_registry(tmp_path, monkeypatch):
    items = write_catalog(tmp_path / "images")
    toy = ToyText()
    assert isinstance(toy, TextEncoder) and isinstance(ToyImage(), ImageEncoder)
    monkeypatch.setitem(TEXT_ENCODERS, "toy-text", lambda cfg: toy)
    monkeypatch.setitem(IMAGE_ENCODERS, "toy-image", None)  # so the name is removed again after the test
    register_image_encoder("toy-image", lambda cfg: ToyImage())
    config = FeatureConfig(text_encoder="toy-text", image_encoder="toy-image", batch_size=3, progress=False)
    with pytest.warns(ImageDecodeWarning):
        manifest = build_item_features(items, N_INDEX, tmp_path / "out", config, cache_dir=tmp_path / "cache")
    f = load_item_features(tmp_path / "out")
    assert manifest["modalities"]["text"]["encoder"]["name"] == "toy-text"
    assert f.text.shape == (N_INDEX, 3, 4) and f.image.shape == (N_INDEX, 1, 2)
    assert f.text[3, :, 0].tolist() == [len(SHORT_TEXT), len(SHORT_TEXT) + 1, 0]  # masked token zeroed
    assert f.text_mask[3].tolist() == [True, True, False]
    assert f.image[4, 0, 1] == 1.0 and f.image_mask.tolist() == [False] * 3 + [True] * 3 + [False] * 3
    assert toy.calls == 2  # 4 texts in batches of 3

    # an instance passed directly wins over the registry name
    direct = ToyText()
    build_item_features(items, N_INDEX, tmp_path / "direct", FeatureConfig(modalities=("text",), progress=False),
                        cache_dir=tmp_path / "cache2", text_encoder=direct)
    assert direct.calls == 1 and load_item_features(tmp_path / "direct").text.shape == (N_INDEX, 3, 4)


def test_a_missing_modality_is_skipped_and_stale_arrays_are_removed(tmp_path, monkeypatch):
    items = write_catalog(tmp_path / "images")
    monkeypatch.setitem(TEXT_ENCODERS, "toy-text", lambda cfg: ToyText())
    monkeypatch.setitem(IMAGE_ENCODERS, "toy-image", lambda cfg: ToyImage())
    config = FeatureConfig(text_encoder="toy-text", image_encoder="toy-image", progress=False)
    with pytest.warns(ImageDecodeWarning):
        build_item_features(items, N_INDEX, tmp_path / "out", config, cache_dir=tmp_path / "cache")
    manifest = build_item_features(items.drop(columns="image"), N_INDEX, tmp_path / "out", config,
                                   cache_dir=tmp_path / "cache")
    assert manifest["modalities"]["image"] == {"built": False, "reason": "no item has image"}
    assert not (tmp_path / "out" / "image.npy").exists()
    f = load_item_features(tmp_path / "out")
    assert f.modalities == ["text"] and f.image is None and f.image_mask is None


@pytest.mark.parametrize("idx, n_index, problem", [
    ([2, 3], 5, "item_idx < 3"), ([3, 5], 5, "item_idx >= n_index"), ([3, 3], 5, "duplicate"),
])
def test_the_item_index_contract_is_checked(tmp_path, idx, n_index, problem):
    items = pd.DataFrame({"item_idx": idx, "text": ["a", "b"]})
    with pytest.raises(ValueError, match=problem):
        build_item_features(items, n_index, tmp_path, FeatureConfig(progress=False), cache_dir=tmp_path / "c")


def test_folding_batch_norms_into_convs_keeps_the_image_features():
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from odmt_t4r.features.image import fold_batch_norms, lite0_weights

    model = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    model.load_state_dict(torch.load(lite0_weights(), map_location="cpu"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model.eval().extract_features(x)
        folded = fold_batch_norms(model).extract_features(x)
    torch.testing.assert_close(folded, reference, atol=1e-3, rtol=1e-3)
