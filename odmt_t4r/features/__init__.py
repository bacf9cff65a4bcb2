"""Frozen modality features: per-item text and image tokens, extracted once, cached by content, memory-mapped.

    from odmt_t4r.features import FeatureConfig, build_item_features, load_item_features
    manifest = build_item_features(items, n_index, "prepared/features", FeatureConfig(image_size=224))
    feats = load_item_features("prepared/features")  # feats.text [n_index T 384], feats.image [n_index P 1280]
"""

import importlib

# name -> submodule; loaded on first use, so that the light readers (features.store, features.config) do
# not pull in the encoders (about 2 s of imports) for a model that only reads built features
_LAZY = {
    "ImageDecodeWarning": "build", "build_item_features": "build", "feature_hashes": "build",
    "FeatureCache": "cache", "default_cache_dir": "cache",
    "MODALITIES": "config", "RESERVED_ROWS": "config", "FeatureConfig": "config",
    "IMAGE_ENCODERS": "encoders", "TEXT_ENCODERS": "encoders", "ImageEncoder": "encoders", "TextEncoder": "encoders",
    "make_image_encoder": "encoders", "make_text_encoder": "encoders", "register_image_encoder": "encoders",
    "register_text_encoder": "encoders",
    "EfficientNetLiteImageEncoder": "image", "load_rgb": "image",
    "ItemFeatures": "store", "load_item_features": "store",
    "MiniLMTextEncoder": "text",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "FeatureConfig", "build_item_features", "load_item_features", "feature_hashes", "ItemFeatures",
    "TextEncoder", "ImageEncoder", "MiniLMTextEncoder", "EfficientNetLiteImageEncoder",
    "TEXT_ENCODERS", "IMAGE_ENCODERS", "register_text_encoder", "register_image_encoder",
    "make_text_encoder", "make_image_encoder", "FeatureCache", "default_cache_dir", "load_rgb",
    "ImageDecodeWarning", "MODALITIES", "RESERVED_ROWS",
]
