"""``SiTPipeline``: a distilled SiT student as a diffusers pipeline (what `cli.py export` writes).

Components: ``transformer`` (the SiT student), ``vae``, ``text_encoder`` (+ ``text_encoder_2``),
``tokenizer`` (+ ``tokenizer_2``) and ``scheduler``: the teacher's own VAE and text encoders,
since the student was trained on their latents and embeddings. Load an exported folder with

    from sitdistill.students.pipeline import SiTPipeline
    pipe = SiTPipeline.from_pretrained("exported/")
    image = pipe("a red circle at the top left", generator=torch.Generator().manual_seed(0)).images[0]

``DiffusionPipeline.from_pretrained(folder)`` alone cannot find the class: diffusers looks the
``_class_name`` of ``model_index.json`` up in its own module namespace (``_get_pipeline_class``
in diffusers 0.42), and the only other route, ``custom_pipeline``, runs a Python file, which this
project never does. The components themselves are found by ``model_index.json`` entries such
as ``["sitdistill.students.sit", "SiT"]`` (an importable module + class), like any library component.

Prompts are encoded by the teacher family's own code (``sitdistill.teachers.sd``, which reproduces
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.encode_prompt``) and sampled by
``sitdistill.infer.samples.sample_latents``, the function `cli.py sample` and `cli.py eval` use, so the
pipeline's images equal theirs for the same settings.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from sitdistill.teachers.frontend import FrontEnd, SD15FrontEnd, SDXLFrontEnd, vae_scale_factor

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5


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
    def from_front_end(cls, front: FrontEnd, transformer, scheduler, *, default_hw: tuple[int, int] | None = None
                       ) -> "SiTPipeline":
        """The pipeline of a student and the front end it samples with (the teacher's, or its own
        after the end-to-end stage; shared, not copied)."""
        h, w = default_hw or front.default_size()
        parts = dict(transformer=transformer, vae=front.vae, text_encoder=front.text_encoder,
                     tokenizer=front.tokenizer, scheduler=scheduler, default_height=int(h), default_width=int(w),
                     clip_skip=front.clip_skip)
        if front.family == "sdxl":
            parts.update(text_encoder_2=front.text_encoder_2, tokenizer_2=front.tokenizer_2,
                         force_zeros_for_empty_prompt=front.force_zeros_for_empty_prompt)
        return cls(**parts)

    def front_end(self) -> FrontEnd:
        """The prompt encoder(s) + VAE as a front end (``sitdistill.infer.samples.sample_latents`` takes it)."""
        kw = dict(dtype=self.text_encoder.dtype, default_hw=self.default_hw(),
                  clip_skip=getattr(self.config, "clip_skip", None))
        if self.text_encoder_2 is not None:
            return SDXLFrontEnd(self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2,
                                force_zeros_for_empty_prompt=self.config.force_zeros_for_empty_prompt, **kw)
        return SD15FrontEnd(self.vae, self.text_encoder, self.tokenizer, **kw)

    def default_hw(self) -> tuple[int, int]:
        """The training resolution stored at export; else the student's default latent size."""
        f = vae_scale_factor(self.vae.config.block_out_channels)
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
        from sitdistill.infer.samples import sample_latents, student_fn, to_pil

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        dh, dw = self.default_hw()
        front = self.front_end()
        self.transformer.eval()
        latents = sample_latents(student_fn(self.transformer), front, prompts, height=height or dh, width=width or dw,
                                 scheduler=self.scheduler, steps=num_inference_steps, guidance_scale=guidance_scale,
                                 generator=generator, negative_prompt=negative_prompt,
                                 guidance_rescale=guidance_rescale)
        if output_type == "latent":
            images: Any = latents
        else:
            pixels = front.decode_latents(latents)  # (N, 3, H, W) in [-1, 1]
            if output_type == "pil":
                images = to_pil(pixels)
            elif output_type in ("np", "pt"):
                unit = (pixels + 1) / 2
                images = unit if output_type == "pt" else np.asarray(unit.permute(0, 2, 3, 1).cpu().numpy())
            else:
                raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
