"""Off-data states from the teacher's own sampling trajectories (perturbation part c, data-free).

The teacher samples from pure noise for a batch of prompts with DDIM on its training grid; every
intermediate state is a noisy latent at a training timestep that no data image produced. One run
of S steps for N prompts gives S x N states, served N at a time in a shuffled order, so a state
costs about one guided teacher forward, the same as a data state's target.
"""

from __future__ import annotations

import torch

from distill.perturb import draw_prompts, teacher_trajectory_states, where_rows
from distill.sampling import make_scheduler


class TrajectoryPool:
    """`next()` -> (x_t (N, C, h, w), t (N,), cond) from the teacher's own trajectories."""

    def __init__(self, distiller, cfg):
        self.d, self.cfg = distiller, cfg
        # In the teacher's own prediction type: with zero terminal SNR, epsilon at t = T carries
        # nothing and DDIM's x0 from it divides by zero (every state after the first would be NaN).
        te = distiller.teacher
        self.scheduler = make_scheduler("ddim", te.scheduler_config, te.prediction_type)
        self.queue: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def prompts(self, n: int) -> list[str]:
        d, g = self.d, self.d.gen
        if self.cfg.prompts == "prompt_file":
            if d.prompt_pool is None:
                raise ValueError("trajectory prompts=prompt_file needs losses.perturbations.prompt_file.path")
            return draw_prompts(d.prompt_pool, n, generator=g)
        if self.cfg.prompts == "toy":
            from data.toy import ToyWorld

            seed = int(torch.randint(2**31 - 1, (1,), generator=g, device=g.device))
            return ToyWorld().prompts(n, seed)
        return draw_prompts(d.data.captions, n, generator=g)

    @torch.no_grad()
    def refill(self) -> None:
        d = self.d
        n = d.data.batch_size
        h, w = d.data.example_latent_hw
        te = d.teacher
        cond, uncond = te.encode_prompt(self.prompts(n), height=h * te.vae_scale_factor,
                                        width=w * te.vae_scale_factor, do_cfg=True)
        guided = self.cfg.guidance_scale > 1.0
        states, steps = teacher_trajectory_states(
            te.predict, self.scheduler, cond, uncond if guided else None, (n, te.latent_channels, h, w),
            self.cfg.num_steps, guidance_scale=self.cfg.guidance_scale, generator=d.gen, stop_at="all")
        # Shuffle the S x N states, then serve them N at a time.
        flat = states.flatten(0, 1)  # (S*N, C, h, w)
        t = steps.repeat_interleave(n)  # (S*N,)
        which = torch.arange(n, device=flat.device).repeat(len(steps))  # prompt of each state
        order = torch.randperm(flat.shape[0], generator=d.gen, device=d.gen.device).to(flat.device)
        for chunk in order.split(n):
            if len(chunk) == n:
                self.queue.append((flat[chunk], t[chunk], {k: v[which[chunk]] for k, v in cond.items()},
                                   {k: v[which[chunk]] for k, v in uncond.items()}))

    def next(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """A batch of states and their conditioning. The data's caption dropout applies here too
        (a dropped row gets the unconditional input, and so the teacher's unconditional eps as
        target): without it a data-free student never learns the branch that CFG subtracts."""
        if not self.queue:
            self.refill()
        x, t, cond, uncond = self.queue.pop()
        p = float(self.d.recipe.data.caption_dropout)
        if p > 0:
            g = self.d.gen
            drop = torch.rand(len(t), generator=g, device=g.device).to(t.device) < p
            cond = where_rows(drop, uncond, cond)
        return x, t, cond
