"""Extract per-item token features once: validate the catalog, hash its content, encode on a cache miss.

`build_item_features` is the one entry point of the feature stage; `feature_hashes` answers
"would this rebuild?" without running an encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .cache import FORMAT_VERSION, FeatureCache, content_key, file_bytes_digest, link_or_copy
from .config import MODALITIES, RESERVED_ROWS, FeatureConfig
from .encoders import as_numpy, encoder_identity, make_image_encoder, make_text_encoder
from .image import load_rgb
from .store import FILES, MANIFEST, array_info, write_json_atomic

_LISTED_FAILURES = 100  # the manifest names this many failed items; the count is always exact


class ImageDecodeWarning(RuntimeWarning):
    """Some item images could not be decoded; their image features are all-zero (see the manifest)."""


@dataclass
class _Job:
    modality: str
    encoder: Any
    idx: np.ndarray  # [N] item_idx of the items that have this modality, ascending
    values: list  # [N] texts or image paths
    key: str


def build_item_features(
    items: pd.DataFrame,
    n_index: int,
    out_dir: str | os.PathLike,
    config: FeatureConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    text_encoder: Any = None,
    image_encoder: Any = None,
) -> dict:
    """Write text/image token features for `items` (columns item_idx, optional text, optional image) to
    out_dir and return its manifest. Encoders run only on a cache miss; encoder instances given here
    take the place of the config's registry names."""
    config = config or FeatureConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(cache_dir)
    jobs = _jobs(_catalog(items, n_index), n_index, config, text_encoder, image_encoder)
    modalities = {}
    for modality in MODALITIES:
        job = jobs.get(modality)
        if job is None or len(job.idx) == 0:
            reason = "not requested" if modality not in config.modalities else f"no item has {modality}"
            modalities[modality] = {"built": False, "reason": reason}
        else:
            modalities[modality] = _build_one(job, n_index, config, cache, out_dir)
        if not modalities[modality]["built"]:
            for name in FILES[modality]:  # a stale array from an earlier build must not outlive its manifest
                (out_dir / name).unlink(missing_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "content_hash": _combine(n_index, {m: j.key for m, j in jobs.items() if len(j.idx)}),
        "n_index": int(n_index),
        "reserved_rows": RESERVED_ROWS,
        "config": config.to_dict(),
        "modalities": modalities,
        "fallbacks": {"image_unreadable": modalities["image"].get("fallbacks", {}).get("unreadable", 0),
                      "image_empty": _empty_cells(items, jobs.get("image"))},
        "software": _software(),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def feature_hashes(
    items: pd.DataFrame, n_index: int, config: FeatureConfig | None = None, *, text_encoder=None, image_encoder=None
) -> dict:
    """The cache keys a build would use, per modality plus `content_hash`; reads image files, encodes nothing."""
    config = config or FeatureConfig()
    jobs = _jobs(_catalog(items, n_index), n_index, config, text_encoder, image_encoder)
    keys = {m: j.key for m, j in jobs.items() if len(j.idx)}
    return {**keys, "content_hash": _combine(n_index, keys)}


def _catalog(items: pd.DataFrame, n_index: int) -> pd.DataFrame:
    """Check the item-index contract and order rows by item_idx (the order arrays are written in)."""
    if "item_idx" not in items.columns:
        raise ValueError(f"items needs an 'item_idx' column; found {list(items.columns)}")
    if not pd.api.types.is_integer_dtype(items["item_idx"]):
        raise ValueError(f"items.item_idx must be integers, got {items['item_idx'].dtype}")
    idx = items["item_idx"]
    problems = {
        f"item_idx < {RESERVED_ROWS} (rows 0-2 are padding/null/OOV)": idx < RESERVED_ROWS,
        f"item_idx >= n_index={n_index}": idx >= n_index,
        "duplicate item_idx": idx.duplicated(keep=False),
    }
    for problem, bad in problems.items():
        if bad.any():
            raise ValueError(f"items: {int(bad.sum())} rows with {problem}:\n{items[bad].head(5).to_string()}")
    return items.sort_values("item_idx", kind="stable").reset_index(drop=True)


def _present(value: Any) -> bool:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return False
    return bool(str(value).strip())  # an empty string is a missing text/path, not an item with content


def _jobs(catalog, n_index, config, text_encoder, image_encoder) -> dict[str, _Job]:
    jobs = {}
    for modality in config.modalities:
        if modality not in catalog.columns:
            continue
        have = catalog[catalog[modality].map(_present)]
        idx, values = have["item_idx"].to_numpy(np.int64), [str(v) for v in have[modality]]
        if modality == "text":
            encoder = text_encoder if text_encoder is not None else make_text_encoder(config)
            payloads = (v.encode("utf-8") for v in values)
        else:
            encoder = image_encoder if image_encoder is not None else make_image_encoder(config)
            payloads = (file_bytes_digest(p) for p in values)
        header = {
            "modality": modality,
            "n_index": int(n_index),
            "settings": config.hashed_settings(modality),
            "encoder": encoder_identity(encoder) if len(idx) else None,  # no items: do not hash weights
        }
        jobs[modality] = _Job(modality, encoder, idx, values, content_key(header, zip(idx.tolist(), payloads)))
    return jobs


def _empty_cells(items: pd.DataFrame, job: _Job | None) -> int:
    """Catalog rows with an empty image cell while other items have an image: each gets a zero image feature."""
    return int(len(items) - len(job.idx)) if job is not None and len(job.idx) else 0


def _combine(n_index: int, keys: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps({"n_index": int(n_index), **keys}, sort_keys=True).encode()).hexdigest()


def _build_one(job: _Job, n_index: int, config: FeatureConfig, cache: FeatureCache, out_dir: Path) -> dict:
    entry = cache.lookup(job.modality, job.key)
    status = "hit"
    if entry is None:
        status = "miss"
        staged = cache.staging(job.modality)
        try:
            meta = _encode(job, n_index, config, staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)  # nothing half-written stays behind in the cache
            raise
        if not meta["built"]:
            shutil.rmtree(staged, ignore_errors=True)
            _warn_failures(job.modality, meta)
            return meta
        entry = cache.commit(staged, job.modality, job.key)
    meta = json.loads((entry / "meta.json").read_text())
    for name in FILES[job.modality]:
        link_or_copy(entry / name, out_dir / name)
    _warn_failures(job.modality, meta)  # repeated on a cache hit: fallbacks are never silent
    files = {name: array_info(out_dir / name) for name in FILES[job.modality]}
    return {**meta, "cache": status, "content_hash": job.key, "files": files}


def _encode(job: _Job, n_index: int, config: FeatureConfig, staged: Path) -> dict:
    """Run the encoder in batches, writing rows straight into a memory-mapped .npy (catalogs may exceed RAM)."""
    from odmt_t4r.training.progress import progress_bar  # here: the training package imports T4R

    tokens = mask = None
    failures: list[dict] = []
    n_failed = 0
    starts = range(0, len(job.idx), config.batch_size)
    # a bar on a terminal, plain lines with rate and time left in logs
    bar = progress_bar(starts, total=len(starts), desc=f"{job.modality} features [{job.encoder.name}], "
                       f"batches of {config.batch_size} items", enabled=config.progress)
    with torch.inference_mode():  # also covers plugged-in encoders that forget it
        for start in bar:
            rows, inputs = job.idx[start:start + config.batch_size], job.values[start:start + config.batch_size]
            if job.modality == "image":
                rows, inputs, failed = _decode_images(rows, inputs)
                n_failed += len(failed)
                failures.extend(failed[: max(0, _LISTED_FAILURES - len(failures))])
            if len(rows):
                tok, tok_mask = as_numpy(*job.encoder.encode(inputs))
                if tokens is None:
                    tokens, mask = _allocate(job, staged, n_index, tok.shape[1:])
                tokens[rows] = _checked_fp16(job, tok * tok_mask[..., None], tokens.shape[1:])  # masked slots = 0
                mask[rows] = tok_mask if job.modality == "text" else tok_mask.any(1)
    meta = {
        "built": tokens is not None,
        "encoder": encoder_identity(job.encoder),
        "n_items": int(len(job.idx)),
        "n_encoded": int(len(job.idx) - n_failed),
    }
    if job.modality == "image":
        meta["fallbacks"] = {"unreadable": n_failed, "items": failures}
    if tokens is None:
        meta["reason"] = f"none of the {len(job.idx)} items could be encoded"
        return meta
    tokens.flush()
    del tokens  # close the mapping before the folder is renamed into the cache
    mask_name = FILES[job.modality][1]
    np.save(staged / mask_name, mask)
    (staged / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for name in FILES[job.modality]:
        os.chmod(staged / name, 0o444)  # hardlinked into out dirs: read-only so no one edits the cache in place
    return meta


def _allocate(job: _Job, staged: Path, n_index: int, token_shape: tuple) -> tuple[np.memmap, np.ndarray]:
    if token_shape[-1] != int(job.encoder.dim):
        raise ValueError(f"{job.encoder.name}: returned dim {token_shape[-1]} but declares dim={job.encoder.dim}")
    # a new .npy memmap is a sparse zero file: reserved rows and items without content stay all-zero
    tokens = np.lib.format.open_memmap(staged / FILES[job.modality][0], mode="w+", dtype=np.float16,
                                       shape=(n_index, *token_shape))
    mask_shape = (n_index, token_shape[0]) if job.modality == "text" else (n_index,)
    return tokens, np.zeros(mask_shape, dtype=bool)


def _checked_fp16(job: _Job, tok: np.ndarray, want: tuple) -> np.ndarray:
    if tok.shape[1:] != tuple(want):
        raise ValueError(f"{job.encoder.name}: token shape {tok.shape[1:]} changed between batches (first {want})")
    out = tok.astype(np.float16)
    if not np.isfinite(out).all():
        raise ValueError(f"{job.encoder.name}: features overflow float16 or are NaN")
    return out


def _decode_images(rows: np.ndarray, paths: list[str]) -> tuple[np.ndarray, list, list[dict]]:
    keep, images, failed = [], [], []
    for row, path in zip(rows.tolist(), paths):
        try:
            images.append(load_rgb(path))
            keep.append(row)
        except Exception as exc:  # any decode error -> an all-zero row, counted and reported
            failed.append({"item_idx": row, "path": path, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return np.asarray(keep, dtype=np.int64), images, failed


def _warn_failures(modality: str, meta: dict) -> None:
    n = meta.get("fallbacks", {}).get("unreadable", 0)
    if n:
        listed = ", ".join(f"{f['item_idx']} ({f['path']})" for f in meta["fallbacks"]["items"][:5])
        warnings.warn(
            f"{n} of {meta['n_items']} item {modality}s could not be decoded; their {modality} features are "
            f"all-zero and masked out. First: {listed}",
            ImageDecodeWarning,
            stacklevel=4,  # point at the caller of build_item_features
        )


def _software() -> dict:
    from odmt_t4r import __version__

    return {"odmt_t4r": __version__, "numpy": np.__version__, "torch": torch.__version__}
