"""Extract per-item token features once: validate the catalog, hash its content, encode on a cache miss.

`build_item_features` is the one entry point of the feature stage; `feature_hashes` answers
"would this rebuild?" without running an encoder; `extend_item_features` grows a built folder by new
items (`odmt prepare --append-to`), encoding only those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
from .store import FILES, MANIFEST, array_info, load_item_features, write_json_atomic

_LISTED_FAILURES = 100  # the manifest names this many failed items; the count is always exact
_COPY_ROWS = 4096  # rows of a parent's arrays copied at a time (catalogs may exceed RAM)


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
    keys = {m: j.key for m, j in jobs.items() if len(j.idx)}
    return _write_manifest(out_dir, n_index, config, modalities, keys, _empty_cells(items, jobs.get("image")))


def _write_manifest(out_dir: Path, n_index: int, config: FeatureConfig, modalities: dict, keys: dict[str, str],
                    empty_images: int) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION,
        "content_hash": _combine(n_index, keys),
        "n_index": int(n_index),
        "reserved_rows": RESERVED_ROWS,
        "config": config.to_dict(),
        "modalities": modalities,
        "fallbacks": {"image_unreadable": modalities["image"].get("fallbacks", {}).get("unreadable", 0),
                      "image_empty": empty_images},
        "software": _software(),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def extend_item_features(parent_dir: str | os.PathLike, parent_n_index: int, items: pd.DataFrame, n_index: int,
                         out_dir: str | os.PathLike, config: FeatureConfig | None = None, **build_options) -> dict:
    """Features of a catalog that extends the one whose features `parent_dir` holds (`odmt prepare
    --append-to`): rows below `parent_n_index` are the parent's, copied unchanged (those items keep their
    index), and only the items from `parent_n_index` on are encoded, by `build_item_features` (through the
    cache; `build_options`: its cache_dir, text_encoder, image_encoder). A `parent_dir` without a manifest
    (a parent with no content) gives all-zero parent rows. Writes out_dir as `build_item_features` does and
    returns its manifest."""
    config = config or FeatureConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parent = load_item_features(parent_dir) if (Path(parent_dir) / MANIFEST).is_file() else None
    if parent is not None and parent.n_index != parent_n_index:
        raise ValueError(f"{parent_dir}: features for {parent.n_index} rows, but the parent catalog has {parent_n_index}")
    catalog = _catalog(items, n_index)
    new = catalog[catalog["item_idx"] >= parent_n_index]
    shift = parent_n_index - RESERVED_ROWS
    with tempfile.TemporaryDirectory(prefix=".new-items-", dir=out_dir) as tmp:
        added = None
        if len(new):  # indexed from RESERVED_ROWS, as a catalog of their own (`odmt add-items` builds them alike)
            build_item_features(new.assign(item_idx=new["item_idx"] - shift), n_index - shift, tmp, config, **build_options)
            added = load_item_features(tmp)
        modalities = {m: _extend_one(m, parent, added, parent_n_index, n_index, out_dir) for m in MODALITIES}
    keys = {m: meta["content_hash"] for m, meta in modalities.items() if meta["built"]}
    has_image = catalog["image"].map(_present).sum() if "image" in catalog else 0
    return _write_manifest(out_dir, n_index, config, modalities, keys,
                           int(len(catalog) - has_image) if modalities["image"]["built"] else 0)


def _extend_one(modality: str, parent, added, parent_n_index: int, n_index: int, out_dir: Path) -> dict:
    """One modality's arrays: the parent's rows, then the added items' (rows from RESERVED_ROWS in `added`)."""
    parts = [(f, f.manifest["modalities"].get(modality, {})) for f in (parent, added) if f is not None]
    built = [(f, meta) for f, meta in parts if meta.get("built")]
    for name in FILES[modality]:
        (out_dir / name).unlink(missing_ok=True)
    if not built:
        return {"built": False, "reason": next((m["reason"] for _, m in reversed(parts) if m.get("reason")),
                                               f"no item has {modality}")}
    encoders = {json.dumps(meta["encoder"], sort_keys=True) for _, meta in built}
    shapes = {getattr(f, modality).shape[1:] for f, _ in built}
    if len(encoders) > 1 or len(shapes) > 1:
        raise ValueError(f"the parent's {modality} features ({built[0][1]['encoder']}, tokens {getattr(built[0][0], modality).shape[1:]}) "
                         f"and the new items' ({built[1][1]['encoder']}, tokens {getattr(built[1][0], modality).shape[1:]}) "
                         "differ: one catalog's features come from one encoder; prepare all the data afresh")
    tokens_name, mask_name = FILES[modality]
    first = built[0][0]
    tokens = np.lib.format.open_memmap(out_dir / tokens_name, mode="w+", dtype=np.float16,
                                       shape=(n_index, *getattr(first, modality).shape[1:]))
    mask = np.zeros((n_index, *getattr(first, f"{modality}_mask").shape[1:]), dtype=bool)
    old = parent.manifest["modalities"].get(modality, {}) if parent is not None else {}
    if old.get("built"):
        for start in range(0, parent_n_index, _COPY_ROWS):
            rows = slice(start, min(start + _COPY_ROWS, parent_n_index))
            tokens[rows] = getattr(parent, modality)[rows]
        mask[:parent_n_index] = getattr(parent, f"{modality}_mask")
    new = added.manifest["modalities"].get(modality, {}) if added is not None else {}
    if new.get("built"):
        tokens[parent_n_index:] = getattr(added, modality)[RESERVED_ROWS:]
        mask[parent_n_index:] = getattr(added, f"{modality}_mask")[RESERVED_ROWS:]
    tokens.flush()
    del tokens
    np.save(out_dir / mask_name, mask)
    shift = parent_n_index - RESERVED_ROWS
    meta = {
        "built": True,
        "encoder": built[0][1]["encoder"],
        "n_items": sum(int(m.get("n_items", 0)) for _, m in built),
        "n_encoded": sum(int(m.get("n_encoded", 0)) for _, m in built),
        "cache": "extended",
        "content_hash": hashlib.sha256(f"{old.get('content_hash')}+{new.get('content_hash')}".encode()).hexdigest(),
        "appended": {"parent_rows": int(parent_n_index), "encoded": int(new.get("n_encoded", 0)),
                     "cache": new.get("cache")},
        "files": {name: array_info(out_dir / name) for name in FILES[modality]},
    }
    if modality == "image":
        failed = [*old.get("fallbacks", {}).get("items", []),
                  *({**f, "item_idx": f["item_idx"] + shift} for f in new.get("fallbacks", {}).get("items", []))]
        meta["fallbacks"] = {"unreadable": sum(int(m.get("fallbacks", {}).get("unreadable", 0)) for m in (old, new)),
                             "items": failed[:_LISTED_FAILURES]}
    return meta


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
