"""ODMT's training objective: per-branch next-item cross-entropy plus online (peer) distillation, and
the inference-time fusion of the branch scores.

Each branch b scores the candidates with its own logits z_b. Loss (Ji et al., ACM MM 2023, Sec. 3.4):
    L = sum_b CE(z_b, y) + w(p) * sum_b kd(z_b, z_teacher(b))
    w(p) = kd_weight * exp(-5 (1 - min(p, r) / r)^2)   (p = epoch / epoch budget, r = ramp fraction)
Two forms of kd (`kd_mode`):
    "mutual"   the paper's: tau^2 * CE(softmax(T / tau), log_softmax(S / tau)), teacher NOT detached, so
               the student also pulls its teacher toward itself (mutual learning)
    "detached" tau^2 * KL(softmax(T / tau) || softmax(S / tau)) with a stop-gradient teacher: knowledge
               flows one way only, so a strong branch is never pulled toward a weak one
Teachers: text <- id, image <- id, and the id branch's teacher is `id_teacher`:
    "ensemble" the mean of every branch's logits (the paper), "none" (id learns from the labels only).
Without an "id" branch every branch learns from the ensemble; a single branch has no peer, so no KD.
With `mask` the user's own other items are removed from the KD distributions (the official code's seen mask).

A plain torch module: Transformers4Rec's NextItemPredictionTask scores one body output against one
embedding table, while every ODMT branch has its own states and its own tied item vectors. The
Transformers4Rec blocks of ODMT are its branch sequence encoders (branch.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ENSEMBLE = "ensemble"
KD_MODES = ("detached", "mutual")
ID_TEACHERS = ("ensemble", "none")
FUSION_SCORES = ("raw", "log_softmax")
MASKED_LOGIT = -1e9  # finite, so softmax gives exactly 0 and 0 * log_softmax stays 0 (no NaN) in KD


def kd_ramp(progress: float, ramp: float) -> float:
    """Sigmoid-shaped ramp-up of the KD weight: exp(-5 (1 - min(p, r)/r)^2); 1 once p >= r.
    `progress` and `ramp` share a unit (epochs, or fractions of the epoch budget)."""
    if ramp <= 0:
        return 1.0
    t = min(float(progress), float(ramp)) / float(ramp)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def teacher_map(branches: list[str], id_teacher: str = ENSEMBLE) -> dict[str, str]:
    """student -> teacher: content branches learn from id, id from `id_teacher` (or no one);
    without an id branch, every branch learns from the ensemble."""
    if len(branches) < 2:
        return {}
    if "id" not in branches:
        return {b: ENSEMBLE for b in branches}
    teachers = {b: "id" for b in branches if b != "id"}
    if id_teacher != "none":
        teachers = {"id": id_teacher, **teachers}
    return teachers


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """kd(S, T) = tau^2 * mean_n sum_c softmax(T/tau)[n c] * -log_softmax(S/tau)[n c]. [N C] x2 -> []."""
    target = F.softmax(teacher / tau, dim=-1)  # gradients flow into the teacher too (mutual learning)
    return tau ** 2 * -(target * F.log_softmax(student / tau, dim=-1)).sum(-1).mean()


def detached_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean_n KL(softmax(T/tau) || softmax(S/tau)) with the teacher as a constant. [N C] x2 -> []."""
    log_t = F.log_softmax(teacher.detach() / tau, dim=-1)
    log_s = F.log_softmax(student / tau, dim=-1)
    return tau ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()


KD_LOSSES = {"mutual": soft_cross_entropy, "detached": detached_kl}


class PeerDistillationTask(nn.Module):
    """Next-item cross-entropy of every branch over the same candidates, plus peer distillation."""

    def __init__(self, branches: list[str], tau: float = 0.4, kd_weight: float = 1.0, kd_ramp: float = 0.25,
                 kd_mode: str = "detached", id_teacher: str = ENSEMBLE, kd_mask_seen: bool = True):
        super().__init__()
        self.loss = nn.CrossEntropyLoss()
        if kd_mode not in KD_MODES:
            raise ValueError(f"kd_mode={kd_mode!r}; choose one of {KD_MODES}")
        if id_teacher not in ID_TEACHERS:
            raise ValueError(f"id_teacher={id_teacher!r}; choose one of {ID_TEACHERS}")
        self.branches = list(branches)
        self.teachers = teacher_map(self.branches, id_teacher)
        self.tau = tau
        self.kd_weight = kd_weight
        self.kd_ramp = kd_ramp
        self.kd_mode = kd_mode
        self.kd_mask_seen = kd_mask_seen

    def weight(self, progress: float) -> float:
        """The KD weight at `progress` = epoch / epoch budget (0 when there is no peer to learn from)."""
        return self.kd_weight * kd_ramp(progress, self.kd_ramp) if self.teachers else 0.0

    def logits(self, states: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor],
               bias: dict[str, torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """states {b: [N D]}, candidates {b: [C D]} -> {b: [N C]}.
        bias {b: [C]}: added per candidate (popularity prior, minus the logQ correction in sampled mode).
        mask [N C]: True where a candidate must not count as a negative (the user's own other items)."""
        out = {}
        for b in self.branches:
            z = states[b] @ candidates[b].t()  # [N C]
            if bias is not None and b in bias:
                z = z + bias[b]
            if mask is not None:
                z = z.masked_fill(mask, MASKED_LOGIT)
            out[b] = z
        return out

    def teacher_logits(self, logits: dict[str, torch.Tensor], teacher: str) -> torch.Tensor:
        if teacher == ENSEMBLE:
            return torch.stack([logits[b] for b in self.branches]).mean(0)
        return logits[teacher]

    def forward(self, states: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor],
                targets: torch.Tensor, progress: float = 0.0, bias: dict[str, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> dict:
        """targets [N]: the position of each state's true next item among the candidates.
        mask [N C]: excluded from CE and KD; seen [N C]: the user's other items, excluded from KD only
        (when kd_mask_seen). Returns {"loss", "losses": {b, "kd"}, "kd_weight"}."""
        logits = self.logits(states, candidates, bias=bias, mask=mask)
        losses = {b: self.loss(z, targets) for b, z in logits.items()}
        total = sum(losses.values())
        w = self.weight(progress)
        if self.teachers and self.kd_weight > 0:  # KD off: skip its softmaxes over every candidate
            kd_logits = logits
            if self.kd_mask_seen and seen is not None:
                kd_logits = {b: z.masked_fill(seen, MASKED_LOGIT) for b, z in logits.items()}
            kd_loss = KD_LOSSES[self.kd_mode]
            kd = sum(kd_loss(kd_logits[s], self.teacher_logits(kd_logits, t), self.tau)
                     for s, t in self.teachers.items())
            losses["kd"] = kd
            if w > 0:
                total = total + w * kd
        return {"loss": total, "losses": losses, "kd_weight": w}


def fuse(scores: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
         kind: str = "raw") -> torch.Tensor:
    """Fused inference score. {b: [B C]} -> [B C].
    weights None: the plain mean of the raw branch scores (the paper's inference). Otherwise
    sum_b weights[b] * s_b, where s_b is the raw score ("raw") or its log-softmax over the items
    ("log_softmax", which puts every branch on the same scale); a zero weight drops the branch."""
    if kind not in FUSION_SCORES:
        raise ValueError(f"fusion score {kind!r}; choose one of {FUSION_SCORES}")
    if weights is None:
        return torch.stack(list(scores.values())).mean(0)
    used = [b for b in scores if weights.get(b, 0.0) > 0]
    if not used:
        raise ValueError(f"fusion weights {weights} give no branch of {list(scores)} a positive weight")
    out = None
    for b in used:
        s = torch.log_softmax(scores[b], dim=-1) if kind == "log_softmax" else scores[b]
        out = weights[b] * s if out is None else out + weights[b] * s
    return out
