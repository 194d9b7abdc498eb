"""Muon for the student's hidden matrices, AdamW for everything else, in one torch optimizer.

Muon (K. Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; J. Liu et
al. 2025, "Muon is Scalable for LLM Training") replaces each 2-D weight's momentum update by its
nearest semi-orthogonal matrix (five Newton-Schulz iterations), so every direction of the matrix
moves at the same rate. Following both papers, it is used for the transformer blocks' 2-D weights
only; embeddings, the final layer, norms, biases, projectors and end-to-end encoders keep AdamW.
Moonshot's scale, 0.2 * sqrt(max(rows, cols)), gives the orthogonalised update the RMS of an
AdamW update, so `optimizer.lr` means the same for both halves (weight decay is applied as
lr x weight_decay with each group's own lr, as torch.optim.Muon does).

One optimizer (not two side by side) so that the LR scheduler, gradient clipping, accelerate's
wrapper and checkpoints see a single `param_groups` / `state_dict`, as with AdamW.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from sitdistill.core import precision

# Keller Jordan's quintic Newton-Schulz coefficients (torch.optim.Muon uses the same).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # floor of the norm each matrix is divided by before the iterations


NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NS_FORMS = ("auto", "plain")  # auto: the Gram form where `gram_pays`; plain: torch.optim.Muon's iterations
MUON_SETTINGS = ("momentum", "ns_dtype", "ns_form")  # the group settings beyond AdamW's a resume takes from the recipe


def newton_schulz_dtype(device: torch.device | str, choice: str = "auto") -> torch.dtype:
    """The Newton-Schulz iterations' precision: `choice` ("float32" or "bfloat16"), or for "auto"
    bfloat16 on CUDA (as torch.optim.Muon) and on a CPU with bfloat16 matmul units (there the
    toy student's orthogonalisations run 2.3x-2.7x faster than in float32 and its whole step 1.29x:
    `cli.py bench --compare optimizer.muon_ns_dtype=float32`), float32 elsewhere (CPUs without those
    units emulate bfloat16 matmuls)."""
    if choice != "auto":
        return NS_DTYPES[choice]
    return torch.bfloat16 if precision.bf16_pays(device) else torch.float32


def orthogonalise(g: Tensor, steps: int = 5, eps: float = NS_EPS, dtype: torch.dtype | None = None) -> Tensor:
    """About U V^T for g = U S V^T by `steps` quintic Newton-Schulz iterations (a convolution's kernel
    is taken as its (out, in x kh x kw) matrix, as in Jordan's CIFAR-10 runs; singular values
    land in about [0.7, 1.2], which the papers find as good as exact). `dtype`: the iterations'
    precision; default `newton_schulz_dtype(g.device)`."""
    return _newton_schulz([g], steps, eps, dtype or newton_schulz_dtype(g.device))[0]


def orthogonalise_many(gs: list[Tensor], steps: int = 5, eps: float = NS_EPS,
                       dtype: torch.dtype | None = None) -> list[Tensor]:
    """`orthogonalise` of each matrix, the matrices of one shape stacked and iterated as one batch
    (a transformer's blocks repeat their shapes: the toy student's 48 matrices are 6 shapes, and
    `cli.py bench --configs toy` timed the optimizer at 86-92 against 151-162 ms one by one; the
    iterations are the same, and `tests/test_muon.py` checks the two agree)."""
    out: list[Tensor | None] = [None] * len(gs)
    for (_, _, device), index in _same_shape(gs).items():
        batch = _newton_schulz([gs[i] for i in index], steps, eps, dtype or newton_schulz_dtype(device))
        for i, x in zip(index, batch):
            out[i] = x
    return out


def _same_shape(tensors: Iterable[Tensor]) -> dict[tuple, list[int]]:
    """The positions of `tensors` by (shape, dtype, device): the batches `_newton_schulz` takes."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.shape, t.dtype, t.device), []).append(i)
    return groups


def gram_pays(rows: int, cols: int, steps: int, dtype: torch.dtype) -> bool:
    """Whether `_newton_schulz` iterates a (rows, cols) matrix in its Gram form: in float32 only, and
    where that form multiplies fewer numbers. With r <= n the matrix's short and long sides, the
    iterations cost steps x (2 r^2 n + r^3) products and the Gram form 2 r^2 n + (4 steps - 3) r^3,
    less when n > 1.5 r (for steps > 1). For the toy student's blocks, five steps: the adaLN matrix
    (1152 x 192) 0.45 of the products, the MLP's (768 x 192, 192 x 768) 0.56, qkv (576 x 192) 0.66, the
    cross-attention's key-value (384 x 192) 0.84; the square ones stay plain. Bfloat16 keeps the plain
    iterations (torch.optim.Muon's): there the Gram form's result was 3-7x further from the float64
    iterations (0.011-0.027 against 0.003-0.005, entries of 0.03-0.07) and diverged on square matrices."""
    r, n = sorted((rows, cols))
    return dtype == torch.float32 and steps > 1 and 2 * n > 3 * r


def _newton_schulz(gs: list[Tensor], steps: int, eps: float, dtype: torch.dtype,
                   gram: bool | None = None) -> list[Tensor]:
    """The quintic iterations on matrices of one shape, stacked into one batch in `dtype`; `gram`
    (default `gram_pays`) takes the Gram form."""
    a, b, c = NS_COEFFICIENTS
    shape = gs[0].shape
    x = torch.stack([g.reshape(shape[0], -1).to(dtype) for g in gs])
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    if gram is None:
        gram = gram_pays(x.shape[1], x.shape[2], steps, dtype)
    if gram:
        x = _gram_newton_schulz(x, steps)
    else:
        for _ in range(steps):
            g = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(g, g, g, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return [m.reshape(shape).to(gs[0].dtype) for m in x]


def _gram_newton_schulz(x: Tensor, steps: int) -> Tensor:
    """The same iterations for a batch of wide matrices (r, n), r < n, on r x r matrices only. Each
    iteration is x_{k+1} = p(x_k x_k^T) x_k with p(g) = a + b g + c g^2, so x_k = q_k x_0 with
    q_{k+1} = p(g_k) q_k and g_k = x_k x_k^T = q_k g_0 q_k^T: the long side n enters twice, in
    g_0 = x_0 x_0^T and in the final q x_0, instead of twice per iteration. Exact arithmetic gives
    the plain iterations' result (`tests/test_muon.py` checks float32 to rounding)."""
    a, b, c = NS_COEFFICIENTS

    def p(g: Tensor) -> Tensor:
        out = torch.baddbmm(g, g, g, beta=b, alpha=c)
        out.diagonal(dim1=-2, dim2=-1).add_(a)
        return out

    g0 = x @ x.mT
    q = p(g0)
    for _ in range(steps - 1):
        q = p(q @ g0 @ q.mT) @ q
    return q @ x


def muon_parameters(model: nn.Module, prefix: str = "blocks.",
                    exclude: Iterable[str] = ()) -> tuple[list[Tensor], list[Tensor]]:
    """(Muon's, AdamW's) trainable parameters of a student: the 2-D weights under `prefix` whose names
    contain none of the parts in `exclude`, and the rest. A part that is in no such weight's name is an error."""
    exclude = tuple(exclude)
    muon, rest, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and name.startswith(prefix):
            matrices.append(name)
            if not any(part in name for part in exclude):
                muon.append(p)
                continue
        rest.append(p)
    unknown = [part for part in exclude if not any(part in name for name in matrices)]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))} is in no name of the matrices under {prefix!r} "
                         f"(such as {matrices[0]!r})" if matrices else f"there are no matrices under {prefix!r}")
    return muon, rest


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``muon=True`` (matrices only) take Muon steps (momentum, Nesterov, orthogonalised, RMS-matched to
    AdamW); the others take AdamW steps. Supports the ``grad_scale`` protocol of torch's fused
    optimizers, so gradient clipping folds into the step as it does for fused AdamW."""

    _step_supports_amp_scaling = True
    folds_grad_scale = True  # the trainer may fold gradient clipping into the step (trainer.foldable)

    def __init__(self, groups: Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: str = "auto", ns_form: str = "auto"):
        if ns_dtype != "auto" and ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype is {ns_dtype!r}; choose from auto, {', '.join(NS_DTYPES)}")
        if ns_form not in NS_FORMS:
            raise ValueError(f"ns_form is {ns_form!r}; choose from {', '.join(NS_FORMS)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, ns_form=ns_form, muon=False)
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups hold matrices (2-D weights, or convolution kernels) only")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints written before ns_dtype (they ran float32 on any
            group.setdefault("ns_dtype", "auto")  # CPU; resumed, they take "auto", as a new run does)
            group.setdefault("ns_form", "auto")  # and before ns_form (the plain iterations; now auto)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # torch's GradScaler protocol: skip a step with inf/NaN
        if found_inf is not None and float(found_inf) != 0:
            return loss
        scale = getattr(self, "grad_scale", None)  # the clipping divisor, when folded in
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad if scale is None else p.grad / scale for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            if group["muon"]:
                self._muon(group, params, grads, lr)
            else:
                self._adamw(group, params, grads, lr)
        return loss

    def _muon(self, group: dict, params: list[Tensor], grads: list[Tensor], lr: float) -> None:
        mu = group["momentum"]
        # One shape at a time: only that shape's Nesterov momenta and their batch are held at once.
        for (_, _, device), index in _same_shape(params).items():
            nesterov = []
            for i in index:
                p, g = params[i], grads[i]
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)
                nesterov.append(g.lerp(buf, mu))
            dtype = newton_schulz_dtype(device, group["ns_dtype"])
            gram = None if group["ns_form"] == "auto" else False
            for i, update in zip(index, _newton_schulz(nesterov, group["ns_steps"], NS_EPS, dtype, gram)):
                p = params[i]
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape[0], p[0].numel())))

    def _adamw(self, group: dict, params: list[Tensor], grads: list[Tensor], lr: float) -> None:
        beta1, beta2 = group["betas"]
        states = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            states.append(state)
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        steps = [float(s["step"]) for s in states]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** n) for n in steps])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** n) for n in steps])


__all__ = ["MuonAdamW", "muon_parameters", "newton_schulz_dtype", "orthogonalise", "orthogonalise_many"]
