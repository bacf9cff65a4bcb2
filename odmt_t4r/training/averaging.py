"""Weight averaging (TrainConfig.average_epochs): an exponential moving average of the weights over about
that many epochs of steps. Validation, early stopping, the saved model and so the served one all use the
averaged weights; the optimizer keeps stepping the raw ones. The average smooths the epoch-to-epoch noise
of a small dataset's updates, at no extra training work."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """Shadow copies of a model's floating-point state, moved toward it after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @classmethod
    def over_epochs(cls, model: torch.nn.Module, epochs: float, steps_per_epoch: int) -> "WeightAverage":
        """An average whose horizon is `epochs` epochs of `steps_per_epoch` steps (decay 1 - 1/horizon)."""
        return cls(model, 1.0 - 1.0 / max(2.0, epochs * max(1, steps_per_epoch)))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        # early steps weigh more, so the random initial weights fade out within the first horizon
        decay = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().to(self.shadow[k].dtype), 1.0 - decay)

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Within the block the model holds the averaged weights; the raw ones come back after it."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        model.train(model.training)  # drops the model's eval caches (item vectors, search index) of the old weights
        try:
            yield model
        finally:
            model.load_state_dict(raw, strict=False)
            model.train(model.training)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("the checkpoint's weight average does not match this model's weights")
        self.decay, self.steps = float(state["decay"]), int(state["steps"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
