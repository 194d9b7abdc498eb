"""What every teacher offers: encode prompts, encode/decode images, predict epsilon.

A teacher is a frozen adapter around a foreign diffusion model (the pattern of k-diffusion's
``external.py``): whatever the source predicts (epsilon or v), ``predict_eps`` returns epsilon in
the project's one noise convention (``distill.schedule.NoiseSchedule``, built from the teacher's
own scheduler config). Conditioning is a plain dict of the keyword arguments the diffusers UNet
takes (see ``encode_prompt``).

Frozen means frozen: every module is in eval mode with ``requires_grad_(False)``, every call runs
under ``torch.no_grad()``, and a teacher is never part of a student's state dict.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.guidance import cfg_batch, guide
from distill.schedule import NoiseSchedule

Tensor = torch.Tensor
Cond = dict[str, Tensor]

# Keys of the conditioning dict that the diffusers UNet takes inside ``added_cond_kwargs``.
ADDED_COND_KEYS = ("text_embeds", "time_ids")


def freeze(module: nn.Module | None) -> None:
    """eval() + requires_grad_(False): a teacher part never trains and never drops out."""
    if module is not None:
        module.eval().requires_grad_(False)


def latent_stats(vae: nn.Module, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """(mean, std) that normalise raw VAE latents before ``scaling_factor``: the config's
    per-channel ``latents_mean`` / ``latents_std`` when it has both (Playground-style VAEs; what the
    SDXL pipeline reads), else (``shift_factor`` or 0, 1)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, -1) + (1,) * (like.ndim - 2)
        return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(view),
                torch.tensor(std, device=like.device, dtype=like.dtype).view(view))
    return getattr(cfg, "shift_factor", None) or 0.0, 1.0


def scale_latents(vae: nn.Module, z: Tensor) -> Tensor:
    """Raw VAE latents -> diffusion latents: (z - mean) * scaling_factor / std (``latent_stats``)."""
    mean, std = latent_stats(vae, z)
    return (z - mean) * vae.config.scaling_factor / std


def unscale_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Diffusion latents -> raw VAE latents, the inverse of ``scale_latents`` (the pipelines' decode)."""
    mean, std = latent_stats(vae, latents)
    return latents * std / vae.config.scaling_factor + mean


def first_weight(module: nn.Module) -> Tensor:
    """A module's first parameter: its dtype and device in O(1). diffusers' `ModelMixin.dtype` /
    `.device` walk every parameter in Python (4.3 ms a call on the SDXL UNet, asked several times a
    step); a frozen teacher's networks each have one dtype and one device."""
    return next(module.parameters())


class Teacher:
    """Base of all teacher families; subclasses implement ``encode_prompt`` and ``cond_dims``.

    Attributes: ``family``, ``unet``, ``vae``, ``schedule`` (NoiseSchedule with the source's
    ``prediction_type``), ``scheduler_config`` (a dict; ``distill.sampling.make_scheduler`` builds
    any diffusers sampler from it), ``vae_scale_factor`` (spatial), ``latent_channels``,
    ``dtype`` (of the UNet), ``device``.

    Deliberately not an ``nn.Module``: assigning a teacher to a student attribute registers no
    parameters, so a teacher can never end up in a student's state dict or optimizer.
    """

    family: str = "base"
    # Gradients through the text encoders: never on a teacher; True only on the student-side copy
    # of the end-to-end stage (distill.e2e), which reuses this encoding code on trainable encoders.
    encoders_grad: bool = False

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler_config: dict[str, Any]):
        self.unet = unet
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        self.prediction_type = self.schedule.prediction_type
        # Spatial downsampling of the VAE: one factor 2 per block but the last (diffusers' rule).
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(unet.config.in_channels)
        for module in self.modules().values():
            freeze(module)

    # ------------------------------------------------------------------ bookkeeping
    def modules(self) -> dict[str, nn.Module]:
        """The teacher's networks by name (subclasses add their text encoders)."""
        return {"unet": self.unet, "vae": self.vae}

    @property
    def dtype(self) -> torch.dtype:
        return first_weight(self.unet).dtype

    @property
    def device(self) -> torch.device:
        return first_weight(self.unet).device

    def _for_vae(self, x: Tensor) -> Tensor:
        w = first_weight(self.vae)
        return x.to(device=w.device, dtype=w.dtype)

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
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def encode_prompt(self, prompts: str | list[str], negative_prompts: str | list[str] | None = None,
                      height: int | None = None, width: int | None = None, *, do_cfg: bool = False,
                      **kw: Any) -> Cond | tuple[Cond, Cond]:
        raise NotImplementedError

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
        pipeline's scheduler steps; ``distill.sampling.teacher_denoiser``)."""
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

    # ------------------------------------------------------------------ images <-> latents
    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> Tensor:
        """Pixels in [-1, 1] (N, 3, H, W) -> scaled latents (N, C, H/f, W/f).

        ``sample=True`` draws from the VAE posterior with ``generator`` (what SD training does);
        ``sample=False`` takes its mode. Scaling from ``vae.config`` (and ``shift_factor`` if set).
        """
        dist = self.vae.encode(self._for_vae(pixels)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return self._scaled(z).to(pixels.dtype)

    @torch.no_grad()
    def latent_posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior of pixels in [-1, 1] as scaled (mean, std), float32: `encode_images`
        samples mean + std * noise. What the latent cache stores."""
        dist = self.vae.encode(self._for_vae(pixels)).latent_dist
        _, std = latent_stats(self.vae, dist.mean)
        return self._scaled(dist.mean).float(), (dist.std * self.vae.config.scaling_factor / std).float()

    def _scaled(self, z: Tensor) -> Tensor:
        return scale_latents(self.vae, z)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (N, C, h, w) -> pixels in [-1, 1] (clamped), (N, 3, h*f, w*f), float32."""
        z = unscale_latents(self.vae, self._for_vae(latents))
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, prediction_type={self.prediction_type!r}, "
                f"cond_dims={self.cond_dims}, vae_scale_factor={self.vae_scale_factor}, dtype={self.dtype})")
