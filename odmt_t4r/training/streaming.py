"""Full-catalog evaluation that streams over item blocks: memory B x block, never B x N.

The protocol (metrics.py) needs, per user and scorer, the target's rank among all non-excluded items and,
for coverage, the top-k. Both stream: the target's score is computed first (its own column), then every
block of `block_items` catalog rows adds the count of items scoring >= it and is merged into a running
top-k. log_softmax fusions need each branch's log-partition over the catalog: one streamed pass computes
it before the counting pass. The metrics equal the full-matrix path's (tests/test_streaming_eval.py).

A scorer is (weights, kind) as in `fuse`: weights None = the plain mean of the raw scores; otherwise
sum_b weights[b] * s_b with s_b raw ("raw") or log-softmax ("log_softmax") branch scores.
"""

from __future__ import annotations

import math

import torch

from odmt_t4r.contract import RESERVED_ROWS
from odmt_t4r.model.peer_distillation import fuse
from odmt_t4r.model.retrieval import _logsumexp_update, _mask_block, _merge_topk

from .metrics import RankingAccumulator

ITEM_BLOCK = 32_768  # catalog rows per block: 512 sessions x 32768 x 4 bytes = 64 MB per branch score block
Scorer = tuple[dict[str, float] | None, str]


def model_scorers(model) -> dict[str, Scorer]:
    """What `OdmtRecommender.score` returns, as scorers: each branch, "fused", and "mean" when the fusion is
    not the plain mean (the same names and order)."""
    out: dict[str, Scorer] = {b: ({b: 1.0}, "raw") for b in model.branch_names}
    out["fused"] = (model.config.fusion_weights, model.config.fusion_scores)
    if model.config.fusion_weights is not None:
        out["mean"] = (None, "raw")
    return out


@torch.no_grad()
def stream_ranks(model, history: torch.Tensor, target: torch.Tensor, seen: torch.Tensor | None,
                 scorers: dict[str, Scorer], coverage_k: int | None = None,
                 block_items: int = ITEM_BLOCK) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{name: (0-based pessimistic target rank [B] (inf when the target is excluded), top scores [B k],
    top item indices [B k])} over every catalog item; `seen` [B S] items are excluded (0 = pad).
    The top-k is empty ([B 0]) without `coverage_k`."""
    device = model.log_popularity.device
    states = {b: s for b, s in model.session_states(history.to(device)).items()}  # {b: [B D]}
    target = target.to(device)
    excluded = seen.to(device).long() if seen is not None and seen.numel() else torch.zeros_like(target)[:, None]
    B, N = len(target), model.config.n_index
    lse = _log_partitions(model, states, block_items) if any(k == "log_softmax" for _, k in scorers.values()) else {}
    raw_t = _target_scores(model, states, target)  # {b: [B]} as the full matrix has them
    per_kind_t = {"raw": raw_t, "log_softmax": {b: _log_softmax(t[:, None], lse[b])[:, 0] for b, t in raw_t.items()}
                  if lse else {}}
    t = {name: fuse({b: v[:, None] for b, v in per_kind_t[kind].items()}, w, "raw")[:, 0]
         for name, (w, kind) in scorers.items()}
    count = {name: torch.zeros(B, device=device) for name in scorers}
    k = min(coverage_k or 0, N - RESERVED_ROWS)
    top = {name: (torch.full((B, k), -math.inf, device=device), torch.zeros((B, k), dtype=torch.long, device=device))
           for name in scorers}
    rows = torch.arange(B, device=device)
    for start in range(0, N, block_items):
        end = min(N, start + block_items)
        raw = model.branch_scores(states, start, end)  # {b: [B n]}
        per_kind = {"raw": raw}
        if lse:
            per_kind["log_softmax"] = {b: _log_softmax(s, lse[b]) for b, s in raw.items()}
        inside = (target >= start) & (target < end)
        for name, (w, kind) in scorers.items():
            s = _mask_block(fuse(per_kind[kind], w, "raw"), start, excluded)  # [B n] the protocol's exclusions
            if k:
                top[name] = _merge_topk(*top[name], s, start, k)
            s[rows[inside], target[inside] - start] = -math.inf  # the target does not outrank itself
            count[name] += (s >= t[name][:, None]).sum(1)
    target_excluded = (excluded == target[:, None]).any(1)
    out = {}
    for name in scorers:
        ranks = count[name].float()
        ranks[target_excluded | torch.isinf(t[name])] = math.inf
        out[name] = (ranks.cpu(), top[name][0].cpu(), top[name][1].cpu())
    return out


def _target_scores(model, states: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{b: [B]} each session's raw branch score of its own target, prior included (reserved rows -inf)."""
    catalog, prior = model.catalog_vectors(), model.popularity_bias()
    out = {}
    for b, h in states.items():
        s = (h @ catalog[b][target].t()).diagonal().clone()  # the full product's value for that column
        if prior is not None:
            s = s + prior[b][target]
        s[target < RESERVED_ROWS] = -math.inf
        out[b] = s
    return out


def _log_partitions(model, states, block_items: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{b: (max [B], log sum exp(s - max) [B])} of each branch's raw scores over the catalog, streamed."""
    B = next(iter(states.values())).shape[0]
    device = model.log_popularity.device
    acc = {b: (torch.full((B,), -math.inf, device=device), torch.zeros(B, device=device)) for b in states}
    for start in range(0, model.config.n_index, block_items):
        raw = model.branch_scores(states, start, min(model.config.n_index, start + block_items))
        acc = {b: _logsumexp_update(acc[b], s) for b, s in raw.items()}
    return {b: (m, torch.log(z)) for b, (m, z) in acc.items()}


def _log_softmax(s: torch.Tensor, partition: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(s - max) - log sum exp(s - max): torch.log_softmax's own order of operations, on a block."""
    m, log_z = partition
    return (s - m[:, None]) - log_z[:, None]


def streaming_update(acc: RankingAccumulator, model, history: torch.Tensor, target: torch.Tensor,
                     seen: torch.Tensor | None, tail: torch.Tensor | None = None, block_items: int = ITEM_BLOCK) -> None:
    """`acc.update(model.score(history), target, seen, tail)` without the [B N] matrices."""
    coverage = acc.coverage_k if acc.n_index else None
    acc.add_users(target, seen, tail)
    for name, (ranks, top_s, top_i) in stream_ranks(model, history, target, seen, model_scorers(model),
                                                    coverage, block_items).items():
        acc.add_ranks(name, ranks, (top_s, top_i) if coverage else None)
