"""Full-ranking HR@K and NDCG@K for leave-one-out evaluation, with the user's history excluded.

Protocol (DESIGN.md): rank ALL items; every item the user interacted with before the target is removed
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
        hit = ranks < k
        out[f"HR@{k}"] = hit.float().mean().item() if len(ranks) else 0.0
        gain = torch.where(hit, 1.0 / torch.log2(ranks.clamp(max=1e9) + 2.0), torch.zeros_like(ranks))
        out[f"NDCG@{k}"] = gain.mean().item() if len(ranks) else 0.0
    return out


class RankingAccumulator:
    """Collects target ranks batch by batch, per scorer (e.g. "fused", "id", "text")."""

    def __init__(self, ks=DEFAULT_KS):
        self.ks = tuple(ks)
        self.ranks: dict[str, list[torch.Tensor]] = {}
        self.n_target_in_history = 0

    def update(self, scores: dict[str, torch.Tensor], targets: torch.Tensor, exclude: torch.Tensor | None) -> None:
        if exclude is not None and exclude.numel():
            self.n_target_in_history += int((exclude == targets[:, None]).any(1).sum())
        for name, s in scores.items():
            self.ranks.setdefault(name, []).append(target_ranks(s, targets, exclude))

    def compute(self, fused: str = "fused") -> dict:
        """{"HR@10": .., "NDCG@10": .., ...} for the fused scorer, "<name>/HR@10" for the others."""
        out = {}
        for name, parts in self.ranks.items():
            metrics = hr_ndcg(torch.cat(parts), self.ks)
            prefix = "" if name == fused else f"{name}/"
            out.update({prefix + k: v for k, v in metrics.items()})
        return out
