"""Fusion of the branch scores, chosen on the validation split.

The paper fuses by the plain mean of the raw branch scores, which lets a weak branch drag a strong one
down. Here every candidate fusion is scored on the validation users in one pass over the branch scores:
    the plain mean;  sum_b w_b * s_b for weights on a simplex grid (single branches included), where s_b
    is the raw branch score or its log-softmax over the catalog (every branch on one scale).
The candidate with the best validation NDCG@10 wins (ties keep the earlier, simpler one), so the chosen
fusion is never below any single branch on validation. The choice is saved in the model config
(`fusion_weights`, `fusion_scores`) and applied by `OdmtRecommender.score`, hence identically by
`evaluate`, `export`, the Triton graph and `recommend`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from odmt_t4r.model import OdmtRecommender, history_and_target

from .data import PreparedData
from .metrics import DEFAULT_KS, hr_ndcg
from .streaming import ITEM_BLOCK, stream_ranks

SELECT_BY = "NDCG@10"


@dataclass(frozen=True)
class FusionCandidate:
    weights: tuple[tuple[str, float], ...] | None  # None = the plain mean of the raw scores
    scores: str = "raw"  # "raw" | "log_softmax"

    @property
    def name(self) -> str:
        if self.weights is None:
            return "mean"
        used = [(b, w) for b, w in self.weights if w > 0]
        if len(used) == 1:
            return used[0][0]
        return f"{self.scores}(" + " ".join(f"{b}:{w:g}" for b, w in used) + ")"

    def as_dict(self) -> dict[str, float] | None:
        return None if self.weights is None else {b: w for b, w in self.weights}


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """Every n-vector of non-negative multiples of `step` summing to 1."""
    parts = round(1 / step)
    out = []
    for combo in itertools.product(range(parts + 1), repeat=n):
        if sum(combo) == parts:
            out.append(tuple(round(c / parts, 6) for c in combo))
    return out


def fusion_candidates(branches: list[str], step: float = 0.1) -> list[FusionCandidate]:
    """The plain mean first, then weighted raw and log-softmax fusions; a single branch appears once."""
    out = [FusionCandidate(None)]
    for kind in ("raw", "log_softmax"):
        for w in simplex_grid(len(branches), step):
            if kind == "log_softmax" and max(w) == 1.0:
                continue  # one branch alone ranks the same either way
            out.append(FusionCandidate(tuple(zip(branches, w)), kind))
    return out


def epoch_candidates(branches: list[str], incumbent: dict | None) -> list[FusionCandidate]:
    """The fusions scored between two grid epochs: the plain mean, each branch alone and `incumbent`
    ({"weights", "scores"} as choose_fusion returns it), named as in the grid."""
    out = [FusionCandidate(None)]
    out += [FusionCandidate(tuple((x, 1.0 if x == b else 0.0) for x in branches)) for b in branches]
    if incumbent is not None and incumbent["weights"] is not None:
        c = FusionCandidate(tuple((b, float(incumbent["weights"].get(b, 0.0))) for b in branches), incumbent["scores"])
        if c.name not in {o.name for o in out}:
            out.append(c)
    return out


@torch.no_grad()
def evaluate_fusions(model: OdmtRecommender, data: PreparedData, split: str = "valid", step: float = 0.1,
                     batch_size: int = 512, candidates: list[FusionCandidate] | None = None,
                     block_items: int = ITEM_BLOCK) -> dict:
    """Metrics of every candidate fusion on `split`: {candidate name: {"candidate", "HR@10", ...}}.
    Streams over item blocks (streaming.py): memory is batch x block, whatever the catalog size."""
    branches = model.branch_names
    candidates = candidates or fusion_candidates(branches, step)
    scorers = {c: (c.as_dict(), c.scores if c.weights is not None else "raw") for c in candidates}
    ranks: dict[FusionCandidate, list[torch.Tensor]] = {c: [] for c in candidates}
    was_training = model.training
    model.eval()
    try:
        for batch in data.batches(split, batch_size):
            history, target = history_and_target(batch["items"])
            for c, (r, _, _) in stream_ranks(model, history, target, batch.get("seen"), scorers,
                                             block_items=block_items).items():
                ranks[c].append(r)
    finally:
        model.train(was_training)
    return {c.name: {"candidate": c, **hr_ndcg(torch.cat(r), DEFAULT_KS)} for c, r in ranks.items()}


def choose_fusion(results: dict) -> dict:
    """The best candidate by validation NDCG@10 (the first among equals) and what it beat."""
    best_name = None
    for name, row in results.items():  # insertion order: the plain mean first
        if best_name is None or row[SELECT_BY] > results[best_name][SELECT_BY]:
            best_name = name
    best = results[best_name]["candidate"]
    return {"name": best_name, "weights": best.as_dict(), "scores": best.scores,
            f"valid_{SELECT_BY}": results[best_name][SELECT_BY],
            f"valid_mean_{SELECT_BY}": results["mean"][SELECT_BY],
            "n_candidates": len(results)}


def select_fusion(model: OdmtRecommender, data: PreparedData, step: float = 0.1, batch_size: int = 512) -> dict:
    """Choose the fusion on the validation split and set it on the model; returns the choice."""
    results = evaluate_fusions(model, data, "valid", step=step, batch_size=batch_size)
    choice = choose_fusion(results)
    model.set_fusion(choice["weights"], choice["scores"])
    return choice
