"""``SiTPipeline``: a distilled SiT student as a diffusers pipeline (what `cli.py export` writes).

Components: ``transformer`` (the SiT student), ``vae``, ``text_encoder`` (+ ``text_encoder_2``),
``tokenizer`` (+ ``tokenizer_2``) and ``scheduler``: the teacher's own VAE and text encoders,
since the student was trained on their latents and embeddings. Load an exported folder with

    from students.pipeline import SiTPipeline
    pipe = SiTPipeline.from_pretrained("exported/")
    image = pipe("a red circle at the top left", generator=torch.Generator().manual_seed(0)).images[0]

``DiffusionPipeline.from_pretrained(folder)`` alone cannot find the class: diffusers looks the
``_class_name`` of ``model_index.json`` up in its own module namespace (``_get_pipeline_class``
in diffusers 0.42), and the only other route, ``custom_pipeline``, runs a Python file, which this
project never does. The components themselves are found by ``model_index.json`` entries such
as ``["students.sit", "SiT"]`` (an importable module + class), like any library component.

Prompts are encoded by the teacher family's own code (``teachers.sd``, which reproduces
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.encode_prompt``) and sampled by
``distill.samples.sample_latents``, the function `cli.py sample` and `cli.py eval` use, so the
pipeline's images equal theirs for the same settings.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from teachers.base import Teacher
from teachers.sd import SD15Teacher, SDXLTeacher

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5


class _PartsOnly:
    """Teacher behaviour without a UNet: dtype, device and default size are given, not read off it."""

    def __init__(self, vae, scheduler_config: dict[str, Any], latent_channels: int, dtype: torch.dtype,
                 default_hw: tuple[int, int], clip_skip: int | None = None):
        # Teacher.__init__ reads the UNet; these are the attributes it would have set.
        self.unet = None
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(latent_channels)
        self._dtype = dtype
        self._default_hw = default_hw
        self.clip_skip = clip_skip or None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def default_size(self) -> tuple[int, int]:
        return self._default_hw


class SD15Parts(_PartsOnly, SD15Teacher):
    """An SD1.x teacher's text encoder + VAE: ``encode_prompt`` and ``decode_latents`` as the teacher."""

    def __init__(self, vae, text_encoder, tokenizer, **kw: Any):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        _PartsOnly.__init__(self, vae, **kw)


class SDXLParts(_PartsOnly, SDXLTeacher):
    """An SDXL teacher's two text encoders + VAE."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, *,
                 force_zeros_for_empty_prompt: bool = True, **kw: Any):
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        _PartsOnly.__init__(self, vae, **kw)


TeacherParts = SD15Parts | SDXLParts


class SiTPipeline(DiffusionPipeline):
    """Text-to-image with a distilled SiT student; see the module docstring for loading."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = True, default_height: int | None = None,
                 default_width: int | None = None, clip_skip: int | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler)
        # clip_skip: the teacher's, so the student reads the text states it was trained on.
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                default_height=default_height, default_width=default_width, clip_skip=clip_skip)

    @classmethod
    def from_teacher(cls, teacher: Teacher, transformer, scheduler, *, default_hw: tuple[int, int] | None = None
                     ) -> "SiTPipeline":
        """The pipeline of a student and the frozen parts of its teacher (shared, not copied)."""
        h, w = default_hw or teacher.default_size()
        parts = dict(transformer=transformer, vae=teacher.vae, text_encoder=teacher.text_encoder,
                     tokenizer=teacher.tokenizer, scheduler=scheduler, default_height=int(h), default_width=int(w),
                     clip_skip=teacher.clip_skip)
        if teacher.family == "sdxl":
            parts.update(text_encoder_2=teacher.text_encoder_2, tokenizer_2=teacher.tokenizer_2,
                         force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)
        return cls(**parts)

    def teacher_parts(self) -> TeacherParts:
        """The prompt encoder + VAE as a teacher-like object (``distill.samples.sample_latents`` takes it)."""
        kw = dict(scheduler_config=dict(self.scheduler.config), latent_channels=self.transformer.config.in_channels,
                  dtype=self.text_encoder.dtype, default_hw=self.default_hw(),
                  clip_skip=getattr(self.config, "clip_skip", None))
        if self.text_encoder_2 is not None:
            return SDXLParts(self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2,
                             force_zeros_for_empty_prompt=self.config.force_zeros_for_empty_prompt, **kw)
        return SD15Parts(self.vae, self.text_encoder, self.tokenizer, **kw)

    def default_hw(self) -> tuple[int, int]:
        """The training resolution stored at export; else the student's default latent size."""
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = int(self.transformer.config.input_size) * f
        return int(self.config.default_height or side), int(self.config.default_width or side)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, guidance_rescale: float = 0.0):
        """Generate images; arguments as ``StableDiffusionPipeline.__call__``.

        output_type: "pil", "np" ((N, H, W, 3) float in [0, 1]), "pt" ((N, 3, H, W) in [0, 1]) or
        "latent" (the scaled latents the VAE would decode). ``generator``: one, or one per prompt.
        """
        from distill.samples import sample_latents, student_fn, to_pil

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        dh, dw = self.default_hw()
        parts = self.teacher_parts()
        self.transformer.eval()
        latents = sample_latents(student_fn(self.transformer), parts, prompts, height=height or dh, width=width or dw,
                                 scheduler=self.scheduler, steps=num_inference_steps, guidance_scale=guidance_scale,
                                 generator=generator, negative_prompt=negative_prompt,
                                 guidance_rescale=guidance_rescale)
        if output_type == "latent":
            images: Any = latents
        else:
            pixels = parts.decode_latents(latents)  # (N, 3, H, W) in [-1, 1]
            if output_type == "pil":
                images = to_pil(pixels)
            elif output_type in ("np", "pt"):
                unit = (pixels + 1) / 2
                images = unit if output_type == "pt" else np.asarray(unit.permute(0, 2, 3, 1).cpu().numpy())
            else:
                raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
