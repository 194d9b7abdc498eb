"""What every teacher offers: a frozen UNet that predicts epsilon, and the front end that feeds it.

A teacher is a frozen adapter around a foreign diffusion model (the pattern of k-diffusion's
``external.py``): whatever the source predicts (epsilon or v), ``predict_eps`` returns epsilon in
the project's one noise convention (``sitdistill.core.schedule.NoiseSchedule``, built from the teacher's
own scheduler config). Conditioning is a plain dict of the keyword arguments the diffusers UNet
takes. What turns prompts and images into those inputs, the text encoders, tokenizers and VAE, is
the teacher's front end (``teacher.front``, ``sitdistill.teachers.frontend``); ``encode_prompt``,
``encode_images`` and ``decode_latents`` here are the front end's, run without gradients.

Frozen means frozen: every module is in eval mode with ``requires_grad_(False)``, every call runs
under ``torch.no_grad()``, and a teacher is never part of a student's state dict.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sitdistill.core.guidance import cfg_batch, guide
from sitdistill.core.schedule import NoiseSchedule

from .frontend import Cond, FrontEnd, first_weight, vae_scale_factor

Tensor = torch.Tensor

# Keys of the conditioning dict that the diffusers UNet takes inside ``added_cond_kwargs``.
ADDED_COND_KEYS = ("text_embeds", "time_ids")


def freeze(module: nn.Module | None) -> None:
    """eval() + requires_grad_(False): a teacher part never trains and never drops out."""
    if module is not None:
        module.eval().requires_grad_(False)


def unet_pixel_size(unet: nn.Module, vae: nn.Module) -> tuple[int, int]:
    """The pixel (height, width) a pipeline defaults to: UNet sample_size * the VAE's factor."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    f = vae_scale_factor(vae.config.block_out_channels)
    return h * f, w * f


class Teacher:
    """Base of all teacher families; subclasses build their front end and implement ``cond_dims``.

    Attributes: ``family``, ``unet``, ``front`` (the ``FrontEnd``: VAE, text encoders, tokenizers),
    ``schedule`` (NoiseSchedule with the source's ``prediction_type``), ``scheduler_config`` (a
    dict; ``sitdistill.infer.sampling.make_scheduler`` builds any diffusers sampler from it),
    ``latent_channels``, ``dtype`` (of the UNet), ``device``; ``vae`` and ``vae_scale_factor``
    are the front end's.

    Deliberately not an ``nn.Module``: assigning a teacher to a student attribute registers no
    parameters, so a teacher can never end up in a student's state dict or optimizer.
    """

    family: str = "base"

    def __init__(self, unet: nn.Module, front: FrontEnd, scheduler_config: dict[str, Any]):
        self.unet = unet
        self.front = front
        self.scheduler_config = dict(scheduler_config)
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.prediction_type = self.schedule.prediction_type
        self.latent_channels = int(unet.config.in_channels)
        for module in self.modules().values():
            freeze(module)

    # ------------------------------------------------------------------ bookkeeping
    def modules(self) -> dict[str, nn.Module]:
        """The teacher's networks by name: the UNet and its front end's."""
        return {"unet": self.unet, **self.front.modules()}

    @property
    def vae(self) -> nn.Module:
        return self.front.vae

    def __getattr__(self, name: str):
        """The front end's text encoders and tokenizers read through the teacher, as a pipeline's do
        (``teacher.text_encoder``, ``teacher.tokenizer_2``); read-only."""
        front = self.__dict__.get("front")
        if front is not None and name in front.TEXT_ENCODERS + front.TOKENIZERS:
            return getattr(front, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def vae_scale_factor(self) -> int:
        return self.front.vae_scale_factor

    @property
    def dtype(self) -> torch.dtype:
        return first_weight(self.unet).dtype

    @property
    def device(self) -> torch.device:
        return first_weight(self.unet).device

    def to(self, device: torch.device | str) -> "Teacher":
        """Move every network (dtypes kept, so an fp32 VAE stays fp32)."""
        for module in self.modules().values():
            module.to(device)
        self.schedule.to(device)
        return self

    @property
    def cond_dims(self) -> dict[str, int]:
        """Feature sizes of each conditioning key, e.g. ``{"encoder_hidden_states": 768}``."""
        raise NotImplementedError

    def default_size(self) -> tuple[int, int]:
        """The pixel (height, width) the pipeline defaults to: UNet sample_size * vae_scale_factor."""
        return self.front.default_size()

    # ------------------------------------------------------------------ the front end, frozen
    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], negative_prompts: str | list[str] | None = None,
                      height: int | None = None, width: int | None = None, *, do_cfg: bool = False,
                      **kw: Any) -> Cond | tuple[Cond, Cond]:
        """The front end's ``encode_prompt`` (exactly what the family's diffusers pipeline hands its UNet)."""
        return self.front.encode_prompt(prompts, negative_prompts, height, width, do_cfg=do_cfg, **kw)

    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        return self.front.encode_images(pixels, generator, sample)

    def latent_posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.front.latent_posterior(pixels)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.front.decode_latents(latents)

    # ------------------------------------------------------------------ the model
    @torch.no_grad()
    def _unet_output(self, x_t: Tensor, t: Tensor | int | float, cond: Cond) -> Tensor:
        """Raw UNet output (the source's prediction type), in x_t's dtype."""
        dtype = self.dtype
        added = {k: cond[k].to(dtype) for k in ADDED_COND_KEYS if k in cond}
        out = self.unet(
            x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added or None, return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    @torch.no_grad()
    def predict(self, x_t: Tensor, t: Tensor | int | float, cond: Cond) -> Tensor:
        """The raw UNet output at (x_t, t), in the teacher's own ``prediction_type`` (what its
        pipeline's scheduler steps; ``sitdistill.infer.sampling.teacher_denoiser``)."""
        return self._unet_output(x_t, t, cond)

    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor | int | float, cond: Cond) -> Tensor:
        """Epsilon at (x_t, t): (N, C, h, w). ``t``: integer training timesteps (N,) or a scalar;
        float timesteps (Euler-type samplers) are accepted too."""
        out = self._unet_output(x_t, t, cond)
        return self.schedule.eps_from_prediction(x_t, out, t)

    @torch.no_grad()
    def predict_eps_cfg(self, x_t: Tensor, t: Tensor | int | float, cond: Cond, uncond: Cond,
                        guidance_scale: float | Tensor) -> Tensor:
        """Classifier-free-guided epsilon (``predict_cfg``, converted)."""
        return self.schedule.eps_from_prediction(x_t, self.predict_cfg(x_t, t, cond, uncond, guidance_scale), t)

    @torch.no_grad()
    def predict_as(self, x_t: Tensor, t: Tensor | int | float, cond: Cond, prediction_type: str,
                   uncond: Cond | None = None, guidance_scale: float | Tensor | None = None) -> Tensor:
        """The teacher's prediction (guided when ``uncond`` and ``guidance_scale`` are given) in
        ``prediction_type``: the one convention a student's targets are compared in."""
        raw = (self.predict_cfg(x_t, t, cond, uncond, guidance_scale) if uncond is not None
               else self._unet_output(x_t, t, cond))
        t_n = torch.as_tensor(t, device=x_t.device)
        return self.schedule.convert(x_t, raw, t_n, self.prediction_type, prediction_type)

    @torch.no_grad()
    def predict_cfg(self, x_t: Tensor, t: Tensor | int | float, cond: Cond, uncond: Cond,
                    guidance_scale: float | Tensor) -> Tensor:
        """Classifier-free-guided raw output (the teacher's prediction type), ONE batched forward over
        ``[uncond, cond]`` like the diffusers pipelines. ``guidance_scale``: a float or per-sample (N,)."""
        t2 = torch.as_tensor(t, device=x_t.device)
        t2 = t2 if t2.ndim == 0 else torch.cat([t2, t2])
        out = self._unet_output(torch.cat([x_t, x_t]), t2, cfg_batch(uncond, cond))
        out_uncond, out_cond = out.chunk(2)
        g = torch.as_tensor(guidance_scale, dtype=x_t.dtype, device=x_t.device)  # guide() shapes a per-sample w
        # Guidance on the raw output, as the pipelines do (a conversion is affine in the output at
        # fixed x_t, so guiding after it would be the same up to rounding).
        return guide(out_uncond, out_cond, g)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, prediction_type={self.prediction_type!r}, "
                f"cond_dims={self.cond_dims}, vae_scale_factor={self.vae_scale_factor}, dtype={self.dtype})")
