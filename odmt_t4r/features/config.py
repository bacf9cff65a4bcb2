"""What to extract and how: the one config dataclass of the feature stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MODALITIES = ("text", "image")
from odmt_t4r.contract import RESERVED_ROWS  # noqa: E402  (0 pad, 1 null, 2 OOV: always all-zero features)


@dataclass(frozen=True)
class FeatureConfig:
    """Settings of `build_item_features`. Only the fields in `hashed_settings` decide the cached content."""

    modalities: tuple[str, ...] = MODALITIES
    max_text_tokens: int = 30  # T: text tokens per item, CLS at position 0, padded/truncated to T
    image_size: int = 128  # square input side; EfficientNet-Lite0 gives (ceil(size/32))^2 + 1 tokens
    batch_size: int = 32  # items per encoder call; 16-32 keeps EfficientNet activations in CPU cache
    text_encoder: str = "minilm"  # a name in TEXT_ENCODERS
    text_encoder_folder: str | None = None  # a local Hugging Face folder; None = the encoder's default
    image_encoder: str = "efficientnet-lite0"  # a name in IMAGE_ENCODERS
    device: str = "auto"  # "auto": CUDA where torch sees a GPU, else the CPU; or "cpu", "cuda", "cuda:1"; not hashed
    progress: bool = True  # on stderr: a bar on a terminal, plain lines otherwise

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))  # lists from YAML/CLI hash like tuples
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"FeatureConfig.modalities: unknown {sorted(unknown)}; choose from {MODALITIES}")
        for name in ("max_text_tokens", "image_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FeatureConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_text_tokens < 2:
            raise ValueError("FeatureConfig.max_text_tokens must be >= 2 (CLS plus at least one token)")

    def torch_device(self) -> str:
        """The device the encoders run on: `device`, with "auto" resolved when asked (a GPU is picked up
        with no code change; `device="cpu"` keeps the CPU even where one is present)."""
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def hashed_settings(self, modality: str) -> dict:
        """Fields that change a modality's arrays. Batch size, device, progress and folder paths do not
        (the encoder's own identity, weights hash included, stands for which encoder and weights)."""
        if modality == "text":
            return {"max_text_tokens": int(self.max_text_tokens)}
        return {"image_size": int(self.image_size)}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d
