"""The frozen-encoder interface and the registry that maps a config name to an encoder.

To plug in other local weights (BERT, CLIP, ...) write a class with `name`, `version`, `dim` and
`encode(batch) -> (tokens [B P D], mask [B P])`, then `register_text_encoder("my-bert", factory)`
where `factory(config: FeatureConfig)` returns it, and set `FeatureConfig(text_encoder="my-bert")`.
An optional `fingerprint` string (e.g. a hash of the weight files and the encoder's own settings)
goes into the cache key, so new weights under the same name and version are never served stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .config import FeatureConfig


@runtime_checkable
class TextEncoder(Protocol):
    name: str
    version: str
    dim: int

    def encode(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """texts -> (tokens [B T D] float, mask [B T] bool, True = real token); position 0 is the CLS."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    name: str
    version: str
    dim: int

    def encode(self, images: Sequence[Any]) -> tuple[Any, Any]:
        """RGB PIL images -> (tokens [B P D] float, mask [B P] bool); position 0 is the pooled (CLS) vector."""
        ...


EncoderFactory = Callable[[FeatureConfig], Any]
TEXT_ENCODERS: dict[str, EncoderFactory] = {}
IMAGE_ENCODERS: dict[str, EncoderFactory] = {}


def register_text_encoder(name: str, factory: EncoderFactory) -> None:
    TEXT_ENCODERS[name] = factory


def register_image_encoder(name: str, factory: EncoderFactory) -> None:
    IMAGE_ENCODERS[name] = factory


def make_text_encoder(config: FeatureConfig) -> TextEncoder:
    return _make(TEXT_ENCODERS, config.text_encoder, "text", config)


def make_image_encoder(config: FeatureConfig) -> ImageEncoder:
    return _make(IMAGE_ENCODERS, config.image_encoder, "image", config)


def _make(registry: dict[str, EncoderFactory], name: str, kind: str, config: FeatureConfig):
    import importlib

    # the built-in encoders register themselves when their modules load (features/text.py, image.py)
    importlib.import_module(f"{__package__}.{kind}")
    if name not in registry:
        raise ValueError(f"no {kind} encoder named {name!r}; choose from {sorted(registry)} or register one")
    return registry[name](config)


def encoder_identity(encoder: Any) -> dict:
    """What of an encoder goes into the cache key and the manifest."""
    return {
        "name": str(encoder.name),
        "version": str(encoder.version),
        "dim": int(encoder.dim),
        "fingerprint": str(getattr(encoder, "fingerprint", "") or ""),
    }


def as_numpy(tokens: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Accept torch tensors or arrays from any encoder; check the [B P D] / [B P] contract."""
    tokens = tokens.detach().cpu().float().numpy() if hasattr(tokens, "detach") else np.asarray(tokens)
    mask = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if tokens.ndim != 3 or mask.shape != tokens.shape[:2]:
        raise ValueError(f"encoder returned tokens {tokens.shape} and mask {mask.shape}; want [B P D] and [B P]")
    return tokens, mask.astype(bool)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a weight file, remembered per (path, size, mtime) so a process hashes each file once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def folder_digest(folder: str | os.PathLike) -> str:
    """Hash of every file in a model folder (weights, config, vocab) by relative path, docs excluded."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel or path.suffix.lower() == ".md":
            continue  # README and .gitattributes do not change what the model computes
        h.update(rel.encode() + b"\0" + file_digest(path).encode() + b"\0")
    return h.hexdigest()
