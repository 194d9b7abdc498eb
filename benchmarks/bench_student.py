"""Forward+backward time of the SiT student against a plain DiT-style implementation of the same size.

    python benchmarks/bench_student.py [--presets S/2 B/2] [--batch 4] [--latent 32] [--repeats 5]

The reference below is written the way DiT/SiT's ``models.py`` computes (timm-style attention with an
explicit softmax, norms and modulation in the working dtype, fixed square pos table) and uses the
official tensor names, so it takes our weights: the two outputs are compared before timing. Both
models are class-conditional with learn_sigma (the official configuration), timed interleaved
(ours, reference, ours, ...) after a warm-up; the table gives medians and ratio = reference / ours
(> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sitdistill.students import PRESETS, build_student  # noqa: E402
from sitdistill.students.layers import sincos_pos_embed_2d  # noqa: E402

NUM_CLASSES = 1000


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)      # (N, H, T, T) materialised
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(ref_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(ref_modulate(self.norm2(x), s2, sc2))


class RefFinal(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefEmbedT(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefPatch(nn.Module):
    def __init__(self, patch, channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)


class RefEmbedY(nn.Module):
    def __init__(self, classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, dim)


class RefDiT(nn.Module):
    """Square-only DiT as in the paper's code: fixed pos table, learn_sigma output, official names."""

    def __init__(self, size, patch, channels, dim, depth, heads, mlp_ratio=4.0):
        super().__init__()
        self.patch, self.out_channels, self.side = patch, 2 * channels, size // patch
        self.x_embedder = RefPatch(patch, channels, dim)
        self.t_embedder = RefEmbedT(dim)
        self.y_embedder = RefEmbedY(NUM_CLASSES, dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.side, self.side)[None])
        self.blocks = nn.ModuleList([RefBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = RefFinal(dim, patch, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        h = w = self.side
        p, ch = self.patch, self.out_channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, ch)).reshape(x.shape[0], ch, h * p, w * p)
        return x.chunk(2, dim=1)[0]


def build_pair(preset: str, latent: int, device: torch.device | str = "cpu", **sizes) -> tuple[nn.Module, nn.Module]:
    """(ours, reference) of a preset (`sizes`: hidden_size / depth / num_heads overrides),
    class-conditional with learn_sigma, the same non-zero weights in both, built on `device` (as
    the default device: no CPU copy of a big model), in eval mode (no label dropout; gradients
    still flow)."""
    spec = {**PRESETS[preset], **sizes}
    torch.manual_seed(0)
    with torch.device(device):
        ours = build_student(preset, None, num_classes=NUM_CLASSES, learn_sigma=True, input_size=latent, **sizes)
        ref = RefDiT(latent, spec["patch_size"], 4, spec["hidden_size"], spec["depth"], spec["num_heads"])
    with torch.no_grad():                                    # non-zero weights so both compute something
        for p in ours.parameters():
            p.normal_(0, 0.02)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["pos_embed"] and not unexpected, (missing, unexpected)
    return ours.eval(), ref.eval()


def bench(preset: str, batch: int, latent: int, repeats: int) -> tuple[float, float]:
    ours, ref = build_pair(preset, latent)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    with torch.no_grad():
        a, b = ours(x, t, class_labels=y), ref(x, t, y)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), f"{preset}: outputs differ by {(a - b).abs().max():.2e}"

    def run(model, *args):
        model.zero_grad(set_to_none=True)
        model(x, t, *args).square().mean().backward()

    medians = interleaved({"ours": lambda: run(ours, None, None, None, y), "ref": lambda: run(ref, y)}, repeats)
    return medians["ours"], medians["ref"]


def interleaved(runs: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    """Median ms of each callable, one warm-up call each, then timed in turn (a, b, a, b, ...) so
    that a machine's drift hits both alike. `sync` waits for the device (CUDA runs asynchronously)."""
    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1000.0

    for fn in runs.values():                                 # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["S/2", "B/2"], choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 gives steadier numbers on a CPU shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"latent {args.latent}x{args.latent}, median of {args.repeats} fwd+bwd")
    print(f"{'model':8s} {'ours ms':>10s} {'reference ms':>13s} {'ratio':>7s}")
    for preset in args.presets:
        ours_ms, ref_ms = bench(preset, args.batch, args.latent, args.repeats)
        print(f"{preset:8s} {ours_ms:10.1f} {ref_ms:13.1f} {ref_ms / ours_ms:7.2f}", flush=True)


if __name__ == "__main__":
    main()
