"""Off-data states from the teacher's own sampling trajectories (perturbation part c, data-free).

The teacher samples from pure noise for a batch of prompts with DDIM on its training grid; every
intermediate state is a noisy latent at a training timestep that no data image produced. One run
of S steps for N prompts gives S x N states, served N at a time in a shuffled order, so a state
costs about one guided teacher forward, the same as a data state's target. With `states:
renoised` the S x N states are the run's N samples instead, each noised S times afresh at training
timesteps drawn as the data's are (the teacher's samples used as data images, at the same cost).
"""

from __future__ import annotations

from typing import Sequence

import torch

from sitdistill.train.perturb import draw_prompts, teacher_trajectory_states, where_rows
from sitdistill.infer.sampling import make_scheduler

Cond = dict[str, torch.Tensor]


class TrajectoryPool:
    """`next()` -> (x_t (N, C, h, w), t (N,), cond) from the teacher's own trajectories.

    `cfg`: the recipe's `losses.perturbations.trajectory`; `batch_size` and `latent_hw` the size of
    a batch of states; `captions` (the data set's) and `prompt_pool` (the prompt file's) are where
    `cfg.prompts` may take its prompts from; `caption_dropout` the data's (see `next`);
    `timestep_sampling` the data's too (`losses.timestep_sampling`, for renoised states). Every draw
    uses `generator`, the step's.
    """

    def __init__(self, teacher, cfg, generator: torch.Generator, *, batch_size: int, latent_hw: tuple[int, int],
                 captions: Sequence[str], prompt_pool: Sequence[str] | None, caption_dropout: float,
                 timestep_sampling: str = "uniform"):
        self.teacher, self.cfg, self.gen = teacher, cfg, generator
        self.batch_size, self.latent_hw = batch_size, latent_hw
        self.captions, self.prompt_pool, self.caption_dropout = captions, prompt_pool, float(caption_dropout)
        self.timestep_sampling = timestep_sampling  # for `states: renoised`
        # In the teacher's own prediction type: with zero terminal SNR, epsilon at t = T carries
        # nothing and DDIM's x0 from it divides by zero (every state after the first would be NaN).
        self.scheduler = make_scheduler("ddim", teacher.scheduler_config, teacher.prediction_type)
        # (states, timesteps, cond, uncond) batches, served from the end
        self.queue: list[tuple[torch.Tensor, torch.Tensor, Cond, Cond]] = []

    def prompts(self, n: int) -> list[str]:
        g = self.gen
        if self.cfg.prompts == "prompt_file":
            if self.prompt_pool is None:
                raise ValueError("trajectory prompts=prompt_file needs losses.perturbations.prompt_file.path")
            return draw_prompts(self.prompt_pool, n, generator=g)
        if self.cfg.prompts == "toy":
            from sitdistill.data.toy import ToyWorld

            seed = int(torch.randint(2**31 - 1, (1,), generator=g, device=g.device))
            return ToyWorld().prompts(n, seed)
        return draw_prompts(self.captions, n, generator=g)

    @torch.no_grad()
    def refill(self) -> None:
        n = self.batch_size
        h, w = self.latent_hw
        te = self.teacher
        cond, uncond = te.encode_prompt(self.prompts(n), height=h * te.vae_scale_factor,
                                        width=w * te.vae_scale_factor, do_cfg=True)
        guided = self.cfg.guidance_scale > 1.0
        renoised = self.cfg.states == "renoised"
        states, steps = teacher_trajectory_states(
            te.predict, self.scheduler, cond, uncond if guided else None, (n, te.latent_channels, h, w),
            self.cfg.num_steps, guidance_scale=self.cfg.guidance_scale, generator=self.gen,
            stop_at="end" if renoised else "all")
        if renoised:
            flat, t = self.renoise(states, len(steps))
        else:
            flat = states.flatten(0, 1)  # (S*N, C, h, w)
            t = steps.repeat_interleave(n)  # (S*N,)
        # Shuffle the S x N states, then serve them N at a time.
        which = torch.arange(n, device=flat.device).repeat(len(steps))  # prompt of each state
        order = torch.randperm(flat.shape[0], generator=self.gen, device=self.gen.device).to(flat.device)
        for chunk in order.split(n):
            if len(chunk) == n:
                self.queue.append((flat[chunk], t[chunk], {k: v[which[chunk]] for k, v in cond.items()},
                                   {k: v[which[chunk]] for k, v in uncond.items()}))

    def renoise(self, x0: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`copies` noisy versions of each sample in x0 (N, C, h, w), stacked copy-major like a
        trajectory's states: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with fresh noise and a
        training timestep t drawn per state as the data's are (`losses.timestep_sampling`) -> (copies*N, C, h, w), (copies*N,) long."""
        g, schedule = self.gen, self.teacher.schedule
        flat = x0.repeat(copies, 1, 1, 1)
        t = schedule.sample_timesteps(len(flat), generator=g, device=flat.device, mode=self.timestep_sampling)
        noise = torch.randn(flat.shape, generator=g, device=g.device).to(flat.device)
        return schedule.add_noise(flat, noise, t), t

    def next(self) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """A batch of states and their conditioning. The data's caption dropout applies here too
        (a dropped row gets the unconditional input, and so the teacher's unconditional eps as
        target): without it a data-free student never learns the branch that CFG subtracts. With
        `swap_prompts`, that fraction of rows first takes the prompt a random permutation of the
        batch gives it (another row's, except where the permutation keeps a row in place)."""
        if not self.queue:
            self.refill()
        x, t, cond, uncond = self.queue.pop()
        g, q = self.gen, self.cfg.swap_prompts
        if q > 0:  # before the dropout: a dropped row stays unconditional
            swap = torch.rand(len(t), generator=g, device=g.device).to(t.device) < q
            other = torch.randperm(len(t), generator=g, device=g.device).to(t.device)
            cond = where_rows(swap, {k: v[other] for k, v in cond.items()}, cond)
        p = self.caption_dropout
        if p > 0:
            drop = torch.rand(len(t), generator=g, device=g.device).to(t.device) < p
            cond = where_rows(drop, uncond, cond)
        return x, t, cond
