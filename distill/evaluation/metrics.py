"""Metrics of samples and models, with no sampling of their own: paired distances (latent MSE,
PSNR, SSIM), the noise-prediction error against the teacher by timestep range, a line plot drawn
with PIL, and the optional CLIP score and Fréchet distance from local weights
(`sitdistill.evaluation.evaluate` builds the report from them)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sitdistill.infer.sampling import prediction_type_of

Tensor = torch.Tensor

# Line colours of the usual models in plots.
MODEL_COLOURS = {"teacher": (40, 40, 40), "student": (31, 119, 180), "baseline": (214, 39, 40)}
# SSIM as Wang et al. 2004 ("Image quality assessment: from error visibility to structural
# similarity"): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, statistics over
# the 'valid' part of the image (their reference MATLAB code filters with 'valid').
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# PSNR of identical images is infinite; MSE is floored so JSON stays finite (100 dB at range 1).
PSNR_MSE_FLOOR = 1e-10
# The noise for the fixed x_t of the per-timestep error: its own generator, never the sampling one.
NOISE_PROBE_SEED = 20240917


# --------------------------------------------------------------------------- paired metrics

def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """(size, size) Gaussian weights summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per image, (N,), of (N, C, H, W) images in [0, data_range]; channels averaged.

    Images smaller than the window use a window as large as their shorter side."""
    a, b = a.double(), b.double()
    n, c, h, w = a.shape
    size = min(SSIM_WINDOW, h, w)
    win = gaussian_window(size).to(a.device).expand(c, 1, size, size)  # depthwise: one per channel

    def filt(x: Tensor) -> Tensor:
        return F.conv2d(x, win, groups=c)  # (N, C, H-size+1, W-size+1), 'valid'

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3)).float()


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR in dB per image, (N,); see PSNR_MSE_FLOOR for identical images."""
    mse = (a.double() - b.double()).pow(2).mean(dim=(1, 2, 3)).clamp_min(PSNR_MSE_FLOOR)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


@torch.no_grad()
def reconstruction_psnr(side, pixels: Tensor) -> float:
    """Mean PSNR of pixels in [-1, 1] -> VAE mode -> decoded (clamped to [-1, 1]), through a
    (teacher or student-side) VAE."""
    decoded = side.decode_latents(side.encode_images(pixels, sample=False))
    return float(psnr(decoded.clamp(-1, 1), pixels, data_range=2.0).mean())


def latent_mse(a: Tensor, b: Tensor) -> Tensor:
    """MSE per sample, (N,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def paired_distances(latents: Tensor, ref_latents: Tensor, pixels: Tensor, ref_pixels: Tensor) -> dict[str, Tensor]:
    """Per-sample latent MSE, PSNR and SSIM of samples to the teacher's (pixels in [-1, 1])."""
    unit, ref_unit = (pixels + 1) / 2, (ref_pixels + 1) / 2
    return {"latent_mse": latent_mse(latents, ref_latents), "psnr": psnr(unit, ref_unit), "ssim": ssim(unit, ref_unit)}


def summary(values: Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std()) if values.numel() > 1 else 0.0,
            "n": int(values.numel())}


# --------------------------------------------------------------------------- noise-prediction error

@torch.no_grad()
def noise_prediction_mse(teacher, model_fns: dict[str, Callable], x0: Tensor, cond: dict[str, Tensor], *,
                         bins: int, seed: int = NOISE_PROBE_SEED, batch_size: int = 16,
                         model_conds: dict[str, dict[str, Tensor]] | None = None) -> dict[str, Any]:
    """MSE of each model's epsilon to the teacher's, per timestep range.

    ``model_conds`` gives a model its own conditioning for the same prompts (a student with its own
    text encoders after the end-to-end stage); the others get the teacher's ``cond``.

    The ranges split [0, T) into ``bins`` equal parts. In each, every sample gets one timestep drawn
    uniformly from the range and x_t = add_noise(x0, noise, t) with a fixed generator, so every
    model sees the same inputs. Also reports the teacher's own MSE to the true noise (a scale).
    """
    schedule = teacher.schedule
    total = schedule.num_train_timesteps
    edges = [round(i * total / bins) for i in range(bins + 1)]
    g = torch.Generator("cpu").manual_seed(seed)
    out: dict[str, list[float]] = {name: [] for name in model_fns}
    out["teacher_vs_true_noise"] = []
    n = x0.shape[0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        t_all = torch.randint(lo, hi, (n,), generator=g)  # (N,)
        noise_all = torch.randn(x0.shape, generator=g)  # drawn for the whole set: independent of batch_size
        sums = {name: 0.0 for name in out}
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            t, noise = t_all[rows].to(x0.device), noise_all[rows].to(x0.device)
            c = {k: v[rows] for k, v in cond.items()}
            x_t = schedule.add_noise(x0[rows], noise, t)
            target = teacher.predict_eps(x_t, t, c).float()  # (B, C, h, w)
            sums["teacher_vs_true_noise"] += float((target - noise).pow(2).sum())
            for name, fn in model_fns.items():
                own = {k: v[rows] for k, v in (model_conds or {}).get(name, cond).items()}
                pred = schedule.convert(x_t, fn(x_t, t, own), t, prediction_type_of(fn), "epsilon")
                sums[name] += float((pred.float() - target).pow(2).sum())
        for name in out:
            out[name].append(sums[name] / x0.numel())
    return {"bin_edges": edges, **out}


# --------------------------------------------------------------------------- a plot without matplotlib

def line_plot(x: Sequence[float], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (520, 340), colours: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """A small line chart drawn with PIL (matplotlib is not a dependency): axes, ticks, legend.

    Non-finite values are left out (the line skips them)."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    y_max = max(values) * 1.1 if values and max(values) > 0 else 1.0
    x_min, x_max = min(x), max(x)
    span = (x_max - x_min) or 1.0

    def px(xv: float, yv: float) -> tuple[float, float]:
        return (left + (xv - x_min) / span * (w - left - right), h - bottom - yv / y_max * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):  # y ticks
        yv = y_max * i / 4
        _, yp = px(x_min, yv)
        d.line([left - 4, yp, left, yp], fill="black")
        d.text((4, yp - 6), f"{yv:.3g}", fill="black")
    for xv in x:  # x ticks at the bin centres
        xp, _ = px(xv, 0)
        d.line([xp, h - bottom, xp, h - bottom + 4], fill="black")
    for xv in (x[0], x[len(x) // 2], x[-1]):
        xp, _ = px(xv, 0)
        d.text((xp - 10, h - bottom + 6), f"{xv:.0f}", fill="black")
    d.text((w // 2 - 4 * len(xlabel) // 2, h - 18), xlabel, fill="black")
    d.text((left, 8), f"{title}   ({ylabel})", fill="black")
    for k, (name, ys) in enumerate(series.items()):
        colour = {**MODEL_COLOURS, **(colours or {})}.get(name, (120, 120, 120))
        pts = [px(xv, yv) for xv, yv in zip(x, ys) if math.isfinite(yv)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for xp, yp in pts:
            d.ellipse([xp - 3, yp - 3, xp + 3, yp + 3], fill=colour)
        d.line([w - right - 110, top + 12 + 14 * k, w - right - 90, top + 12 + 14 * k], fill=colour, width=2)
        d.text((w - right - 84, top + 6 + 14 * k), name, fill=colour)
    return img


# --------------------------------------------------------------------------- optional hooks

def _load_local(path: str):
    """A transformers model + processor from a local folder only (never a download)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


@torch.no_grad()
def clip_score(images: list[Image.Image], prompts: list[str], weights: str) -> dict[str, float]:
    """CLIP score (Hessel et al. 2021, torchmetrics' scaling): 100 * max(cos(image, text), 0), mean."""
    model, processor = _load_local(weights)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
    img = model.get_image_features(pixel_values=inputs["pixel_values"])
    txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
    return summary(100 * cos.clamp_min(0))


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al. 2017), in float64.

    Tr((S_a S_b)^1/2) = sum of sqrt(eigenvalues) of S_a^1/2 S_b S_a^1/2 (symmetric PSD)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eva, vec = torch.linalg.eigh(cov_a)
    root_a = vec @ torch.diag(eva.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


@torch.no_grad()
def image_features(images: list[Image.Image], weights: str) -> Tensor:
    """Pooled image features of a local vision model (CLIP's image tower, or any AutoModel)."""
    model, processor = _load_local(weights)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixels)
        return getattr(out, "pooler_output", out)
    return model(pixel_values=pixels).pooler_output
