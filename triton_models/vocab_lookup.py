"""The `fast` request transform: the fitted inference workflow's Categorify + ListSlice as array ops.

The saved inference workflow (workflows/sessions.py `inference_workflow`) is

    item_id-list (raw IDs) >> Categorify(vocabs=<fixed vocabulary>) >> ListSlice(start, end) >> AddTags

NVTabular 23.08 runs it on pandas: list column -> flattened frame -> merge with the vocabulary parquet
-> fillna(OOV) -> rebuilt list column -> Python slice per row, about 9 ms per request on 2 cores.
`VocabularyLookup` reads the same fitted vocabulary file and the same slice bounds from that workflow
and does the same thing with one dict lookup per item and two numpy ops, in microseconds:

    Categorify (no buckets, freq_threshold 0, max_size 0, search_sorted off, not single_table):
        label(v) = row index of v in the vocabulary parquet (its index starts at 3) if v is in it,
                   else OOV = 2                                  (nvtabular/ops/categorify.py `_encode`)
        (1 = null never occurs: the wire cannot carry a null item or a null session)
    ListSlice(start, end, pad=False) on pandas: `row[start:end]` per row (nvtabular/ops/list_slice.py)

`from_workflow` refuses any workflow that is not exactly that shape (other ops, hashing buckets,
frequency thresholds, padding, a non-string vocabulary): use `--transform workflow` for those.
Requests arrive from Triton as UTF-8 `bytes` and in-process as `str`; the lookup table holds both
spellings of every vocabulary entry, so neither is decoded per request.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema
from merlin.table import TensorTable

NULL_INDEX, OOV_INDEX = 1, 2  # nvtabular.ops.categorify NULL_OFFSET, OOV_OFFSET
UNKNOWN_IDS = "unknown_ids"  # INT32 [B, 1]: per session, its raw IDs the served catalog does not hold
_SLICE_END_OPEN = np.iinfo(np.int64).max  # ListSlice's `end=None`


class FastPathUnsupported(ValueError):
    """The workflow does something the array lookup does not reproduce; serve it with TransformWorkflow."""


def slice_bounds(lengths: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Python's `row[start:end]` (step 1) for every row length at once: (first index, new length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    s = np.where(start < 0, np.maximum(lengths + start, 0), np.minimum(start, lengths))
    e = np.where(end < 0, np.maximum(lengths + end, 0), np.minimum(end, lengths))
    return s, np.maximum(e - s, 0)


class VocabularyLookup(BaseOperator):
    """Merlin operator: ragged raw IDs -> ragged int64 item indices, sliced like the fitted workflow.

    Runs inside the executor model's graph (no extra Triton model, no pandas). The encoded column and its
    schema are the workflow's own, so the downstream operator cannot tell the two transforms apart; next to
    it goes `unknown_ids` (INT32 [B, 1]), each session's count of IDs the served catalog does not hold,
    counted over the whole request before the slice (OdmtPredict passes it on as an output)."""

    def __init__(self, column: str, vocabulary: Sequence[str], start: int, end: int,
                 output_schema: ColumnSchema | None = None, first_index: int = OOV_INDEX + 1):
        super().__init__()
        self.column = column
        self.vocabulary = np.asarray(list(vocabulary), dtype=object)  # index i -> label first_index + i
        self.first_index = int(first_index)
        self.start, self.end = int(start), int(end)
        self.output_column_schema = output_schema
        if len(set(self.vocabulary.tolist())) != len(self.vocabulary):
            raise FastPathUnsupported("the vocabulary has duplicate entries; Categorify's merge would repeat items")
        self._table: dict | None = None

    # -- built from the fitted workflow ---------------------------------------------------------
    @classmethod
    def from_workflow(cls, workflow, column: str | None = None) -> "VocabularyLookup":
        """The lookup equivalent to `workflow` (a fitted inference workflow), or FastPathUnsupported."""
        import pandas as pd
        from merlin.dag import postorder_iter_nodes
        from nvtabular.ops import AddMetadata, Categorify
        from nvtabular.ops import ListSlice as NvtListSlice

        names = workflow.input_schema.column_names
        if column is None:
            if len(names) != 1:
                raise FastPathUnsupported(f"the workflow has {len(names)} inputs {names}; the fast path serves one list column")
            column = names[0]
        if workflow.output_schema.column_names != [column]:
            raise FastPathUnsupported(f"the workflow outputs {workflow.output_schema.column_names}, not [{column!r}]")
        ops = [n.op for n in postorder_iter_nodes(workflow.output_node) if n.op is not None]
        kinds = [type(op) for op in ops]
        cats = [op for op in ops if isinstance(op, Categorify)]
        slices = [op for op in ops if isinstance(op, NvtListSlice)]
        others = [k.__name__ for k in kinds if not issubclass(k, (Categorify, NvtListSlice, AddMetadata))
                  and k.__name__ != "SelectionOp"]
        if len(cats) != 1 or len(slices) > 1 or others:
            raise FastPathUnsupported(f"expected Categorify [+ ListSlice] [+ tags], found {[k.__name__ for k in kinds]}")
        if slices and ops.index(slices[0]) < ops.index(cats[0]):
            raise FastPathUnsupported("ListSlice runs before Categorify")
        cat = cats[0]
        checks = {
            "num_buckets": cat.num_buckets in (None, 0, {}),
            "freq_threshold": cat.freq_threshold in (0, None) or (isinstance(cat.freq_threshold, dict)
                                                                   and not any(cat.freq_threshold.values())),
            "max_size": cat.max_size in (0, None, {}) or (isinstance(cat.max_size, dict) and not any(cat.max_size.values())),
            "search_sorted": not cat.search_sorted,
            "single_table": not cat.single_table,
            "fitted": bool(cat.categories),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise FastPathUnsupported(f"Categorify settings the fast path does not reproduce: {bad}")
        storage = cat.storage_name.get(column, column)
        path = cat.categories.get(storage)
        if path is None:
            raise FastPathUnsupported(f"Categorify has no fitted categories for {column!r}")
        vocab = pd.read_parquet(path)  # the exact file Categorify merges with; its index is the label
        values = vocab[storage] if storage in vocab else vocab.iloc[:, 0]
        if not (values.dtype == object and all(isinstance(v, str) for v in values)):
            raise FastPathUnsupported(f"the vocabulary is {values.dtype}, not strings: Categorify would cast the "
                                      "request to it first")
        labels = vocab.index.to_numpy()
        first = int(labels[0]) if len(labels) else OOV_INDEX + 1
        if not np.array_equal(labels, np.arange(first, first + len(labels))) or first != OOV_INDEX + 1:
            raise FastPathUnsupported(f"vocabulary labels are not {OOV_INDEX + 1}.. in order")
        if slices:
            sl = slices[0]
            if sl.pad:
                raise FastPathUnsupported("ListSlice(pad=True)")
            start, end = int(sl.start), int(sl.end)
        else:
            start, end = 0, _SLICE_END_OPEN
        return cls(column, values.tolist(), start, end, workflow.output_schema[column], first_index=first)

    def extended(self, added: Sequence[str]) -> "VocabularyLookup":
        """This lookup with `added` IDs (odmt add-items) labelled after the vocabulary, in order."""
        if not len(added):
            return self
        clash = set(added) & set(self.vocabulary.tolist())
        if clash:
            raise ValueError(f"{len(clash)} added item IDs are already in the vocabulary, e.g. {sorted(clash)[:3]}")
        return type(self)(self.column, [*self.vocabulary.tolist(), *added], self.start, self.end,
                          self.output_column_schema, first_index=self.first_index)

    # -- the lookup ------------------------------------------------------------------------------
    def _lookup_table(self) -> dict:
        if self._table is None:
            labels = range(self.first_index, self.first_index + len(self.vocabulary))
            table = dict(zip(self.vocabulary.tolist(), labels))
            table.update(zip((v.encode("utf-8") for v in self.vocabulary.tolist()), labels))
            self._table = table
        return self._table

    def encode(self, values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw IDs (str or UTF-8 bytes) as values/offsets -> (int64 item indices, int32 offsets)."""
        return self.sliced(*self.lookup(values, offsets))

    def lookup(self, values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw IDs as values/offsets -> (int64 item indices of every value, the checked int64 offsets): no slice."""
        values = np.asarray(values)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != values.shape[0] or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{self.column}__offsets must start at 0, never decrease and end at the number of "
                             f"values ({values.shape[0]}); got {offsets.tolist()[:8]}{'...' if offsets.size > 8 else ''}")
        table = self._lookup_table()
        codes = np.fromiter((table.get(v, OOV_INDEX) for v in values.reshape(-1).tolist()), dtype=np.int64,
                            count=values.size)
        return codes, offsets

    @staticmethod
    def unknown_counts(codes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Looked-up codes (before the slice) -> INT32 [B, 1]: how many of each session's IDs are unknown (OOV)."""
        seen = np.zeros(codes.size + 1, dtype=np.int64)
        np.cumsum(codes == OOV_INDEX, out=seen[1:])
        return (seen[offsets[1:]] - seen[offsets[:-1]]).astype(np.int32).reshape(-1, 1)

    def sliced(self, codes: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every value's code and the int64 offsets -> the workflow's ListSlice of each session (int32 offsets)."""
        lengths = np.diff(offsets)
        first, new_len = slice_bounds(lengths, self.start, self.end)
        new_offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(new_len, out=new_offsets[1:])
        if new_offsets[-1] == codes.size:  # nothing sliced away (the usual short session)
            return codes, new_offsets
        starts = offsets[:-1] + first
        index = np.repeat(starts - new_offsets[:-1], new_len) + np.arange(new_offsets[-1])
        return codes[index], new_offsets

    # -- merlin operator -------------------------------------------------------------------------
    def transform(self, col_selector: ColumnSelector, transformable: TensorTable) -> TensorTable:
        col = transformable[self.column]
        if col.offsets is None:  # a fixed-length list arrives as a 2-D array
            values = col.values
            lengths = np.full(values.shape[0], values.shape[1] if values.ndim > 1 else 1, dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            values = values.reshape(-1)
        else:
            values, offsets = col.values, col.offsets
        codes, offsets = self.lookup(values, offsets)
        unknown = self.unknown_counts(codes, offsets)  # the whole request's IDs, before the slice keeps the last L
        codes, new_offsets = self.sliced(codes, offsets)
        return TensorTable({f"{self.column}__values": codes, f"{self.column}__offsets": new_offsets,
                            UNKNOWN_IDS: unknown})

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Schema | None = None) -> Schema:
        unknown = ColumnSchema(UNKNOWN_IDS, dtype=np.int32, dims=(None, 1))
        if self.output_column_schema is not None:
            return Schema([self.output_column_schema, unknown])
        bound = None if self.start >= 0 or self.end != _SLICE_END_OPEN else -self.start
        return Schema([ColumnSchema(self.column, dtype=np.int64, is_list=True, is_ragged=True,
                                    dims=(None, (0, bound))), unknown])

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_table"] = None  # rebuilt on first use; keeps the pickle small
        return state

    def __repr__(self) -> str:
        return (f"VocabularyLookup({self.column!r}, {len(self.vocabulary)} items, "
                f"slice [{self.start}:{'' if self.end == _SLICE_END_OPEN else self.end}])")
