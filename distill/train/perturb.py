"""The perturbation family of the SDiT objective: where only the teacher can be the target.

The data terms only teach the student what the (small) training set shows. Evaluating the teacher
on inputs *around* and *beyond* the data, and asking the student to match it there, carries the
teacher's knowledge (learnt on billions of images) into the student. Each part has its own
switch, weight and strength in the recipe; the target is always `teacher_eps(x~, t~, c~)` and the
loss is `losses.perturb_loss` (the true noise of a perturbed state is unknown).

    input          x~_t = x_t + gamma * xi                         (`perturb_input`)
    condition      recombined captions / prompts from a file /
                   noise on the text embeddings                     (`recombine_captions`,
                                                                     `draw_prompts`, `perturb_embeddings`)
    trajectory     x_t from the teacher's own sampling trajectory
                   from pure noise: no image needed (data-free)     (`teacher_trajectory_states`)
    timestep       t~ = clamp(t + delta), |delta| <= max_delta     (`jitter_timesteps`)

Everything here is a pure function of its inputs and an explicit `torch.Generator`.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from sitdistill.core.guidance import cfg_batch, guide
from sitdistill.core.schema import BATCH_PARTS
from sitdistill.train.losses import broadcast_per_sample

# Conditioning keys that hold text embeddings. SDXL's `time_ids` (sizes and crop coordinates)
# are micro-conditioning, not text, and are never noised.
EMBEDDING_KEYS = ("encoder_hidden_states", "text_embeds")

# kohya's tag separator: captions are comma-separated tag lists or phrases.
TAG_SEPARATOR = ","


def _gen_device(generator: torch.Generator | None, default="cpu") -> torch.device:
    # Draws happen on the generator's device (torch requires it) and are moved afterwards, so a
    # CPU generator gives the same numbers whether the batch lives on CPU or GPU.
    return generator.device if generator is not None else torch.device(default)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device),
                       dtype=torch.float32).to(x)


# --------------------------------------------------------------------------- (a) input

def perturb_input(x_t: Tensor, gamma: Union[float, Tensor], generator: torch.Generator | None = None) -> Tensor:
    """x~_t = x_t + gamma * xi with xi ~ N(0, I); gamma a float or per-sample (N,).

    The trainer passes `input_noise_scale(...)`, the kick of DDPM-IP (below)."""
    return x_t + broadcast_per_sample(gamma, x_t) * _randn_like(x_t, generator)


def input_noise_scale(alphas_cumprod: Tensor, t: Tensor, gamma: float) -> Tensor:
    """Per-sample (N,) scale of the input perturbation of DDPM-IP (Ning et al. 2023, "Input
    perturbation reduces exposure bias in diffusion models"): the noise is perturbed, not x_t,

        x~_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) (eps + gamma xi)  =  x_t + gamma sqrt(1 - abar_t) xi,

    so the kick is a fixed fraction gamma of the noise level at every t (an absolute gamma would be
    several times the noise level at small t)."""
    abar = alphas_cumprod.to(t.device)[t.long()]
    return gamma * (1.0 - abar).sqrt()


# --------------------------------------------------------------------------- (b) condition

def where_rows(mask: Tensor, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample choice between two conditioning dicts: ``a`` where ``mask`` (N,), else ``b``."""
    return {k: torch.where(mask.view(-1, *([1] * (a[k].ndim - 1))), a[k], b[k]) for k in a}


def split_tags(caption: str, sep: str = TAG_SEPARATOR) -> list[str]:
    """'a, b ,c' -> ['a', 'b', 'c'] (empty pieces dropped)."""
    return [piece.strip() for piece in caption.split(sep) if piece.strip()]


def recombine_captions(
    captions: Sequence[str],
    generator: torch.Generator | None = None,
    *,
    sep: str = TAG_SEPARATOR,
    keep_tokens: int = 0,
) -> list[str]:
    """Recombine the tags/phrases of a batch of captions into new captions.

    All tags of the batch (after each caption's first `keep_tokens` tags, which stay in place as
    kohya's `keep_tokens` does) are pooled, permuted and dealt back so every caption keeps its
    number of tags: the batch keeps its vocabulary but the combinations are new, e.g.
    "red circle, top left" + "blue square, bottom" -> "bottom, red circle" + "top left, blue square".
    Captions of a single phrase are thereby permuted across samples, pairing an image's x_t with
    another sample's prompt, which is itself a condition perturbation the teacher can answer.
    """
    tags = [split_tags(c, sep) for c in captions]
    kept = [t[:keep_tokens] for t in tags]
    rest = [t[keep_tokens:] for t in tags]
    pool = [tag for r in rest for tag in r]
    order = torch.randperm(len(pool), generator=generator, device=_gen_device(generator)).tolist()
    shuffled = [pool[i] for i in order]
    out, start = [], 0
    for k, r in zip(kept, rest):
        out.append(f"{sep} ".join(k + shuffled[start:start + len(r)]))
        start += len(r)
    return out


def perturb_embeddings(
    cond: Mapping[str, Tensor],
    sigma: float,
    generator: torch.Generator | None = None,
    keys: Sequence[str] = EMBEDDING_KEYS,
) -> dict[str, Tensor]:
    """Return a copy of `cond` with N(0, sigma^2) noise added to its text-embedding entries.

    Only the keys in `keys` that are present are touched (others, e.g. `time_ids`, are passed
    through). sigma is absolute: CLIP's final-layer states are layer-normed (unit scale), but
    SDXL's penultimate states are not, so the recipe's strength is per teacher family.
    """
    out = dict(cond)
    for key in keys:
        if key in out:
            out[key] = out[key] + sigma * _randn_like(out[key], generator)
    return out


def load_prompt_file(path: Union[str, Path]) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with '#' skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def draw_prompts(prompts: Sequence[str], n: int, generator: torch.Generator | None = None) -> list[str]:
    """n prompts drawn uniformly with replacement."""
    if not prompts:
        raise ValueError("cannot draw from an empty prompt list")
    idx = torch.randint(len(prompts), (n,), generator=generator, device=_gen_device(generator)).tolist()
    return [prompts[i] for i in idx]


# --------------------------------------------------------------------------- (d) timestep

def jitter_timesteps(
    t: Tensor, max_delta: int, num_train_timesteps: int, generator: torch.Generator | None = None
) -> Tensor:
    """t~ = clamp(t + delta, 0, T-1), delta uniform in [-max_delta, max_delta] integers -> (N,) long."""
    delta = torch.randint(-max_delta, max_delta + 1, t.shape, generator=generator, device=_gen_device(generator))
    return (t.long() + delta.to(t.device)).clamp_(0, num_train_timesteps - 1)


# --------------------------------------------------------------------------- (c) trajectory

@torch.no_grad()
def teacher_trajectory_states(
    teacher_eps_fn: Callable[[Tensor, Tensor, dict], Tensor],
    scheduler,
    cond: Mapping[str, Tensor],
    uncond: Mapping[str, Tensor] | None,
    shape: Sequence[int],
    num_steps: int,
    guidance_scale: Union[float, Tensor] = 1.0,
    generator: torch.Generator | None = None,
    stop_at: Union[int, Tensor, str, None] = None,
) -> tuple[Tensor, Tensor]:
    """States (x_t, t) on the teacher's own sampling trajectory from pure noise (data-free).

    Runs the teacher's (optionally guided) sampler with `scheduler` for `num_steps` steps from
    x ~ N(0, I) of `shape` and, for sample i, returns the state x that enters the teacher at step
    `stop_at[i]` (0 = the pure-noise state) together with that step's timestep. Only as many
    steps as the largest `stop_at` are run. `stop_at` None draws a step per sample uniformly.

    The scheduler must work on the DDPM training grid: integer timesteps and unit initial noise
    (DDIM, DDPM, DPM-Solver++, UniPC; DDIM with eta=0 is the natural choice). Then each state is a
    noisy latent at a training timestep t and can be fed to teacher and student like any x_t.
    Euler-type schedulers (sigma-scaled inputs, float timesteps) are refused. The scheduler is
    copied, so a shared sampling scheduler is not disturbed.

    `stop_at="all"` returns every state of the trajectory instead: states (S, N, C, H, W) and
    timesteps (S,) for the S = `num_steps` steps (one sampling run yields S batches of states).
    `stop_at="end"` runs every step and returns the teacher's samples, x0 (N, C, H, W), with the
    timesteps (S,) of the grid they were sampled on.

    `teacher_eps_fn(x, t, cond) -> eps` with t a (N,) long tensor; with `uncond` and a guidance
    scale (float or (N,)) the unconditional and conditional halves go through one batched call.
    """
    scheduler = copy.deepcopy(scheduler)
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
        raise ValueError(f"{type(scheduler).__name__} starts at sigma {scheduler.init_noise_sigma}, not on "
                         "the DDPM training grid; use DDIM/DDPM/DPM-Solver++/UniPC")
    gen_device = _gen_device(generator)
    device = next(iter(cond.values())).device
    n = shape[0]
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    if timesteps.is_floating_point():
        raise ValueError(f"{type(scheduler).__name__} has float timesteps; trajectory states need integer ones")

    x = torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)  # (N, C, H, W)
    named = isinstance(stop_at, str)
    if named and stop_at not in ("all", "end"):
        raise ValueError(f"stop_at must be a step index, a tensor of them, None, 'all' or 'end', got {stop_at!r}")
    every_state, to_the_end = named and stop_at == "all", named and stop_at == "end"
    trail = []
    if named:
        stop_at = len(timesteps) - 1
    elif stop_at is None:
        stop_at = torch.randint(len(timesteps), (n,), generator=generator, device=gen_device)
    stop_at = torch.as_tensor(stop_at, device=device).long().expand(n)  # (N,)
    if stop_at.min() < 0 or stop_at.max() >= len(timesteps):
        raise ValueError(f"stop_at must lie in [0, {len(timesteps)}), got {stop_at.tolist()}")

    # Stochastic samplers (DDPM, DDIM with eta > 0) draw from our generator; UniPC takes none.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    guided = uncond is not None
    both = cfg_batch(uncond, cond) if guided else dict(cond)
    states = torch.empty_like(x)
    for step, t in enumerate(timesteps[: int(stop_at.max()) + 1]):
        take = stop_at == step  # (N,)
        states[take] = x[take]
        if every_state:
            trail.append(x)
        if step == int(stop_at.max()) and not to_the_end:
            break  # every sample has its state; no more teacher calls needed
        model_in = scheduler.scale_model_input(x, t)  # identity on the DDPM grid
        t_batch = t.expand(n).long()  # (N,)
        if guided:
            eps_u, eps_c = teacher_eps_fn(torch.cat([model_in, model_in]), torch.cat([t_batch, t_batch]), both).chunk(2)
            eps = guide(eps_u, eps_c, guidance_scale)
        else:
            eps = teacher_eps_fn(model_in, t_batch, both)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    if every_state:
        return torch.stack(trail), timesteps.long()  # (S, N, C, H, W), (S,)
    if to_the_end:
        return x, timesteps.long()  # (N, C, H, W), (S,)
    return states, timesteps[stop_at].long()


# --------------------------------------------------------------------------- the batch parts


@dataclass
class PerturbedBatch:
    """The inputs of the one extra forward that serves every batch part: a copy of the data batch's
    x_t, t, captions and teacher conditioning, perturbed row by row (each row by its own part).
    `student_cond`: the student's own conditioning (end-to-end stage with trainable text encoders),
    else None (the student reads `cond`, like the teacher)."""

    x_t: Tensor  # (N, C, h, w)
    t: Tensor  # (N,) long
    captions: list[str]
    cond: dict[str, Tensor]
    student_cond: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class PartContext:
    """What a part reads besides the batch: the data batch's own captions, the teacher's noise
    schedule, the prompt file's prompts and the step's generator."""

    captions: Sequence[str]
    schedule: Any
    prompt_pool: Sequence[str] | None
    generator: torch.Generator


def _input_noise(p: PerturbedBatch, rows: Tensor, cfg, ctx: PartContext) -> None:
    # DDPM-IP: gamma times the noise level of each sample's t.
    scale = input_noise_scale(ctx.schedule.alphas_cumprod, p.t[rows], cfg.gamma)
    p.x_t[rows] = perturb_input(p.x_t[rows], scale, generator=ctx.generator)


def _caption_mix(p: PerturbedBatch, rows: Tensor, cfg, ctx: PartContext) -> None:
    mixed = recombine_captions(ctx.captions, generator=ctx.generator)
    p.captions = [m if rows[j] else c for j, (m, c) in enumerate(zip(mixed, p.captions))]


def _prompt_file(p: PerturbedBatch, rows: Tensor, cfg, ctx: PartContext) -> None:
    drawn = iter(draw_prompts(ctx.prompt_pool, int(rows.sum()), generator=ctx.generator))
    p.captions = [next(drawn) if rows[j] else c for j, c in enumerate(p.captions)]


def _embedding_noise(p: PerturbedBatch, rows: Tensor, cfg, ctx: PartContext) -> None:
    noisy = perturb_embeddings(p.cond, cfg.sigma, generator=ctx.generator)
    if p.student_cond is not None:  # the same noise on the student's own encodings
        moved = {k: p.student_cond[k] + (noisy[k] - p.cond[k]) for k in p.student_cond}
        p.student_cond = where_rows(rows, moved, p.student_cond)
    p.cond = where_rows(rows, noisy, p.cond)


def _timestep_jitter(p: PerturbedBatch, rows: Tensor, cfg, ctx: PartContext) -> None:
    p.t[rows] = jitter_timesteps(p.t[rows], cfg.max_delta, ctx.schedule.num_train_timesteps, generator=ctx.generator)


@dataclass(frozen=True)
class Part:
    """One batch part: `apply(batch, rows, cfg, ctx)` perturbs the rows (N,) bool given to it, with
    `cfg` its recipe section (`losses.perturbations.<name>`)."""

    apply: Callable[[PerturbedBatch, Tensor, Any, PartContext], None]
    new_captions: bool = False  # gives rows new captions, which are encoded before the next stage
    after_encoding: bool = False  # acts on the encoded conditioning (after new captions are encoded)


# The parts that act on a data batch (a, b, d), by the recipe's names, in the fixed order that the
# per-sample assignment follows (so that it is reproducible). The trajectory part (c) has a batch of
# its own (`sitdistill.train.trajectory`).
PERTURBATIONS: dict[str, Part] = {
    "input_noise": Part(_input_noise),
    "caption_mix": Part(_caption_mix, new_captions=True),
    "prompt_file": Part(_prompt_file, new_captions=True),
    "embedding_noise": Part(_embedding_noise, after_encoding=True),
    "timestep_jitter": Part(_timestep_jitter),
}
if tuple(PERTURBATIONS) != BATCH_PARTS:  # the schema names the parts; this table implements them
    raise AssertionError(f"perturbation parts {tuple(PERTURBATIONS)} differ from the schema's {BATCH_PARTS}")
