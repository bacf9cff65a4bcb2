"""Batches of a prepared DIR's splits through the Merlin dataloader, as padded index tensors.

The merlin `Loader` yields ragged list columns as `<col>__values` / `<col>__offsets`; the model wants
right-padded rows (0 = pad, the T4R convention), so each batch becomes
    {"items": [B L+1] (ends with the target), "user": [B], "seen": [B S] (valid/test only)}.
Shuffling uses numpy's global RNG inside the loader; `batches(..., seed=s)` seeds it so an epoch's
order depends only on (seed, epoch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from odmt_t4r.model.prepared import PreparedInfo, read_prepared

from odmt_t4r.contract import ITEM_LIST, SEEN_LIST, USER_IDX, PreparedDir, last_items, read_split  # noqa: E402


def pad_ragged(values: torch.Tensor, offsets: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Ragged (values [V], offsets [B+1]) -> right-padded [B W]; a row longer than `width` keeps its tail."""
    return torch.from_numpy(last_items(values.numpy(), offsets.numpy(), width)).to(values.dtype)


class PreparedData:
    """A prepared DIR: its schema-derived facts and padded batches of each split."""

    def __init__(self, root: str | os.PathLike | PreparedInfo):
        self.info = root if isinstance(root, PreparedInfo) else read_prepared(root)
        self.root: Path = self.info.root
        self._datasets = {}

    @property
    def item_column(self) -> str:
        return self.info.item_column

    @property
    def max_length(self) -> int:
        return self.info.max_length

    def dataset(self, split: str):
        import merlin.io

        if split not in self._datasets:
            path = PreparedDir(self.root).split(split)
            if not path.is_dir():
                raise FileNotFoundError(f"{self.root} has no '{split}' split")
            self._datasets[split] = merlin.io.Dataset(str(path), engine="parquet")
        return self._datasets[split]

    def num_rows(self, split: str) -> int:
        return int(self.dataset(split).num_rows)

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        from merlin.dataloader.torch import Loader

        if seed is not None:
            np.random.seed(seed % 2**32)  # the loader shuffles with numpy's global RNG
        loader = Loader(self.dataset(split), batch_size=batch_size, shuffle=shuffle)
        col = self.item_column
        try:
            for inputs, _ in loader:
                batch = {"items": pad_ragged(inputs[f"{col}__values"], inputs[f"{col}__offsets"],
                                             self.max_length + 1)}
                if USER_IDX in inputs:
                    batch["user"] = inputs[USER_IDX].long().reshape(-1)
                if f"{SEEN_LIST}__values" in inputs:
                    batch["seen"] = pad_ragged(inputs[f"{SEEN_LIST}__values"], inputs[f"{SEEN_LIST}__offsets"])
                yield batch
        finally:
            loader.stop()

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.num_rows(split) // batch_size)


def sample_sessions(data_dir: str | os.PathLike, n: int, split: str = "test", seed: int = 0) -> list[dict]:
    """`n` users of a split, drawn with `seed` (the same users for the same seed): {"row", "history" (raw IDs,
    oldest first: the user's items before the split's target), "target" (the held-out next item)}."""
    prepared = PreparedDir(data_dir)
    frame = read_split(prepared.split(split), [SEEN_LIST, ITEM_LIST])
    items = prepared.items(["item_idx", "item_id"])
    raw = dict(zip(items["item_idx"].tolist(), items["item_id"].astype(str).tolist()))
    rows = np.random.default_rng(seed).choice(len(frame), size=min(n, len(frame)), replace=False)
    return [{"row": int(r), "history": [raw[int(i)] for i in frame[SEEN_LIST].iloc[r]],
             "target": raw[int(frame[ITEM_LIST].iloc[r][-1])]} for r in rows]
