"""A tiny prepared DIR that follows the `odmt prepare` contract, for tests only (not shipped in the package).

Users walk a hidden item order (item k is usually followed by item k+1, sometimes by a jump), so a
sequence model can learn it; text/image features are random but fixed per item. Files written:
manifest.json, items.parquet, train/ valid/ test/ (parquet + merlin schema.pbtxt), features/*.npy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

ITEM_LIST = "item_id-list"
SEEN_LIST = "seen-list"
USER_IDX = "user_idx"
RESERVED = 3


def _sequences(n_users: int, n_items: int, min_len: int, max_len: int, jump: float,
               rng: np.random.Generator) -> list[list[int]]:
    seqs = []
    for _ in range(n_users):
        length = int(rng.integers(min_len, max_len + 1))
        cur = int(rng.integers(n_items))
        seq = [cur]
        while len(seq) < length:
            cur = int(rng.integers(n_items)) if rng.random() < jump else (cur + 1) % n_items
            seq.append(cur)
        seqs.append([RESERVED + i for i in seq])
    return seqs


def _split_rows(seqs: list[list[int]], L: int) -> dict[str, pd.DataFrame]:
    train, valid, test = [], [], []
    for u, seq in enumerate(seqs):
        test.append({USER_IDX: u, ITEM_LIST: seq[-(L + 1):], SEEN_LIST: seq[:-1]})
        valid.append({USER_IDX: u, ITEM_LIST: seq[:-1][-(L + 1):], SEEN_LIST: seq[:-2]})
        head = seq[:-2]
        for start in range(0, max(1, len(head) - 1), L):  # windows sharing one item: each target once
            window = head[start:start + L + 1]
            if len(window) >= 2:
                train.append({USER_IDX: u, ITEM_LIST: window})
    return {"train": pd.DataFrame(train), "valid": pd.DataFrame(valid), "test": pd.DataFrame(test)}


def _write_split(df: pd.DataFrame, out: Path, n_index: int, L: int) -> None:
    from merlin.schema import ColumnSchema, Schema, Tags
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    out.mkdir(parents=True, exist_ok=True)
    df = df.copy()
    for col in (ITEM_LIST, SEEN_LIST):
        if col in df:
            df[col] = df[col].map(lambda v: np.asarray(v, dtype=np.int64))
    df[USER_IDX] = df[USER_IDX].astype("int64")
    df.to_parquet(out / "part_0.parquet", index=False)
    cols = [
        ColumnSchema(USER_IDX, dtype=np.int64, tags=[Tags.USER_ID, Tags.USER, Tags.CATEGORICAL]),
        ColumnSchema(ITEM_LIST, dtype=np.int64, is_list=True, is_ragged=True,
                     tags=[Tags.ITEM_ID, Tags.ITEM, Tags.CATEGORICAL, Tags.LIST],
                     properties={"domain": {"min": 0, "max": n_index - 1},
                                 "value_count": {"min": 1, "max": L + 1}}),
    ]
    if SEEN_LIST in df:
        cols.append(ColumnSchema(SEEN_LIST, dtype=np.int64, is_list=True, is_ragged=True, tags=[Tags.LIST]))
    TensorflowMetadata.from_merlin_schema(Schema(cols)).to_proto_text_file(str(out))


def make_synthetic_prepared(out: str | os.PathLike, n_users: int = 64, n_items: int = 40,
                            max_length: int = 8, min_len: int = 6, max_len: int = 24,
                            modalities: tuple[str, ...] = ("text", "image"), text_tokens: int = 6,
                            image_tokens: int = 5, text_dim: int = 384, image_dim: int = 1280,
                            jump: float = 0.1, seed: int = 0) -> Path:
    """Write a small prepared DIR to `out` and return its path."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_index = RESERVED + n_items
    seqs = _sequences(n_users, n_items, min_len, max_len, jump, rng)
    splits = _split_rows(seqs, max_length)
    for name, df in splits.items():
        _write_split(df, out / name, n_index, max_length)

    train_counts = np.zeros(n_index, dtype=np.int64)
    for row in splits["train"][ITEM_LIST]:
        np.add.at(train_counts, np.asarray(row), 1)
    items = pd.DataFrame({"item_idx": np.arange(RESERVED, n_index, dtype=np.int64),
                          "item_id": [f"item-{i}" for i in range(n_items)],
                          "text": [f"synthetic item {i}" for i in range(n_items)],
                          "train_count": train_counts[RESERVED:]})
    feats = out / "features"
    feats.mkdir(exist_ok=True)
    if "text" in modalities:
        text = rng.normal(size=(n_index, text_tokens, text_dim)).astype(np.float16)
        lengths = rng.integers(2, text_tokens + 1, size=n_index)
        mask = np.arange(text_tokens)[None, :] < lengths[:, None]
        text[~mask] = 0
        text[:RESERVED], mask[:RESERVED] = 0, False
        np.save(feats / "text.npy", text)
        np.save(feats / "text_mask.npy", mask)
    if "image" in modalities:
        image = rng.normal(size=(n_index, image_tokens, image_dim)).astype(np.float16)
        has = rng.random(n_index) > 0.1  # a few items without an image
        image[~has] = 0
        image[:RESERVED], has[:RESERVED] = 0, False
        np.save(feats / "image.npy", image)
        np.save(feats / "image_mask.npy", has)
        items["image"] = [f"images/{i}.png" for i in range(n_items)]
    items.to_parquet(out / "items.parquet", index=False)
    manifest = {
        "format": "odmt-prepared/1", "source": "synthetic", "max_length": max_length, "n_index": n_index,
        "modalities": ["id", *[m for m in ("text", "image") if m in modalities]],
        "counts": {"users": n_users, "items": n_items, "interactions": int(sum(map(len, seqs))),
                   "rows": {k: len(v) for k, v in splits.items()}},
    }
    # the feature folder's manifest as features.build writes it (the part its reader checks)
    built = {m: {"built": True, "files": {f.name: {"shape": list(np.load(f, mmap_mode="r").shape),
                                                    "dtype": str(np.load(f, mmap_mode="r").dtype)}
                                          for f in (feats / f"{m}.npy", feats / f"{m}_mask.npy")}}
             for m in ("text", "image") if m in modalities}
    (feats / "manifest.json").write_text(json.dumps({
        "n_index": n_index, "reserved_rows": RESERVED,
        "modalities": {m: built.get(m, {"built": False, "reason": "not requested"}) for m in ("text", "image")}}))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
