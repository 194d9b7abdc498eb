"""Which low precision pays on this machine: bfloat16 where the hardware multiplies it.

Two recipe settings ask it: `training.mixed_precision: auto` (the student's forward and backward)
and `optimizer.muon_ns_dtype: auto` (Muon's Newton-Schulz iterations). A CPU without bfloat16
matmul units emulates them, which is slower than float32; one with them (AVX512-BF16 or AMX)
runs the toy student's whole step 1.5x faster in bf16 (README, "Speed").
"""
from __future__ import annotations

import functools

import torch

MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX tiles); asked
    once per process, since every Muon step asks it for every matrix."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def bf16_pays(device: torch.device | str) -> bool:
    """bfloat16 matmuls are native here: a CUDA GPU that supports them, or a CPU with the units."""
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_has_bf16_matmul()
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def resolve_mixed_precision(choice: str, device: torch.device | str) -> str:
    """accelerate's `mixed_precision` for the recipe's choice: "auto" is "bf16" where `bf16_pays`,
    else "no" (never fp16, which would need a loss scaler the recipe did not ask for)."""
    if choice != "auto":
        return choice
    return "bf16" if bf16_pays(device) else "no"
