"""Top-k of the fused score over the whole catalog, the user's history excluded: exact in item blocks, or
through an approximate (HNSW) index for catalogs too large to score per request.

The fused score is one inner product. With weights w_b (1/n each for the plain mean) and the popularity
prior pw_b * log1p(train count):
    fused = sum_b w_b (h_b . v_b + pw_b c) = [w_1 h_1 ; ... ; sum_b w_b pw_b] . [v_1 ; ... ; c]
so each session becomes one query vector and the catalog one float32 matrix [N D'] (D' = the used branches'
widths, plus 1 with the prior), built once per model.
    exact  scores the catalog in blocks of `block_items` rows with a running top-k: memory B x block,
           never B x N; its scores equal `OdmtRecommender.score(...)["fused"]` up to float rounding.
    hnsw   faiss HNSW (inner product reduced to L2 by one extra coordinate, Bachrach et al. 2014) returns
           k + L candidates; the history is dropped and the rest re-scored exactly, so every returned
           score is exact and only recall is approximate (benchmarks/serving_scale.py measures it).
    auto   exact up to `exact_max_items` items, hnsw above (exact when faiss is not installed).
log_softmax fusion subtracts sum_b w_b logsumexp_b(s_b) per session, a constant that does not change the
ranking. The exact search computes it exactly while streaming (one pass, per-branch block products); the
hnsw search would need every item's score for it, so there the score is the weighted raw score (same
ranking, shifted by that constant): `score_definition` says which a retriever returns.

Business rules (`ItemRules`, one per request, shared by its sessions): never return `exclude`; return only
`include` when given, and only what an attribute filter `allow`s (model/item_filter.py). The answer is the
unfiltered ranking with those items removed: the same items, order and scores (the log_softmax constant
stays the whole catalog's).
    exact  the rule's mask is applied to each block before the running top-k.
    hnsw   a rule that allows at most `rules_exact_max_items` items is answered by an exact scan over just
           those items; a wider one walks the graph with the rule as a faiss selector (the walk passes through
           every node, only allowed ones are returned) with ef_search / sqrt(allowed fraction): a fixed ef lost
           recall as the rule narrowed (at 10^6 items, ef 512: 0.986 for a 50% exclude list, 0.94 for a 2%
           include list; scaled: 0.993-0.999 from 50% to 2.5%), then re-scores exactly. If the walk finds
           fewer than k allowed items, the exact scan over the allowed items answers instead, so a rule always
           gets k items when k are allowed. (benchmarks/serving_scale.py measures the filtered cases.)
A request without rules takes the same path as before (`rules` None: no mask, no grouping).

An index is built once per catalog and cached on disk (`cache_dir`, keyed by the sha256 of the matrix and
the settings), so `odmt export`'s in-process check, its reference model and the server's instances load
the same index and give the same answers.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from odmt_t4r.contract import RESERVED_ROWS

INDEXES = ("auto", "exact", "hnsw")


@dataclass
class RetrievalConfig:
    """How `OdmtRecommender.recommend` finds the top-k; saved in a RUN's config.json under "retrieval"."""

    index: str = "auto"  # "auto" | "exact" | "hnsw"
    # auto: exact up to this many items (benchmarks/serving_scale.py: the exact scan's p50 passes the hnsw
    # search's between 10^4 and 10^5 items at trained sizes on one thread)
    exact_max_items: int = 20_000
    block_items: int = 65_536  # exact: catalog rows scored at once (memory B x block_items floats)
    hnsw_m: int = 32  # graph degree
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 512  # search breadth: the recall/latency knob (recall@10 >= 0.99 at 10^6, measured)
    # hnsw with a business rule: at most this many allowed items are scanned exactly instead of walked (at
    # 10^6 items a 10k-item scan took 1.3 ms, a 20k one 8 ms; the walk a 2.5% rule needs took 11 ms, p50)
    rules_exact_max_items: int = 20_000
    cache_dir: str | None = None  # None: $ODMT_CACHE_DIR/retrieval, else ~/.cache/odmt-t4r/retrieval

    def validate(self) -> "RetrievalConfig":
        if self.index not in INDEXES:
            raise ValueError(f"retrieval index {self.index!r}; choose one of {INDEXES}")
        for name in ("exact_max_items", "block_items", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                     "rules_exact_max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"retrieval {name} must be >= 1, got {getattr(self, name)}")
        return self

    @classmethod
    def from_dict(cls, d: dict | None) -> "RetrievalConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d or {}) - known
        if unknown:
            raise ValueError(f"unknown retrieval settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**(d or {})).validate()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(eq=False)
class ItemRules:
    """One request's business rules over index rows: `exclude` rows are never returned; with `include`, only
    those rows may be (None: no such list; an empty include allows nothing); with `allow` (an attribute
    filter's mask, model/item_filter.py), only the rows it marks. Sessions share a rule by sharing the
    object: `search(..., rules=[r, r, None])` groups them by identity."""

    exclude: torch.Tensor | None = None  # int64 [E] index rows
    include: torch.Tensor | None = None  # int64 [I] index rows
    allow: torch.Tensor | None = None  # bool [n_rows]: the rows a filter allows

    def allowed(self, n_rows: int) -> torch.Tensor:
        """bool [n_rows]: the rows this rule lets through (reserved rows never)."""
        self._check(n_rows)
        if self.include is None:
            mask = torch.ones(n_rows, dtype=torch.bool) if self.allow is None else self.allow.clone()
            mask[:RESERVED_ROWS] = False
        else:
            mask = torch.zeros(n_rows, dtype=torch.bool)
            mask[self.include.long()] = True
            if self.allow is not None:
                mask &= self.allow
        if self.exclude is not None:
            mask[self.exclude.long()] = False
        return mask

    def included_rows(self, n_rows: int) -> torch.Tensor:
        """Sorted int64: the rows an include rule lets through, without an [n_rows] mask (include only)."""
        self._check(n_rows)
        rows = torch.unique(self.include.long())
        if self.allow is not None:
            rows = rows[self.allow[rows]]
        return rows if self.exclude is None else rows[~torch.isin(rows, self.exclude.long())]

    def _check(self, n_rows: int) -> None:
        if self.allow is not None and tuple(self.allow.shape) != (n_rows,):
            raise ValueError(f"ItemRules.allow has {tuple(self.allow.shape)} rows; the catalog indexes {n_rows}")
        for name, rows in (("exclude", self.exclude), ("include", self.include)):
            if rows is not None and len(rows) and not (RESERVED_ROWS <= int(rows.min()) and int(rows.max()) < n_rows):
                raise ValueError(f"ItemRules.{name} holds rows outside the catalog [{RESERVED_ROWS}, {n_rows}): "
                                 "give item indices, or raw IDs through the served graph")


def rule_groups(rules, batch: int) -> list[tuple[ItemRules | None, torch.Tensor]] | None:
    """Per-session rules (one ItemRules for all, or a sequence of B, each ItemRules or None) -> [(rule, its
    session rows)], sessions grouped by rule identity; None when no session has a rule."""
    if rules is None:
        return None
    if isinstance(rules, ItemRules):
        return [(rules, torch.arange(batch))]
    if len(rules) != batch:
        raise ValueError(f"rules: one per session ({batch}), got {len(rules)}")
    if all(r is None for r in rules):
        return None
    groups: dict[int, tuple[ItemRules | None, list[int]]] = {}
    for row, rule in enumerate(rules):
        groups.setdefault(id(rule), (rule, []))[1].append(row)
    return [(rule, torch.tensor(rows)) for rule, rows in groups.values()]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FusedRetriever:
    """The fused score as one item matrix and one query per session (see the module docstring). Built from
    plain arrays, so anything that has branch item vectors and session states can search with it."""

    def __init__(self, branch_items: dict[str, torch.Tensor], weights: dict[str, float], log_softmax: bool = False,
                 prior_weights: dict[str, float] | None = None, log_counts: torch.Tensor | None = None,
                 config: RetrievalConfig | None = None):
        """branch_items {branch: [N D]} every index row's item vectors; weights {branch: w} the fusion (only
        w > 0 are used); prior_weights {branch: pw} and log_counts [N] the popularity prior pw * log_counts,
        or None without a prior; log_softmax: the weighted scores are log-softmax scores."""
        self.config = (config or RetrievalConfig()).validate()
        self.weights = {b: float(w) for b, w in weights.items() if w > 0}
        self.log_softmax = log_softmax
        parts = [branch_items[b].detach().float().cpu() for b in self.weights]
        self.widths = [p.shape[1] for p in parts]
        self.has_prior = prior_weights is not None
        self.prior_weights = {b: float(prior_weights[b]) for b in self.weights} if self.has_prior else {}
        if self.has_prior:
            parts.append(log_counts.detach().float().cpu()[:, None])
        self.items = torch.cat(parts, 1).contiguous()  # [N D'] float32
        # [D'] query = [states ; 1] * scale: w_b on each branch's columns, sum_b w_b pw_b on the prior's
        scale = [torch.full((w,), wt) for w, wt in zip(self.widths, self.weights.values())]
        if self.has_prior:
            scale.append(torch.tensor([sum(wt * self.prior_weights[b] for b, wt in self.weights.items())]))
        self._query_scale = torch.cat(scale)
        self.n_items = self.items.shape[0] - RESERVED_ROWS
        kind = self.config.index
        if kind == "auto":
            kind = "hnsw" if self.n_items > self.config.exact_max_items and faiss_available() else "exact"
        self.kind = kind
        self._index = _build_hnsw(self.items, self.config) if kind == "hnsw" else None
        self.score_definition = ("weighted raw score (log_softmax fusion's per-session constant left out)"
                                 if kind == "hnsw" and self.log_softmax else "fused score")

    # -- queries --------------------------------------------------------------------------------
    def queries(self, states: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """{branch: [B D]} session states -> (query vectors [B D']: the weighted session states and the
        prior's weight, each used branch's own state [B D])."""
        used = [states[b].float().cpu() for b in self.weights]  # the item matrix lives on the CPU
        ones = [torch.ones(len(used[0]), 1)] if self.has_prior else []
        return torch.cat(used + ones, 1) * self._query_scale, used

    @torch.no_grad()
    def search(self, states: dict[str, torch.Tensor], excluded: torch.Tensor, k: int,
               rules: ItemRules | Sequence[ItemRules | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores [B K], item indices [B K]), K = min(k, catalog size), of the sessions' states;
        excluded [B S] item indices never returned (0 = pad); rules: business rules (`ItemRules`, for all
        sessions or one per session); -inf scores where no item is left."""
        q, used = self.queries(states)
        return self.top_k(q, used, excluded.long().cpu(), k, rules)

    def top_k(self, q: torch.Tensor, states: list[torch.Tensor], excluded: torch.Tensor, k: int, rules=None):
        """The search itself, from `queries(history)`; excluded [B S] item indices (0 = pad)."""
        k = min(k, self.n_items)
        groups = rule_groups(rules, len(q))
        if groups is None:  # no rules: the unfiltered search, nothing added
            return self._search(q, states, excluded, k, None)
        top_s = torch.full((len(q), k), float("-inf"))
        top_i = torch.zeros((len(q), k), dtype=torch.long)
        for rule, rows in groups:
            top_s[rows], top_i[rows] = self._search(q[rows], [h[rows] for h in states], excluded[rows], k, rule)
        return top_s, top_i

    def _search(self, q, states, excluded, k, rule: ItemRules | None):
        """One group of sessions under one rule (None: every item)."""
        n_rows = self.items.shape[0]
        if self._index is None:
            return self._search_exact(q, states, excluded, k, None if rule is None else rule.allowed(n_rows))
        if rule is None:
            return self._search_hnsw(q, excluded, k)
        if rule.include is not None:  # a narrow include list needs no [N] mask (1-2 ms at 10^6 items)
            rows = rule.included_rows(n_rows)
            if len(rows) <= self.config.rules_exact_max_items:
                return self._search_subset(q, excluded, k, rows)
        allowed = rule.allowed(n_rows)
        rows = allowed.nonzero()[:, 0]
        if len(rows) <= self.config.rules_exact_max_items:
            return self._search_subset(q, excluded, k, rows)
        top_s, top_i = self._search_hnsw(q, excluded, k, allowed, len(rows))
        short = torch.isinf(top_s[:, -1])  # the walk found fewer than k allowed items: scan them all
        if short.any():
            top_s[short], top_i[short] = self._search_subset(q[short], excluded[short], k, rows)
        return top_s, top_i

    def _search_exact(self, q: torch.Tensor, states: list[torch.Tensor], excluded: torch.Tensor, k: int,
                      allowed: torch.Tensor | None = None):
        B = q.shape[0]
        top_s = torch.full((B, k), float("-inf"))
        top_i = torch.zeros((B, k), dtype=torch.long)
        lse = None
        if self.log_softmax:  # per-branch running logsumexp, streamed with the blocks
            lse = [(torch.full((B,), float("-inf")), torch.zeros(B)) for _ in self.weights]
        step = self.config.block_items
        for start in range(0, self.items.shape[0], step):
            block = self.items[start:start + step]  # [n D']
            s = q @ block.t()  # [B n]
            if lse is not None:
                lse = [_logsumexp_update(acc, s_b) for acc, s_b in zip(lse, self._branch_blocks(states, block, start))]
            s = _mask_block(s, start, excluded)
            if allowed is not None:  # the rule, before the running top-k (after the logsumexp: whole catalog)
                s.masked_fill_(~allowed[start:start + s.shape[1]], float("-inf"))
            if start == 0 and s.shape[1] == self.items.shape[0]:  # one block: its top-k is the answer
                top_s, top_i = torch.topk(s, k, dim=1)
            else:
                top_s, top_i = _merge_topk(top_s, top_i, s, start, k)
        if lse is not None:
            const = sum(w * (m + torch.log(z)) for w, (m, z) in zip(self.weights.values(), lse))  # [B]
            top_s = top_s - const[:, None]
        return top_s, top_i

    def _branch_blocks(self, states: list[torch.Tensor], block: torch.Tensor, start: int) -> list[torch.Tensor]:
        """Each used branch's own raw score (with its prior) on a block, reserved rows -inf. [B n] each."""
        out, col = [], 0
        for b, h, width in zip(self.weights, states, self.widths):
            s = h @ block[:, col:col + width].t()
            if self.has_prior:
                s = s + self.prior_weights[b] * block[:, -1]
            col += width
            if start < RESERVED_ROWS:
                s[:, : RESERVED_ROWS - start] = float("-inf")
            out.append(s)
        return out

    def _search_hnsw(self, q: torch.Tensor, excluded: torch.Tensor, k: int, allowed: torch.Tensor | None = None,
                     n_allowed: int = 0):
        want = min(k + excluded.shape[1], self.n_items)  # room for the history items the index also finds
        ef = max(self.config.hnsw_ef_search, want)
        if allowed is not None:  # a narrower rule needs a wider walk for the same recall (module docstring)
            ef = math.ceil(ef / math.sqrt(max(n_allowed, 1) / self.n_items))
        qa = np.concatenate([q.numpy(), np.zeros((len(q), 1), np.float32)], 1)  # the L2 reduction's 0 coordinate
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())  # the serving process's thread budget
        if allowed is None:
            self._index.hnsw.efSearch = ef
            _, found = self._index.search(np.ascontiguousarray(qa, dtype=np.float32), want)
        else:  # the walk passes through every node and returns allowed ones only
            bitmap = np.packbits(allowed[RESERVED_ROWS:].numpy(), bitorder="little")
            selector = faiss.IDSelectorBitmap(self.n_items, faiss.swig_ptr(bitmap))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
            _, found = self._index.search(np.ascontiguousarray(qa, dtype=np.float32), want, params=params)
        cand = torch.from_numpy(found.astype(np.int64)) + RESERVED_ROWS  # faiss ids are catalog positions
        valid = torch.from_numpy(found >= 0)
        s = (q[:, None, :] * self.items[cand.clamp(min=0)]).sum(-1)  # [B want] exact re-score
        drop = ~valid | (cand[:, :, None] == excluded[:, None, :]).any(-1)
        s = s.masked_fill(drop, float("-inf"))
        top_s, pos = torch.topk(s, k, dim=1)
        return top_s, cand.gather(1, pos)

    def _search_subset(self, q: torch.Tensor, excluded: torch.Tensor, k: int, rows: torch.Tensor):
        """Exact top-k over the allowed rows only (sorted int64 [n]): the hnsw path's answer to a narrow rule,
        scored like the hnsw path (the weighted raw score for a log_softmax fusion)."""
        top_s = torch.full((len(q), k), float("-inf"))
        top_i = torch.zeros((len(q), k), dtype=torch.long)
        if len(rows) == 0:
            return top_s, top_i
        s = q @ torch.index_select(self.items, 0, rows).t()  # [B n] (index_select: ~2x faster than items[rows])
        pos = torch.searchsorted(rows, excluded).clamp(max=len(rows) - 1)  # the history among the allowed rows
        hit = rows[pos] == excluded
        s[torch.arange(len(q))[:, None].expand_as(pos)[hit], pos[hit]] = float("-inf")
        n = min(k, len(rows))
        top_s[:, :n], found = torch.topk(s, n, dim=1)
        top_i[:, :n] = rows[found]
        return top_s, top_i


def _mask_block(s: torch.Tensor, start: int, excluded: torch.Tensor) -> torch.Tensor:
    """Reserved rows and each session's excluded items -> -inf in a block of columns [start, start+n)."""
    n = s.shape[1]
    if start < RESERVED_ROWS:
        s[:, : RESERVED_ROWS - start] = float("-inf")
    local = excluded - start
    inside = (local >= 0) & (local < n)
    rows = torch.arange(len(s))[:, None].expand_as(local)
    s[rows[inside], local[inside]] = float("-inf")
    return s


def _merge_topk(top_s, top_i, s, start, k):
    """The running top-k merged with a block's: earlier items first among equal scores."""
    bs, bi = torch.topk(s, min(k, s.shape[1]), dim=1)
    cat_s, cat_i = torch.cat([top_s, bs], 1), torch.cat([top_i, bi + start], 1)
    keep_s, pos = torch.topk(cat_s, k, dim=1)
    return keep_s, cat_i.gather(1, pos)


def _logsumexp_update(acc, s):
    """(running max [B], running sum of exp(x - max) [B]) updated with a block s [B n]."""
    m, z = acc
    new_m = torch.maximum(m, s.max(1).values)
    safe = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)
    z = z * torch.exp(m - safe) + torch.exp(s - safe[:, None]).sum(1)
    return new_m, z


# -- the HNSW index ---------------------------------------------------------------------------------

def _cache_dir(config: RetrievalConfig) -> Path:
    root = config.cache_dir or os.environ.get("ODMT_CACHE_DIR") or Path.home() / ".cache" / "odmt-t4r"
    return Path(root) / "retrieval"


def _build_hnsw(items: torch.Tensor, config: RetrievalConfig):
    """faiss IndexHNSWFlat over the catalog rows (no reserved rows) with the MIPS -> L2 coordinate
    sqrt(max|x|^2 - |x|^2); loaded from the on-disk cache when this exact matrix was indexed before."""
    import faiss

    x = items[RESERVED_ROWS:].numpy()
    norms = (x.astype(np.float64) ** 2).sum(1)
    extra = np.sqrt(np.maximum(norms.max() - norms, 0.0)).astype(np.float32)[:, None]
    xa = np.ascontiguousarray(np.concatenate([x, extra], 1))
    key = hashlib.sha256(xa.tobytes())
    key.update(repr((config.hnsw_m, config.hnsw_ef_construction, faiss.__version__)).encode())
    path = _cache_dir(config) / f"hnsw-{key.hexdigest()[:32]}.faiss"
    if path.is_file():
        try:
            index = faiss.read_index(str(path))
            if index.ntotal == len(xa):
                return index
        except RuntimeError:
            pass  # a damaged cache file: build again
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(xa.shape[1], config.hnsw_m)
    index.hnsw.efConstruction = config.hnsw_ef_construction
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # a one-off build: every core (searches use the torch budget)
    index.add(xa)
    print(f"[retrieval] built an HNSW index over {len(xa):,} items in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    try:  # written next to its final name, then renamed: a reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home still serves, it only builds again next time
        print(f"[retrieval] could not cache the index in {path.parent}: {exc}", file=sys.stderr, flush=True)
    return index
