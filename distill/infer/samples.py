"""Sample latents and images from any epsilon model with a teacher's conditioning, plus grids.

One code path for teacher and student: ``sample_latents(model_fn, front, ...)`` encodes prompts
with a front end (``sitdistill.teachers.frontend``: exactly what the family's diffusers pipeline hands the
UNet) and runs ``sitdistill.infer.sampling.sample``. ``front`` is a teacher (its own front end), the
student's front end after the end-to-end stage, or an exported pipeline's: each offers
``encode_prompt``, ``vae_scale_factor``, ``latent_channels`` and ``device``. A sampler given by
name is built from ``scheduler_config`` (default: the teacher's own).

Seeds: image ``i`` of a call with base seed ``s`` starts from the noise of
``torch.Generator().manual_seed(s + i)`` (one generator per image, diffusers' list-of-generators
convention), so any single image is reproduced from the seed written into its PNG.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from sitdistill.core.modules import eval_mode
from sitdistill.infer.sampling import Denoiser, make_scheduler, prediction_type_of, sample, teacher_denoiser

LABEL_HEIGHT = 12  # pixels of the column-label strip of a grid


def student_fn(student) -> Denoiser:
    """A student as the sampler's model function, in its own prediction type (epsilon or v)."""
    dtype = next(student.parameters()).dtype
    device = next(student.parameters()).device

    def fn(x, t, cond):
        cond = {k: v.to(device=device, dtype=dtype) for k, v in cond.items()}
        return student(x.to(device=device, dtype=dtype), t.to(device), **cond).to(x.dtype)

    out = Denoiser(fn, getattr(student.config, "prediction_type", "epsilon"))
    # A w-conditioned student (student.guidance_embed) takes the guidance scale as an input.
    out.guidance_embedded = bool(getattr(student.config, "guidance_embed", False))
    return out


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Images in rows (all the same size) on a white sheet, with an optional column label row."""
    w, h = rows[0][0].size
    label_h = LABEL_HEIGHT if labels else 0
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, label_h + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(labels or []):
        draw.text((pad + c * (w + pad), 0), text, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(img, (pad + c * (w + pad), label_h + pad + r * (h + pad)))
    return sheet


def generators(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image: image i gets seed + i (see the module docstring)."""
    return [torch.Generator(device).manual_seed(seed + i) for i in range(n)]


def png_info(**fields: Any) -> PngInfo:
    """PNG text chunks (prompt, negative_prompt, seed, sampler, steps, guidance_scale, checkpoint...)."""
    info = PngInfo()
    for key, value in fields.items():
        if value is not None:
            info.add_text(key, str(value))
    return info


@torch.no_grad()
def sample_latents(model_fn, teacher, prompts: Sequence[str], *, height: int, width: int, scheduler: Any,
                   steps: int, guidance_scale: float, seed: int | None = None,
                   generator: torch.Generator | list[torch.Generator] | None = None,
                   negative_prompt: str | Sequence[str] | None = None, guidance_rescale: float = 0.0, scheduler_config: dict | None = None) -> torch.Tensor:
    """Latents (N, C, height/f, width/f) for `prompts` from any model, with the teacher's
    conditioning and schedule.

    model_fn: a plain function returning epsilon, or a ``sitdistill.infer.sampling.Denoiser``
        (``teacher_denoiser(teacher)``, ``student_fn(student)``: each in its own prediction type).
        A w-conditioned student (``guidance_embed``) gets ``guidance_scale`` as its w, without CFG.
    scheduler: a name of ``sitdistill.infer.sampling.SCHEDULERS`` (built from ``teacher.scheduler_config``
        for the model's prediction type) or a ready diffusers scheduler for that type.
    seed / generator: ``seed`` gives image i the generator ``seed + i``; or pass generators; neither:
        torch's global random state, like a diffusers pipeline called without a generator.
    negative_prompt: one for all prompts or one per prompt. None = the pipeline's default
        unconditional input (zeros for SDXL under ``force_zeros_for_empty_prompt``); an explicit ""
        is encoded, as diffusers does.
    """
    prompts = list(prompts)
    f = teacher.vae_scale_factor
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of the VAE factor {f}, got {height}x{width}")
    if isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = None if negative_prompt is None else list(negative_prompt)
    cond, uncond = teacher.encode_prompt(prompts, negatives, height, width, do_cfg=True)
    if getattr(model_fn, "guidance_embedded", False):
        # A w-conditioned student has learnt the guided prediction: guidance_scale is its w input,
        # and no classifier-free guidance is applied on top (that would guide twice).
        cond = {**cond, "guidance": torch.full((len(prompts),), float(guidance_scale), device=teacher.device)}
        uncond, guidance_scale = None, 1.0
    shape = (len(prompts), teacher.latent_channels, height // f, width // f)
    if generator is None and seed is not None:
        generator = generators(seed, len(prompts))
    if isinstance(scheduler, str):
        config = scheduler_config if scheduler_config is not None else teacher.scheduler_config
        scheduler = make_scheduler(scheduler, config, prediction_type_of(model_fn))
    return sample(model_fn, scheduler, cond=cond, uncond=uncond, shape=shape, guidance_scale=guidance_scale,
                  num_inference_steps=steps, generator=generator, device=teacher.device,
                  guidance_rescale=guidance_rescale)


def teacher_student_grid(teacher, student, recipe, pixel_hw: tuple[int, int], student_side=None) -> Image.Image:
    """Rows = the recipe's sampling prompts; columns = teacher | student, same seed and sampler.

    ``student_side``: the student's own front end (end-to-end stage); default the teacher's."""
    side = student_side if student_side is not None else teacher.front
    s = recipe.sampling
    prompts = list(s.prompts) or ["a photograph"]
    h, w = (s.height or pixel_hw[0], s.width or pixel_hw[1])
    kw = dict(height=h, width=w, scheduler=s.scheduler, steps=s.num_inference_steps,
              guidance_scale=s.guidance_scale, seed=s.seed, negative_prompt=s.negative_prompt,
              guidance_rescale=s.guidance_rescale, scheduler_config=teacher.scheduler_config)
    with eval_mode(student):
        images = [to_pil(parts.decode_latents(sample_latents(fn, parts, prompts, **kw)))
                  for fn, parts in ((teacher_denoiser(teacher), teacher), (student_fn(student), side))]
    return grid([list(pair) for pair in zip(*images)], labels=["teacher", "student"])
