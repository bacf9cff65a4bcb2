"""The file contracts between stages, in one place: the prepared DIR and the RUN folder.

Prepared DIR (`odmt prepare`): manifest.json with `format` PREPARED_FORMAT; items.parquet; the
train/valid/test splits (parquet parts + schema.pbtxt) whose rows hold ITEM_LIST (the history ending with
its target), SEEN_LIST (every earlier item of the user) and USER_IDX; features/; workflows/.
Item indices: PAD 0, NULL 1, OOV 2, then the catalog from RESERVED_ROWS on.

RUN folder (`odmt train`): config.json with `format` RUN_FORMAT (a model saved on its own carries
MODEL_FORMAT) and `data.dir`, the prepared DIR it was trained on; model.pt, item_vectors.pt, checkpoint.pt,
log.jsonl, fusion.json.

Sessions are cut to their LAST `max_length` items and right-padded with PAD (`last_items`): the same rule
in training batches, evaluation, and the served graph.

Import-light on purpose (numpy only at import): every stage and the Triton python stub read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PREPARED_FORMAT = "odmt-prepared/1"
RUN_FORMAT = "odmt-run/1"
MODEL_FORMAT = "odmt-model/1"

ITEM_LIST = "item_id-list"  # a split row: the history items, ending with the target
SEEN_LIST = "seen-list"  # every item of the user before the target (the evaluation's exclusion)
USER_IDX = "user_idx"
SPLITS = ("train", "valid", "test")

PAD, NULL, OOV = 0, 1, 2  # NVTabular Categorify's reserved rows
RESERVED_ROWS = 3  # the catalog's items are indexed from here on


def read_split(folder: str | Path, columns: list[str] | None = None):
    """A split folder's parquet parts in order, as one pandas frame (the folder also holds schema files)."""
    import pandas as pd
    from dask.utils import natural_sort_key

    parts = sorted(map(str, Path(folder).glob("*.parquet")), key=natural_sort_key)  # part_2 before part_10
    if not parts:
        raise FileNotFoundError(f"{folder} holds no parquet parts: not a split of a prepared DIR")
    return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)


def run_data_dir(run: str | Path, data: str | Path | None = None) -> Path:
    """The prepared DIR of a RUN: `data` if given, else the one recorded in RUN/config.json."""
    try:
        recorded = json.loads((Path(run) / "config.json").read_text()).get("data", {}).get("dir")
    except (OSError, ValueError, AttributeError):
        recorded = None
    chosen = Path(data or recorded or "")
    if not str(chosen) or not (chosen / "manifest.json").is_file():
        raise FileNotFoundError(f"no prepared DIR for {run}: pass --data (recorded: {recorded!r})")
    return chosen.resolve()


def last_items(values: np.ndarray, offsets: np.ndarray, width: int | None = None) -> np.ndarray:
    """Ragged sessions (values [V], offsets [B+1]) -> [B W] int64: each session's last W items,
    left-aligned and right-padded with PAD. W = the longest session when `width` is None."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    lengths = np.diff(offsets)
    W = int(width if width is not None else (lengths.max() if len(lengths) else 0))
    keep = np.minimum(lengths, W)
    out = np.full((len(lengths), W), PAD, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), keep)
    cols = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    out[rows, cols] = values[np.repeat(offsets[1:] - keep, keep) + cols]
    return out
