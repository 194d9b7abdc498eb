"""Official SiT/DiT ImageNet checkpoints (willisma/SiT, facebookresearch/DiT layout): read them
safely, read their architecture from the tensors, and copy every tensor that fits into a student
(`SiT.from_official_checkpoint`)."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from sitdistill.students.layers import sincos_pos_embed_2d

logger = logging.getLogger(__name__)

# Presets: the official SiT sizes (depth, width, heads) by name.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Heads of the official presets by width: an official checkpoint has no head count in its tensors.
OFFICIAL_HEADS_BY_WIDTH = {hidden: heads for depth, hidden, heads in _SIZES.values()}


@dataclass
class LoadReport:
    """What ``from_official_checkpoint`` did with each tensor."""
    loaded: dict[str, tuple] = field(default_factory=dict)    # name -> shape
    new: dict[str, tuple] = field(default_factory=dict)       # ours, kept at init
    skipped: dict[str, str] = field(default_factory=dict)     # checkpoint name -> "shape: why"

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)}, new {len(self.new)}, skipped {len(self.skipped)}"]
        lines += [f"  loaded  {k} {tuple(v)}" for k, v in self.loaded.items()]
        lines += [f"  new     {k} {tuple(v)}" for k, v in self.new.items()]
        lines += [f"  skipped {k} {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def load_into(model, state: dict[str, torch.Tensor]) -> LoadReport:
    """Copy every official tensor that fits into `model` (a SiT); see ``SiT.from_official_checkpoint``."""
    ours = model.state_dict()
    report = LoadReport()
    merged = dict(ours)
    for name, tensor in state.items():
        shape = tuple(tensor.shape)
        if name == "pos_embed":
            # Fixed sin-cos table in official models; ours is recomputed for every grid.
            side = math.isqrt(shape[1])
            same = side * side == shape[1] and torch.allclose(
                tensor[0].float(), sincos_pos_embed_2d(shape[2], side, side), atol=1e-5)
            if not same:
                logger.warning("pos_embed in the checkpoint is not the sin-cos table; it is ignored")
            why = "recomputed per grid" + ("" if same else " (checkpoint table differs from sin-cos!)")
            report.skipped[name] = f"{shape}: {why}"
        elif name not in ours:
            report.skipped[name] = f"{shape}: not in this configuration"
        elif shape == tuple(ours[name].shape):
            merged[name] = tensor
            report.loaded[name] = shape
        elif name.startswith("final_layer.linear.") and shape[0] == 2 * ours[name].shape[0]:
            # learn_sigma checkpoint -> eps-only student: rows are (p, q, c) with c fastest.
            p2 = model.config.patch_size ** 2
            merged[name] = tensor.reshape(p2, -1, *shape[1:])[:, : model.config.in_channels].reshape(ours[name].shape)
            report.loaded[name] = shape
            report.skipped[name + "[sigma half]"] = f"{shape}: dropped (learn_sigma=False)"
        else:
            report.skipped[name] = f"{shape}: shape differs from ours {tuple(ours[name].shape)}"
    report.new = {k: tuple(v.shape) for k, v in ours.items() if k not in report.loaded}
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in merged.items()}, strict=True)
    return report


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official checkpoint safely: ``torch.load(weights_only=True)`` or safetensors.

    Training checkpoints (``{"model", "ema", ...}``) give their EMA weights, as DiT's sampler does.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    from sitdistill.core.checkpoint import load_weights_only

    state = load_weights_only(path)
    for key in ("ema", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def official_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Architecture of an official SiT/DiT state dict, read from its tensors."""
    if "x_embedder.proj.weight" not in state:
        raise ValueError("not an official SiT/DiT checkpoint: no x_embedder.proj.weight")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out_rows = state["final_layer.linear.weight"].shape[0]
    out_channels = out_rows // (patch * patch)
    assert out_channels in (in_channels, 2 * in_channels), f"final layer has {out_rows} rows for patch {patch}"
    config = dict(
        in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        learn_sigma=out_channels == 2 * in_channels,
    )
    if hidden in OFFICIAL_HEADS_BY_WIDTH:
        config["num_heads"] = OFFICIAL_HEADS_BY_WIDTH[hidden]
    if "pos_embed" in state:
        config["input_size"] = math.isqrt(state["pos_embed"].shape[1]) * patch
    if "y_embedder.embedding_table.weight" in state:
        # Official models always carry the null-class row (class_dropout_prob = 0.1).
        config["num_classes"] = state["y_embedder.embedding_table.weight"].shape[0] - 1
        config["class_dropout_prob"] = 0.1
    return config
