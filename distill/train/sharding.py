"""FSDP2 for big students: shard the SiT blocks across processes, and keep the EMA, the checkpoint
and the sample grid working on sharded weights.

`training.fsdp: true` under `accelerate launch --multi_gpu` (on CPU: gloo, for a functional check).
The trainer shards the student itself with `torch.distributed.fsdp.fully_shard` rather than through
accelerate's FSDP plugin, because the parts around the student need to know the layout:

- each `SiTBlock` (the model's `_no_split_modules`) is one FSDP unit, the rest of the model the
  root unit; parameters stay float32 masters, compute runs in the recipe's `mixed_precision` (bf16)
  through FSDP's `MixedPrecisionPolicy`, gradients are reduced in float32;
- the EMA shadow is sharded the same way, so each rank averages only its own shard (a 3b student's
  float32 shadow costs 12 GB / world size per GPU, not 12 GB);
- checkpoints hold *full* weights: every rank takes part in the gather, the main process writes the
  usual `save_pretrained` folders (so `from_pretrained` and `cli.py sample` load them as always) and
  a full, parameter-name-keyed optimizer state (not per-process shards).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sitdistill.train.ema import local

from diffusers.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS_NAME  # the file from_pretrained reads


def check_fsdp(recipe, accelerator) -> bool:
    """Whether this run shards the student (`training.fsdp`); a clear error for a launch it cannot use
    (what the recipe itself combines with FSDP is checked by `sitdistill.train.validate`)."""
    from accelerate.utils import DistributedType

    from sitdistill.core.recipe import RecipeError

    t = recipe.training
    if accelerator.distributed_type == DistributedType.FSDP:
        raise RecipeError("launched with accelerate's FSDP plugin (--use_fsdp): sitdistill shards the student itself "
                          "so the EMA and checkpoints know the layout; launch with --multi_gpu and set training.fsdp=true")
    if not t.fsdp:
        return False
    if accelerator.num_processes < 2:
        raise RecipeError("training.fsdp shards over processes: launch with "
                          "`accelerate launch --multi_gpu --num_processes N` (N >= 2), or set training.fsdp=false")
    return True


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is an FSDP unit (no import for runs that never loaded FSDP)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly) sharded tensor (a collective for a DTensor)."""
    return t.full_tensor() if local(t) is not t else t


def shard_model(model: nn.Module, device: torch.device, mixed_precision: str = "no",
                offload: bool = False) -> nn.Module:
    """Shard `model` in place over all processes: one FSDP unit per module whose class is listed
    in `model._no_split_modules` (SiTBlock), the rest as the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    compute = {"bf16": torch.bfloat16}.get(mixed_precision)
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=compute,
                                                                             reduce_dtype=torch.float32)}
    if offload and device.type != "cpu":
        kwargs["offload_policy"] = CPUOffloadPolicy()  # the shards stay in host memory
    # (fully_shard moves each unit's parameters and buffers to the mesh's device as it shards them,
    # so the whole model never sits on one GPU)
    units = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if module is not model and type(module).__name__ in units:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights of a sharded model as CPU tensors on the main process ({} elsewhere). Every
    process must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.reshard()  # a forward outside training (probe, EMA) leaves the root unit gathered
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_finite(model: nn.Module) -> bool:
    """Whether every weight is finite; for a sharded model, agreed by all processes (each checks
    its own shards)."""
    finite = all(torch.isfinite(local(p)).all() for p in model.parameters())
    if not is_sharded(model):
        return finite
    ok = torch.tensor(float(finite), device=next(local(p) for p in model.parameters()).device)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


class GatheredModel:
    """A sharded model as the checkpoint code sees a model: `gather()` (all processes) collects the
    full weights, `save_pretrained` (main process) writes the model's ordinary folder, and
    `load_state_dict` (all processes, full weights) puts a saved folder back into the shards."""

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        self.model = model
        self.model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        self.weights: dict[str, torch.Tensor] | None = None

    def gather(self) -> "GatheredModel":
        self.weights = full_state_dict(self.model)
        return self

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        if not self.weights:
            raise RuntimeError("GatheredModel.save_pretrained before gather() (or off the main process)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_config(path)
        # FSDP's wrapper class (FSDPSiT) would be recorded as the class: record the model's own.
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config["_class_name"] = self.model_class.__name__
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in self.weights.items()}, path / WEIGHTS_NAME, metadata={"format": "pt"})

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Checked here: with full state dicts torch fills keys missing from `state` with the
        # model's current values, so it would never report them.
        missing = sorted(set(self.model.state_dict()) - set(state))
        result = set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        unexpected = sorted(set(result.unexpected_keys))
        if strict and (missing or unexpected):
            raise RuntimeError(f"weights do not match {self.model_class.__name__}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def unsharded(self) -> nn.Module | None:
        """A plain copy with the gathered weights (main process), e.g. to draw a sample grid."""
        if not self.weights:
            return None
        plain = self.model_class.from_config(self.model.config)
        plain.load_state_dict(self.weights)
        return plain


class GatheredOptimizer:
    """The optimizer of sharded models, for the checkpoint: full state keyed by parameter name."""

    def __init__(self, models: nn.Module, optimizer: torch.optim.Optimizer):
        self.models = models  # one module holding every model the optimizer updates
        self.optimizer = optimizer
        self.state: dict | None = None

    def gather(self) -> "GatheredOptimizer":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.state = get_optimizer_state_dict(self.models, self.optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self

    def state_dict(self) -> dict:
        if self.state is None:
            raise RuntimeError("GatheredOptimizer.state_dict before gather()")
        return self.state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.models, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
