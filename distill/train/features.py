"""Intermediate features by module path, for aligning student blocks to teacher UNet blocks.

`capture` hooks modules named by their `named_modules()` path (torchdistill's way of choosing
features without touching the model code) and always removes its hooks on exit.
`tokens_from_map` brings a UNet feature map (N, C, H, W) onto the student's token grid, and
`FeatureProjector` is the small learnt MLP that maps student tokens to the teacher's channels
(REPA's projector: 3 linear layers with SiLU between). The loss itself is `losses.feature_loss`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn


def _first_tensor(output) -> Tensor:
    """A block's output as one tensor: itself, the first tensor of a tuple/list, or `.sample`."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    sample = getattr(output, "sample", None)  # diffusers BaseOutput
    if isinstance(sample, Tensor):
        return sample
    raise TypeError(f"cannot take a feature tensor from a {type(output).__name__} output")


@contextlib.contextmanager
def capture(module: nn.Module, paths: Sequence[str], detach: bool = False) -> Iterator[dict[str, Tensor]]:
    """Collect the outputs of the submodules at `paths` during forwards inside the block.

        with capture(teacher.unet, ["mid_block", "up_blocks.1"], detach=True) as feats:
            teacher.predict_eps(x_t, t, cond)
        feats["mid_block"]  # (N, C, H, W)

    The dict maps each path to the output of its last call (a teacher called once for the
    unconditional and once for the conditional half leaves the second). Keep `detach=False` on
    the student side so gradients flow through the features. Unknown paths raise a KeyError
    before anything is hooked; every hook is removed on exit, exceptions included. No paths: an
    empty dict, without walking the module (the training step enters this every step).
    """
    if not paths:
        yield {}
        return
    modules = dict(module.named_modules())
    unknown = [p for p in paths if p not in modules]
    if unknown:
        sample = [name for name in modules if name][:8]
        raise KeyError(f"no module at path(s) {unknown} in {type(module).__name__}; e.g. {sample}")

    feats: dict[str, Tensor] = {}

    def make_hook(path: str):
        def hook(_module, _inputs, output):
            out = _first_tensor(output)
            feats[path] = out.detach() if detach else out
        return hook

    handles = []
    try:
        for path in paths:
            handles.append(modules[path].register_forward_hook(make_hook(path)))
        yield feats
    finally:
        for handle in handles:
            handle.remove()


def tokens_from_map(feat: Tensor, grid_hw: tuple[int, int], mode: str | None = None) -> Tensor:
    """Resample a feature map onto a token grid: (N, C, H, W) -> (N, h*w, C), row-major tokens.

    Row-major (h, w) order is the order of a ViT/SiT patch sequence. `mode` None picks "area"
    when the map shrinks (an average over the patch's footprint) and "bilinear" when it grows.
    """
    n, c, h_in, w_in = feat.shape
    h, w = grid_hw
    if (h_in, w_in) != (h, w):
        if mode is None:
            mode = "area" if h <= h_in and w <= w_in else "bilinear"
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        feat = F.interpolate(feat, size=(h, w), mode=mode, **kwargs)  # (N, C, h, w)
    return feat.flatten(2).transpose(1, 2)  # (N, h*w, C)


class FeatureProjector(ModelMixin, ConfigMixin):
    """Student tokens (N, T, student_dim) -> teacher channels (N, T, teacher_dim).

    REPA's projector shape: Linear -> SiLU -> Linear -> SiLU -> Linear. Trainable and saved with
    the student side (it is a diffusers model, so `save_pretrained`/`from_pretrained` work).
    """

    @register_to_config
    def __init__(self, student_dim: int, teacher_dim: int, hidden_dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(student_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, teacher_dim),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)  # (N, T, teacher_dim)


class FeatureProjectors(nn.ModuleList):
    """One projector per aligned block, called as one module: ``projectors(features) -> list``.

    A single forward is what lets accelerate's DDP wrapper (which is not iterable) serve all the
    projectors, and synchronise their gradients across processes."""

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self):
            raise ValueError(f"{len(features)} feature maps for {len(self)} projectors")
        return [proj(f) for proj, f in zip(self, features)]
