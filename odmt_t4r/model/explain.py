"""Per-branch explanations: how much each branch lifted a recommended item, and which branch drove it.

The fused score of item i for a session is sum_b w_b s_b(i) (`fuse` in peer_distillation.py): w_b the
fusion weights (1/n each for the paper's plain mean), s_b the branch's raw score h_b . v_b(i) plus its
popularity prior, or that score's log-softmax over the catalog. The contribution of branch b to item i is

    c_b(i) = w_b * (s_b(i) - mean_j s_b(j))        j over every catalog item (index rows 3..N-1)

the branch's weighted score of the item above its weighted score of an average catalog item. Summed over
the branches it gives fused(i) - mean_j fused(j): the contributions split how far the fused score puts the
item above an average item. The log-softmax subtracts a per-session constant, which cancels here, so c_b
is the same for raw and log-softmax fusion; and the catalog mean of a dot product is the dot product with
the mean item vector, so explaining K items costs K x D per branch (plus the session's encoder pass).

The branch that DROVE item i is argmax_b c_b(i): the branch that lifted it most above an average item
(ties go to the first in model order: id, text, image). Only branches that take part in the fused score
(w_b > 0) are explained; a branch with weight 0 cannot change a recommendation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from odmt_t4r.contract import RESERVED_ROWS

POPULARITY = "popularity"  # what drove the answer to an empty session: there is no branch state to score


def fusion_weights(config) -> dict[str, float]:
    """{branch: w_b} of the branches in the fused score (an OdmtConfig), in model order."""
    names = config.branch_names
    if config.fusion_weights is None:
        return {b: 1.0 / len(names) for b in names}
    return {b: float(config.fusion_weights[b]) for b in names if config.fusion_weights.get(b, 0.0) > 0}


class BranchExplainer:
    """Contributions c_b of given items for a model in eval mode; the catalog means are taken once."""

    def __init__(self, model):
        self.model = model
        self.weights = fusion_weights(model.config)
        catalog = model.catalog_vectors()
        prior = model.popularity_bias()
        self._mean_vector = {b: catalog[b][RESERVED_ROWS:].mean(0) for b in self.weights}  # [D]
        self._mean_prior = {b: float(prior[b][RESERVED_ROWS:].detach().mean()) if prior is not None else 0.0
                            for b in self.weights}

    @property
    def branches(self) -> list[str]:
        return list(self.weights)

    @torch.no_grad()
    def contributions(self, history: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """history [B S] right-padded item indices, items [B K] index rows -> {branch: [B K]} c_b."""
        states = self.model.session_states(history)  # {b: [B D]}
        catalog = self.model.catalog_vectors()
        prior = self.model.popularity_bias(items)
        out = {}
        for b, w in self.weights.items():
            h = states[b]  # [B D]
            lift = torch.einsum("bd,bkd->bk", h, catalog[b][items]) - (h @ self._mean_vector[b])[:, None]
            if prior is not None:
                lift = lift + prior[b] - self._mean_prior[b]
            out[b] = w * lift
        return out


def driving_branches(contributions: Mapping[str, Sequence[float] | np.ndarray]) -> np.ndarray:
    """{branch: [..., K]} contributions -> [..., K] the name of the branch with the largest (first on ties)."""
    names = list(contributions)
    stacked = np.stack([np.asarray(contributions[b], dtype=np.float64) for b in names])  # [NB ... K]
    return np.asarray(names, dtype=object)[np.argmax(stacked, axis=0)]
