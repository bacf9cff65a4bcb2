"""`OdmtPredict`: the last operator of the serving ensemble, an ODMT/SASRec RUN scoring sessions.

A merlin-systems 23.08 graph operator (a `merlin.dag.BaseOperator`: this release has no
`InferenceOperator`) that runs inside the executor model on Triton's PYTHON backend, so it needs no
libtorch backend. Per request:

    item_id-list  ragged int64 item indices (the training encoding: 0 pad, 1 null, 2 OOV, 3.. items)
      -> right-padded history [B L] (the last L items of each session)
      -> model.recommend: mean of the branch scores over every item, those L items masked
      -> top-k item indices -> raw item IDs through the vocabulary, and their scores

    item_ids  object (bytes) [B, K]   raw item IDs, best first; b"" pads a row with fewer than K items
    scores    float32        [B, K]   their scores, descending; -inf where the ID is b""
    contribution_<branch>  float32 [B, K]   OPTIONAL, one per branch in the fused score (id/text/image):
              how far that branch lifts each returned item above an average catalog item, weighted as
              the fusion weighs it (odmt_t4r/model/explain.py); the largest says which branch drove it.
              0 where the ID is b"" and for empty sessions (answered by popularity).
    unknown_ids  int32       [B, 1]   how many of the session's raw IDs the served catalog does not hold:
              passed on from the fast lookup (the whole request), else counted here as the OOV indices
              among the items the workflow kept (its last L). Always computed (a cumsum); a client that
              does not name it does not receive it.
    unknown_rule_ids  int32  [B, 2]   how many raw IDs of the request's exclude_ids / include_ids lists the
              served catalog does not hold (they are ignored); 0 without rules.

Business rules (per request, optional inputs the executor hands over as `rules`, one entry per session):
    exclude_ids  raw IDs never returned;  include_ids  only these may be returned;
    filter       one JSON object over the catalog's attributes (odmt_t4r/model/item_filter.py): only the items
                 it allows may be returned. The attributes ship as an artifact (SERVED_ATTRIBUTES) and are
                 indexed at load; the executor has `check_rules` refuse a malformed filter for its request only.
The answer is the unrestricted ranking with those items removed (same items, order and scores: the
retriever applies the rule before its top-k, odmt_t4r/model/retrieval.py); an include list leaving fewer
than K items gets padding. The raw IDs are resolved against the served catalog here, for both transforms,
so the rules need no column in the merlin graph. An empty session's popularity answer obeys them too.

The contributions are computed only when the executor says a request asked for them (`requested`, set
per graph run from the requests' requested outputs); otherwise `transform` returns zero-stride
placeholders the executor never sends, so a request without them pays nothing but an array header.

An empty session has no history to encode: it gets the K most popular training items (the model's
`log_popularity` buffer, ties in vocabulary order) with their log training counts as scores.

The model is loaded once per Triton model instance (`load_artifacts`), in eval mode, and each branch's
item matrix is computed there (from the prepared DIR's frozen features when they are reachable,
otherwise read from the RUN's saved item_vectors.pt); requests only run the sequence encoders and
one matrix product per branch. The sequence encoders are TorchScript-traced at load (same weights and
ops, ~2.5x faster at batch 1 on CPU; each trace is compared with the eager encoder on other batch
sizes and dropped if it differs). torch runs one intra-op thread per instance: on 2 shared cores more
threads only spin against each other (a batch-1 call went from ~3 ms to ~800 ms under load).
The model never enters the pickled ensemble (`__getstate__`): the RUN's files are copied next to it
by `save_artifacts`, so the model repository is self-contained.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.table import TensorTable

ITEM_IDS, SCORES = "item_ids", "scores"
CONTRIBUTION = "contribution_"  # + branch name: the optional per-branch outputs
UNKNOWN_IDS = "unknown_ids"  # triton_models.vocab_lookup.UNKNOWN_IDS: unknown raw IDs per session
EXCLUDE_IDS, INCLUDE_IDS, FILTER = RULE_INPUTS = ("exclude_ids", "include_ids", "filter")  # optional, per request
UNKNOWN_RULE_IDS = "unknown_rule_ids"  # INT32 [B, 2]: the rule lists' raw IDs not in the served catalog
ARTIFACT_DIR = "odmt_model"  # under the executor model's ensemble/ folder
SERVED_ITEMS = "served_items.json"  # artifact: the raw IDs this version serves, index order from 3 on
SERVED_ATTRIBUTES = "served_attributes.parquet"  # artifact: their catalog attributes, one row per index row from 0
from odmt_t4r.contract import ITEM_LIST, OOV, RESERVED_ROWS, RUN_CONFIG, RUN_WEIGHTS, RunFolder, last_items  # noqa: E402

SERVED_RUN_FILES = (RUN_CONFIG, *RUN_WEIGHTS)  # what the executor ships of a RUN (item_vectors.pt optional)


def with_availability(rule, available):
    """A request's ItemRules (or None) that also lets only the available items through (`available`: the
    availability's ItemRules, or None when every item is available)."""
    if available is None or rule is None:
        return rule if available is None else available
    from odmt_t4r.model.retrieval import ItemRules

    allow = available.allow if rule.allow is None else rule.allow & available.allow
    return ItemRules(exclude=rule.exclude, include=rule.include, allow=allow)


class OdmtPredict(BaseOperator):
    """Merlin operator: encoded sessions -> top-k raw item IDs and scores (see the module docstring)."""

    rule_inputs = RULE_INPUTS  # the executor reads these optional request inputs and sets `rules` per graph run

    def __init__(self, run_dir: str | os.PathLike, item_ids: Sequence[str], k: int = 10,
                 data_dir: str | os.PathLike | None = None, input_column: str = ITEM_LIST,
                 torch_threads: int = 1, jit: bool = True):
        super().__init__()
        if k < 1:
            raise ValueError("k must be >= 1")
        self.run_dir = str(Path(run_dir).resolve())
        self.data_dir = str(Path(data_dir).resolve()) if data_dir else None
        self.k = int(k)
        self.input_column = input_column
        self.torch_threads = int(torch_threads)
        self.jit = bool(jit)
        self.jit_status = "not loaded"
        # index -> raw ID as UTF-8 bytes (the BYTES output); b"" for the reserved rows and padding
        ids = np.empty(len(item_ids), dtype=object)
        ids[:] = [b"" if i is None else str(i).encode("utf-8") for i in item_ids]
        ids[:RESERVED_ROWS] = b""
        self.item_ids = ids
        self._model = None
        self._popular: tuple[np.ndarray, np.ndarray] | None = None
        self.explained = explained_branches(self.run_dir)  # the branches with a contribution output
        self.requested: frozenset[str] | None = None  # outputs to compute; None = all (in-process use)
        # per graph run: one {rule input: raw IDs} per session (a request's sessions share one dict), or None
        self.rules: list[dict | None] | None = None
        self._catalog_index = None  # pandas Index of the served raw IDs (bytes), built at load
        self._attributes = None  # item_filter.AttributeIndex of the served catalog, built at load
        self._popular_order: np.ndarray | None = None  # every item by popularity, for rules on empty sessions
        self._explainer = None  # BranchExplainer and raw ID -> index, built on the first explanation
        # the repository's availability (triton_models/availability.py), set by the executor before each run:
        # (its sequence number, the raw IDs that may not be served or None); applied to every session
        self.availability: tuple[int, np.ndarray | None] = (0, None)
        self._available: tuple[int, object] = (0, None)  # (sequence, ItemRules allowing the available rows)

    # -- model lifecycle -------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_model"] = None  # the weights travel as artifacts, not inside ensemble.pkl
        state["_popular"] = None
        state["_explainer"] = None
        state["_catalog_index"] = None
        state["_attributes"] = None
        state["_popular_order"] = None
        state["rules"] = None
        state["availability"], state["_available"] = (0, None), (0, None)
        return state

    def save_artifacts(self, artifact_path: str | os.PathLike | None = None) -> None:
        if not artifact_path:
            return
        target = Path(artifact_path) / ARTIFACT_DIR
        target.mkdir(parents=True, exist_ok=True)
        for name in SERVED_RUN_FILES:
            src = Path(self.run_dir) / name
            if src.is_file():
                shutil.copyfile(src, target / name)
            elif name != RUN_WEIGHTS[1]:
                raise FileNotFoundError(f"{src} is missing: {self.run_dir} is not a saved model RUN")
        # the served catalog, readable without unpickling: a later `add-items --repo` checks its lineage
        (target / SERVED_ITEMS).write_text(json.dumps([i.decode("utf-8") for i in self.item_ids[RESERVED_ROWS:]]))
        self.attribute_table().to_parquet(target / SERVED_ATTRIBUTES)  # what filters are evaluated on

    def attribute_table(self):
        """The served catalog's attributes, one row per index row (data/attributes.py), from the RUN and its DIR."""
        from odmt_t4r.data.attributes import run_attributes

        frame = run_attributes(self.run_dir, self.data_dir)
        if len(frame) != len(self.item_ids):
            raise ValueError(f"{self.run_dir}'s catalog has {len(frame)} rows, the served vocabulary {len(self.item_ids)}")
        return frame

    def load_artifacts(self, artifact_path: str | os.PathLike | None = None) -> None:
        # merlin.dag.Graph.__init__ calls load_artifacts("") when the ensemble is built: stay lazy then.
        if not artifact_path:
            return
        folder = Path(artifact_path) / ARTIFACT_DIR
        if self.torch_threads > 0:  # a serving process (one stub per instance): set it process-wide
            import torch

            torch.set_num_threads(self.torch_threads)
        self._load(folder if (folder / "config.json").is_file() else Path(self.run_dir))

    def _load(self, folder: Path) -> None:
        try:
            from odmt_t4r.model import OdmtRecommender
        except ImportError as exc:
            raise ImportError(f"OdmtPredict needs the odmt_t4r package in the server's Python ({exc}); install the "
                              "project there (pip install -e .) or start tritonserver with its venv first on PATH") from exc

        data_dir = self.data_dir
        if data_dir is None:
            data_dir = RunFolder(folder).recorded_data().get("dir")
        if data_dir and not Path(data_dir).is_dir():
            data_dir = None  # DIR moved or absent: the saved item vectors score the same
        model = OdmtRecommender.from_pretrained(folder, data_dir=data_dir)
        model.eval()
        if model.config.n_index != len(self.item_ids):
            raise ValueError(f"the model indexes {model.config.n_index} rows but the vocabulary has "
                             f"{len(self.item_ids)}: the RUN was not trained on this prepared DIR")
        model.catalog_vectors()  # each branch's item matrix, once, now
        model.retriever()  # the fused item matrix and, for a large catalog, its HNSW index (retrieval.py)
        self.jit_status = trace_sequence_encoders(model) if self.jit else "off"
        pop = model.log_popularity.detach().cpu().numpy().astype(np.float64).copy()
        pop[:RESERVED_ROWS] = -np.inf
        everything = np.argsort(-pop, kind="stable")[: len(pop) - RESERVED_ROWS]
        order = everything[: self.k]
        self._popular = (order, pop[order].astype(np.float32))
        self._popular_order = everything
        self._catalog_index = catalog_index(self.item_ids)
        self._attributes = self._attribute_index(folder)
        self._model = model
        self.recommend(np.zeros(1, dtype=np.int64), np.array([0, 1], dtype=np.int64))  # warm up torch

    def _attribute_index(self, folder: Path):
        """The filters' index: the shipped artifact, else (in-process, before export) the RUN's catalog."""
        import pandas as pd

        from odmt_t4r.model.item_filter import AttributeIndex

        shipped = folder / SERVED_ATTRIBUTES
        if shipped.is_file():
            return AttributeIndex(pd.read_parquet(shipped), len(self.item_ids))
        try:
            return AttributeIndex(self.attribute_table(), len(self.item_ids))
        except (OSError, ValueError):  # a repository exported before filters, its DIR gone: it declares no filter input
            return AttributeIndex(pd.DataFrame(index=range(len(self.item_ids))), len(self.item_ids))

    @property
    def model(self):
        if self._model is None:
            self._load(Path(self.run_dir))  # in-process use before export
        return self._model

    # -- scoring ---------------------------------------------------------------------------------
    def history(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """values/offsets -> right-padded [B L] int64: each session's last L items, left-aligned."""
        return last_items(values, offsets, self.model.config.max_length)

    def recommend(self, values: np.ndarray, offsets: np.ndarray, rules=None) -> tuple[np.ndarray, np.ndarray]:
        """Encoded sessions (values/offsets) -> (raw IDs object [B K], scores float32 [B K]); rules: business
        rules in raw IDs, {"exclude_ids": [...], "include_ids": [...]} for every session or one such dict
        (or None) per session (`session_rules`)."""
        B = np.asarray(offsets).size - 1
        return self._recommend(values, offsets, self.session_rules(rules, B)[0])

    def _recommend(self, values: np.ndarray, offsets: np.ndarray, rules) -> tuple[np.ndarray, np.ndarray]:
        import torch

        model = self.model
        hist = self.history(values, offsets)
        B, K = hist.shape[0], self.k
        ids = np.full((B, K), b"", dtype=object)
        scores = np.full((B, K), -np.inf, dtype=np.float32)
        if B == 0:
            return ids, scores
        with torch.inference_mode():
            top_scores, top_idx = model.recommend(torch.from_numpy(hist), k=K, rules=rules)
        top_scores, top_idx = top_scores.numpy(), top_idx.numpy()
        n = top_idx.shape[1]
        found = np.isfinite(top_scores)  # fewer unseen items than K: those slots stay padding
        ids[:, :n] = np.where(found, self.item_ids[top_idx], b"")
        scores[:, :n] = np.where(found, top_scores, -np.inf)
        empty = hist[:, 0] == 0
        for row in np.flatnonzero(empty):
            order, pop = self._popular if rules is None or rules[row] is None else self._popular_under(rules[row])
            ids[row], scores[row] = b"", -np.inf
            ids[row, : len(order)] = self.item_ids[order]
            scores[row, : len(order)] = pop
        return ids, scores

    # -- business rules --------------------------------------------------------------------------
    def session_rules(self, rules, batch: int) -> tuple[list | None, np.ndarray]:
        """Raw-ID rules (None, one dict for every session, or one dict or None per session) -> (one
        retrieval.ItemRules or None per session, None when no session has one; INT32 [B, 2] the unknown IDs
        of each session's exclude and include lists). Sessions sharing a dict share its ItemRules."""
        unknown = np.zeros((batch, 2), dtype=np.int32)
        available = self._availability_rule()
        if rules is None:
            return (None if available is None else [available] * batch), unknown
        per_session = [rules] * batch if isinstance(rules, dict) else list(rules)
        if len(per_session) != batch:
            raise ValueError(f"rules: one per session ({batch}), got {len(per_session)}")
        resolved: dict[int, tuple] = {}
        out = []
        for row, lists in enumerate(per_session):
            if lists is None:
                out.append(available)
                continue
            if id(lists) not in resolved:
                rule, counts = self._item_rules(lists)
                resolved[id(lists)] = (with_availability(rule, available), counts)
            rule, unknown[row] = resolved[id(lists)]
            out.append(rule)
        return (None if all(r is None for r in out) else out), unknown

    def _availability_rule(self):
        """The ItemRules that lets only the available items through (every session obeys it), built once per
        change of the repository's availability; None when every item is available."""
        import torch

        from odmt_t4r.model.retrieval import ItemRules

        sequence, ids = self.availability
        if self._available[0] != sequence:
            rule = None
            if ids is not None and len(ids):
                mask = torch.ones(len(self.item_ids), dtype=torch.bool)
                rows = self.catalog_rows(ids)
                mask[torch.from_numpy(rows[rows >= 0])] = False  # an ID a newer version dropped: nothing to hide
                rule = ItemRules(allow=mask)
            self._available = (sequence, rule)
        return self._available[1]

    def check_rules(self, lists: dict | None) -> None:
        """Raises ValueError for rules that cannot run (a malformed filter): the executor answers that request
        alone with the error, before the batch's graph run."""
        if lists and lists.get(FILTER) is not None:
            self.model  # noqa: B018 - loads the attribute index
            self._attributes.parse(lists[FILTER])

    def _item_rules(self, lists: dict):
        """{"exclude_ids": raw IDs, "include_ids": raw IDs, "filter": JSON} -> (ItemRules over index rows,
        [unknown exclude, unknown include]); a list that is absent or None is no rule, an empty include list
        allows nothing."""
        import torch

        from odmt_t4r.model.retrieval import ItemRules

        unexpected = set(lists) - set(RULE_INPUTS)
        if unexpected:
            raise ValueError(f"unknown rule lists {sorted(unexpected)}; known: {list(RULE_INPUTS)}")
        allow = None
        if lists.get(FILTER) is not None:
            self.model  # noqa: B018 - loads the attribute index
            mask = self._attributes.allowed(self._attributes.parse(lists[FILTER]))
            allow = None if mask is None else torch.from_numpy(mask)
        rows, unknown = {}, []
        for name in (EXCLUDE_IDS, INCLUDE_IDS):
            raw = lists.get(name)
            if raw is None:
                rows[name] = None
                unknown.append(0)
                continue
            found = self.catalog_rows(raw)
            unknown.append(int(np.sum(found < 0)))
            rows[name] = torch.from_numpy(found[found >= 0])
        if rows[EXCLUDE_IDS] is None and rows[INCLUDE_IDS] is None and allow is None:
            return None, unknown
        return ItemRules(exclude=rows[EXCLUDE_IDS], include=rows[INCLUDE_IDS], allow=allow), unknown

    def catalog_rows(self, raw) -> np.ndarray:
        """Raw item IDs (UTF-8 bytes as Triton sends them, or str) -> int64 index rows, -1 where unknown."""
        if self._catalog_index is None:
            self._catalog_index = catalog_index(self.item_ids)
        raw = np.asarray(raw, dtype=object).reshape(-1)
        if raw.size and not isinstance(raw[0], bytes):  # in-process callers pass str
            raw = np.array([str(v).encode("utf-8") for v in raw.tolist()], dtype=object)
        found = self._catalog_index.get_indexer(raw)  # a C hash lookup: ~10x a dict loop at 10^5 IDs
        return np.where(found >= 0, found + RESERVED_ROWS, -1).astype(np.int64)

    def _popular_under(self, rule) -> tuple[np.ndarray, np.ndarray]:
        """The popularity answer of an empty session (`_popular`) restricted to what `rule` allows."""
        self.model  # noqa: B018 - loads the popularity order
        allowed = rule.allowed(len(self.item_ids)).numpy()
        order = self._popular_order[allowed[self._popular_order]][: self.k]
        pop = self.model.log_popularity.detach().cpu().numpy()[order].astype(np.float32)
        return order, pop

    @staticmethod
    def unknown_ids(transformable: TensorTable, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """INT32 [B, 1]: the lookup's count of unknown raw IDs per session when it sent one (fast transform),
        else the OOV indices among the encoded items (the workflow transform keeps each session's last L)."""
        if UNKNOWN_IDS in transformable.columns:
            return np.asarray(transformable[UNKNOWN_IDS].values, dtype=np.int32).reshape(-1, 1)
        seen = np.zeros(np.size(values) + 1, dtype=np.int64)
        np.cumsum(np.asarray(values).reshape(-1) == OOV, out=seen[1:])
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        return (seen[offsets[1:]] - seen[offsets[:-1]]).astype(np.int32).reshape(-1, 1)

    # -- explanations ----------------------------------------------------------------------------
    @property
    def optional_outputs(self) -> tuple[str, ...]:
        """Outputs computed only when asked for (the executor sets `requested` per graph run)."""
        return tuple(CONTRIBUTION + b for b in self.explained)

    def explain(self, values: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Encoded sessions and their answered raw IDs [B K] -> {contribution_<branch>: float32 [B K]}:
        each branch's weighted lift of each item over an average catalog item (odmt_t4r/model/explain.py).
        Padding (b"") and empty sessions (popularity answers) get 0."""
        import torch

        from odmt_t4r.model.explain import BranchExplainer

        if self._explainer is None:
            index = {raw: i for i, raw in enumerate(self.item_ids.tolist()) if raw}
            self._explainer = (BranchExplainer(self.model), index)
        explainer, index = self._explainer
        hist = self.history(values, offsets)
        idx = np.vectorize(lambda raw: index.get(raw, 0), otypes=[np.int64])(ids) if ids.size else \
            np.zeros(ids.shape, dtype=np.int64)
        explained = (idx > 0) & (hist[:, :1] > 0)  # a real item answered from a session's history
        out = {CONTRIBUTION + b: np.zeros(ids.shape, dtype=np.float32) for b in self.explained}
        if explained.any():
            with torch.inference_mode():
                lifts = explainer.contributions(torch.from_numpy(hist), torch.from_numpy(idx))
            for b, lift in lifts.items():
                out[CONTRIBUTION + b] = np.where(explained, lift.numpy(), 0.0).astype(np.float32)
        return out

    # -- merlin operator -------------------------------------------------------------------------
    def transform(self, col_selector: ColumnSelector, transformable: TensorTable) -> TensorTable:
        col = transformable[self.input_column]
        if col.offsets is None:  # every session had the same length: merlin sent a 2-D array
            values = col.values
            offsets = np.arange(values.shape[0] + 1, dtype=np.int64) * (values.shape[1] if values.ndim > 1 else 1)
        else:
            values, offsets = col.values, col.offsets
        rules, unknown_rules = self.session_rules(self.rules, np.asarray(offsets).size - 1)
        ids, scores = self._recommend(values, offsets, rules)
        out = {ITEM_IDS: ids, SCORES: scores, UNKNOWN_IDS: self.unknown_ids(transformable, values, offsets),
               UNKNOWN_RULE_IDS: unknown_rules}
        optional = self.optional_outputs
        if self.requested is None or not self.requested.isdisjoint(optional):
            out.update(self.explain(values, offsets, ids))
        else:  # not asked for: a read-only zero-stride view (no data) keeps the graph's output schema whole
            out.update({name: np.broadcast_to(np.float32(0), ids.shape) for name in optional})
        return TensorTable(out)

    def compute_input_schema(self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema,
                             selector: ColumnSelector) -> Schema:
        schema = parents_schema + deps_schema
        if self.input_column not in schema.column_names:
            raise ValueError(f"OdmtPredict needs the encoded column {self.input_column!r}, got {schema.column_names}")
        return schema[[self.input_column, *([UNKNOWN_IDS] if UNKNOWN_IDS in schema.column_names else [])]]

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Schema | None = None) -> Schema:
        return Schema([
            ColumnSchema(ITEM_IDS, dtype="object", tags=[Tags.ITEM_ID], dims=(None, self.k)),
            ColumnSchema(SCORES, dtype=np.float32, dims=(None, self.k)),
            *(ColumnSchema(name, dtype=np.float32, dims=(None, self.k)) for name in self.optional_outputs),
            ColumnSchema(UNKNOWN_IDS, dtype=np.int32, dims=(None, 1)),
            ColumnSchema(UNKNOWN_RULE_IDS, dtype=np.int32, dims=(None, 2)),
        ])

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE

    def __repr__(self) -> str:
        return f"OdmtPredict(run_dir={self.run_dir!r}, k={self.k}, items={len(self.item_ids) - RESERVED_ROWS})"


def catalog_index(item_ids: np.ndarray):
    """pandas Index of the served raw IDs (bytes, index rows from RESERVED_ROWS on): a C hash table."""
    import pandas as pd

    return pd.Index(item_ids[RESERVED_ROWS:], dtype=object)


def explained_branches(run_dir: str | os.PathLike) -> list[str]:
    """The branches of a RUN's fused score (weight > 0), in model order: one contribution output each."""
    from odmt_t4r.model import OdmtConfig
    from odmt_t4r.model.explain import fusion_weights

    config = OdmtConfig.from_dict(RunFolder(run_dir).config()["model"])
    return list(fusion_weights(config))


def trace_sequence_encoders(model, atol: float = 1e-5) -> str:
    """Replaces each branch's sequence encoder (a T4R TransformerBlock around a Hugging Face model) by
    its TorchScript trace: the same weights and ops without the Python module overhead, about 2.5x
    faster at batch 1 on CPU. The trace is kept only if it matches the eager encoder on other batch
    sizes than the one traced; otherwise the eager encoder stays. Returns what was done."""
    import warnings

    import torch

    L = model.config.max_length
    done = []
    for name, branch in model.branches.items():
        eager = branch.encoder
        try:
            width = model.catalog_vectors()[name].shape[1]
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about Python ints from shapes
                traced = torch.jit.trace(eager, (torch.randn(2, L, width, generator=gen),), check_trace=False)
                traced = torch.jit.freeze(traced.eval())
                for B in (1, 3, 7):
                    x = torch.randn(B, L, width, generator=gen)
                    diff = (traced(x) - eager(x)).abs().max().item()
                    if not diff <= atol:
                        raise ValueError(f"trace differs from eager by {diff:.3g} at batch {B}")
        except Exception as exc:  # noqa: BLE001 - an untraceable encoder still serves, eagerly
            done.append(f"{name}: eager ({type(exc).__name__}: {exc})")
            continue
        branch.encoder = traced
        done.append(f"{name}: traced")
    return "; ".join(done)
