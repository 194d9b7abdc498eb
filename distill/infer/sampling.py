"""Classifier-free-guided sampling with any diffusers scheduler, for teacher and student alike.

``sample`` is the denoising loop of diffusers' ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` with the network abstracted as ``model_fn(x, t, cond) -> output``:
same initial noise (``randn_tensor`` with the generator, times ``init_noise_sigma``), same
``scale_model_input``, CFG as one batched forward over ``[uncond, cond]``, the same
``guidance_rescale`` (Lin et al. 2023, section 3.4), same ``step`` keyword arguments.

Samplers run in the model's own prediction type, as the pipelines do: a teacher samples through
``teacher_denoiser(teacher)`` (its raw UNet output, epsilon or v) with a scheduler built for that
type, so a zero-terminal-SNR v-prediction teacher keeps its first step (in epsilon its output at
SNR 0 would carry no information, and DDIM would divide by zero). A plain function is taken to
return epsilon (the students). With a teacher the loop reproduces the pipeline's latents (tests
check 1e-4, epsilon, v and zero-terminal-SNR v teachers).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from sitdistill.core.guidance import cfg_batch, guide

Tensor = torch.Tensor
Cond = dict[str, Tensor]
ModelFn = Callable[[Tensor, Tensor, Cond], Tensor]

# name -> (scheduler class, options on top of the teacher's scheduler config)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),  # DPM-Solver++ 2M
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


def follows_zero_snr(name: str) -> bool:
    """Whether ``SCHEDULERS[name]`` can follow a zero-terminal-SNR schedule (``rescale_betas_zero_snr``)."""
    return "rescale_betas_zero_snr" in inspect.signature(SCHEDULERS[name][0].__init__).parameters


def zero_snr_schedulers() -> list[str]:
    """The names of ``SCHEDULERS`` that can follow a zero-terminal-SNR teacher."""
    return sorted(name for name in SCHEDULERS if follows_zero_snr(name))


def make_scheduler(name: str, scheduler_config: dict[str, Any], prediction_type: str = "epsilon", **overrides: Any):
    """A fresh ``SCHEDULERS[name]`` built from the teacher's scheduler config (its betas, spacing,
    zero-terminal-SNR rescaling), stepping outputs of ``prediction_type`` (the sampled model's)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    cls, options = SCHEDULERS[name]
    if scheduler_config.get("rescale_betas_zero_snr") and not follows_zero_snr(name):
        raise ValueError(f"scheduler {name!r} ({cls.__name__}) cannot follow this teacher's zero-terminal-SNR "
                         f"schedule (rescale_betas_zero_snr); choose from {zero_snr_schedulers()}")
    return cls.from_config(dict(scheduler_config), **{**options, **overrides, "prediction_type": prediction_type})


class Denoiser:
    """A model function together with the prediction type of what it returns."""

    def __init__(self, fn: ModelFn, prediction_type: str = "epsilon"):
        self.fn, self.prediction_type = fn, prediction_type

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.fn(x, t, cond)


def teacher_denoiser(teacher) -> Denoiser:
    """The teacher as the sampler sees it: its raw UNet output in its own prediction type."""
    return Denoiser(teacher.predict, teacher.prediction_type)


def prediction_type_of(model_fn) -> str:
    """A ``Denoiser``'s prediction type; plain functions return epsilon."""
    return getattr(model_fn, "prediction_type", "epsilon")


def rescale_guidance(guided: Tensor, cond_out: Tensor, guidance_rescale: float | Tensor) -> Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4): scale
    the guided output to the per-sample standard deviation of the conditional one, then mix:
    ``phi * rescaled + (1 - phi) * guided`` (the pipelines' ``rescale_noise_cfg``)."""
    dims = list(range(1, guided.ndim))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _step_kwargs(scheduler, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
    """The pipelines' ``prepare_extra_step_kwargs``: eta (DDIM) and a generator (ancestral) if taken."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def sample(model_fn: ModelFn, scheduler, *, cond: Cond, shape: tuple[int, ...] | None = None,
           latents: Tensor | None = None, uncond: Cond | None = None, guidance_scale: float | Tensor = 1.0,
           num_inference_steps: int = 25, generator: torch.Generator | None = None, eta: float = 0.0,
           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
           guidance_rescale: float = 0.0) -> Tensor:
    """Run the scheduler's denoising loop from noise and return the final latents (N, C, h, w).

    Args:
        model_fn: ``model_fn(x, t, cond) -> output`` in the scheduler's prediction type; ``t`` is the
            scheduler's timestep repeated to (B,) (integer-valued, float for Euler-type schedulers).
        scheduler: a diffusers scheduler for that prediction type (``make_scheduler``); reset here.
        shape / latents: the latent shape to draw initial noise for (the pipelines' ``randn_tensor``
            with ``generator``, so the same seed gives the same start), or starting latents already
            at unit scale (they are multiplied by ``init_noise_sigma`` like the pipelines do).
        uncond, guidance_scale: classifier-free guidance ``eps_u + g (eps_c - eps_u)`` in one
            batched forward over ``[uncond, cond]``; skipped (like the pipelines) when ``uncond`` is
            None or a scalar ``g <= 1``. ``g`` may be a per-sample tensor (N,).
        generator: also passed to ``step`` of ancestral schedulers.
        guidance_rescale: ``rescale_guidance`` after CFG (0 = off), as the pipelines apply it.
    """
    if latents is None:
        if shape is None:
            raise ValueError("give shape or latents")
        latents = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)
    # Timesteps first: Euler-type schedulers only know init_noise_sigma (their largest sigma) after.
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    latents = latents * scheduler.init_noise_sigma
    g = torch.as_tensor(guidance_scale, dtype=latents.dtype, device=latents.device)
    do_cfg = uncond is not None and (g.ndim > 0 or float(g) > 1.0)
    if g.ndim == 1:
        g = g.view(-1, *([1] * (latents.ndim - 1)))
    if do_cfg:
        cond = cfg_batch(uncond, cond)  # [uncond, cond], like the pipelines
    step_kwargs = _step_kwargs(scheduler, generator, eta)

    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if do_cfg else latents  # (B, C, h, w), B = 2N with CFG
        x_in = scheduler.scale_model_input(x_in, t)
        eps = model_fn(x_in, t.reshape(1).expand(x_in.shape[0]), cond)
        if do_cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = guide(eps_uncond, eps_cond, g)
            if guidance_rescale > 0:
                eps = rescale_guidance(eps, eps_cond, guidance_rescale)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def sample_teacher(teacher, prompts: str | list[str], *, scheduler: str = "euler",
                   negative_prompts: str | list[str] | None = None, height: int | None = None,
                   width: int | None = None, guidance_scale: float = 5.0, num_inference_steps: int = 25,
                   generator: torch.Generator | None = None, guidance_rescale: float = 0.0,
                   **encode_kw: Any) -> Tensor:
    """Teacher latents for prompts — the pipeline's ``output_type="latent"`` result, via ``sample``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    dh, dw = teacher.default_size()
    height, width = height or dh, width or dw
    do_cfg = guidance_scale > 1.0
    encoded = teacher.encode_prompt(prompts, negative_prompts, height, width, do_cfg=do_cfg, **encode_kw)
    cond, uncond = encoded if isinstance(encoded, tuple) else (encoded, None)
    f = teacher.vae_scale_factor
    shape = (len(prompts), teacher.latent_channels, height // f, width // f)
    return sample(teacher_denoiser(teacher), make_scheduler(scheduler, teacher.scheduler_config, teacher.prediction_type),
                  cond=cond, uncond=uncond, shape=shape, guidance_scale=guidance_scale,
                  num_inference_steps=num_inference_steps, generator=generator, device=teacher.device,
                  dtype=teacher.dtype, guidance_rescale=guidance_rescale)
