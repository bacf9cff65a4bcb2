"""One ODMT branch: an item MLP and a causal sequence encoder over that branch's item vectors.

The branch's item vectors are tied: the same vectors feed the sequence encoder and are the candidates
that get scored (score = <sequence state, candidate item vector>), as in SASRec and the ODMT code.
The sequence encoder is a Transformers4Rec `TransformerBlock`: GPT-2 (causal, learnable positions) by
default, XLNet as an option (made causal with a permutation mask: its own uni-directional mask path
does not run with torch 2.x in transformers 4.30).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers4rec.torch as tr
from torch import nn
from transformers4rec.torch.block.transformer import TransformerPrepare


@dataclass
class SequenceEncoderConfig:
    kind: str = "gpt2"  # "gpt2" | "xlnet"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    max_length: int = 20  # the history length L (positions the encoder knows)


class XLNetCausalPrepare(TransformerPrepare):
    """Causal XLNet: perm_mask[b, i, j] = 1 forbids position i to see j; forbid every j > i."""

    def forward(self, inputs_embeds):
        B, L, _ = inputs_embeds.shape
        future = torch.triu(torch.ones(L, L, device=inputs_embeds.device), diagonal=1)  # [L L]
        return {"inputs_embeds": inputs_embeds, "perm_mask": future.expand(B, L, L)}


def sequence_encoder(cfg: SequenceEncoderConfig) -> tr.TransformerBlock:
    """A T4R TransformerBlock: [B L D] item vectors -> [B L D] causal states."""
    common = dict(d_model=cfg.d_model, n_head=cfg.n_heads, n_layer=cfg.n_layers, dropout=cfg.dropout,
                  layer_norm_eps=1e-6, initializer_range=0.02)
    if cfg.kind == "gpt2":
        return tr.TransformerBlock(tr.GPT2Config.build(total_seq_length=cfg.max_length, **common))
    if cfg.kind == "xlnet":
        config = tr.XLNetConfig.build(total_seq_length=cfg.max_length, attn_type="bi", **common)
        return tr.TransformerBlock(config, prepare_module=XLNetCausalPrepare)
    raise ValueError(f"unknown sequence encoder '{cfg.kind}'; choose gpt2 or xlnet")


class Branch(nn.Module):
    """Item MLP (Linear, LeakyReLU, Linear) + sequence encoder, for one modality (or the fused input)."""

    def __init__(self, name: str, in_dim: int, seq: SequenceEncoderConfig, mlp: bool = True):
        super().__init__()
        self.name = name
        d = seq.d_model
        if mlp:
            self.mlp = nn.Sequential(nn.Linear(in_dim, d), nn.LeakyReLU(), nn.Linear(d, d))
        elif in_dim == d:
            self.mlp = nn.Identity()
        else:
            raise ValueError(f"branch '{name}': without an MLP the item vector must already be {d}-dim")
        self.encoder = sequence_encoder(seq)

    def item_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """[... in_dim] tower output -> [... D] branch item vectors (inputs and candidates alike)."""
        return self.mlp(x)

    def forward(self, seq_vectors: torch.Tensor) -> torch.Tensor:
        """[B L D] right-padded history item vectors -> [B L D] states; state t has seen items 0..t."""
        return self.encoder(seq_vectors)
