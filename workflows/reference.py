"""A straightforward pandas implementation of the session workflows: the oracle the tests compare the
NVTabular path against, and the baseline of benchmarks/etl.py. Not used by the product itself."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workflows.sessions import ITEM_COL, ITEM_LIST, SEEN_LIST, TIME_COL, USER_COL, SessionConfig


def encode_items(items: pd.Series, vocab: pd.Series) -> np.ndarray:
    """0 padding, 1 null, 2 out-of-vocabulary, 3 + position in the vocabulary."""
    index = pd.Series(np.arange(3, 3 + len(vocab)), index=vocab.values)
    codes = items.map(index)
    codes = codes.where(items.notna(), 1).fillna(2)
    return codes.to_numpy(dtype=np.int64)


def sessions(interactions: pd.DataFrame, vocab: pd.Series) -> pd.DataFrame:
    """One row per user (sorted by user id), items in time order, ties in input row order."""
    df = interactions.assign(_code=encode_items(interactions[ITEM_COL], vocab), _row=np.arange(len(interactions)))
    df = df.sort_values([USER_COL, TIME_COL, "_row"], kind="stable")
    grouped = df.groupby(USER_COL, sort=True)["_code"]
    return pd.DataFrame({ITEM_LIST: grouped.agg(list), "item_id-count": grouped.size()}).reset_index()


def split(sess: pd.DataFrame, name: str, cfg: SessionConfig) -> pd.DataFrame:
    L = cfg.max_length
    rows = []
    for user, items in zip(sess[USER_COL], sess[ITEM_LIST]):
        if len(items) < cfg.min_interactions:
            continue
        if name == "train":
            history = items[:-2]
            end = len(history)
            windows = []
            while end > 1:
                windows.append(history[max(0, end - (L + 1)):end])
                end -= L
            rows += [{USER_COL: user, ITEM_LIST: w} for w in windows]
        else:
            t = len(items) - (1 if name == "test" else 2)  # position of the target
            rows.append({USER_COL: user, ITEM_LIST: items[max(0, t - L):t + 1], SEEN_LIST: items[:t]})
    return pd.DataFrame(rows)
