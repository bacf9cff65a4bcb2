"""ODMT's training objective: per-branch next-item cross-entropy plus online (peer) distillation.

Each branch b scores the candidates with its own logits z_b. Loss (Ji et al., ACM MM 2023, Sec. 3.4):
    L = sum_b CE(z_b, y) + w(e) * sum_b kd(z_b, z_teacher(b))
    kd(S, T) = tau^2 * CE(softmax(T / tau), log_softmax(S / tau))       (teachers are NOT detached)
    teacher(text) = teacher(image) = id,  teacher(id) = ensemble = mean_b z_b
    w(e) = exp(-5 (1 - min(e, a) / a)^2)   (e = 0-based epoch, a = ramp length in epochs)
Generalised to any branch set: without an "id" branch every branch learns from the ensemble; a single
branch has no peer, so no KD. Inference fuses branches by the mean of their scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers4rec.torch.model.prediction_task import NextItemPredictionTask

ENSEMBLE = "ensemble"
MASKED_LOGIT = -1e9  # finite, so softmax gives exactly 0 and 0 * log_softmax stays 0 (no NaN) in KD


def kd_ramp(epoch: float, ramp_epochs: float) -> float:
    """Sigmoid-shaped ramp-up of the KD weight: exp(-5 (1 - min(e, a)/a)^2); 1 from epoch a on."""
    if ramp_epochs <= 0:
        return 1.0
    t = min(float(epoch), float(ramp_epochs)) / float(ramp_epochs)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def teacher_map(branches: list[str]) -> dict[str, str]:
    """student -> teacher: content branches learn from id, id (or everyone, if no id) from the ensemble."""
    if len(branches) < 2:
        return {}
    if "id" in branches:
        return {b: ("id" if b != "id" else ENSEMBLE) for b in branches}
    return {b: ENSEMBLE for b in branches}


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """kd(S, T) = tau^2 * mean_n sum_c softmax(T/tau)[n c] * -log_softmax(S/tau)[n c]. [N C] x2 -> []."""
    target = F.softmax(teacher / tau, dim=-1)  # gradients flow into the teacher too (mutual learning)
    return tau ** 2 * -(target * F.log_softmax(student / tau, dim=-1)).sum(-1).mean()


class PeerDistillationTask(NextItemPredictionTask):
    """A T4R next-item task over several branches scoring the same candidates.

    It keeps NextItemPredictionTask's contract (CrossEntropyLoss, padding index, target_dim, the
    sampled-softmax switch, top-k prediction) but takes per-branch states and candidate vectors instead
    of one body output and one embedding table, because every ODMT branch has its own tied item vectors.
    It is called directly by `OdmtRecommender`, not built by a T4R `Head`.
    """

    def __init__(self, branches: list[str], n_index: int, tau: float = 0.4, kd_weight: float = 1.0,
                 ramp_epochs: float = 5.0, sampled_softmax: bool = False):
        super().__init__(loss=torch.nn.CrossEntropyLoss(), metrics=(), task_name="peer-distillation",
                         weight_tying=True, padding_idx=0, target_dim=n_index,
                         sampled_softmax=sampled_softmax)
        self.branches = list(branches)
        self.teachers = teacher_map(self.branches)
        self.tau = tau
        self.kd_weight = kd_weight
        self.ramp_epochs = ramp_epochs
        self.built = True  # nothing to build: the model hands over states and candidates itself

    def build(self, *args, **kwargs):  # noqa: D102 - a T4R Head never builds this task
        raise NotImplementedError("PeerDistillationTask is driven by OdmtRecommender, not by a T4R Head")

    def weight(self, epoch: float) -> float:
        """The KD weight at `epoch` (0 when there is no peer to learn from)."""
        return self.kd_weight * kd_ramp(epoch, self.ramp_epochs) if self.teachers else 0.0

    def logits(self, states: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor],
               log_q: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """states {b: [N D]}, candidates {b: [C D]} -> {b: [N C]}.
        log_q [C]: log sampling probability of each candidate, subtracted (logQ correction) in sampled mode.
        mask [N C]: True where a candidate must not count as a negative (the user's own other items)."""
        out = {}
        for b in self.branches:
            z = states[b] @ candidates[b].t()  # [N C]
            if log_q is not None:
                z = z - log_q
            if mask is not None:
                z = z.masked_fill(mask, MASKED_LOGIT)
            out[b] = z
        return out

    def forward(self, states: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor],
                targets: torch.Tensor, epoch: float = 0.0, log_q: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, training: bool = True, **kwargs) -> dict:
        """targets [N]: the position of each state's true next item among the candidates.
        Returns {"loss", "losses": {b, "kd"}, "kd_weight", "predictions" (fused [N C]), "labels"}."""
        logits = self.logits(states, candidates, log_q=log_q, mask=mask)
        losses = {b: self.loss(z, targets) for b, z in logits.items()}
        total = sum(losses.values())
        w = self.weight(epoch)
        if self.teachers:
            ensemble = torch.stack([logits[b] for b in self.branches]).mean(0)  # [N C]
            teacher = lambda name: ensemble if name == ENSEMBLE else logits[name]  # noqa: E731
            kd = sum(soft_cross_entropy(logits[s], teacher(t), self.tau) for s, t in self.teachers.items())
            losses["kd"] = kd
            if w > 0:
                total = total + w * kd
        return {"loss": total, "losses": losses, "kd_weight": w,
                "predictions": fuse(logits), "labels": targets}


def fuse(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Fused inference score: the mean of the branch scores. {b: [B C]} -> [B C]."""
    return torch.stack(list(scores.values())).mean(0)
