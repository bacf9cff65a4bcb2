"""Custom NVTabular operators of the session workflows. Each extends an NVTabular op; where one works
around an NVTabular 23.08 limitation, its docstring says which."""

from __future__ import annotations

import numpy as np
import pandas as pd
from merlin.core.dispatch import DataFrameType
from merlin.dag import ColumnSelector
from nvtabular import ops

from odmt_t4r.contract import ITEM_LIST


class Groupby(ops.Groupby):
    """NVTabular's Groupby with a vectorised CPU path for "list" and "count" aggregations.
    On pandas, NVTabular 23.08 builds lists with `DataFrameGroupBy.agg(list)`, which calls a Python
    function per group (most of the ETL time); here one stable argsort by key and `np.split` build the
    same lists in the same row order. cuDF (GPU) and any other aggregation take upstream's path."""

    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if not isinstance(df, pd.DataFrame) or len(self.groupby_cols) != 1 or not len(df) or not self._list_and_count_only():
            return super().transform(col_selector, df)
        if self.sort_cols:
            df = df.sort_values(self.sort_cols, ascending=self.ascending, ignore_index=True, kind="stable")
        key = self.groupby_cols[0]
        codes, uniques = pd.factorize(df[key], sort=True)  # sorted keys, like pandas' groupby(sort=True)
        order = np.argsort(codes, kind="stable")  # keeps the sort_cols order inside each group
        counts = np.bincount(codes, minlength=len(uniques))
        bounds = np.cumsum(counts)[:-1]
        out = pd.DataFrame({key: uniques})
        for col in col_selector.names:
            if col in self.groupby_cols:
                continue
            aggs = self.conv_aggs.get(col, self.conv_aggs.get("__all__", []))
            names = ["list" if a in ("list", list) else a for a in aggs]
            if "list" in names:
                values = df[col].to_numpy()[order]
                out[f"{col}{self.name_sep}list"] = pd.Series(np.split(values, bounds), dtype="object")
            if "count" in names:
                out[f"{col}{self.name_sep}count"] = counts.astype(np.int32)
        return out

    def _list_and_count_only(self) -> bool:
        allowed = {"list", list, "count"}
        return all(a in allowed for aggs in self.conv_aggs.values() for a in aggs)


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

    def _compute_shape(self, col_schema, input_schema):
        # the input shape is copied last by merlin's Operator; the windows bound the list length
        col_schema = super()._compute_shape(col_schema, input_schema)
        if col_schema.name == self.list_col:
            return col_schema.with_shape((None, (0, self.length)))
        return col_schema


class ListSlice(ops.ListSlice):
    """NVTabular 23.08's ListSlice computes a negative size bound for slices like [0:-2]
    (list_slice.py: `max_elements = end - start` with a negative end), which makes its schema
    invalid. Such a slice has no fixed bound, so it is left open; everything else is upstream's."""

    def __init__(self, start, end=None, pad=False, pad_value=0.0):
        super().__init__(start, end, pad, pad_value)
        if self.start >= 0 and self.end is not None and self.end < 0:
            self.max_elements = np.iinfo(np.int64).max
