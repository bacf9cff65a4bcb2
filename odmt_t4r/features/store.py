"""The on-disk feature folder: array files, manifest.json, and loading them back (memory-mapped).

Files (rows = categorified item index, rows 0-2 reserved and all-zero):
  text.npy [n_index T D] float16, text_mask.npy [n_index T] bool (True = real token, position 0 = CLS)
  image.npy [n_index P D] float16, image_mask.npy [n_index] bool (True = item has a decoded image)
  manifest.json: encoders, versions, shapes, dtypes, content hashes, fallback counts
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from odmt_t4r.output_folder import atomic_write

MANIFEST = "manifest.json"
FILES = {"text": ("text.npy", "text_mask.npy"), "image": ("image.npy", "image_mask.npy")}


@dataclass
class ItemFeatures:
    """Per-item token features; a modality that was not built is None."""

    text: np.ndarray | None = None  # [n_index T D] float16
    text_mask: np.ndarray | None = None  # [n_index T] bool
    image: np.ndarray | None = None  # [n_index P D] float16
    image_mask: np.ndarray | None = None  # [n_index] bool
    manifest: dict = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return [m for m in FILES if getattr(self, m) is not None]

    @property
    def n_index(self) -> int:
        return int(self.manifest["n_index"])


def write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def array_info(path: Path) -> dict:
    arr = np.load(path, mmap_mode="r")
    return {"shape": list(arr.shape), "dtype": str(arr.dtype)}


def built_modalities(out_dir: str | os.PathLike) -> list[str]:
    """The modalities a feature folder holds (its manifest says built and both files are there); [] without one."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        built = {m for m, info in manifest["modalities"].items() if info.get("built")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [m for m in FILES if m in built and all((out_dir / name).is_file() for name in FILES[m])]


def load_item_features(out_dir: str | os.PathLike, mmap: bool = True) -> ItemFeatures:
    """Load a folder written by `build_item_features`; mmap keeps large catalogs on disk until touched."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {MANIFEST}; run build_item_features first")
    manifest = json.loads(manifest_path.read_text())
    arrays = {}
    for modality, info in manifest["modalities"].items():
        if not info.get("built"):
            continue
        for name in FILES[modality]:
            arr = np.load(out_dir / name, mmap_mode="r" if mmap else None)
            want = info["files"][name]
            if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
                raise ValueError(f"{out_dir / name}: {arr.shape} {arr.dtype} does not match the manifest {want}")
            arrays[name.removesuffix(".npy")] = arr
    return ItemFeatures(**arrays, manifest=manifest)
