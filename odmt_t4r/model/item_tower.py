"""Item towers: turn an item index into one d-dim vector per modality.

`IdAwareMultiModalTransformer` is ODMT's IMT (Ji et al., ACM MM 2023, Sec. 3.2): each item is a short
token sequence [text tokens | image tokens | ID token] encoded by a small post-LN Transformer. Content
tokens cannot see the ID token (so the text and image vectors stay pure content), while the ID token
attends to everything (so the ID vector is content-aware). `IndependentItemTower` is the no-IMT
ablation and the SASRec / late-fusion input: an ID embedding and one linear projection per modality.

Both return {"id": [U D], "text": [U D], "image": [U D]} restricted to the modalities they were built with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modality_store import ModalityStore

from odmt_t4r.contract import RESERVED_ROWS  # noqa: E402  (0 pad, 1 null, 2 OOV)


@dataclass
class ItemTowerConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    id_init: str = "content"  # "content": mean of the projected text/image CLS features; "xavier"


def text_extent(text_mask: torch.Tensor) -> torch.Tensor:
    """[U T] real-token mask -> [U] tokens up to and including the last real one (at least the CLS)."""
    positions = torch.arange(1, text_mask.shape[1] + 1, device=text_mask.device)
    return (text_mask * positions).amax(1).clamp(min=1)


class _ItemTower(nn.Module):
    """What both towers share: the modality list, the feature store and the ID embedding's content init."""

    modalities: list[str]
    content: list[str]
    store: ModalityStore | None
    tokens_read: int | None = None  # tokens per modality the tower reads from the store (None = all)

    @torch.no_grad()
    def init_id_from_content(self, chunk: int = 4096) -> None:
        """ID embedding <- mean of the projected text/image CLS features (the paper's content init)."""
        if "id" not in self.modalities or not self.content or self.store is None:
            return
        n = self.id_embedding.num_embeddings
        for start in range(RESERVED_ROWS, n, chunk):
            idx = torch.arange(start, min(n, start + chunk), device=self.id_embedding.weight.device)
            feats = {k: v.to(idx.device) for k, v in self.store.lookup(idx, n_tokens=1).items()}
            self.id_embedding.weight[idx] = self.content_id_vectors(feats)
        self.id_embedding.weight[:RESERVED_ROWS] = 0.0

    @torch.no_grad()
    def content_id_vectors(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The content init of ID vectors, [U D], from looked-up features (their CLS tokens)."""
        return torch.stack([self.proj[m](feats[m][:, 0]) for m in self.content]).mean(0)

    @torch.no_grad()
    def new_id_vectors(self, feats: dict[str, torch.Tensor], n_new: int, n_index: int, seed: int = 0) -> torch.Tensor:
        """ID vectors [n_new D] for items a trained tower has not seen (odmt add-items, odmt update), by the rule at
        training start: the content init from their looked-up `feats`, or (xavier ID init, or no content: SASRec)
        xavier-normal's scale for an [n_index D] table, drawn reproducibly from `seed`."""
        if self.cfg.id_init == "content" and self.content:
            return self.content_id_vectors(feats)
        d = self.id_embedding.weight.shape[1]
        std = (2.0 / (n_index + d)) ** 0.5
        return torch.randn(n_new, d, generator=torch.Generator().manual_seed(seed)) * std

    def forward(self, item_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """item_idx [U] -> {modality: [U D]}, content features read from the ModalityStore."""
        if self.content and self.store is None:
            raise RuntimeError("this item tower has no ModalityStore attached (load the model with its data)")
        feats = self.store.lookup(item_idx, n_tokens=self.tokens_read) if self.content else {}
        return self.encode_features(item_idx, {k: v.to(item_idx.device) for k, v in feats.items()})


class IdAwareMultiModalTransformer(_ItemTower):
    """The IMT. Inputs are item indices; frozen content features come from the ModalityStore."""

    def __init__(self, cfg: ItemTowerConfig, n_index: int, modalities: list[str],
                 feature_dims: dict[str, int], store: ModalityStore | None = None):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(modalities)  # subset of ["id", "text", "image"], in that order
        self.content = [m for m in ("text", "image") if m in self.modalities]
        self.store = store
        d = cfg.d_model
        self.proj = nn.ModuleDict({m: nn.Linear(feature_dims[m], d) for m in self.content})
        # a learned type vector per token kind, so the encoder can tell text, image and ID tokens apart
        self.token_type = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m in self.content})
        if "id" in self.modalities:
            self.id_embedding = nn.Embedding(n_index, d)
            nn.init.xavier_normal_(self.id_embedding.weight)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=False)  # post-LN, as the paper
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.bucket_size = 256  # items per length bucket when a call covers many items

    def _content_tokens(self, feats: dict, n_text: int) -> tuple[dict, dict]:
        """Projected content tokens {m: [U Tm D]} and key-padding masks {m: [U Tm]} (True = ignore).
        Text is cut to its first `n_text` tokens (the longest real text among these items)."""
        tokens, pad = {}, {}
        for m in self.content:
            x = feats[m][:, :n_text] if m == "text" else feats[m]
            tokens[m] = self.proj[m](x) + self.token_type[m]  # [U Tm D]
            mask = feats[f"{m}_mask"]
            if m == "text":
                keep = mask[:, :n_text].clone()  # [U T]
            else:  # an item without an image keeps only its (zero-feature) CLS token
                keep = mask[:, None].expand(-1, tokens[m].shape[1]).clone()  # [U P]
            keep[:, 0] = True  # the CLS token is always visible: no query is left with nothing to attend to
            pad[m] = ~keep
        return tokens, pad

    def _encode(self, item_idx: torch.Tensor, feats: dict, n_text: int) -> dict[str, torch.Tensor]:
        tokens, pad = self._content_tokens(feats, n_text) if self.content else ({}, {})
        seq = [tokens[m] for m in self.content]
        keys_pad = [pad[m] for m in self.content]
        if "id" in self.modalities:
            seq.append(self.id_embedding(item_idx)[:, None])  # [U 1 D]
            keys_pad.append(torch.zeros(len(item_idx), 1, dtype=torch.bool, device=item_idx.device))
        x = torch.cat(seq, dim=1)  # [U S D], S = T + P + 1
        key_padding = torch.cat(keys_pad, dim=1)  # [U S]
        S = x.shape[1]
        n_content = S - int("id" in self.modalities)
        attn_mask = torch.zeros(S, S, dtype=torch.bool, device=x.device)  # True = may not attend
        attn_mask[:n_content, n_content:] = True  # content queries never see the ID token
        h = self.encoder(x, mask=attn_mask, src_key_padding_mask=key_padding)  # [U S D]

        out, start = {}, 0
        for m in self.content:
            out[m] = h[:, start]  # the modality's CLS output
            start += tokens[m].shape[1]
        if "id" in self.modalities:
            out["id"] = h[:, -1]
        return out

    def encode_features(self, item_idx: torch.Tensor, feats: dict) -> dict[str, torch.Tensor]:
        """item_idx [U] and their looked-up content features -> {modality: [U D]}."""
        if "text" not in self.content:
            return self._encode(item_idx, feats, 0)
        lengths = text_extent(feats["text_mask"])  # [U]
        if len(item_idx) <= self.bucket_size:
            return self._encode(item_idx, feats, int(lengths.max()))
        # Items only attend within themselves, so encoding them in groups of similar text length, each cut
        # to its own longest text, gives the same vectors for about half the work of padding all to T.
        order = torch.argsort(lengths, stable=True)
        outs, pieces = [], []
        for chunk in order.split(self.bucket_size):
            sub = {k: v[chunk] for k, v in feats.items()}
            outs.append(self._encode(item_idx[chunk], sub, int(lengths[chunk].max())))
            pieces.append(chunk)
        inverse = torch.argsort(torch.cat(pieces))
        return {m: torch.cat([o[m] for o in outs])[inverse] for m in outs[0]}


class IndependentItemTower(_ItemTower):
    """No cross-modal attention: an ID embedding plus a linear projection of each modality's CLS feature."""

    def __init__(self, cfg: ItemTowerConfig, n_index: int, modalities: list[str],
                 feature_dims: dict[str, int], store: ModalityStore | None = None):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(modalities)
        self.content = [m for m in ("text", "image") if m in self.modalities]
        self.store = store
        d = cfg.d_model
        self.proj = nn.ModuleDict({m: nn.Linear(feature_dims[m], d) for m in self.content})
        if "id" in self.modalities:
            self.id_embedding = nn.Embedding(n_index, d)
            nn.init.xavier_normal_(self.id_embedding.weight)
        self.dropout = nn.Dropout(cfg.dropout)

    tokens_read = 1  # only the CLS tokens

    def encode_features(self, item_idx: torch.Tensor, feats: dict) -> dict[str, torch.Tensor]:
        """item_idx [U] and their looked-up content features -> {modality: [U D]}."""
        out = {m: self.dropout(self.proj[m](feats[m][:, 0])) for m in self.content}  # CLS -> [U D]
        if "id" in self.modalities:
            out["id"] = self.dropout(self.id_embedding(item_idx))
        return out


ITEM_TOWERS = {"imt": IdAwareMultiModalTransformer, "independent": IndependentItemTower}
