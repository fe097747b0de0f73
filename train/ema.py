"""An exponential moving average of the LoRA weights, kept on its own device (the CPU by default)."""

from __future__ import annotations

import torch


class LoraEMA:
    """fp32 EMA copies of the trainable parameters, by name.

    After optimizer step t: ema = d·ema + (1-d)·w with d = min(decay, (1+t)/(10+t)), the warm-up
    diffusers' EMAModel uses, so early steps are not dominated by the random initialisation.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, device: str | torch.device):
        self.decay, self.device = decay, torch.device(device)
        self.shadow = {name: p.detach().to(self.device, torch.float32, copy=True) for name, p in named_params.items()}

    @torch.no_grad()
    def update(
        self, named_params: dict[str, torch.nn.Parameter], step: int, skipped: torch.Tensor | None = None
    ) -> None:
        """Move towards the weights after optimizer step `step`; not at all where `skipped` (a 0-dim tensor on
        the weights' device, 1.0 for a step skipped on a non-finite loss: decided without a host sync)."""
        d = min(self.decay, (1 + step) / (10 + step))
        weight = torch.full((), 1 - d, device=self.device)
        if skipped is not None:
            weight = weight * (1 - skipped.to(self.device, torch.float32))
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().to(self.device, torch.float32), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
