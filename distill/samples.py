"""Teacher | student sample grids for fixed prompts and seeds (training logs, quick looks)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from distill.sampling import make_scheduler, sample


def student_fn(student):
    """A student as the sampler's `model_fn(x, t, cond) -> eps`."""
    dtype = next(student.parameters()).dtype
    device = next(student.parameters()).device

    def fn(x, t, cond):
        cond = {k: v.to(device=device, dtype=dtype) for k, v in cond.items()}
        return student(x.to(device=device, dtype=dtype), t.to(device), **cond).to(x.dtype)

    return fn


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Images in rows (all the same size) on a white sheet, with an optional column label row."""
    w, h = rows[0][0].size
    label_h = 12 if labels else 0
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, label_h + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(labels or []):
        draw.text((pad + c * (w + pad), 0), text, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(img, (pad + c * (w + pad), label_h + pad + r * (h + pad)))
    return sheet


@torch.no_grad()
def sample_latents(model_fn, teacher, prompts: list[str], *, height: int, width: int, scheduler: str,
                   steps: int, guidance_scale: float, seed: int, negative_prompt: str = "") -> torch.Tensor:
    """Latents for `prompts` from any eps model with the teacher's conditioning and schedule."""
    negatives = [negative_prompt] * len(prompts) if negative_prompt else None
    cond, uncond = teacher.encode_prompt(prompts, negatives, height, width, do_cfg=True)
    f = teacher.vae_scale_factor
    shape = (len(prompts), teacher.latent_channels, height // f, width // f)
    gen = torch.Generator("cpu").manual_seed(seed)
    return sample(model_fn, make_scheduler(scheduler, teacher.scheduler_config), cond=cond, uncond=uncond,
                  shape=shape, guidance_scale=guidance_scale, num_inference_steps=steps, generator=gen,
                  device=teacher.device)


def teacher_student_grid(teacher, student, recipe, pixel_hw: tuple[int, int]) -> Image.Image:
    """Rows = the recipe's sampling prompts; columns = teacher | student, same seed and sampler."""
    s = recipe.sampling
    prompts = list(s.prompts) or ["a photograph"]
    h, w = (s.height or pixel_hw[0], s.width or pixel_hw[1])
    kw = dict(height=h, width=w, scheduler=s.scheduler, steps=s.num_inference_steps,
              guidance_scale=s.guidance_scale, seed=s.seed, negative_prompt=s.negative_prompt)
    was_training = student.training
    student.eval()
    try:
        images = [to_pil(teacher.decode_latents(sample_latents(fn, teacher, prompts, **kw)))
                  for fn in (teacher.predict_eps, student_fn(student))]
    finally:
        student.train(was_training)
    return grid([list(pair) for pair in zip(*images)], labels=["teacher", "student"])

