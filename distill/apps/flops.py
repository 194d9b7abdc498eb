"""Analytic FLOPs of the SiT student and the dense bf16 peak of common accelerators, for MFU.

FLOPs count the matrix products only (a multiply-add is 2 FLOPs), as MFU conventionally does and
as `torch.utils.flop_counter.FlopCounterMode` counts them: linear layers, the patch-embedding
convolution and both products of every attention (Q K^T and A V, the T^2 term of self-attention
and the T x L term of cross-attention). Norms, activations, softmax and the modulation arithmetic
are elementwise and left out. Backward is 2x forward (the gradient with respect to the input and
to the weight of each product); recomputation under gradient checkpointing is not counted, so the
MFU of a checkpointed run is *model* FLOPs utilisation (PaLM's definition), not hardware
utilisation.
"""

from __future__ import annotations

from sitdistill.students.layers import FREQ_EMBED_DIM

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets. Matched as a
# substring of `torch.cuda.get_device_name()`, first match wins: more specific names come first
# ("H100 PCIe" before "H100", "L40S" before "L40" before "L4").
PEAK_BF16_TFLOPS: dict[str, float] = {
    "GH200": 989.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 6000 Ada": 364.0,
    "A10G": 125.0,
    "A10": 125.0,
    "MI300X": 1307.0,
}


def peak_tflops(device_name: str) -> tuple[float | None, str | None]:
    """(dense bf16 peak in TFLOP/s, the table key that matched) for a device name; (None, None)
    when the table has no entry (the CPU, an unknown card): MFU is then not reported."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value, key
    return None, None


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def sit_forward_flops(config, batch: int, height: int, width: int, text_len: int = 0) -> int:
    """FLOPs of one SiT forward on a (batch, C, height, width) latent with `text_len` text tokens.

    `config` is the student's config (`student.config`): every width comes from it, so the count
    follows any preset or override.
    """
    c = config
    n, d, p = batch, c.hidden_size, c.patch_size
    tokens = (height // p) * (width // p)
    rows = n * tokens                                         # token rows through every image-side linear
    out_channels = c.in_channels * (2 if c.learn_sigma else 1)
    mlp = int(d * c.mlp_ratio)
    total = _linear(rows, c.in_channels * p * p, d)           # patch embedding (a strided conv = a linear)
    # (N, D) conditioning vector: timestep MLP, pooled text + micro-conditioning, guidance scale
    total += _linear(n, FREQ_EMBED_DIM, d) + _linear(n, d, d)
    if c.pooled_dim or c.time_ids_dim:
        total += _linear(n, c.pooled_dim + c.time_ids_dim * FREQ_EMBED_DIM, d) + _linear(n, d, d)
    if c.guidance_embed:
        total += _linear(n, FREQ_EMBED_DIM, d) + _linear(n, d, d)
    text = c.text_dim > 0 and text_len > 0
    if text:                                                  # caption projection (and its pooled signal)
        total += _linear(n * text_len, c.text_dim, d) + _linear(n * text_len, d, d)
        if c.text_pool:
            total += _linear(n, d, d)
    block = _linear(n, d, 6 * d)                              # adaLN modulation
    block += _linear(rows, d, 3 * d) + _linear(rows, d, d)    # self-attention qkv + output projection
    block += 2 * 2 * n * tokens * tokens * d                  # Q K^T and A V over all heads: the T^2 term
    if text:
        block += _linear(rows, d, d) + _linear(n * text_len, d, 2 * d) + _linear(rows, d, d)  # q, kv, proj
        block += 2 * 2 * n * tokens * text_len * d            # Q K^T and A V against the text tokens
    block += _linear(rows, d, mlp) + _linear(rows, mlp, d)    # MLP
    total += c.depth * block
    total += _linear(n, d, 2 * d) + _linear(rows, d, p * p * out_channels)  # final layer: adaLN + linear
    return total


def train_flops(forward_flops: int) -> int:
    """Forward + backward of a step that trains every weight: backward = 2x forward."""
    return 3 * forward_flops
