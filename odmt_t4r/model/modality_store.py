"""The frozen per-item token features the item tower reads (never trained, never saved with a model).

A prepared DIR holds them in `features/` (rows = categorified item index, rows 0-2 reserved and zero):
    text.npy  [N T Dt] fp16, text_mask.npy [N T] bool (True = real token, position 0 = CLS)
    image.npy [N P Di] fp16 (position 0 = pooled CLS), image_mask.npy [N] bool (True = item has an image)
A modality whose files are missing is simply absent. Small catalogs are copied into RAM once;
large ones stay memory-mapped and only the rows a batch asks for are read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

CONTENT_MODALITIES = ("text", "image")
_FILES = {"text": ("text.npy", "text_mask.npy"), "image": ("image.npy", "image_mask.npy")}


class ModalityStore:
    """Looks up frozen features by item index and returns float32 torch tensors."""

    def __init__(self, arrays: dict[str, np.ndarray], in_memory_limit_bytes: int = 2 << 30,
                 float32_limit_bytes: int = 1 << 30):
        self.modalities = [m for m in CONTENT_MODALITIES if m in arrays]
        self._np = arrays
        # Small catalogs live in RAM: as float32 when that fits `float32_limit_bytes` (no conversion per
        # lookup), else as the fp16 files up to `in_memory_limit_bytes`; larger ones stay memory-mapped.
        total = sum(a.nbytes for a in arrays.values())
        as_float = sum(a.size * 4 if k in CONTENT_MODALITIES else a.nbytes for k, a in arrays.items())
        if as_float <= float32_limit_bytes:
            self._torch = {k: torch.from_numpy(np.array(a, dtype=np.float32 if k in CONTENT_MODALITIES else a.dtype))
                           for k, a in arrays.items()}
        elif total <= in_memory_limit_bytes:
            self._torch = {k: torch.from_numpy(np.array(a)) for k, a in arrays.items()}  # a copy, not the mmap
        else:
            self._torch = None
        n = {a.shape[0] for a in arrays.values()}
        if len(n) > 1:
            raise ValueError(f"feature arrays disagree on the number of rows: {sorted(n)}")
        self.n_index = n.pop() if n else 0

    @classmethod
    def load(cls, features_dir: str | os.PathLike, modalities: list[str] | None = None,
             in_memory_limit_bytes: int = 2 << 30) -> "ModalityStore":
        """Open `features_dir`; `modalities` restricts (and requires) the ones to load."""
        features_dir = Path(features_dir)
        arrays = {}
        for m, (values, mask) in _FILES.items():
            if modalities is not None and m not in modalities:
                continue
            if (features_dir / values).is_file() and (features_dir / mask).is_file():
                arrays[m] = np.load(features_dir / values, mmap_mode="r")
                arrays[f"{m}_mask"] = np.load(features_dir / mask, mmap_mode="r")
            elif modalities is not None:
                raise FileNotFoundError(f"{features_dir}: modality '{m}' needs {values} and {mask}")
        return cls(arrays, in_memory_limit_bytes=in_memory_limit_bytes)

    def dim(self, modality: str) -> int:
        return int(self._np[modality].shape[-1])

    def n_tokens(self, modality: str) -> int:
        return int(self._np[modality].shape[1])

    def lookup(self, item_idx: torch.Tensor, n_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """item_idx [U] -> {"text": [U T Dt], "text_mask": [U T], "image": [U P Di], "image_mask": [U]};
        `n_tokens` keeps only each modality's first tokens (1 = the CLS only)."""
        idx = item_idx.detach().cpu().long()
        out = {}
        for m in self.modalities:
            for key in (m, f"{m}_mask"):
                if self._torch is not None:
                    t = self._torch[key][idx]
                else:  # memory-mapped: numpy fancy indexing reads only these rows
                    t = torch.from_numpy(np.asarray(self._np[key][idx.numpy()]))
                if n_tokens is not None and t.dim() >= 2:
                    t = t[:, :n_tokens]
                out[key] = t.float() if key == m else t.bool()
        return out
