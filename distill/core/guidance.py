"""Classifier-free guidance (Ho & Salimans 2022), written once for teacher, student and samplers.

One forward runs the batch [uncond, cond] (the diffusers pipelines' order, `cfg_batch`), and its
two halves are combined as uncond + w * (cond - uncond) (`guide`), w a float or one scale per
sample (guided-teacher targets draw w per sample, LCM-style).
"""

from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import Tensor


def cfg_batch(uncond: Mapping[str, Tensor], cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The conditioning of one batched CFG forward: [uncond, cond] along the batch dim, per key of `cond`."""
    return {k: torch.cat([uncond[k], cond[k]]) for k in cond}


def guide(out_uncond: Tensor, out_cond: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """uncond + w * (cond - uncond). `scale`: a float, a 0-d tensor, a per-sample (N,) tensor
    (viewed to broadcast over the other dims, on the outputs' device; its dtype is kept, so torch's
    promotion rules apply), or a tensor already shaped to broadcast."""
    if isinstance(scale, Tensor) and scale.ndim == 1:
        scale = scale.to(out_cond.device).view(-1, *([1] * (out_cond.ndim - 1)))  # (N, 1, ...)
    return out_uncond + scale * (out_cond - out_uncond)
