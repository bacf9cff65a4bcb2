"""Frozen modality features: per-item text and image tokens, extracted once, cached by content, memory-mapped.

    from odmt_t4r.features import FeatureConfig, build_item_features, load_item_features
    manifest = build_item_features(items, n_index, "prepared/features", FeatureConfig(image_size=224))
    feats = load_item_features("prepared/features")  # feats.text [n_index T 384], feats.image [n_index P 1280]
"""

from .build import ImageDecodeWarning, build_item_features, feature_hashes
from .cache import FeatureCache, default_cache_dir
from .config import MODALITIES, RESERVED_ROWS, FeatureConfig
from .encoders import (
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    ImageEncoder,
    TextEncoder,
    make_image_encoder,
    make_text_encoder,
    register_image_encoder,
    register_text_encoder,
)
from .image import EfficientNetLiteImageEncoder, load_rgb
from .store import ItemFeatures, load_item_features
from .text import MiniLMTextEncoder

__all__ = [
    "FeatureConfig", "build_item_features", "load_item_features", "feature_hashes", "ItemFeatures",
    "TextEncoder", "ImageEncoder", "MiniLMTextEncoder", "EfficientNetLiteImageEncoder",
    "TEXT_ENCODERS", "IMAGE_ENCODERS", "register_text_encoder", "register_image_encoder",
    "make_text_encoder", "make_image_encoder", "FeatureCache", "default_cache_dir", "load_rgb",
    "ImageDecodeWarning", "MODALITIES", "RESERVED_ROWS",
]
