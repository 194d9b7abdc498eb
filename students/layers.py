"""The SiT's building blocks: embedders, fp32 norms and adaLN modulation, attention, the block
and the final layer (module names and tensor layouts are the official SiT/DiT ones; see
`sitdistill.students.sit`)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FREQ_EMBED_DIM = 256        # sinusoid width of the timestep embedder (DiT/SiT) and of each time_id (SDXL)
MAX_PERIOD = 10000          # sinusoid max period (GLIDE / DiT / SDXL)
NORM_EPS = 1e-6             # LayerNorm eps of DiT/SiT blocks
ZERO_INIT_STD = 0.02        # normal init std of DiT's label table and timestep MLP


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int = FREQ_EMBED_DIM, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """[cos, sin] sinusoid of a 1-D tensor of (fractional) positions, (N,) -> (N, dim), in fp32.

    GLIDE/DiT's timestep embedding; identical to diffusers' ``Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)`` that SDXL uses for ``time_ids``. fp32 always: t up to ~1000 in bf16
    would lose the position.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                          # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (N, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """2-D sin-cos positions for an h x w grid, row-major tokens -> (h * w, dim), fp32.

    MAE/DiT layout: the first half of the channels encodes the column index, the second half the
    row index, each as [sin, cos] with frequencies 1 / 10000^(i / (dim/4)). On a square grid this
    is exactly the official table; on other grids a token's code depends only on its (row, col).
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for 2-D sin-cos positions")
    quarter = dim // 4
    omega = 1.0 / MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)   # (T,)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)              # (T,)

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * omega[None]                              # (T, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)     # (T, dim/2)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()       # (T, dim)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, h*w, D) with a strided conv; any H, W divisible by the patch."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)               # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU -> Linear, as DiT/SiT (key names ``mlp.0`` / ``mlp.2``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t).to(self.mlp[0].weight.dtype))   # (N, D)


class LabelEmbedder(nn.Module):
    """Class table with DiT's extra null row (index ``num_classes``) when dropout is used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            # DiT's label dropout during training (global RNG, as upstream).
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)                            # (N, D)


class AddedCondEmbedder(nn.Module):
    """SDXL's ``add_embedding``: concat(pooled text, sinusoid(each time_id)) -> MLP -> added to t_emb.

    The last layer starts at zero, so adding this pathway to a trained model changes nothing at
    first (the same argument as adaLN-Zero).
    """

    def __init__(self, pooled_dim: int, time_ids_dim: int, hidden_size: int):
        super().__init__()
        self.pooled_dim, self.time_ids_dim = pooled_dim, time_ids_dim
        in_dim = pooled_dim + time_ids_dim * FREQ_EMBED_DIM
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if self.pooled_dim:
            parts.append(text_embeds.float())                                         # (N, P)
        if self.time_ids_dim:
            n = time_ids.shape[0]
            parts.append(sinusoidal_embedding(time_ids.reshape(-1)).reshape(n, -1))  # (N, K * 256)
        return self.mlp(torch.cat(parts, dim=-1).to(self.mlp[0].weight.dtype))       # (N, D)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in the input's dtype (bf16-safe statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, in fp32 (1 + scale in bf16 keeps ~3 digits), back to x's dtype."""
    return torch.addcmul(shift, x.float(), 1 + scale).to(x.dtype)


def adaln_params(modulation: nn.Sequential, c: torch.Tensor) -> torch.Tensor:
    """SiLU -> Linear on the (N, D) conditioning vector, outside autocast, returned in fp32.

    The product is tiny (N rows), and every shift/scale/gate of the block comes from it: under
    bf16 autocast it would be rounded to ~3 digits (and the fp32 weight copied to bf16 each step).
    """
    linear = modulation[-1]
    with torch.autocast(c.device.type, enabled=False):
        return F.linear(F.silu(c.to(linear.weight.dtype)), linear.weight, linear.bias).float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA of (N, H, T, Dh) heads; on a CPU, low-precision heads are attended in float32.

    torch's CPU flash-attention kernel runs its backward 3-10x slower in bfloat16 than in float32
    (fwd+bwd at the toy student's shapes: 15.8 vs 5.0 ms self-attention, 12.3 vs 1.3 ms cross-attention),
    which made a bf16 step slower than an fp32 one. Autocast is off here, or it would cast back.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    n, length, d = x.shape
    return x.view(n, length, num_heads, d // num_heads).transpose(1, 2)   # (N, H, L, Dh)


class Attention(nn.Module):
    """Self-attention with fused qkv (timm layout ``qkv``/``proj``, so official weights load), SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = FP32LayerNorm(head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = FP32LayerNorm(head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # 3 x (N, H, T, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v)                                          # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))      # (N, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to projected text tokens; ``proj`` starts at zero (block = identity)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = FP32LayerNorm(head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = FP32LayerNorm(head_dim, eps=NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, d = x.shape
        q = self.q_norm(_heads(self.q(x), self.num_heads))                # (N, H, T, Dh)
        k, v = self.kv(ctx).chunk(2, dim=-1)                             # 2 x (N, L, D)
        k, v = self.k_norm(_heads(k, self.num_heads)), _heads(v, self.num_heads)   # (N, H, L, Dh)
        out = attention(q, k, v, mask)                                    # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, length, d))      # (N, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (DiT's ``approx_gelu``; timm key names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa * attn(mod(norm x)); x += xattn(norm x, text); x += gate_mlp * mlp(mod(norm x))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attention: bool, qk_norm: bool):
        super().__init__()
        self.norm1 = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        if cross_attention:
            # Affine norm on the query side (no adaLN: the text, not the timestep, drives this path).
            self.norm_cross = FP32LayerNorm(hidden_size, eps=NORM_EPS)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None,
                ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        mod = adaln_params(self.adaLN_modulation, c).unsqueeze(1)        # (N, 1, 6D) fp32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        # residual += gate * branch as one addcmul (promotes to fp32 under autocast; back to the stream's dtype)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa))).to(x.dtype)  # (N, T, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), ctx, ctx_mask).to(x.dtype)                         # (N, T, D)
        x = torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))).to(x.dtype)   # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to p*p*out_channels; zero-initialised like DiT."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = FP32LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = adaln_params(self.adaLN_modulation, c).unsqueeze(1).chunk(2, dim=-1)   # (N, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))                   # (N, T, p*p*C_out)
