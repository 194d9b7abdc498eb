"""Classifier-free-guided sampling with any diffusers scheduler, for teacher and student alike.

``sample`` is the denoising loop of diffusers' ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` with the network abstracted as ``model_fn(x, t, cond) -> eps``:
same initial noise (``randn_tensor`` with the generator, times ``init_noise_sigma``), same
``scale_model_input``, CFG as one batched forward over ``[uncond, cond]``, same ``step`` keyword
arguments. With a teacher's ``predict_eps`` it reproduces the pipeline's latents (tests check
1e-4); a student plugs in through the same signature.

Schedulers are always built with ``prediction_type="epsilon"``: every ``model_fn`` in the project
returns epsilon (a v teacher converts inside its adapter). For a v-prediction teacher this equals
the pipeline for every scheduler that converts each model output at its own timestep (DDIM, DDPM,
Euler, Euler-a, Heun, LMS, DPM-Solver++, UniPC: ~5e-6 measured). diffusers' PNDM instead converts
the multistep *combination* of v outputs at the current timestep, so there the two differ by
design. Not mirrored: the pipelines' ``guidance_rescale`` (default 0).
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


def make_scheduler(name: str, scheduler_config: dict[str, Any], **overrides: Any):
    """A fresh ``SCHEDULERS[name]`` built from the teacher's scheduler config, predicting epsilon."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    cls, options = SCHEDULERS[name]
    return cls.from_config(dict(scheduler_config), **{**options, **overrides, "prediction_type": "epsilon"})


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
           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Run the scheduler's denoising loop from noise and return the final latents (N, C, h, w).

    Args:
        model_fn: ``model_fn(x, t, cond) -> eps``; ``t`` is the scheduler's timestep repeated to (B,)
            (integer-valued, float for Euler-type schedulers), ``cond`` a conditioning dict.
        scheduler: a diffusers scheduler predicting epsilon (``make_scheduler``); its state is reset.
        shape / latents: the latent shape to draw initial noise for (the pipelines' ``randn_tensor``
            with ``generator``, so the same seed gives the same start), or starting latents already
            at unit scale (they are multiplied by ``init_noise_sigma`` like the pipelines do).
        uncond, guidance_scale: classifier-free guidance ``eps_u + g (eps_c - eps_u)`` in one
            batched forward over ``[uncond, cond]``; skipped (like the pipelines) when ``uncond`` is
            None or a scalar ``g <= 1``. ``g`` may be a per-sample tensor (N,).
        generator: also passed to ``step`` of ancestral schedulers.
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
        cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}  # [uncond, cond], like the pipelines
    step_kwargs = _step_kwargs(scheduler, generator, eta)

    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if do_cfg else latents  # (B, C, h, w), B = 2N with CFG
        x_in = scheduler.scale_model_input(x_in, t)
        eps = model_fn(x_in, t.reshape(1).expand(x_in.shape[0]), cond)
        if do_cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + g * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def sample_teacher(teacher, prompts: str | list[str], *, scheduler: str = "euler",
                   negative_prompts: str | list[str] | None = None, height: int | None = None,
                   width: int | None = None, guidance_scale: float = 5.0, num_inference_steps: int = 25,
                   generator: torch.Generator | None = None, **encode_kw: Any) -> Tensor:
    """Teacher latents for prompts — the pipeline's ``output_type="latent"`` result, via ``sample``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    dh, dw = teacher.default_size()
    height, width = height or dh, width or dw
    do_cfg = guidance_scale > 1.0
    encoded = teacher.encode_prompt(prompts, negative_prompts, height, width, do_cfg=do_cfg, **encode_kw)
    cond, uncond = encoded if isinstance(encoded, tuple) else (encoded, None)
    f = teacher.vae_scale_factor
    shape = (len(prompts), teacher.latent_channels, height // f, width // f)
    return sample(teacher.predict_eps, make_scheduler(scheduler, teacher.scheduler_config), cond=cond,
                  uncond=uncond, shape=shape, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                  generator=generator, device=teacher.device, dtype=teacher.dtype)
