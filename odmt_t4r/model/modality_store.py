"""The frozen per-item token features the item tower reads (never trained, never saved with a model).

A prepared DIR holds them in `features/` (rows = categorified item index, rows 0-2 reserved and zero):
    text.npy  [N T Dt] fp16, text_mask.npy [N T] bool (True = real token, position 0 = CLS)
    image.npy [N P Di] fp16 (position 0 = pooled CLS), image_mask.npy [N] bool (True = item has an image)
A modality whose files are missing is simply absent. Small catalogs are copied into RAM once;
large ones stay memory-mapped and only the rows a batch asks for are read.

`TokenLayout` says what the item tower sees of these files (the frozen features are pooled, never learned):
    text:  [summary | K span tokens]: summary = mean of the real token states (the sentence embedding
           all-MiniLM-L6-v2 is trained to give), span k = mean of the k-th of K equal spans of the real
           tokens after [CLS] (K=None keeps every token as stored)
    image: [pooled CLS | g*g grid tokens]: the h*w feature map average-pooled to g*g (None keeps h*w)
Fewer tokens make the IMT proportionally cheaper (its cost is items x tokens); the paper used 30 text
and 50 image tokens on a GPU, the CPU defaults in OdmtConfig use 8 and 4.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from odmt_t4r.features.store import load_item_features

CONTENT_MODALITIES = ("text", "image")


@dataclass(frozen=True)
class TokenLayout:
    text_tokens: int | None = None  # K span tokens after the summary; None = every stored token
    image_tokens: int | None = None  # G = g*g grid tokens after the pooled CLS; None = the stored h*w

    @classmethod
    def from_counts(cls, text_tokens: int, image_tokens: int) -> "TokenLayout":
        """Config integers -> layout; -1 means every stored token."""
        return cls(None if text_tokens == -1 else text_tokens, None if image_tokens == -1 else image_tokens)

    def __post_init__(self):
        if self.text_tokens is not None and self.text_tokens < 0:
            raise ValueError(f"text_tokens must be >= 0 or None, got {self.text_tokens}")
        if self.image_tokens is not None and self.image_tokens < 0:
            raise ValueError(f"image_tokens must be >= 0 or None, got {self.image_tokens}")

    def text(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [U T D] float, mask [U T] bool -> ([U 1+K D], [U 1+K]); position 0 = the summary."""
        m = mask.float()
        summary = (tokens * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)  # [U D]
        if self.text_tokens is None:
            return torch.cat([summary[:, None], tokens[:, 1:]], 1), mask
        K = self.text_tokens
        body, body_mask = m[:, 1:], mask[:, 1:]  # [U T-1] the tokens after [CLS]
        real = body.sum(1, keepdim=True)  # [U 1]
        pos = torch.arange(body.shape[1], dtype=torch.float32)[None]  # [1 T-1]
        span = torch.floor(pos * K / real.clamp(min=1.0)).long().clamp(max=max(K - 1, 0))  # [U T-1]
        weights = F.one_hot(span, max(K, 1)).float()[..., :K] * body[..., None]  # [U T-1 K]
        counts = weights.sum(1)  # [U K]
        spans = torch.einsum("utk,utd->ukd", weights, tokens[:, 1:]) / counts.clamp(min=1.0)[..., None]
        out_mask = torch.cat([mask[:, :1] | body_mask.any(1, keepdim=True), counts > 0], 1)
        return torch.cat([summary[:, None], spans], 1), out_mask

    def image(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [U 1+P D] (position 0 = pooled CLS) -> [U 1+min(G, P) D]. A square h*h map with a square G
        is pooled to g*g cells (the spatial layout kept); otherwise the token list to G equal spans."""
        G = self.image_tokens
        if G is None or tokens.shape[1] - 1 <= G:
            return tokens
        U, P, D = tokens.shape[0], tokens.shape[1] - 1, tokens.shape[2]
        if G == 0:
            return tokens[:, :1]
        h, g = math.isqrt(P), math.isqrt(G)
        grid = tokens[:, 1:].transpose(1, 2)  # [U D P]
        if h * h == P and g * g == G:
            pooled = F.adaptive_avg_pool2d(grid.reshape(U, D, h, h), g).reshape(U, D, G)
        else:
            pooled = F.adaptive_avg_pool1d(grid, G)
        return torch.cat([tokens[:, :1], pooled.transpose(1, 2)], 1)

    def apply(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw looked-up rows (float tokens, bool masks) -> the tower's layout."""
        out = dict(feats)
        if "text" in feats:
            out["text"], out["text_mask"] = self.text(feats["text"], feats["text_mask"])
        if "image" in feats:
            out["image"] = self.image(feats["image"])
        return out


class ModalityStore:
    """Looks up frozen features by item index, in a `TokenLayout`, as float32 torch tensors."""

    def __init__(self, arrays: dict[str, np.ndarray], in_memory_limit_bytes: int = 2 << 30,
                 float32_limit_bytes: int = 1 << 30, layout: TokenLayout | None = None,
                 chunk: int = 4096):
        self.modalities = [m for m in CONTENT_MODALITIES if m in arrays]
        self.layout = layout or TokenLayout()
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
        if self._torch is not None and self.n_index:  # pool once: the features are frozen
            parts = [self._raw(torch.arange(s, min(self.n_index, s + chunk))) for s in range(0, self.n_index, chunk)]
            self._torch = {k: torch.cat([p[k] for p in parts]).to(t.dtype) for k, t in self._torch.items()}

    @classmethod
    def load(cls, features_dir: str | os.PathLike, modalities: list[str] | None = None,
             in_memory_limit_bytes: int = 2 << 30, layout: TokenLayout | None = None) -> "ModalityStore":
        """Open `features_dir` (through the feature folder's one reader, features.store);
        `modalities` restricts (and requires) the ones to load."""
        feats = load_item_features(features_dir)
        missing = sorted(set(modalities or ()) - set(feats.modalities))
        if missing:
            raise FileNotFoundError(f"{features_dir}: modality {missing[0]!r} was not built "
                                    f"(built: {', '.join(feats.modalities) or 'none'})")
        arrays = {}
        for m in feats.modalities:
            if modalities is None or m in modalities:
                arrays[m], arrays[f"{m}_mask"] = getattr(feats, m), getattr(feats, f"{m}_mask")
        return cls(arrays, in_memory_limit_bytes=in_memory_limit_bytes, layout=layout)

    def dim(self, modality: str) -> int:
        return int(self._np[modality].shape[-1])

    def n_tokens(self, modality: str) -> int:
        """Tokens per item that the tower sees for `modality`, in this store's layout."""
        return int(self.lookup(torch.zeros(1, dtype=torch.long))[modality].shape[1])

    def _raw(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `idx` as stored, converted (float tokens, bool masks) and put in the layout."""
        out = {}
        for key in self._np:
            if self._torch is not None:
                t = self._torch[key][idx]
            else:  # memory-mapped: numpy fancy indexing reads only these rows
                t = torch.from_numpy(np.asarray(self._np[key][idx.numpy()]))
            out[key] = t.float() if key in CONTENT_MODALITIES else t.bool()
        return self.layout.apply(out)

    def lookup(self, item_idx: torch.Tensor, n_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """item_idx [U] -> {"text": [U T Dt], "text_mask": [U T], "image": [U P Di], "image_mask": [U]} in the
        layout; `n_tokens` keeps only each modality's first tokens (1 = the summary / CLS only)."""
        idx = item_idx.detach().cpu().long()
        if self._torch is not None:  # in RAM: pooled into the layout at load; memory-mapped: pooled per lookup
            # cut the tokens before gathering the rows: the independent tower reads 1 token of 5-9 per item
            cut = {k: (t[:, :n_tokens] if n_tokens is not None and t.dim() >= 2 else t) for k, t in self._torch.items()}
            return {k: (t[idx].float() if k in CONTENT_MODALITIES else t[idx].bool()) for k, t in cut.items()}
        else:
            out = self._raw(idx)
        if n_tokens is not None:
            out = {k: (t[:, :n_tokens] if t.dim() >= 2 else t) for k, t in out.items()}
        return out
