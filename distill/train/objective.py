"""The distillation objective: one call from a batch to the weighted per-sample loss terms.

    terms, weights, logs = objective(batch)
    L = w_eps * L_eps + w_teacher * L_teacher + w_perturb * sum_p w_p * L_perturb,p (+ w_feat * L_feat)

In the style of DiT/SiT's `transport.training_losses` and NVlabs/edm `training/loss.py`: the
objective owns everything between a batch and the terms (conditioning, noising, the frozen
teacher's and the student's forwards, every term, the perturbation parts, the trajectory term and
the end-to-end hooks); the trainer (`sitdistill.train.trainer`) weights and reduces them (`combine`), runs
backward, steps and keeps EMA. No accelerate object is needed: `autocast` is a context factory
(the accelerator's in training, none in tests).

Student and teacher see the same x_t and the same integer timestep t of the teacher's DDPM
schedule (`sitdistill.core.schedule`); every target is compared in the student's prediction type
(`target_type`). Everything random draws from one explicit `torch.Generator`, in a fixed order,
so a resumed run continues exactly.

Perturbations (SDiT): every sample of a batch is assigned to one enabled batch part
(`sitdistill.train.perturb.PERTURBATIONS`, keyed by the recipe's names), so one extra teacher+student
forward serves them all and each part's loss is logged on its own. Off-data trajectory states
(data-free) come as a batch of their own from `TrajectoryPool`, aligned too when
`trajectory.align` is on (w_feat * L_feat on them, logged as `feature/trajectory`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from omegaconf import DictConfig

from sitdistill.train.features import capture, tokens_from_map
from sitdistill.train.losses import Terms, eps_loss, feature_loss, sample_guidance_scale, teacher_loss
from sitdistill.train.perturb import PERTURBATIONS, PartContext, PerturbedBatch, load_prompt_file, where_rows
from sitdistill.train.timing import SectionTimer

Tensor = torch.Tensor


def pair_rows(a: Tensor, b: Tensor, k: int) -> Tensor:
    """CFG pairs: rows 0..k of `a`, then rows 0..k of `b` in place of a's rows k..2k, then a's rest."""
    return torch.cat([a[:k], b[:k], a[2 * k:]])


class DistillObjective:
    """`terms, weights, logs = objective(batch)`: the loss terms of one micro-batch.

    `student`: the model to train as it is called (an accelerate/DDP wrapper in training);
    `student_config` its config where the wrapper hides it. `data`: the run's `TrainData` (text
    cache, batch size, latent size, captions). `projector`: the feature projectors when
    `losses.feature` is on; `e2e`: the end-to-end stage's `EndToEnd`, or None.
    """

    def __init__(self, recipe: DictConfig, teacher, student, generator: torch.Generator, data, *,
                 projector=None, e2e=None, student_config=None, device=None,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, timer: SectionTimer | None = None):
        self.losses = lo = recipe.losses
        self.caption_dropout = recipe.data.caption_dropout
        self.accumulation = recipe.training.gradient_accumulation_steps
        self.teacher, self.schedule, self.student = teacher, teacher.schedule, student
        self.projector, self.e2e, self.data = projector, e2e, data
        self.text_cache = data.text_cache
        self.gen = generator
        self.device = device if device is not None else generator.device
        self.autocast, self.timer = autocast, timer or SectionTimer(enabled=False)
        config = student_config if student_config is not None else student.config
        # The one convention every target and prediction is compared in: the student's own.
        self.target_type = config.prediction_type
        self.guidance_embed = bool(config.guidance_embed)
        # Read from the recipe once, not every step.
        self.teacher_paths = tuple(lo.features.teacher_modules) if lo.feature else ()
        self.student_blocks = tuple(lo.features.student_blocks) if lo.feature else None
        # The teacher modules aligned on trajectory states too (`trajectory.align`), else none.
        self.trajectory_paths = self.teacher_paths if lo.perturbations.trajectory.align else ()
        self.parts = [name for name in PERTURBATIONS if lo.perturbations[name].enabled]  # batch parts on
        pp = lo.perturbations
        # The prompt file feeds the prompt_file part and/or the trajectory part (prompts=prompt_file),
        # which needs no image: a data-free run reads the file without enabling the batch part.
        wants_pool = pp.prompt_file.enabled or (pp.trajectory.enabled and pp.trajectory.prompts == "prompt_file")
        self.prompt_pool = load_prompt_file(pp.prompt_file.path) if wants_pool and pp.prompt_file.path else None
        self.trajectory = None
        if lo.perturb and pp.trajectory.enabled:
            from sitdistill.train.trajectory import TrajectoryPool

            self.trajectory = TrajectoryPool(teacher, pp.trajectory, generator, batch_size=data.batch_size,
                                             latent_hw=data.example_latent_hw, captions=data.captions,
                                             prompt_pool=self.prompt_pool, caption_dropout=self.caption_dropout,
                                             timestep_sampling=lo.timestep_sampling)

    # ------------------------------------------------------------------ the terms
    def __call__(self, batch: dict) -> tuple[dict[str, Tensor], dict[str, float], dict[str, Tensor]]:
        """The per-sample terms (N,) by name, their weights, and values logged but not optimised."""
        out = Terms()
        if self.data.needs_images:
            out.update(self.data_terms(batch))
        if self.trajectory is not None:
            out.update(self.trajectory_term())
        return out.terms, out.weights, out.logs

    def data_terms(self, batch: dict) -> Terms:
        """The terms of a data batch: eps, teacher, feature, and the batch perturbation parts."""
        lo, g, dev, sched, timer = self.losses, self.gen, self.device, self.schedule, self.timer
        e2e, out = self.e2e, Terms()
        # 1. Conditioning: the teacher's encoders; dropped captions get the unconditional input.
        with timer("conditioning"):
            captions = list(batch["caption"])
            cond, uncond = self.encode(captions, batch)
            n = len(captions)
            drop = torch.rand(n, generator=g, device=dev) < self.caption_dropout  # (N,)
            own_cond = None  # the student's own (trainable) encoders' conditioning, end-to-end stage
            if e2e is not None and e2e.text_encoders:
                own_cond, e2e_terms = e2e.conditioning(captions, drop, cond, **self.size_kwargs(batch))
                out.update(e2e_terms)
            cond = where_rows(drop, uncond, cond)
            k = n // 2 if lo.guidance_pairs else 0  # CFG pairs: rows k..2k are rows 0..k, unconditional
            if k:
                cond = {key: pair_rows(v, uncond[key], k) for key, v in cond.items()}
            s_cond = cond if own_cond is None else own_cond

        # 2. The noisy state, in the teacher's convention.
        with timer("noise"):
            x0_attached = None  # the student VAE's latents with their graph (REPA-E's path)
            if e2e is not None and e2e.vae is not None:
                # End-to-end: the student VAE's latents (stop-gradient by default) + its own losses.
                x0, x0_attached, vae_terms = e2e.latents(batch["pixel_values"].to(dev), g)
                out.update(vae_terms)
            else:
                x0 = self.latents(batch)  # (N, C, h, w)
            noise = torch.randn(x0.shape, generator=g, device=dev)
            t = sched.sample_timesteps(n, generator=g, device=dev, mode=lo.timestep_sampling)  # (N,)
            if k:  # each pair shares its clean latent (with its VAE graph), noise and timestep
                x0, noise, t = (pair_rows(v, v, k) for v in (x0, noise, t))
                if x0_attached is not None:
                    x0_attached = pair_rows(x0_attached, x0_attached, k)
            x_t = sched.add_noise(x0, noise, t)
            if x0_attached is not None:
                x_t.requires_grad_(True)  # to carry the alignment term's gradient on to the VAE

        # 3. The teacher (frozen, no grad), with its features when they are aligned.
        t_eps, t_feats, scale = None, None, None
        if lo.teacher or lo.feature:
            with timer("teacher"), capture(self.teacher.unet, self.teacher_paths) as t_feats:
                scale = self.draw_guidance(n)
                t_eps = self.teacher_eps(x_t, t, cond, uncond, scale)

        # 4. The student (on the same x_t; its own conditioning in the end-to-end stage).
        blocks = self.student_blocks
        with timer("student_forward"):
            pred = self.student_eps(x_t, t, self.with_guidance(s_cond, scale), blocks)
        s_eps, s_feats, grid = pred if blocks else (pred, None, None)

        # 5. The loss terms, one value per sample.
        if lo.eps:  # the data term: the true noise, or the true velocity for a v student
            w = sched.min_snr_weight(t, lo.min_snr_gamma, self.target_type) if lo.min_snr_gamma else None
            out.add("eps", eps_loss(s_eps, sched.target(x0, noise, t, self.target_type), w), lo.eps)
        if lo.teacher:
            out.add("teacher", teacher_loss(s_eps, t_eps, self.teacher_weight(t)), lo.teacher)
        if k:  # the guidance direction cond - uncond of each pair, student against teacher
            out.add("guidance", teacher_loss(s_eps[:k] - s_eps[k:2 * k], t_eps[:k] - t_eps[k:2 * k],
                                             self.teacher_weight(t[:k])), lo.guidance_pairs)
        if lo.feature:
            out.add("feature", self.alignment(s_feats, t_feats, grid, self.teacher_paths, n), lo.feature)
            if x0_attached is not None:  # REPA-E: this term alone trains the VAE, through x_t
                weighted = lo.feature / self.accumulation * out.terms["feature"].mean()
                e2e.feature_grad_to_vae_(weighted, x_t, x0_attached, noise, t, sched)
        if lo.perturb:
            out.update(self.perturbation_terms(captions, x_t, t, cond, own_cond, batch))
        return out

    def perturbation_terms(self, captions: list[str], x_t: Tensor, t: Tensor, cond: dict, own_cond: dict | None,
                           batch: dict) -> Terms:
        """The batch parts of the perturbation family on one extra forward: each sample gets one
        part. `own_cond`: the student's conditioning when it has its own encoders (end-to-end
        stage); new captions are then encoded on both sides and embedding noise is the same on both."""
        lo, g, out, parts = self.losses, self.gen, Terms(), self.parts
        if not parts:
            return out
        part_of = torch.randperm(x_t.shape[0], generator=g, device=self.device) % len(parts)  # (N,) balanced
        p = PerturbedBatch(x_t.clone(), t.clone(), list(captions), dict(cond),
                           dict(own_cond) if own_cond is not None else None)
        ctx = PartContext(list(captions), self.schedule, self.prompt_pool, g)
        for i, name in enumerate(parts):  # the parts on x_t, t and captions
            if not PERTURBATIONS[name].after_encoding:
                PERTURBATIONS[name].apply(p, part_of == i, lo.perturbations[name], ctx)
        if any(PERTURBATIONS[name].new_captions for name in parts):
            changed = torch.tensor([a != b for a, b in zip(p.captions, captions)], device=self.device)
            p.cond = where_rows(changed, self.encode(p.captions, batch, cached=False)[0], p.cond)
            if p.student_cond is not None:
                p.student_cond = where_rows(changed, self.e2e.encode(p.captions, **self.size_kwargs(batch)),
                                            p.student_cond)
        for i, name in enumerate(parts):  # the parts on the encoded conditioning
            if PERTURBATIONS[name].after_encoding:
                PERTURBATIONS[name].apply(p, part_of == i, lo.perturbations[name], ctx)
        with self.timer("teacher"), torch.no_grad():
            target = self.teacher_target(p.x_t, p.t, p.cond)
        with self.timer("student_forward"):
            s_cond = p.student_cond if p.student_cond is not None else p.cond
            per_sample = teacher_loss(self.student_eps(p.x_t, p.t, self.with_guidance(s_cond, None)), target,
                                      self.teacher_weight(p.t))  # (N,)
        for i, name in enumerate(parts):
            rows = part_of == i
            if rows.any():
                out.add(f"perturb/{name}", per_sample[rows], lo.perturb * lo.perturbations[name].weight)
        return out

    def trajectory_term(self) -> Terms:
        """The trajectory part: states of the teacher's own sampling, a batch of their own; with
        `trajectory.align`, the feature alignment on them too (`feature/trajectory`)."""
        lo, out = self.losses, Terms()
        with self.timer("trajectory_sampling"):
            xs, ts, cs = self.trajectory.next()
        paths = self.trajectory_paths
        blocks = self.student_blocks if paths else None
        with self.timer("teacher"), torch.no_grad(), capture(self.teacher.unet, paths) as t_feats:
            target = self.teacher_target(xs, ts, cs)
        with self.timer("student_forward"):
            pred = self.student_eps(xs, ts, self.with_guidance(cs, None), blocks)
        s_eps, s_feats, grid = pred if blocks else (pred, None, None)
        out.add("perturb/trajectory", teacher_loss(s_eps, target, self.teacher_weight(ts)),
                lo.perturb * lo.perturbations.trajectory.weight)
        if blocks:  # alignment on the teacher's own states, weighted as the data's (`losses.feature`)
            out.add("feature/trajectory", self.alignment(s_feats, t_feats, grid, paths, len(ts)), lo.feature)
        return out

    def alignment(self, s_feats: list[Tensor], t_feats: dict[str, Tensor], grid: tuple[int, int],
                  paths: tuple[str, ...], n: int) -> Tensor:
        """The feature-alignment term (N,): the student's block outputs through the projectors
        against the teacher's module outputs at `paths`, resampled onto the student's token grid. A
        guided teacher ran one batch [uncond, cond]: its last `n` rows, the conditional half, are the targets."""
        projected = self.projector(s_feats)  # one call for every block: the DDP wrapper syncs their gradients
        targets = [tokens_from_map(t_feats[p][-n:], grid) for p in paths]
        return feature_loss(projected, targets, kind=self.losses.features.kind)

    # ------------------------------------------------------------------ conditioning and latents
    def encode(self, captions: list[str], batch: dict | None = None, cached: bool = True) -> tuple[dict, dict]:
        """(cond, uncond) from the teacher's frozen text encoders, as its pipeline builds them.
        `uncond` is the pipeline's encoding of an empty negative prompt (zeros for SDXL when the
        pipeline forces them), which is also what a dropped caption becomes. Data captions come
        from the text cache when it is on; one-off prompts (perturbations) are not cached."""
        kw = self.size_kwargs(batch)
        if cached and self.text_cache is not None:
            return self.text_cache.encode(list(captions), **kw)
        cond, uncond = self.teacher.encode_prompt(list(captions), do_cfg=True, **kw)
        return cond, uncond

    def size_kwargs(self, batch: dict | None) -> dict:
        """SDXL's micro-conditioning sizes of a batch, as `encode_prompt` keywords."""
        if batch is None or self.teacher.family != "sdxl":
            return {}
        return {"original_size": batch["original_size"], "crops_coords_top_left": batch["crop_top_left"],
                "target_size": batch["target_size"]}

    def latents(self, batch: dict) -> Tensor:
        """Clean latents x0: a fresh posterior sample, from the cache or through the frozen VAE."""
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(self.device)
            std = batch["latent_std"].to(self.device)
            return mean + std * torch.randn(mean.shape, generator=self.gen, device=self.device)
        return self.teacher.encode_images(batch["pixel_values"].to(self.device), generator=self.gen)

    # ------------------------------------------------------------------ the two networks
    def teacher_target(self, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The teacher's prediction in the student's prediction type (``target_type``)."""
        return self.teacher.predict_as(x_t, t, cond, self.target_type)

    def teacher_eps(self, x_t: Tensor, t: Tensor, cond: dict, uncond: dict, scale: Tensor | None = None) -> Tensor:
        """The teacher's target in the student's prediction type: plain, or guided with the scale
        drawn per sample (`draw_guidance`, LCM-style)."""
        if scale is not None:
            return self.teacher.predict_as(x_t, t, cond, self.target_type, uncond, scale)
        return self.teacher_target(x_t, t, cond)

    def draw_guidance(self, n: int) -> Tensor | None:
        """Per-sample guidance scales (N,) of a guided-teacher target (`losses.guided_teacher`)."""
        lo = self.losses
        if not lo.guided_teacher:
            return None
        return sample_guidance_scale(n, *lo.guidance_range, generator=self.gen, device=self.device)

    def with_guidance(self, cond: dict, scale: Tensor | None) -> dict:
        """The student's conditioning plus its w input, when it has one (`student.guidance_embed`):
        the scale the teacher's target was guided with, else 1 (the unguided prediction)."""
        if not self.guidance_embed:
            return cond
        n = next(iter(cond.values())).shape[0]
        w = scale if scale is not None else torch.ones(n, device=self.device)
        return {**cond, "guidance": w}

    def teacher_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample weights of the teacher-target terms (`losses.teacher_weighting`), for an MSE in
        the student's prediction type."""
        lo = self.losses
        if lo.teacher_weighting == "none":
            return None
        return self.schedule.loss_weight(t, lo.teacher_weighting, lo.min_snr_gamma, self.target_type)

    def student_eps(self, x_t: Tensor, t: Tensor, cond: dict, blocks: list[int] | None = None):
        """The student's prediction (and, with `blocks`, those blocks' outputs and its token grid)."""
        with self.autocast():
            if blocks:
                return self.student(x_t, t, **cond, return_features=list(blocks))
            return self.student(x_t, t, **cond)
