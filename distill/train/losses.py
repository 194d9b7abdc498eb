"""Loss terms of the distillation objective, each an unreduced per-sample tensor (N,).

    L = w_eps * L_eps + w_teacher * L_teacher + w_perturb * L_perturb (+ w_feature * L_feature)

Every function here returns one value per sample, in the style of NVlabs/edm `training/loss.py`:
the trainer chooses the inputs (which x_t, which t, which conditioning), weights the terms,
reduces them and logs each on its own through `combine`. Nothing here knows about the noise
schedule; per-sample weights such as min-SNR-gamma come from `NoiseSchedule.min_snr_weight`.

All arithmetic is done in float32, even when the predictions come out of a bf16/fp16 autocast
region: a squared error of bf16 values loses most of its mantissa exactly where the student is
close to the teacher, which is where distillation spends most of its time.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def mse_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over every non-batch dimension, in float32: (N, ...) x 2 -> (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = a.float() - b.float()  # (N, ...)
    return diff.square().flatten(1).mean(dim=1)  # (N,)


def broadcast_per_sample(value: Union[Tensor, float], like: Tensor) -> Union[Tensor, float]:
    """A per-sample (N,) tensor viewed as (N, 1, ...) to broadcast against `like`; scalars pass."""
    if isinstance(value, Tensor) and value.ndim == 1:
        return value.to(like).view(-1, *([1] * (like.ndim - 1)))  # (N, 1, ...)
    return value


def _weighted(loss: Tensor, weight: Union[Tensor, float, None]) -> Tensor:
    if weight is None:
        return loss
    if isinstance(weight, Tensor):
        weight = weight.to(device=loss.device, dtype=torch.float32)
    return loss * weight  # (N,)


def eps_loss(pred: Tensor, noise: Tensor, weight: Union[Tensor, float, None] = None) -> Tensor:
    """Data term: MSE(student eps, the noise that made x_t) -> (N,).

    `weight` (N,) is the optional min-SNR-gamma weighting (Hang et al. 2023), e.g.
    `schedule.min_snr_weight(t, gamma)`.
    """
    return _weighted(mse_per_sample(pred, noise), weight)


def teacher_loss(pred: Tensor, teacher_eps: Tensor, weight: Union[Tensor, float, None] = None) -> Tensor:
    """Teacher term: MSE(student eps, teacher eps) on the same x_t, t and conditioning -> (N,).

    The target may be the plain conditional teacher prediction or a guided one (`sitdistill.core.guidance`).
    The teacher's prediction is a target, never a path for gradients: it is detached here so a
    teacher that was (by mistake) called with grad enabled still cannot be trained.
    """
    return _weighted(mse_per_sample(pred, teacher_eps.detach()), weight)


# The perturbation term is the teacher term evaluated on perturbed inputs (perturbed x_t, t,
# conditioning, or states from the teacher's own trajectory; see `distill/train/perturb.py`): the
# teacher is the only target there, because the true noise of a perturbed state is unknown.
perturb_loss = teacher_loss


FeatureInput = Union[Tensor, Sequence[Tensor]]
FEATURE_KINDS = ("cosine", "mse")


def _feature_loss_one(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    # student, teacher: (N, T, C) token features, already projected and on the same token grid.
    if student.shape != teacher.shape:
        raise ValueError(f"feature shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    teacher = teacher.detach()
    if kind == "cosine":
        # 1 - cos per token (REPA aligns with negative cosine similarity; the constant offset
        # makes the term zero at perfect alignment so it reads like the other terms).
        cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)  # (N, T)
        return (1.0 - cos).flatten(1).mean(dim=1)  # (N,)
    if kind == "mse":
        return mse_per_sample(student, teacher)  # (N,)
    raise ValueError(f"unknown feature loss kind {kind!r}; choose one of {FEATURE_KINDS}")


def feature_loss(student_feats: FeatureInput, teacher_feats: FeatureInput, kind: str = "cosine") -> Tensor:
    """Feature alignment of projected student tokens to teacher tokens -> (N,).

    Inputs are (N, T, C) tensors, or equal-length sequences of them (one per aligned block pair),
    in which case the per-sample losses are averaged over the pairs. The teacher side is detached.
    """
    if isinstance(student_feats, Tensor):
        student_feats, teacher_feats = [student_feats], [teacher_feats]
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"need matching non-empty feature lists, got {len(student_feats)} and {len(teacher_feats)}")
    losses = [_feature_loss_one(s, t, kind) for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(losses).mean(dim=0)  # (N,)


def sample_guidance_scale(
    n: int, lo: float, hi: float, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """Per-sample guidance scales drawn uniformly in [lo, hi] (LCM's w ~ U[w_min, w_max]) -> (N,)."""
    if hi < lo:
        raise ValueError(f"guidance range is empty: [{lo}, {hi}]")
    u = torch.rand(n, generator=generator, device=generator.device if generator is not None else "cpu")
    return (lo + (hi - lo) * u).to(device=device)


class Terms:
    """Per-sample loss terms (N,) with their weights, and values logged beside them but not
    optimised (`logs`): what each piece of the objective returns, merged in order (the order is
    the order of the total's sum in `combine`)."""

    def __init__(self) -> None:
        self.terms: dict[str, Tensor] = {}
        self.weights: dict[str, float] = {}
        self.logs: dict[str, Tensor] = {}

    def add(self, name: str, per_sample: Tensor, weight: float) -> None:
        self.terms[name], self.weights[name] = per_sample, weight

    def update(self, other: "Terms") -> "Terms":
        self.terms.update(other.terms)
        self.weights.update(other.weights)
        self.logs.update(other.logs)
        return self


def combine(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """Weight, reduce and collect the per-sample terms into one scalar loss plus a log dict.

    Each term is reduced by its own mean first, so terms may come from batches of different size
    (e.g. data-free trajectory states). A weight must be given for every term (no silent zero);
    a term with weight 0 is logged but left out of the total. The log holds the detached
    unweighted mean of every term under `loss/<name>` and the total under `loss/total`.
    """
    missing = [name for name in terms if name not in weights]
    if missing:
        raise KeyError(f"no weight given for loss term(s) {missing}; weights: {sorted(weights)}")
    total = None
    logs: dict[str, Tensor] = {}
    for name, per_sample in terms.items():
        mean = per_sample.float().mean()
        logs[f"loss/{name}"] = mean.detach()
        w = float(weights[name])
        if w != 0.0:
            total = w * mean if total is None else total + w * mean
    if total is None:
        raise ValueError(f"every loss term has weight 0: {dict(weights)}")
    logs["loss/total"] = total.detach()
    return total, logs


# The loss terms by the names the recipe and the logs use.
LOSSES = {
    "eps": eps_loss,
    "teacher": teacher_loss,
    "perturb": perturb_loss,
    "feature": feature_loss,
}
