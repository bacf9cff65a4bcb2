"""ODMT: Online Distillation-enhanced Multi-modal Transformer for Sequential Recommendation
(Ji et al., ACM MM 2023, arXiv 2308.04067), and the baselines that share its code.

    item index --item tower--> {id, text, image} vectors --branch MLPs--> tied branch item vectors
    history vectors --per-branch causal T4R TransformerBlock--> states --dot--> per-branch scores
    training: per-branch CE + ramped peer distillation;  inference: mean of branch scores, top-k

Models (see `model_registry`): odmt (independent per-modality projections as the item tower: the default,
2-3x cheaper per epoch than the IMT and level with it on validation, docs/model.md), odmt-imt (the paper's
ID-aware multi-modal transformer as the item tower), sasrec (ID only, one sequence encoder), late-fusion
(ID embedding and projected text/image CLS concatenated into one sequence encoder, no distillation).

Batches are right-padded item-index rows [B L+1] that end with their target (the prepared-DIR
contract): the history is the row minus its last item, and a causal encoder predicts each next item.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from odmt_t4r.flags import flag
from odmt_t4r.output_folder import atomic_write

from .branch import Branch, SequenceEncoderConfig
from .item_tower import ITEM_TOWERS, RESERVED_ROWS, ItemTowerConfig
from .modality_store import ModalityStore, TokenLayout
from .peer_distillation import FUSION_SCORES, ID_TEACHERS, KD_MODES, PeerDistillationTask, fuse
from .prepared import PreparedInfo, read_prepared
from .retrieval import FusedRetriever, RetrievalConfig

from odmt_t4r.contract import ITEM_LIST, MODEL_FORMAT, PREPARED_ITEMS, RUN_CONFIG, PreparedDir, RunFolder  # noqa: E402
from odmt_t4r.features.store import built_modalities  # noqa: E402
# loss="auto": full softmax up to this many items; above it the in-batch sampled softmax of the official
# code, because a full softmax must run the item tower over the whole catalog at every step
AUTO_FULL_SOFTMAX_MAX_ITEMS = 2048


@dataclass
class OdmtConfig:
    """The model, one dataclass: `odmt train` makes a flag of every field not marked derived."""

    name: str = "odmt"  # derived: the preset (model_registry)
    # from the prepared DIR (derived)
    n_index: int = 0
    max_length: int = 20
    item_column: str = ITEM_LIST
    # item-tower inputs = peer branches; None = every modality the prepared DIR has features for
    modalities: list[str] | None = field(default=None, metadata=flag("id, text, image", none="all the DIR has"))
    feature_dims: dict[str, int] = field(default_factory=dict)  # derived: {"text": 384, "image": 1280}
    # architecture
    item_tower: str = "independent"  # "independent" | "imt" (the paper's, preset odmt-imt)
    fusion: str = "peer"  # "peer": one branch per modality + KD; "late": concat -> one branch, no KD
    branch_mlp: bool = True
    d_model: int = 64
    n_heads: int = 2
    imt_layers: int = 2
    imt_dropout: float = 0.1
    # content tokens per item the IMT reads besides the summary/CLS (pooled frozen features, see
    # TokenLayout); -1 = every stored token (the paper's 30 text + 50 image). The IMT's cost is items x tokens.
    text_tokens: int = 8
    image_tokens: int = 4
    seq_encoder: str = "gpt2"  # "gpt2" | "xlnet"
    seq_layers: int = 2
    seq_dropout: float = 0.2
    id_init: str = "content"  # "content" | "xavier"
    # objective
    # "full" softmax | "in_batch" sampled softmax with logQ correction | "auto": full up to
    # AUTO_FULL_SOFTMAX_MAX_ITEMS items, else in-batch (resolved in from_prepared)
    loss: str = "auto"
    # a learned per-branch weight on log(train count) added to every score: popularity is explained by
    # one scalar, so the item vectors are free to learn similarity (rare items are not pushed down)
    popularity_prior: bool = True
    # distillation (peer_distillation.py): the form, the id branch's teacher, the seen-item mask, tau,
    # the weight and its ramp as a fraction of the epoch budget. Off by default: in benchmarks/quality.py
    # no variant beat the same model without it (docs/benchmarks/quality.md); kd_weight 0.5 turns the rest on.
    kd_mode: str = "detached"  # "detached" | "mutual" (the paper's)
    id_teacher: str = "none"  # "ensemble" (the paper's) | "none"
    kd_mask_seen: bool = True
    tau: float = 0.4
    kd_weight: float = 0.0
    kd_ramp: float = 0.1
    # inference fusion, chosen on the validation split after training (training/fusion.py);
    # None = the plain mean of the raw branch scores (the paper's)
    fusion_weights: dict[str, float] | None = None
    fusion_scores: str = "raw"  # "raw" | "log_softmax"

    DERIVED = ("name", "n_index", "max_length", "item_column", "feature_dims", "fusion_weights", "fusion_scores")

    @property
    def branch_names(self) -> list[str]:
        return list(self.modalities) if self.fusion == "peer" else ["late"]

    def validate(self) -> "OdmtConfig":
        bad = set(self.modalities or []) - {"id", "text", "image"}
        if bad or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of id/text/image, got {self.modalities}")
        self.modalities = [m for m in ("id", "text", "image") if m in self.modalities]
        for m in self.modalities:
            if m != "id" and m not in self.feature_dims:
                raise ValueError(f"modality '{m}' has no feature dimension (no {m}.npy in the prepared DIR?)")
        choices = {"item_tower": tuple(ITEM_TOWERS), "fusion": ("peer", "late"), "seq_encoder": ("gpt2", "xlnet"),
                   "id_init": ("content", "xavier"), "loss": ("full", "in_batch"), "kd_mode": KD_MODES,
                   "id_teacher": ID_TEACHERS, "fusion_scores": FUSION_SCORES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        for name in ("d_model", "n_heads", "imt_layers", "seq_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.tau > 0 or self.kd_weight < 0 or not 0 <= self.kd_ramp <= 1:
            raise ValueError(f"need tau > 0, kd_weight >= 0 and 0 <= kd_ramp <= 1; got tau={self.tau}, "
                             f"kd_weight={self.kd_weight}, kd_ramp={self.kd_ramp}")
        self.token_layout()  # raises on a bad token count
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        return self

    def token_layout(self) -> TokenLayout:
        return TokenLayout.from_counts(self.text_tokens, self.image_tokens)

    @classmethod
    def from_dict(cls, d: dict) -> "OdmtConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# name -> the settings that define it (they win over user overrides)
model_registry: dict[str, dict] = {
    # the default item tower is the cheaper one: the IMT cost 2-3x per epoch for no gain on validation
    # (benchmarks/epoch_profile.py, benchmarks/quality.py); the paper's IMT stays as odmt-imt
    "odmt": dict(item_tower="independent", fusion="peer"),
    "odmt-imt": dict(item_tower="imt", fusion="peer"),
    # the baselines keep their published form: no popularity prior
    "sasrec": dict(item_tower="independent", fusion="peer", modalities=["id"], branch_mlp=False, id_init="xavier",
                   popularity_prior=False, kd_weight=0.0),  # one branch: nothing to distil
    "late-fusion": dict(item_tower="independent", fusion="late", id_init="xavier", kd_weight=0.0,
                        popularity_prior=False),
}


def split_targets(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [B L+1] -> (history [B L], next item [B L]); pads are 0 in both.
    history[t] is followed by targets[t]; a row's last item appears only as a target."""
    targets = items[:, 1:]
    history = torch.where(targets > 0, items[:, :-1], torch.zeros_like(targets))
    return history, targets


def history_and_target(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation rows [B L+1] -> (history [B L], the row's last item [B])."""
    lengths = (items > 0).sum(1)  # [B]
    target = items[torch.arange(len(items)), (lengths - 1).clamp(min=0)]
    history, _ = split_targets(items)
    return history, target


def clip_history(history: torch.Tensor, max_length: int) -> torch.Tensor:
    """Keep each right-padded row's last `max_length` real items, left-aligned again. [B S] -> [B <=L]."""
    if history.shape[1] <= max_length:
        return history
    lengths = (history > 0).sum(1, keepdim=True)  # [B 1]
    start = (lengths - max_length).clamp(min=0)  # [B 1]
    pos = start + torch.arange(max_length, device=history.device)  # [B L]
    out = history.gather(1, pos.clamp(max=history.shape[1] - 1))
    return torch.where(pos < lengths, out, torch.zeros_like(out))


class OdmtRecommender(nn.Module):
    def __init__(self, config: OdmtConfig, store: ModalityStore | None = None):
        super().__init__()
        self.config = config.validate()
        c = config
        tower_cfg = ItemTowerConfig(d_model=c.d_model, n_layers=c.imt_layers, n_heads=c.n_heads,
                                    dropout=c.imt_dropout, id_init=c.id_init)
        self.item_tower = ITEM_TOWERS[c.item_tower](tower_cfg, c.n_index, c.modalities, c.feature_dims, store)
        seq_cfg = SequenceEncoderConfig(kind=c.seq_encoder, d_model=c.d_model, n_layers=c.seq_layers,
                                        n_heads=c.n_heads, dropout=c.seq_dropout, max_length=c.max_length)
        in_dim = c.d_model * (len(c.modalities) if c.fusion == "late" else 1)
        self.branches = nn.ModuleDict({b: Branch(b, in_dim, seq_cfg, mlp=c.branch_mlp) for b in c.branch_names})
        self.task = PeerDistillationTask(c.branch_names, tau=c.tau, kd_weight=c.kd_weight, kd_ramp=c.kd_ramp,
                                         kd_mode=c.kd_mode, id_teacher=c.id_teacher, kd_mask_seen=c.kd_mask_seen)
        self.register_buffer("log_popularity", torch.zeros(c.n_index))  # log max(train count, 1): popular fallback
        self.register_buffer("train_count", torch.zeros(c.n_index))  # for the prior and the logQ correction
        # one learned weight per branch on log(1 + train count); starts at 1, the popularity model's logits
        self.popularity_weight = nn.Parameter(torch.ones(len(c.branch_names))) if c.popularity_prior else None
        self._catalog: dict[str, torch.Tensor] | None = None  # eval-time cache of every item's vectors
        self._frozen_catalog = False  # True when loaded without features: the cache is all we have
        self.retrieval = RetrievalConfig()  # how recommend() searches the catalog (retrieval.py)
        self._retriever: FusedRetriever | None = None  # built from the eval catalog on first use

    # ------------------------------------------------------------------ building
    @classmethod
    def from_prepared(cls, data_dir: str | os.PathLike | PreparedInfo, name: str = "odmt",
                      **overrides) -> "OdmtRecommender":
        """A fresh model for a prepared DIR: schema-derived sizes, features, popularity, preset `name`."""
        info = data_dir if isinstance(data_dir, PreparedInfo) else read_prepared(data_dir)
        if name not in model_registry:
            raise ValueError(f"unknown model '{name}'; choose one of {sorted(model_registry)}")
        settings = {**{k: v for k, v in overrides.items() if v is not None}, **model_registry[name], "name": name}
        if settings.get("loss", "auto") == "auto":
            n_items = info.n_index - RESERVED_ROWS
            settings["loss"] = "full" if n_items <= AUTO_FULL_SOFTMAX_MAX_ITEMS else "in_batch"
        wanted = settings.get("modalities") or info.modalities
        missing = [m for m in wanted if m not in info.modalities]
        if missing:
            raise ValueError(f"{info.root} has no features for {missing}; it offers {info.modalities}")
        content = [m for m in wanted if m != "id"]
        config = OdmtConfig.from_dict({
            **settings, "n_index": info.n_index, "max_length": info.max_length, "item_column": info.item_column,
            "modalities": list(wanted),
        })
        store = ModalityStore.load(info.features_dir, content, layout=config.token_layout()) if content else None
        config.feature_dims = {m: store.dim(m) for m in content}
        model = cls(config, store)
        if config.id_init == "content":
            model.item_tower.init_id_from_content()
        if info.dir.file(PREPARED_ITEMS).is_file():
            items = info.dir.items(["item_idx", "train_count"])
            counts = np.zeros(info.n_index)
            counts[items["item_idx"].to_numpy()] = items["train_count"].to_numpy()
            model.set_popularity(torch.from_numpy(counts))
        return model

    def set_popularity(self, counts: torch.Tensor) -> None:
        """counts [N] train interactions per item -> the popularity prior, logQ correction and fallback."""
        self.train_count.copy_(counts.float())
        self.log_popularity.copy_(torch.log(counts.float().clamp(min=1.0)))

    def popularity_bias(self, item_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """{branch: [C]} the learned prior weight x log(1 + train count) of each item (all rows if None)."""
        if self.popularity_weight is None:
            return None
        log_count = self.prior_log_count() if item_idx is None else self.prior_log_count()[item_idx]
        return {b: self.popularity_weight[i] * log_count for i, b in enumerate(self.branches)}

    def prior_log_count(self) -> torch.Tensor:
        """[N] log(1 + train count): what the learned popularity prior weights, per index row."""
        return torch.log1p(self.train_count)

    def in_batch_log_q(self, cand_items: torch.Tensor, n_targets: int) -> torch.Tensor:
        """log P(item is among the batch's unique candidates) [C]: 1 - (1 - q)^P for P target draws with
        q = the item's share of train interactions. Unlike log q, this saturates at 0 for popular items,
        which are candidates in nearly every batch, so they are not over-penalised."""
        q = (self.train_count[cand_items].double() / self.train_count.sum().double().clamp(min=1.0)).clamp(1e-12, 1.0)
        p_in = -torch.expm1(n_targets * torch.log1p(-q.clamp(max=1 - 1e-12)))  # 1 - (1 - q)^P, stable
        return torch.log(p_in.clamp(min=1e-30)).float()

    @property
    def branch_names(self) -> list[str]:
        return list(self.branches)

    # ------------------------------------------------------------------ item vectors
    def item_vectors(self, item_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """item_idx [U] -> {branch: [U D]} tied branch item vectors (tower + branch MLP)."""
        return self._branch_vectors(self.item_tower(item_idx))

    def _branch_vectors(self, tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The item tower's {modality: [U D]} -> {branch: [U D]} (the branch MLPs)."""
        if self.config.fusion == "late":
            return {"late": self.branches["late"].item_vectors(torch.cat([tower[m] for m in self.config.modalities], -1))}
        return {b: self.branches[b].item_vectors(tower[b]) for b in self.branches}

    @torch.no_grad()
    def catalog_vectors(self, chunk: int = 2048) -> dict[str, torch.Tensor]:
        """{branch: [N D]} for every index row; computed once per eval session and cached."""
        if self._catalog is not None and not self.training:
            return self._catalog
        device = self.log_popularity.device
        parts = [self.item_vectors(torch.arange(s, min(self.config.n_index, s + chunk), device=device))
                 for s in range(0, self.config.n_index, chunk)]
        catalog = {b: torch.cat([p[b] for p in parts]) for b in self.branches}
        if not self.training:
            self._catalog = catalog
        return catalog

    @torch.no_grad()
    def with_added_items(self, feats: dict[str, torch.Tensor], n_new: int, seed: int = 0,
                         assumed_count: float = 0.0) -> "OdmtRecommender":
        """A copy that also indexes `n_new` items, appended from n_index on, scored from their content:
        `feats` are their looked-up features in this model's token layout (ModalityStore.lookup; {} for an
        ID-only model). Their ID vectors follow the rule at training start: the content init, or (xavier
        ID init, SASRec) an untrained random vector. They have no interactions yet: `assumed_count` is the
        train count the popularity prior and the empty-session fallback use for them (0 ranks every
        trained item above them wherever the prior is on).
        The copy scores from its cached catalog (it cannot train: the new items have no stored features)."""
        if n_new < 1:
            raise ValueError("no items to add")
        self.eval()
        old = self.catalog_vectors()
        c, tower = self.config, self.item_tower
        N = c.n_index
        idx = torch.arange(N, N + n_new)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if "id" in c.modalities:
            weight = state["item_tower.id_embedding.weight"]
            new_id = tower.new_id_vectors(feats, n_new, N + n_new, seed)
            state["item_tower.id_embedding.weight"] = torch.cat([weight, new_id.to(weight.dtype)])
        counts = torch.full((n_new,), float(assumed_count))
        for name, value in (("train_count", counts), ("log_popularity", torch.log(counts.clamp(min=1.0)))):
            state[name] = torch.cat([state[name], value.to(state[name].dtype)])
        config = OdmtConfig.from_dict({**asdict(c), "n_index": N + n_new})
        model = type(self)(config)
        model.load_state_dict(state)
        model.set_retrieval(self.retrieval)  # the parent's search settings carry over
        model.eval()
        new = model._branch_vectors(model.item_tower.encode_features(idx, feats))
        model._catalog = {b: torch.cat([old[b], new[b]]) for b in old}
        model._frozen_catalog = True
        return model

    def train(self, mode: bool = True):
        self._retriever = None  # built from the catalog and fusion, which may change now
        if not self._frozen_catalog:
            self._catalog = None  # weights are about to change: drop the eval cache
        elif mode:
            raise RuntimeError("this model was loaded without its item features; it can score but not train")
        return super().train(mode)

    # ------------------------------------------------------------------ training
    def forward(self, items: torch.Tensor, progress: float = 0.0) -> dict:
        """items [B L+1] right-padded rows ending with their target -> the task's loss dict.
        progress: the epoch as a fraction of the epoch budget (drives the KD ramp)."""
        history, targets = split_targets(items)  # [B L] each
        B, L = history.shape
        valid = targets >= RESERVED_ROWS  # [B L] positions with a real next item
        rows = torch.arange(B, device=items.device)[:, None].expand(B, L)[valid]  # [P] each position's row
        if self.config.loss == "full":
            vecs = self.item_vectors(torch.arange(self.config.n_index, device=items.device))  # {b: [N D]}
            seq = {b: v[history] for b, v in vecs.items()}  # [B L D]
            candidates = {b: v[RESERVED_ROWS:] for b, v in vecs.items()}  # [C D], C = N - 3
            y = targets[valid] - RESERVED_ROWS  # [P]
            cand_items = torch.arange(RESERVED_ROWS, self.config.n_index, device=items.device)  # [C]
            bias, mask = self.popularity_bias(cand_items), None
            row_has = torch.zeros(B, self.config.n_index, dtype=torch.bool, device=items.device)
            row_has = row_has.scatter_(1, items, True)[:, RESERVED_ROWS:]  # [B C]
        else:  # in-batch: the batch's targets are the candidates; the tower runs on the unique items only
            cand_items, y = torch.unique(targets[valid], return_inverse=True)  # [C], [P]
            needed, inv = torch.unique(torch.cat([history.flatten(), cand_items]), return_inverse=True)
            vecs = self.item_vectors(needed)  # {b: [U D]}
            seq = {b: v[inv[: B * L]].view(B, L, -1) for b, v in vecs.items()}
            candidates = {b: v[inv[B * L:]] for b, v in vecs.items()}
            log_q = self.in_batch_log_q(cand_items, len(y))  # [C]
            prior = self.popularity_bias(cand_items)
            bias = {b: (prior[b] if prior else 0.0) - log_q for b in self.branches}
            row_has = (items[:, :, None] == cand_items[None, None, :]).any(1)  # [B C]
        # the user's own other items: not negatives in the in-batch CE (the official code's history
        # mask) and, with kd_mask_seen, left out of the distributions the branches distil
        seen = row_has[rows]  # [P C]
        seen[torch.arange(len(y), device=items.device), y] = False
        if self.config.loss == "in_batch":
            mask = seen
        nonpad = (history > 0).unsqueeze(-1)  # [B L 1]
        states = {b: self.branches[b](seq[b] * nonpad)[valid] for b in self.branches}  # [P D]
        out = self.task(states, candidates, y, progress=progress, bias=bias, mask=mask, seen=seen)
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def session_states(self, history: torch.Tensor) -> dict[str, torch.Tensor]:
        """history [B S] right-padded item indices -> {branch: [B D]} the state after the newest item."""
        history = clip_history(history, self.config.max_length)
        catalog = self.catalog_vectors()
        B = history.shape[0]
        last = ((history > 0).sum(1) - 1).clamp(min=0)  # [B] position of the newest history item
        nonpad = (history > 0).unsqueeze(-1)  # [B L 1]
        return {b: branch(catalog[b][history] * nonpad)[torch.arange(B), last] for b, branch in self.branches.items()}

    @torch.no_grad()
    def branch_scores(self, states: dict[str, torch.Tensor], start: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
        """{branch: [B D]} states -> {branch: [B n]} raw scores of index rows [start, end) (all if end is None),
        the popularity prior included; reserved rows get -inf."""
        catalog = self.catalog_vectors()
        end = self.config.n_index if end is None else end
        prior = self.popularity_bias()
        scores = {}
        for b, h in states.items():
            rows = catalog[b] if (start, end) == (0, self.config.n_index) else catalog[b][start:end]
            s = h @ rows.t()  # [B n]
            if prior is not None:
                s = s + prior[b][start:end]
            if start < RESERVED_ROWS:
                s[:, : RESERVED_ROWS - start] = float("-inf")
            scores[b] = s
        return scores

    @torch.no_grad()
    def score(self, history: torch.Tensor) -> dict[str, torch.Tensor]:
        """history [B S] right-padded item indices -> {branch: [B N], "fused": [B N]} scores for every
        index row; reserved rows get -inf. Uses the cached catalog in eval mode. [B N] each: for large
        catalogs use `recommend` (blocked or indexed top-k) or training/streaming.py instead."""
        scores = self.branch_scores(self.session_states(history))
        branch_scores = {b: scores[b] for b in self.branches}
        scores["fused"] = fuse(branch_scores, self.config.fusion_weights, self.config.fusion_scores)
        if self.config.fusion_weights is not None:
            scores["mean"] = fuse(branch_scores)  # the paper's plain mean, for comparison
        return scores

    def set_fusion(self, weights: dict[str, float] | None, kind: str = "raw") -> None:
        """Use sum_b weights[b] * score_b (raw or log-softmax scores) as the fused score; None = the mean."""
        if weights is not None:
            unknown = set(weights) - set(self.branches)
            if unknown or not any(w > 0 for w in weights.values()):
                raise ValueError(f"fusion weights {weights} do not fit branches {self.branch_names}")
        fuse({b: torch.zeros(1, 1) for b in self.branches}, weights, kind)  # validates `kind`
        self.config.fusion_weights = None if weights is None else {b: float(w) for b, w in weights.items()}
        self.config.fusion_scores = kind
        self._retriever = None  # the query weights changed

    @torch.no_grad()
    def recommend(self, history: torch.Tensor, k: int = 10, exclude_history: bool = True,
                  branch: str = "fused", rules=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores [B k], item indices [B k]) for each history; the history's items excluded.
        The fused top-k goes through `retriever()` (exact in item blocks, or an HNSW index for a large
        catalog: retrieval.py), so memory stays bounded and a served model answers the same.
        rules: business rules (retrieval.ItemRules, for every session or one per session), fused only."""
        if branch == "fused":
            history = clip_history(history.long(), self.config.max_length)
            excluded = history if exclude_history else torch.zeros_like(history[:, :1])
            return self.retriever().search(self.session_states(history), excluded, k, rules)
        if rules is not None:
            raise ValueError(f"business rules apply to the fused ranking, not branch={branch!r}")
        s = self.score(history)[branch].clone()
        if exclude_history:
            s.scatter_(1, history.long(), float("-inf"))  # pads hit column 0, which is -inf already
        return torch.topk(s, k=min(k, s.shape[1] - RESERVED_ROWS), dim=-1)

    def retriever(self) -> FusedRetriever:
        """The fused-score top-k search over the current catalog and fusion (built once, then cached)."""
        if self.training:
            raise RuntimeError("recommend needs the model in eval mode (model.eval())")
        if self._retriever is None:
            c, names = self.config, self.branch_names
            prior = self.popularity_weight
            self._retriever = FusedRetriever(
                self.catalog_vectors(), c.fusion_weights or {b: 1.0 / len(names) for b in names},
                log_softmax=c.fusion_weights is not None and c.fusion_scores == "log_softmax",
                prior_weights=None if prior is None else dict(zip(names, prior.detach().cpu().tolist())),
                log_counts=None if prior is None else self.prior_log_count(), config=self.retrieval)
        return self._retriever

    def set_retrieval(self, config: RetrievalConfig | dict) -> None:
        """How `recommend` searches (saved by save_pretrained in config.json's "retrieval")."""
        self.retrieval = RetrievalConfig.from_dict(config) if isinstance(config, dict) else config.validate()
        self._retriever = None

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Writes config.json (model config + `extra`), model.pt (state_dict) and item_vectors.pt (the
        eval catalog, so the folder can score even without the prepared DIR's features)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        existing = RunFolder(path).config_or_none() or {}
        payload = {"format": MODEL_FORMAT, **existing, "retrieval": self.retrieval.as_dict(), **(extra or {}),
                   "model": asdict(self.config)}
        atomic_write(path / RUN_CONFIG, json.dumps(payload, indent=2, default=str) + "\n")
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        atomic_write(path / "model.pt", lambda tmp: torch.save(state, tmp))
        was_training = self.training
        self.eval()
        catalog = self.catalog_vectors()
        vectors = {b: v.detach().cpu().clone() for b, v in catalog.items()}
        atomic_write(path / "item_vectors.pt", lambda tmp: torch.save(vectors, tmp))
        self.train(was_training)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                        map_location: str | torch.device = "cpu") -> "OdmtRecommender":
        """Reload a saved folder (a training RUN or a save_pretrained folder) in eval mode.
        Item features come from `data_dir` (default: the DIR recorded at training time); if they are not
        there, the saved item vectors are used and the model can score but not train."""
        path = Path(path)
        payload = RunFolder(path).config()
        try:
            config = OdmtConfig.from_dict(payload["model"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path / RUN_CONFIG} is not a saved model's config ({type(exc).__name__}: {exc})") from exc
        content = [m for m in config.modalities if m != "id"]
        data_dir = data_dir or payload.get("data", {}).get("dir")
        features = PreparedDir(data_dir).features if data_dir else None
        store = None
        if content and features is not None and set(content) <= set(built_modalities(features)):
            store = ModalityStore.load(features, content, layout=config.token_layout())
            if store.n_index != config.n_index:  # items added after training (odmt add-items): saved vectors
                store = None
        model = cls(config, store)
        state = _load_tensors(path / "model.pt", map_location)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path / 'model.pt'} does not fit the model its config.json describes "
                             f"({str(exc).splitlines()[0]}); it was written by another version or another run") from exc
        model.eval()
        if content and store is None:
            catalog = _load_tensors(path / "item_vectors.pt", map_location)
            model._catalog, model._frozen_catalog = catalog, True
        try:
            model.set_retrieval(payload.get("retrieval") or {})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path / 'config.json'}: bad \"retrieval\" settings ({exc})") from exc
        return model


def build_model(name: str, data_dir: str | os.PathLike | PreparedInfo, **overrides) -> OdmtRecommender:
    """`model_registry` entry point: a fresh `name` model for a prepared DIR."""
    return OdmtRecommender.from_prepared(data_dir, name=name, **overrides)


def _load_tensors(path: Path, map_location) -> dict:
    """torch.load with weights_only (no code runs), and one clear error for a missing or damaged file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the folder is not a complete saved model")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupted or not a tensor file
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}): it is truncated or corrupted; "
                         "train again or restore the file") from exc
