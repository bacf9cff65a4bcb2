"""Session workflows: raw interactions -> one time-ordered list per user -> leave-one-out splits.

    interactions (user_id, item_id, timestamp, _row)
      session_workflow:  Categorify(item_id, fixed vocabulary) -> Groupby(user_id, sort by timestamp
                         then input row) -> item_id-list, item_id-count          [one row per user]
      split_workflow:    Filter(count >= 3) -> ListSlice per split -> Tags, ValueCount
                           test : item_id-list = last L+1 items (target = last),  seen-list = all before it
                           valid: item_id-list = L+1 items ending at the 2nd-to-last, seen-list = all before it
                           train: items[:-2] cut into windows of <= L+1 (TrainingWindows)
      inference_workflow: raw item_id-list -> Categorify(same vocabulary) -> ListSlice(-L); drops no row.

Item index: 0 padding, 1 null, 2 out-of-vocabulary, 3.. the catalog ordered by popularity. The same
code runs on pandas (CPU) and cuDF (GPU); pass a dask.distributed Client to scale out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import nvtabular as nvt
from merlin.core.dispatch import DataFrameType
from merlin.dag import ColumnSelector
from merlin.schema import Schema, Tags
from nvtabular import ops

USER_COL, ITEM_COL, TIME_COL, ROW_COL = "user_id", "item_id", "timestamp", "_row"
ITEM_LIST, ITEM_COUNT, SEEN_LIST, USER_IDX = "item_id-list", "item_id-count", "seen-list", "user_idx"
SPLITS = ("train", "valid", "test")
ITEM_TAGS = [Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.LIST]


@dataclass
class SessionConfig:
    max_length: int = 20  # history items the model sees; split lists hold max_length + 1 (history + target)
    min_interactions: int = 3  # leave-one-out needs one train item, a valid target and a test target


def item_vocabulary(interactions: pd.DataFrame, items: pd.DataFrame) -> pd.Series:
    """The whole catalog, most interacted first (stable on catalog order), so items with no
    interactions still get an index and can be recommended from their content."""
    counts = interactions[ITEM_COL].value_counts(sort=False)
    order = pd.DataFrame({ITEM_COL: items[ITEM_COL].values, "n": items[ITEM_COL].map(counts).fillna(0).values})
    order = order.sort_values("n", ascending=False, kind="stable")
    return pd.Series(order[ITEM_COL].values, name=ITEM_COL)


def session_workflow(item_vocab: pd.Series, categories_dir: str, client=None) -> nvt.Workflow:
    """One row per user: the items in time order; equal timestamps keep the input row order."""
    items = [ITEM_COL] >> ops.Categorify(vocabs={ITEM_COL: item_vocab}, out_path=categories_dir)
    sessions = (items + [USER_COL, TIME_COL, ROW_COL]) >> ops.Groupby(
        groupby_cols=[USER_COL], sort_cols=[TIME_COL, ROW_COL],
        aggs={ITEM_COL: ["list", "count"]}, name_sep="-",
    )
    return nvt.Workflow(sessions, client=client)


class TrainingWindows(ops.Operator):
    """Cuts each training history into windows of <= length items stepping back by length - 1, so that
    a causal model predicting every next position sees every item but the first exactly once as a
    target. Changes the row count, so it carries the other selected columns along."""

    def __init__(self, length: int, list_col: str = ITEM_LIST):
        super().__init__()
        self.length, self.list_col = length, list_col

    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        on_gpu = not isinstance(df, pd.DataFrame)
        pdf = df.to_pandas() if on_gpu else df  # windowing is cheap next to Groupby; numpy keeps it simple
        lists = pdf[self.list_col]
        lengths = lists.map(len).to_numpy()
        step = self.length - 1
        n_windows = np.where(lengths > 1, -(-(lengths - 1) // step), 0)  # ceil((n-1)/step)
        row = np.repeat(np.arange(len(pdf)), n_windows)
        k = np.arange(n_windows.sum()) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
        ends = lengths[row] - k * step
        starts = np.maximum(ends - self.length, 0)
        flat = np.concatenate([np.asarray(v, dtype=np.int64) for v in lists]) if len(pdf) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        base = offsets[row]
        out = pdf[[c for c in col_selector.names if c != self.list_col]].iloc[row].reset_index(drop=True)
        out[self.list_col] = [flat[b + s:b + e] for b, s, e in zip(base, starts, ends)]
        out = out[col_selector.names]
        if on_gpu:
            import cudf
            return cudf.from_pandas(out)
        return out

    def _compute_properties(self, col_schema, input_schema):
        col_schema = super()._compute_properties(col_schema, input_schema)
        if col_schema.name == self.list_col:
            props = {**col_schema.properties, "value_count": {"min": 0, "max": self.length}}
            return col_schema.with_properties(props)
        return col_schema


class ListSlice(ops.ListSlice):
    """NVTabular 23.08's ListSlice computes a negative size bound for slices like [0:-2]
    (list_slice.py: `max_elements = end - start` with a negative end), which makes its schema
    invalid. Such a slice has no fixed bound, so it is left open; everything else is upstream's."""

    def __init__(self, start, end=None, pad=False, pad_value=0.0):
        super().__init__(start, end, pad, pad_value)
        if self.start >= 0 and self.end is not None and self.end < 0:
            self.max_elements = np.iinfo(np.int64).max


def split_workflow(split: str, cfg: SessionConfig, categories_dir: str, client=None) -> nvt.Workflow:
    """Leave-one-out view `split` of the per-user sessions (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    L = cfg.max_length
    users = [USER_COL, ITEM_LIST, ITEM_COUNT] >> ops.Filter(f=lambda df: df[ITEM_COUNT] >= cfg.min_interactions)
    user_idx = users[USER_COL] >> ops.Categorify(out_path=categories_dir) >> ops.Rename(name=USER_IDX) >> ops.TagAsUserID()
    if split == "train":
        history = users[ITEM_LIST] >> ListSlice(0, -2)
        out = (user_idx + history) >> TrainingWindows(L + 1)
        out = (out[ITEM_LIST] >> ops.AddTags(ITEM_TAGS) >> ops.ValueCount()) + out[USER_IDX]
        return nvt.Workflow(out, client=client)
    end = None if split == "test" else -1  # the target: last item (test) or second-to-last (valid)
    window = users[ITEM_LIST] >> ListSlice(-(L + 1) if end is None else -(L + 2), end)
    seen = users[ITEM_LIST] >> ops.Rename(name=SEEN_LIST) >> ListSlice(0, -1 if end is None else -2)
    out = user_idx + (window >> ops.AddTags(ITEM_TAGS) >> ops.ValueCount()) + (seen >> ops.ValueCount())
    return nvt.Workflow(out, client=client)


def inference_workflow(item_vocab: pd.Series, cfg: SessionConfig, categories_dir: str) -> nvt.Workflow:
    """Serving: a raw `item_id-list` per request -> the training encoding of its last L items.
    Only row-preserving ops, so no request is ever dropped; unknown items map to the OOV index 2."""
    vocab = pd.Series(item_vocab.values, name=ITEM_LIST)
    out = [ITEM_LIST] >> ops.Categorify(vocabs={ITEM_LIST: vocab}, out_path=categories_dir) \
        >> ListSlice(-cfg.max_length) >> ops.AddTags(ITEM_TAGS)
    return nvt.Workflow(out)


def inference_input_schema() -> Schema:
    from merlin.schema import ColumnSchema
    return Schema([ColumnSchema(ITEM_LIST, dtype=str, is_list=True, is_ragged=True)])
