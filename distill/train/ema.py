"""Exponential moving average of the student's weights.

The shadow is a full copy of the model (kept in float32, optionally on the CPU), so
`ema.model.save_pretrained(dir)` writes an ordinary model folder that `from_pretrained` loads and
samples from, like DiT's `ema` model. The EMA holds no counter of its own: the decay is a pure
function of the optimisation step the trainer passes in, so resuming needs only the shadow weights.

Decay schedule (`warmup=True`, the default of diffusers' `EMAModel` without `use_ema_warmup`):

    decay_t = min(decay, (1 + step) / (10 + step))

so the first updates follow the fast-moving young model closely instead of averaging in its random
initialisation for ~1/(1-decay) steps. `warmup=False` gives DiT's constant decay.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a weight sharded with FSDP; the tensor itself otherwise. (No DTensor
    exists before its module is imported, so unsharded runs do not pay for that import.)"""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if dtensor is not None and isinstance(t, dtensor.DTensor) else t


class EMA:
    """Shadow weights: s <- decay_t * s + (1 - decay_t) * p after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, device=None):
        """`device` None keeps the shadow beside the model; "cpu" saves accelerator memory for big
        students (one host-device copy per update). The copy is taken from `model` as it is now."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model)
        if device is not None:
            self.model.to(device)  # move before the float32 cast: the cast then happens there
        self.model.float()  # (not .to(dtype=...): diffusers models warn on a dtype cast through .to)
        self.model.requires_grad_(False).eval()

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimisation step `step` (0-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the shadow towards `model` (same architecture, unwrapped from DDP/compile)."""
        weight = 1.0 - self.decay_at(step)
        for m in (self.model, model):  # sharded (FSDP): a forward outside training leaves its root gathered
            getattr(m, "reshard", lambda: None)()
        pairs = self._pairs(model)
        # Same device and dtype (the usual case): one multi-tensor lerp over all trained weights,
        # a fraction of the per-tensor loop's cost; otherwise (shadow on the CPU, bf16 model) each
        # weight is brought to the shadow's device and dtype first.
        # Sharded (FSDP) shadow and model: each process averages its own shard.
        trained = [(local(s), local(p.detach())) for s, p in pairs if p.requires_grad]
        if trained and all(s.device == p.device and s.dtype == p.dtype for s, p in trained):
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], weight)
        else:
            for s, p in trained:
                s.lerp_(p.to(s), weight)
        for s, p in pairs:
            if not p.requires_grad:
                local(s).copy_(local(p.detach()))  # frozen parts follow the model (diffusers' EMAModel does the same)
        # Buffers (e.g. norm statistics) are copied, not averaged.
        for s, b in zip(self.model.buffers(), model.buffers()):
            s.copy_(b)  # copy_ casts dtype and moves device

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(shadow, model) parameter pairs, names checked once per model object."""
        cached = getattr(self, "_pair_cache", None)
        if cached is not None and cached[0] is model:
            return cached[1]
        pairs = []
        for (name, s), (name_p, p) in zip(self.model.named_parameters(), model.named_parameters()):
            if name != name_p:
                raise ValueError(f"EMA and model parameters differ: {name} vs {name_p}")
            pairs.append((s, p))
        self._pair_cache = (model, pairs)
        return pairs

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into `model` (cast to its dtype and device), e.g. to sample."""
        model.load_state_dict(self.model.state_dict())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "shadow": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.model.load_state_dict(state["shadow"])
