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

An index is built once per catalog and cached on disk (`cache_dir`, keyed by the sha256 of the matrix and
the settings), so `odmt export`'s in-process check, its reference model and the server's instances load
the same index and give the same answers.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
    cache_dir: str | None = None  # None: $ODMT_CACHE_DIR/retrieval, else ~/.cache/odmt-t4r/retrieval

    def validate(self) -> "RetrievalConfig":
        if self.index not in INDEXES:
            raise ValueError(f"retrieval index {self.index!r}; choose one of {INDEXES}")
        for name in ("exact_max_items", "block_items", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
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
    def search(self, states: dict[str, torch.Tensor], excluded: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores [B K], item indices [B K]), K = min(k, catalog size), of the sessions' states;
        excluded [B S] item indices never returned (0 = pad); -inf scores where no item is left."""
        q, used = self.queries(states)
        return self.top_k(q, used, excluded.long().cpu(), k)

    def top_k(self, q: torch.Tensor, states: list[torch.Tensor], excluded: torch.Tensor, k: int):
        """The search itself, from `queries(history)`; excluded [B S] item indices (0 = pad)."""
        k = min(k, self.n_items)
        if self._index is not None:
            return self._search_hnsw(q, excluded, k)
        return self._search_exact(q, states, excluded, k)

    def _search_exact(self, q: torch.Tensor, states: list[torch.Tensor], excluded: torch.Tensor, k: int):
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

    def _search_hnsw(self, q: torch.Tensor, excluded: torch.Tensor, k: int):
        want = min(k + excluded.shape[1], self.n_items)  # room for the history items the index also finds
        self._index.hnsw.efSearch = max(self.config.hnsw_ef_search, want)
        qa = np.concatenate([q.numpy(), np.zeros((len(q), 1), np.float32)], 1)  # the L2 reduction's 0 coordinate
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())  # the serving process's thread budget
        _, found = self._index.search(np.ascontiguousarray(qa, dtype=np.float32), want)
        cand = torch.from_numpy(found.astype(np.int64)) + RESERVED_ROWS  # faiss ids are catalog positions
        valid = torch.from_numpy(found >= 0)
        s = (q[:, None, :] * self.items[cand.clamp(min=0)]).sum(-1)  # [B want] exact re-score
        drop = ~valid | (cand[:, :, None] == excluded[:, None, :]).any(-1)
        s = s.masked_fill(drop, float("-inf"))
        top_s, pos = torch.topk(s, k, dim=1)
        return top_s, cand.gather(1, pos)


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
