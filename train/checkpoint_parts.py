"""The trainer's stateful parts that are not objects of their own library: each has `state_dict` /
`load_state_dict`, so a checkpoint (train/checkpoint.py) saves and restores them like any other part."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import UserError


@dataclass
class Progress:
    """The step counters: optimizer steps done, and how many of them were skipped for a non-finite loss."""

    step: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nonfinite_total = int(state["step"]), int(state["nonfinite_total"])


class LoraWeights:
    """The trainable (LoRA) parameters, by name, saved in fp32."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu() for name, p in self.params.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        differ = sorted(set(self.params) ^ set(weights))
        if differ:
            raise UserError(
                f"the checkpoint's LoRA does not match this run's ({len(differ)} parameter(s) differ, "
                f"e.g. {differ[0]}); resume with the same lora_rank, lora_target and model, or start a new output_dir"
            )
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(weights[name].to(p.device, p.dtype))


class OptimizerState:
    """A torch optimizer's state with string keys (JSON has no integer keys), restored with its integer ones."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        return {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}

    def load_state_dict(self, state: dict) -> None:
        per_param = {int(k): v for k, v in state["state"].items()}
        self.optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


class RngState:
    """This rank's random number generators: torch's CPU and CUDA ones, and the training noise generator."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        states = {"torch": torch.get_rng_state(), "noise": self.generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()
        return states

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(states["torch"])
        self.generator.set_state(states["noise"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
