"""Full-ranking HR@K and NDCG@K for leave-one-out evaluation, with the user's history excluded.

Protocol (docs/benchmarks/quality.md): rank ALL items; every item the user interacted with before the target is removed
from the ranking (as the ODMT code does), even if it is the target itself (then the user is a miss);
one target per user, so HR@K = 1[rank < K] and NDCG@K = 1[rank < K] / log2(rank + 2), rank 0-based.
Ties count against the target (rank = items scoring >= the target, itself excluded), so a model that
scores everything equally gets no credit.
"""

from __future__ import annotations

import math

import torch

PROTOCOL = "leave-one-out; full ranking over all items; items seen before the target excluded; ties pessimistic"
DEFAULT_KS = (10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None,
                 n_reserved: int = 3) -> torch.Tensor:
    """scores [B N] over every index row, targets [B], exclude [B S] item indices (0 = pad) ->
    0-based rank [B] of each target among the non-excluded items (inf when the target is excluded)."""
    scores = scores.float().clone()
    scores[:, :n_reserved] = float("-inf")  # pad / null / OOV rows are never candidates
    rows = torch.arange(len(targets))
    target_excluded = torch.zeros(len(targets), dtype=torch.bool)
    if exclude is not None and exclude.numel():
        target_excluded = (exclude == targets[:, None]).any(1)
        scores.scatter_(1, exclude.long(), float("-inf"))
    t = scores[rows, targets].clone()  # [B]
    scores[rows, targets] = float("-inf")  # the target does not outrank itself
    ranks = (scores >= t[:, None]).sum(1).float()  # [B]
    ranks[target_excluded | torch.isinf(t)] = math.inf
    return ranks


def hr_ndcg(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, float]:
    """Mean HR@K / NDCG@K over users from 0-based target ranks [B]."""
    out = {}
    for k in ks:
        out[f"HR@{k}"] = (ranks < k).float().mean().item() if len(ranks) else 0.0
        out[f"NDCG@{k}"] = ndcg_gains(ranks, k).mean().item() if len(ranks) else 0.0
    return out


def ndcg_gains(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Each user's NDCG@k from 0-based target ranks [B]: 1 / log2(rank + 2) inside the top k, else 0."""
    return torch.where(ranks < k, 1.0 / torch.log2(ranks.clamp(max=1e9) + 2.0), torch.zeros_like(ranks))


def ndcg_standard_error(ranks: torch.Tensor, k: int = 10) -> float:
    """The standard error of NDCG@k as a mean over these users: how far another draw of as many users
    could move it. It bounds what a difference between models on this split can show."""
    if len(ranks) < 2:
        return 0.0
    return (ndcg_gains(ranks, k).std() / math.sqrt(len(ranks))).item()


class RankingAccumulator:
    """Collects target ranks batch by batch, per scorer (e.g. "fused", "id", "text"), plus the long-tail
    slice (users whose target is a rare item) and catalog coverage (items in anyone's top `coverage_k`)."""

    def __init__(self, ks=DEFAULT_KS, n_index: int | None = None, coverage_k: int = 10, n_reserved: int = 3):
        self.ks = tuple(ks)
        self.ranks: dict[str, list[torch.Tensor]] = {}
        self.tail: list[torch.Tensor] = []
        self.n_target_in_history = 0
        self.n_index, self.coverage_k, self.n_reserved = n_index, coverage_k, n_reserved
        self.recommended: dict[str, torch.Tensor] = {}  # scorer -> [N] bool, item was in some top-k

    def update(self, scores: dict[str, torch.Tensor], targets: torch.Tensor, exclude: torch.Tensor | None,
               tail: torch.Tensor | None = None) -> None:
        """scores {scorer: [B N]} over every index row; tail [B] bool: the user belongs to the long-tail slice.
        (training/streaming.py's `streaming_update` does the same without the [B N] matrices.)"""
        self.add_users(targets, exclude, tail)
        for name, s in scores.items():
            self.add_ranks(name, target_ranks(s, targets, exclude, self.n_reserved),
                           self._top(s, exclude) if self.n_index else None)

    def add_users(self, targets: torch.Tensor, exclude: torch.Tensor | None, tail: torch.Tensor | None = None) -> None:
        """A batch of users: counts targets found in their own history, records the long-tail slice."""
        if exclude is not None and exclude.numel():
            self.n_target_in_history += int((exclude == targets[:, None]).any(1).sum())
        self.tail.append(torch.zeros(len(targets), dtype=torch.bool) if tail is None else tail.bool())

    def add_ranks(self, name: str, ranks: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """The batch's target ranks [B] of one scorer and, for coverage, its (top scores, items) [B k]."""
        self.ranks.setdefault(name, []).append(ranks)
        if top is not None and self.n_index:
            top_s, top_i = top
            seen = self.recommended.setdefault(name, torch.zeros(self.n_index, dtype=torch.bool))
            seen[top_i[torch.isfinite(top_s)]] = True

    def _top(self, scores: torch.Tensor, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = scores.float().clone()
        s[:, : self.n_reserved] = float("-inf")
        if exclude is not None and exclude.numel():
            s.scatter_(1, exclude.long(), float("-inf"))
        k = min(self.coverage_k, s.shape[1] - self.n_reserved)
        return torch.topk(s, k, dim=1)

    def compute(self, fused: str = "fused") -> dict:
        """{"HR@10": .., "NDCG@10": .., ...} for the fused scorer, "<name>/HR@10" for the others;
        "longtail/..." the same on the long-tail users, "coverage@10" the share of catalog items that
        appear in some user's top 10, "se/NDCG@10" the fused NDCG@10's standard error over users."""
        out = {}
        tail = torch.cat(self.tail) if self.tail else torch.zeros(0, dtype=torch.bool)
        for name, parts in self.ranks.items():
            ranks = torch.cat(parts)
            prefix = "" if name == fused else f"{name}/"
            out.update({prefix + k: v for k, v in hr_ndcg(ranks, self.ks).items()})
            if name == fused:
                out[f"se/NDCG@{self.ks[0]}"] = ndcg_standard_error(ranks, self.ks[0])
            if tail.any():
                out.update({f"longtail/{prefix}{k}": v for k, v in hr_ndcg(ranks[tail], self.ks).items()})
            if name in self.recommended:
                n_items = self.n_index - self.n_reserved
                out[f"{prefix}coverage@{self.coverage_k}"] = self.recommended[name].sum().item() / max(1, n_items)
        out["longtail_users"] = int(tail.sum())
        return out
