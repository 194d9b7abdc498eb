"""The distillation trainer: a frozen teacher, a SiT student, one readable step.

    L = w_eps * L_eps + w_teacher * L_teacher + w_perturb * sum_p w_p * L_perturb,p (+ w_feat * L_feat)

`Distiller.step` reads top to bottom: batch -> conditioning -> x_t -> teacher (no grad) ->
student -> loss terms -> backward -> clip -> optimizer step -> EMA. `Distiller.fit` wraps it with
logging, checkpoints, sample grids and the run summary. Everything random in a step draws from one
explicit `torch.Generator` per process (saved in checkpoints), so a resumed run continues exactly.

Student and teacher see the same x_t and the same integer timestep t of the teacher's DDPM
schedule (`distill.schedule`); the student predicts epsilon, like the teacher adapter returns.

Perturbations (SDiT): every sample of a batch is assigned to one enabled part of the family, so
one extra teacher+student forward serves all parts and each part's loss is logged on its own.
Off-data trajectory states (data-free) come as a separate batch from `TrajectoryPool`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distill import checkpoint as ckpt
from distill.build import (build_lr_scheduler, build_optimizer, build_student_from_recipe, check_names,
                           load_teacher_from_recipe)
from distill.e2e import EndToEnd, check_recipe as check_e2e_recipe, resolve_init
from distill.ema import EMA, local
from distill.features import FeatureProjector, FeatureProjectors, capture, tokens_from_map
from distill.losses import combine, eps_loss, feature_loss, sample_guidance_scale, teacher_loss
from distill.perturb import (BATCH_PARTS, draw_prompts, input_noise_scale, jitter_timesteps, load_prompt_file,
                             perturb_embeddings, perturb_input, recombine_captions, where_rows)
from data.pipeline import DataExhausted
from distill.recipe import RecipeError, save_recipe, to_yaml
from distill.sharding import GatheredModel, GatheredOptimizer, all_finite, check_fsdp, full, shard_model
from distill.timing import SectionTimer

CAPTION_PARTS = ("caption_mix", "prompt_file")  # perturbation parts that re-encode prompts


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many non-finite steps in a row)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` consumed on this rank (data position)
    bad_steps: int = 0  # non-finite steps skipped in total
    bad_in_row: int = 0


def _cond_rows(cond: dict, rows: torch.Tensor) -> dict:
    return {k: v[rows] for k, v in cond.items()}


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of plain (unsharded) gradients, as a 0-d float32 tensor on their device. On
    the CPU a BLAS dot product per tensor (about 1.5x faster than torch's per-tensor norms)."""
    if grads[0].device.type == "cpu":
        return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)).float() for g in grads]).sum().sqrt()
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def clip_gradients(accelerator, params: list[torch.Tensor], max_norm: float,
                   fold: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip the gradients' global L2 norm to `max_norm` (torch's rule: scale by
    max_norm / (norm + 1e-6) when that is below 1); returns (norm before clipping, divisor).

    `fold=True` (a fused optimizer, see `step_optimizer`) leaves the gradients alone and returns the
    divisor for the optimizer to apply inside its fused kernel: the same clipping without a pass of
    its own over every gradient, and without a host sync. Otherwise the gradients are scaled here
    and the divisor is None; sharded (FSDP) gradients go through torch's `clip_grad_norm_`.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or any(local(g) is not g for g in grads):
        return full(accelerator.clip_grad_norm_(params, max_norm)), None
    accelerator.unscale_gradients()
    norm = grad_norm(grads)
    divisor = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    if fold:
        return norm, divisor
    torch._foreach_mul_(grads, 1.0 / divisor)
    return norm, None


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's `AcceleratedOptimizer` wrapper (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def foldable(optimizer, accelerator) -> bool:
    """Whether clipping can be folded into the optimizer step: a fused torch optimizer (which
    divides the gradients by its `grad_scale` inside the kernel, the protocol torch's GradScaler
    uses) and no fp16 loss scaler of accelerate's that would set it too."""
    inner = torch_optimizer(optimizer)
    return (bool(inner.defaults.get("fused")) and getattr(inner, "_step_supports_amp_scaling", False)
            and getattr(accelerator, "scaler", None) is None)


def step_optimizer(optimizer, divisor: torch.Tensor | None) -> None:
    """`optimizer.step()`, with the gradients divided by `divisor` inside a fused kernel."""
    if divisor is None:
        optimizer.step()
        return
    inner = torch_optimizer(optimizer)
    inner.grad_scale = divisor
    try:
        optimizer.step()
    finally:
        del inner.grad_scale


class Distiller:
    """Everything a run holds; `fit()` trains, `step()` is one micro-batch."""

    def __init__(self, recipe: DictConfig, accelerator=None, teacher=None, student=None):
        """`teacher`: an already loaded teacher instead of the recipe's (notebooks, benchmarks).
        `student`: an already built student, what `build_student_from_recipe(recipe.student,
        teacher)` returns, e.g. built on the GPU directly (`cli.py bench --gpu`: seconds instead of
        a CPU init of billions of weights)."""
        from accelerate import Accelerator

        from data.pipeline import build_train_data

        self.recipe = r = recipe
        t = r.training
        self.accelerator = accelerator or Accelerator(
            mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        self.device = acc.device
        self.run_dir = Path(r.output.dir)
        self.log = acc.print
        self.fsdp = check_fsdp(r, acc)

        # Frozen teacher; the student is built to take its conditioning sizes.
        check_names(r)
        if teacher is None:  # (a caller that brings its own teacher may use a placeholder source)
            from distill.validate import validate_recipe

            validate_recipe(r)
        torch.manual_seed(t.seed)  # the student's init is the same on every rank
        self.teacher = teacher if teacher is not None else load_teacher_from_recipe(r.teacher, self.device)
        self.schedule = self.teacher.schedule
        self.data = build_train_data(r, self.teacher, rank=acc.process_index, world_size=acc.num_processes)
        self.text_cache = self.data.text_cache
        for note in self.data.notes:
            self.log(note)
        student = student if student is not None else build_student_from_recipe(r.student, self.teacher)
        # The one convention every target and prediction is compared in: the student's own.
        self.target_type = student.config.prediction_type
        self.guidance_embed = bool(student.config.guidance_embed)
        self.check_conflicts(student)
        # End-to-end stage: trainable student-side copies of the VAE / text encoders (distill.e2e).
        self.e2e = EndToEnd(r, self.teacher) if t.train_vae or t.train_text_encoder else None
        if self.e2e is not None:
            self.log(self.e2e.describe())

        self.projector = None
        if r.losses.feature:
            f = r.losses.features
            if len(f.student_blocks) != len(f.teacher_modules) or not f.student_blocks:
                raise ValueError("losses.features: student_blocks and teacher_modules need the same non-zero length")
            dims = self.teacher_feature_dims(list(f.teacher_modules))
            self.projector = FeatureProjectors(
                FeatureProjector(student.config.hidden_size, d, f.projector_hidden) for d in dims)

        self.total_steps = self.planned_steps()
        # The shadow goes where the student will train (accelerate moves the student only later),
        # or to the CPU. FSDP: copied from the whole student, then both are sharded (distill.sharding).
        ema_device = None if self.fsdp else ("cpu" if t.ema_on_cpu else self.device)
        self.ema = EMA(student, decay=t.ema_decay, device=ema_device) if t.use_ema else None
        if self.fsdp:
            shard_model(student, self.device, t.mixed_precision)
            if self.ema is not None:
                shard_model(self.ema.model, self.device, offload=t.ema_on_cpu)
            for proj in self.projector or []:
                shard_model(proj, self.device, t.mixed_precision)
        params = [{"params": [p for p in student.parameters() if p.requires_grad]}]
        if self.projector is not None:
            params.append({"params": list(self.projector.parameters())})
        if self.e2e is not None:
            params += self.e2e.param_groups(r.optimizer)  # their own learning rates
        self.optimizer = build_optimizer(params, r.optimizer, self.device)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, r.optimizer, self.total_steps)
        if self.fsdp:  # sharded above; accelerate only wraps the optimizer
            self.optimizer = acc.prepare(self.optimizer)
        elif self.projector is not None:
            student, self.projector, self.optimizer = acc.prepare(student, self.projector, self.optimizer)
        else:
            student, self.optimizer = acc.prepare(student, self.optimizer)
        self.student = student
        self.fold_clip = not self.fsdp and foldable(self.optimizer, acc)  # clipping inside the fused AdamW
        # Every parameter the optimizer updates (student, projectors, student-side encoders): clipped together.
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        # One generator per process for every random draw of the step (noise, t, dropout, parts).
        self.gen = torch.Generator(self.device).manual_seed(t.seed * 1_000_003 + acc.process_index)
        self.state = TrainState()
        self.timer = SectionTimer(enabled=False, device=self.device)  # `cli.py bench` turns it on
        pp = r.losses.perturbations
        # The prompt file feeds the prompt_file part and/or the trajectory part (prompts=prompt_file),
        # which needs no image: a data-free run reads the file without enabling the batch part.
        wants_pool = pp.prompt_file.enabled or (pp.trajectory.enabled and pp.trajectory.prompts == "prompt_file")
        self.prompt_pool = load_prompt_file(pp.prompt_file.path) if wants_pool and pp.prompt_file.path else None
        self.trajectory = None
        if r.losses.perturb and r.losses.perturbations.trajectory.enabled:
            from distill.trajectory import TrajectoryPool

            self.trajectory = TrajectoryPool(self, r.losses.perturbations.trajectory)
        self._uncond_cache: dict = {}

    # ------------------------------------------------------------------ set-up helpers
    def planned_steps(self) -> int | None:
        t = self.recipe.training
        if t.max_steps is not None:
            return int(t.max_steps)
        if t.num_epochs is None:
            raise ValueError("training: set max_steps or num_epochs")
        return t.num_epochs * math.ceil(self.data.batches_per_epoch / t.gradient_accumulation_steps)

    def check_conflicts(self, student) -> None:
        r = self.recipe
        check_e2e_recipe(r, self.data.needs_images)
        if r.losses.perturbations.prompt_file.enabled and not r.losses.perturbations.prompt_file.path:
            raise ValueError("losses.perturbations.prompt_file.enabled needs losses.perturbations.prompt_file.path")
        if r.losses.guided_teacher and not student.config.guidance_embed:
            self.log("warning: losses.guided_teacher without student.guidance_embed: the student learns the "
                     "teacher's guided prediction at the mean scale; sample it with guidance 1 (classifier-free "
                     "guidance on top would guide twice), or set student.guidance_embed")

    @torch.no_grad()
    def teacher_feature_dims(self, paths: list[str]) -> list[int]:
        """Channels of the chosen teacher UNet outputs, from one tiny forward."""
        te = self.teacher
        h, w = self.data.example_latent_hw
        x = torch.zeros(1, te.latent_channels, h, w, device=self.device)
        cond = te.encode_prompt([""], height=h * te.vae_scale_factor, width=w * te.vae_scale_factor)
        with capture(te.unet, paths) as feats:
            te.predict_eps(x, torch.tensor([500], device=self.device), cond)
        return [int(feats[p].shape[1]) for p in paths]

    # ------------------------------------------------------------------ conditioning
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

    def latents(self, batch: dict) -> torch.Tensor:
        """Clean latents x0: a fresh posterior sample, from the cache or through the frozen VAE."""
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(self.device)
            std = batch["latent_std"].to(self.device)
            return mean + std * torch.randn(mean.shape, generator=self.gen, device=self.device)
        return self.teacher.encode_images(batch["pixel_values"].to(self.device), generator=self.gen)

    def teacher_eps(self, x_t, t, cond, uncond, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's target in the student's prediction type: plain, or guided with the scale
        drawn per sample (`draw_guidance`, LCM-style)."""
        if scale is not None:
            return self.teacher.predict_as(x_t, t, cond, self.target_type, uncond, scale)
        return self.teacher_target(x_t, t, cond)

    def draw_guidance(self, n: int) -> torch.Tensor | None:
        """Per-sample guidance scales (N,) of a guided-teacher target (`losses.guided_teacher`)."""
        lo = self.recipe.losses
        if not lo.guided_teacher:
            return None
        return sample_guidance_scale(n, *lo.guidance_range, generator=self.gen, device=self.device)

    def with_guidance(self, cond: dict, scale: torch.Tensor | None) -> dict:
        """The student's conditioning plus its w input, when it has one (`student.guidance_embed`):
        the scale the teacher's target was guided with, else 1 (the unguided prediction)."""
        if not self.guidance_embed:
            return cond
        n = next(iter(cond.values())).shape[0]
        w = scale if scale is not None else torch.ones(n, device=self.device)
        return {**cond, "guidance": w}

    def teacher_target(self, x_t, t, cond) -> torch.Tensor:
        """The teacher's prediction in the student's prediction type (``target_type``)."""
        return self.teacher.predict_as(x_t, t, cond, self.target_type)

    def teacher_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights of the teacher-target terms (`losses.teacher_weighting`), for an MSE in
        the student's prediction type."""
        lo = self.recipe.losses
        if lo.teacher_weighting == "none":
            return None
        return self.schedule.loss_weight(t, lo.teacher_weighting, lo.min_snr_gamma, self.target_type)

    def student_eps(self, x_t, t, cond, blocks=None):
        with self.accelerator.autocast():
            if blocks:
                return self.student(x_t, t, **cond, return_features=list(blocks))
            return self.student(x_t, t, **cond)

    # ------------------------------------------------------------------ the step
    def step(self, batch: dict) -> dict[str, float]:
        """One micro-batch: forward, loss, backward; the optimizer steps at accumulation ends."""
        r, lo, g, dev = self.recipe, self.recipe.losses, self.gen, self.device
        sched, timer = self.schedule, self.timer
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        extra: dict[str, torch.Tensor] = {}  # logged, not optimised
        x_t = t = cond = s_cond = None
        e2e = self.e2e

        if self.data.needs_images:
            # 1. Conditioning: the teacher's encoders; dropped captions get the unconditional input.
            with timer("conditioning"):
                captions = list(batch["caption"])
                cond, uncond = self.encode(captions, batch)
                n = len(captions)
                drop = torch.rand(n, generator=g, device=dev) < r.data.caption_dropout  # (N,)
                if e2e is not None and e2e.text_encoders:
                    # End-to-end: the student reads its own trainable encoders (with grad).
                    s_cond = e2e.conditioning(captions, drop, cond, terms, weights, extra, **self.size_kwargs(batch))
                cond = where_rows(drop, uncond, cond)
                s_cond = cond if s_cond is None else s_cond

            # 2. The noisy state, in the teacher's convention.
            with timer("noise"):
                if e2e is not None and e2e.vae is not None:
                    # End-to-end: the student VAE's latents (stop-gradient by default) + its own losses.
                    x0 = e2e.latents(batch["pixel_values"].to(dev), g, terms, weights)
                else:
                    x0 = self.latents(batch)  # (N, C, h, w)
                noise = torch.randn(x0.shape, generator=g, device=dev)
                t = sched.sample_timesteps(n, generator=g, device=dev, mode=lo.timestep_sampling)  # (N,)
                x_t = sched.add_noise(x0, noise, t)
                repa_to_vae = e2e is not None and e2e.x0_attached is not None
                if repa_to_vae:
                    x_t.requires_grad_(True)  # to carry the alignment term's gradient on to the VAE

            # 3. The teacher (frozen, no grad), with its features when they are aligned.
            t_eps, t_feats, scale = None, None, None
            if lo.teacher or lo.feature:
                paths = list(lo.features.teacher_modules) if lo.feature else []
                with timer("teacher"), capture(self.teacher.unet, paths) as t_feats:
                    scale = self.draw_guidance(n)
                    t_eps = self.teacher_eps(x_t, t, cond, uncond, scale)

            # 4. The student (on the same x_t; its own conditioning in the end-to-end stage).
            blocks = list(lo.features.student_blocks) if lo.feature else None
            with timer("student_forward"):
                out = self.student_eps(x_t, t, self.with_guidance(s_cond, scale), blocks)
            s_eps, s_feats, grid = out if blocks else (out, None, None)

            # 5. The loss terms, one value per sample.
            if lo.eps:  # the data term: the true noise, or the true velocity for a v student
                w = sched.min_snr_weight(t, lo.min_snr_gamma, self.target_type) if lo.min_snr_gamma else None
                target = sched.target(x0, noise, t, self.target_type)
                terms["eps"], weights["eps"] = eps_loss(s_eps, target, w), lo.eps
            if lo.teacher:
                terms["teacher"], weights["teacher"] = teacher_loss(s_eps, t_eps, self.teacher_weight(t)), lo.teacher
            if lo.feature:
                projected = self.projector(s_feats)  # one call: the DDP wrapper syncs their gradients
                # A guided teacher ran one batch [uncond, cond]: align to the conditional half.
                targets = [tokens_from_map(t_feats[p][-n:], grid) for p in lo.features.teacher_modules]
                terms["feature"] = feature_loss(projected, targets, kind=lo.features.kind)
                weights["feature"] = lo.feature
                if repa_to_vae:  # REPA-E: this term alone trains the VAE, through x_t
                    scale = lo.feature / r.training.gradient_accumulation_steps
                    e2e.feature_grad_to_vae_(scale * terms["feature"].mean(), x_t, noise, t, sched)
            if lo.perturb:
                self.perturbation_terms(captions, x_t, t, cond, batch, terms, weights, s_cond)
        if self.trajectory is not None:
            with timer("trajectory_sampling"):
                xs, ts, cs = self.trajectory.next()
            with timer("teacher"), torch.no_grad():
                target = self.teacher_target(xs, ts, cs)
            with timer("student_forward"):
                terms["perturb/trajectory"] = teacher_loss(self.student_eps(xs, ts, self.with_guidance(cs, None)), target,
                                                           self.teacher_weight(ts))
            weights["perturb/trajectory"] = lo.perturb * lo.perturbations.trajectory.weight

        loss, logs = combine(terms, weights)

        # 6. Backward, NaN/inf guard, clip, step, EMA.
        acc = self.accelerator
        finite = torch.isfinite(loss.detach()).float()
        if acc.num_processes > 1:  # every rank must agree, or one would wait in backward forever
            finite = acc.reduce(finite, reduction="sum") / acc.num_processes
        if finite.item() < 1.0:
            self.optimizer.zero_grad(set_to_none=True)
            return self.bad_step(logs)
        if self.fsdp:  # accumulate unreduced gradients; reduce-scatter on the last micro-batch only
            for model in (self.student, *(self.projector or [])):
                model.set_requires_gradient_sync(acc.sync_gradients)
        with timer("backward"):
            acc.backward(loss)
        if acc.sync_gradients:
            if e2e is not None:
                e2e.sync_gradients(acc)
            with timer("optimizer"):
                norm, divisor = clip_gradients(acc, self.trainable, r.training.max_grad_norm, fold=self.fold_clip)
                if not torch.isfinite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    return self.bad_step(logs)
                step_optimizer(self.optimizer, divisor)
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            with timer("ema"):
                if self.ema is not None:
                    self.ema.update(acc.unwrap_model(self.student), self.state.step)
            self.state.step += 1
            self.state.bad_in_row = 0
            logs["grad_norm"] = norm.detach()
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        logs.update(extra)
        return {k: float(v) for k, v in logs.items()}

    def last_checkpoint_note(self) -> str:
        latest = ckpt.find_latest(self.run_dir)
        return f"the last checkpoint, {latest}, is intact" if latest is not None else "no checkpoint was written yet"

    def bad_step(self, logs: dict) -> dict[str, float]:
        self.state.bad_steps += 1
        self.state.bad_in_row += 1
        self.log(f"non-finite loss or gradient at step {self.state.step}: skipped "
                 f"({self.state.bad_in_row} in a row, {self.state.bad_steps} in total)")
        if self.state.bad_in_row >= self.recipe.training.max_bad_steps:
            raise TrainingStopped(f"{self.state.bad_in_row} non-finite steps in a row "
                                  f"(training.max_bad_steps={self.recipe.training.max_bad_steps}); "
                                  + self.last_checkpoint_note())
        return {"bad_step": 1.0}

    def perturbation_terms(self, captions, x_t, t, cond, batch, terms, weights, s_cond=None) -> None:
        """(a, b, d) of the perturbation family on one extra forward: each sample gets one part.
        `s_cond`: the student's conditioning when it has its own encoders (end-to-end stage); new
        captions are then encoded on both sides and embedding noise is the same on both."""
        lo, g, dev = self.recipe.losses, self.gen, self.device
        parts = [p for p in BATCH_PARTS if lo.perturbations[p].enabled]
        if not parts:
            return
        n = x_t.shape[0]
        part_of = torch.randperm(n, generator=g, device=dev) % len(parts)  # (N,) balanced assignment
        x_p, t_p, cond_p = x_t.clone(), t.clone(), dict(cond)
        own = s_cond is not None and s_cond is not cond
        s_p = dict(s_cond) if own else None
        new_captions = list(captions)
        for i, part in enumerate(parts):
            rows = part_of == i
            cfg = lo.perturbations[part]
            if part == "input_noise":  # DDPM-IP: gamma times the noise level of each sample's t
                scale = input_noise_scale(self.schedule.alphas_cumprod, t[rows], cfg.gamma)
                x_p[rows] = perturb_input(x_t[rows], scale, generator=g)
            elif part == "timestep_jitter":
                t_p[rows] = jitter_timesteps(t[rows], cfg.max_delta, self.schedule.num_train_timesteps, generator=g)
            elif part == "caption_mix":
                mixed = recombine_captions(captions, generator=g)
                new_captions = [m if rows[j] else c for j, (m, c) in enumerate(zip(mixed, new_captions))]
            elif part == "prompt_file":
                drawn = iter(draw_prompts(self.prompt_pool, int(rows.sum()), generator=g))
                new_captions = [next(drawn) if rows[j] else c for j, c in enumerate(new_captions)]
        if any(p in parts for p in CAPTION_PARTS):
            changed = torch.tensor([a != b for a, b in zip(new_captions, captions)], device=dev)
            cond_new, _ = self.encode(new_captions, batch, cached=False)
            cond_p = where_rows(changed, cond_new, cond_p)
            if own:
                s_p = where_rows(changed, self.e2e.encode(new_captions, **self.size_kwargs(batch)), s_p)
        if "embedding_noise" in parts:
            rows = part_of == parts.index("embedding_noise")
            noisy = perturb_embeddings(cond_p, lo.perturbations.embedding_noise.sigma, generator=g)
            if own:
                s_p = where_rows(rows, {k: s_p[k] + (noisy[k] - cond_p[k]) for k in s_p}, s_p)
            cond_p = where_rows(rows, noisy, cond_p)
        with self.timer("teacher"), torch.no_grad():
            target = self.teacher_target(x_p, t_p, cond_p)
        with self.timer("student_forward"):
            per_sample = teacher_loss(self.student_eps(x_p, t_p, self.with_guidance(s_p if own else cond_p, None)),
                                      target, self.teacher_weight(t_p))  # (N,)
        for i, part in enumerate(parts):
            rows = part_of == i
            if rows.any():
                terms[f"perturb/{part}"] = per_sample[rows]
                weights[f"perturb/{part}"] = lo.perturb * lo.perturbations[part].weight

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        acc, r = self.accelerator, self.recipe
        resumed = self.maybe_resume()
        if acc.is_main_process:
            save_recipe(r, self.run_dir / "recipe.yaml")
        writer = self.tensorboard()
        try:
            probe = self.probe_batch()
        except DataExhausted as e:
            raise TrainingStopped(f"{e}; {self.last_checkpoint_note()}") from None
        before = self.agreement(probe) if not resumed else self.resumed_before
        self.before = before
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc="distil", dynamic_ncols=True)
        samples, t0, window = 0, time.perf_counter(), []
        try:
            while self.state.step < self.total_steps:
                for batch in self.data.epoch_batches(self.state.epoch, self.state.batch_in_epoch):
                    self.state.batch_in_epoch += 1
                    with acc.accumulate(self.student):
                        logs = self.step(batch)
                    samples += self.data.batch_size * acc.num_processes
                    if not acc.sync_gradients or "bad_step" in logs:
                        continue
                    window.append(logs)
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss/total']:.4f}")
                    step = self.state.step
                    if writer is not None and step % r.training.log_every == 0:
                        elapsed = time.perf_counter() - t0
                        self.write_scalars(writer, window, step, samples / max(elapsed, 1e-9))
                        window, samples, t0 = [], 0, time.perf_counter()
                    if r.training.sample_every and step % r.training.sample_every == 0:
                        self.sample_grid(step, writer)
                    if step % r.training.checkpoint_every == 0 or step >= self.total_steps:
                        self.save()
                    if step >= self.total_steps:
                        break
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
        except DataExhausted as e:
            raise TrainingStopped(f"{e}; {self.last_checkpoint_note()}") from None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        after = self.agreement(probe)
        summary = self.summarize(before, after, self.final_fidelity())
        return summary

    # ------------------------------------------------------------------ run helpers
    def tensorboard(self):
        if not (self.accelerator.is_main_process and self.recipe.output.tensorboard):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "logs"))

    def write_scalars(self, writer, window: list[dict], step: int, samples_per_s: float) -> None:
        keys = sorted({k for logs in window for k in logs})
        for k in keys:
            values = [logs[k] for logs in window if k in logs]
            writer.add_scalar(k, sum(values) / len(values), step)
        writer.add_scalar("samples_per_s", samples_per_s, step)
        writer.add_scalar("bad_steps", self.state.bad_steps, step)

    def checkpoint_models(self) -> dict[str, Any]:
        """Everything saved as a model folder: student, EMA, projectors, student-side VAE/encoders."""
        acc = self.accelerator
        models = {"student": acc.unwrap_model(self.student)}
        if self.ema is not None:
            models["ema"] = self.ema.model
        if self.projector is not None:
            for i, proj in enumerate(acc.unwrap_model(self.projector)):
                models[f"projector_{i}"] = proj
        if self.e2e is not None:
            models.update(self.e2e.checkpoint_models())
        if self.fsdp:  # sharded: saved and loaded through full (gathered) weights
            models = {name: GatheredModel(m) for name, m in models.items()}
        return models

    def checkpoint_optimizer(self):
        """The optimizer as the checkpoint sees it (under FSDP: full state keyed by parameter name)."""
        if not self.fsdp:
            return self.optimizer
        owners = {"student": self.student, **{f"projector_{i}": p for i, p in enumerate(self.projector or [])}}
        return GatheredOptimizer(torch.nn.ModuleDict(owners), torch_optimizer(self.optimizer))

    def save(self) -> Path | None:
        acc = self.accelerator
        student = acc.unwrap_model(self.student)
        if not all_finite(student) or (self.e2e and not self.e2e.all_finite()):
            raise TrainingStopped("non-finite student weights: not saved; " + self.last_checkpoint_note())
        models = self.checkpoint_models()
        optimizer = self.checkpoint_optimizer()
        if self.fsdp:  # every process takes part in the gathers; the main process writes
            for part in (*models.values(), optimizer):
                part.gather()
        rng = ckpt.capture_rng_state({"train": self.gen})
        rng_states = acc.gather_for_metrics([rng], use_gather_object=True) if acc.num_processes > 1 else [rng]
        state = asdict(self.state)
        state["sampler"] = self.data.sampler_state(self.state.epoch, self.state.batch_in_epoch)
        state["fsdp"] = self.fsdp  # the optimizer file's layout
        state["agreement_before"] = getattr(self, "before", None)  # summary.json's "before" after a resume
        path = ckpt.save_checkpoint(
            self.run_dir, self.state.step, models=models, optimizer=optimizer, lr_scheduler=self.lr_scheduler,
            train_state=state, recipe_yaml=to_yaml(self.recipe), rng_states=rng_states,
            keep_last=self.recipe.training.keep_checkpoints, is_main_process=acc.is_main_process,
        )
        acc.wait_for_everyone()
        return path

    def maybe_resume(self) -> bool:
        """Resume from `training.resume`. With "latest", a checkpoint that fails to load is moved
        aside (never deleted) and the next older one is tried; when none loads, RecipeError."""
        self.resumed_before = None
        resume = self.recipe.training.resume
        path = ckpt.resolve_resume(self.run_dir, resume)
        if path is None:
            if self.recipe.training.init_from:
                self.init_from(self.recipe.training.init_from)
            return False
        fallback = str(resume) == "latest"
        failures = []
        wanted = self.optimizer_settings()  # the recipe's, before any checkpoint's are loaded
        while path is not None:
            try:
                self.load_resume(path, wanted)
                break
            except ckpt.CheckpointIncompatible as e:
                raise RecipeError(f"'training.resume': {path} is intact but does not fit this run's models ({e}); "
                                  "resume with the recipe it was trained with") from None
            except ckpt.CheckpointDamaged as e:
                if not fallback:
                    raise RecipeError(f"'training.resume': {path} cannot be loaded: {e}") from None
                failures.append(f"{path.name}: {e}")
                self.log(f"checkpoint {path} cannot be loaded ({e}); moving it aside and trying the one before")
                if self.accelerator.is_main_process:
                    ckpt.move_aside(path)
                self.accelerator.wait_for_everyone()
                path = ckpt.find_latest(self.run_dir)
        else:
            raise RecipeError("'training.resume' is latest, and no checkpoint in " f"{self.run_dir} loads: "
                              + "; ".join(failures))
        self.log(f"resumed from {path} at step {self.state.step}")
        return True

    def load_resume(self, path: Path, wanted: list[dict]) -> None:
        """Restore everything from one checkpoint; then the recipe's optimizer settings (`wanted`) apply."""
        acc = self.accelerator
        try:
            saved = json.loads((path / ckpt.TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ckpt.CheckpointDamaged(f"{path / ckpt.TRAIN_STATE_FILE}: {e}") from None
        if saved.get("fsdp", False) != self.fsdp:
            raise RecipeError(f"'training.fsdp' is {self.fsdp} but {path} was saved with {saved.get('fsdp', False)}; "
                              "resume it with the same setting")
        self.check_student_config(path)
        state = ckpt.load_checkpoint(path, models=self.checkpoint_models(), optimizer=self.checkpoint_optimizer(),
                                     lr_scheduler=self.lr_scheduler, generators={"train": self.gen},
                                     rank=acc.process_index)
        sampler = state.pop("sampler", None)
        self.resumed_before = state.get("agreement_before")
        self.state = TrainState(**{k: state[k] for k in asdict(TrainState()) if k in state})
        if sampler is not None:
            self.data.load_sampler_state(sampler)
        self.apply_optimizer_settings(wanted)

    def check_student_config(self, path: Path) -> None:
        """The checkpoint's student was built like this one (shape, conditioning widths, time input):
        RecipeError naming the first config key that differs, before any weight is loaded."""
        from students import SiT

        try:
            saved = dict(SiT.load_config(path / "student"))
        except (OSError, ValueError):
            return  # a missing or damaged config: the loading step reports it
        ours = dict(self.accelerator.unwrap_model(self.student).config)
        defaults = {"time_input": "ddpm", "guidance_embed": False, "text_pool": False, "noise_schedule": None}
        for key, value in ours.items():
            if key.startswith("_") or key == "noise_schedule":
                continue
            old = saved.get(key, defaults.get(key, value))
            if old != value:
                hint = " (student.init_kind=dit keeps DDPM time)" if key == "time_input" else ""
                raise RecipeError(f"'training.resume': {path} holds a student with {key}={old!r}, this run builds "
                                  f"{key}={value!r}{hint}; resume with the recipe it was trained with")

    def optimizer_settings(self) -> list[dict]:
        """Per parameter group: the recipe's peak lr, betas, weight decay and eps (as built)."""
        return [{"lr": g.get("initial_lr", g["lr"]), "betas": tuple(g["betas"]), "weight_decay": g["weight_decay"],
                 "eps": g["eps"]} for g in torch_optimizer(self.optimizer).param_groups]

    def apply_optimizer_settings(self, wanted: list[dict]) -> None:
        """After a resume: the recipe's optimizer settings replace the checkpoint's, with a notice.
        The LR schedule keeps its step; its peak becomes the recipe's lr."""
        groups = torch_optimizer(self.optimizer).param_groups
        sched = self.lr_scheduler
        changes = []
        for i, (g, w) in enumerate(zip(groups, wanted)):
            name = "" if len(groups) == 1 else f" (group {i})"
            for key in ("betas", "weight_decay", "eps"):
                old = tuple(g[key]) if key == "betas" else g[key]
                if old != w[key]:
                    changes.append(f"{key}{name} {old} -> {w[key]}")
                    g[key] = w[key]
            old_lr = float(sched.base_lrs[i])
            if old_lr != float(w["lr"]):
                changes.append(f"lr{name} {old_lr:g} -> {float(w['lr']):g}")
                sched.base_lrs[i] = g["initial_lr"] = float(w["lr"])
                lr = float(w["lr"]) * sched.lr_lambdas[i](sched.last_epoch)
                if torch.is_tensor(g["lr"]):  # torchao's 8-bit AdamW keeps lr as a tensor, updated in place
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
        if changes:
            sched._last_lr = [g["lr"] for g in groups]
            self.log("resume: the recipe's optimizer settings replace the checkpoint's: " + ", ".join(changes))

    def init_from(self, source: str) -> None:
        """A new stage from an earlier run's checkpoint: weights only (the student, and the EMA,
        projectors and student-side parts it holds; the EMA starts from the student if it has
        none). Optimizer, LR schedule, step, data position and RNG start fresh."""
        path = resolve_init(source)
        loaded = []
        for name, model in self.checkpoint_models().items():
            if (path / name).is_dir():
                ckpt.load_model_folder(model, path / name)
                loaded.append(name)
            elif name == "student":
                raise FileNotFoundError(f"training.init_from: {path} holds no student folder")
        if self.ema is not None and "ema" not in loaded:
            self.ema.model.load_state_dict(self.accelerator.unwrap_model(self.student).state_dict())
        self.log(f"initialised from {path} ({', '.join(loaded)}); a new stage starts at step 0")

    # ------------------------------------------------------------------ agreement probe, samples, summary
    @torch.no_grad()
    def probe_batch(self) -> dict | None:
        """A fixed set of (x_t, t, cond) with the teacher's eps, from the first data batch and a
        generator of its own: the same every time, so 'closer to the teacher' is measured on
        identical inputs before and after."""
        if not self.data.needs_images:
            return None
        batch = next(iter(self.data.epoch_batches(0, 0)))
        g = torch.Generator(self.device).manual_seed(12345)
        cond, _ = self.encode(list(batch["caption"]), batch)
        if "latent_mean" in batch:
            x0 = batch["latent_mean"].to(self.device)
        else:
            x0 = self.teacher.encode_images(batch["pixel_values"].to(self.device), sample=False)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        n = x0.shape[0]
        t = torch.linspace(50, self.schedule.num_train_timesteps - 50, n, device=self.device).long()
        x_t = self.schedule.add_noise(x0, noise, t)
        return {"x_t": x_t, "t": t, "cond": cond, "eps": self.teacher_target(x_t, t, cond),
                "captions": list(batch["caption"]), "sizes": self.size_kwargs(batch)}

    @torch.no_grad()
    def agreement(self, probe: dict | None) -> dict[str, float] | None:
        """MSE between student and teacher eps on the probe (raw weights, and EMA)."""
        if probe is None:
            return None
        student = self.accelerator.unwrap_model(self.student)
        was_training = student.training
        student.eval()
        cond = probe["cond"]  # the student's conditioning: its own encoders' in the end-to-end stage
        if self.e2e is not None and self.e2e.text_encoders:
            cond = self.e2e.encode(probe["captions"], **probe["sizes"])
        out = {"teacher_mse": float(teacher_loss(student(probe["x_t"], probe["t"], **cond).float(),
                                                 probe["eps"]).mean())}
        if self.ema is not None:
            ema = self.ema.model
            # (a sharded EMA computes on the accelerator even when its shard is kept on the CPU)
            dev = self.device if self.fsdp else next(ema.parameters()).device
            xs = {k: v.to(dev) for k, v in probe.items() if torch.is_tensor(v)}
            cond = {k: v.to(xs["x_t"].device) for k, v in cond.items()}
            out["teacher_mse_ema"] = float(teacher_loss(ema(xs["x_t"], xs["t"], **cond).float(), xs["eps"]).mean())
        student.train(was_training)
        return out

    def sample_grid(self, step: int, writer) -> None:
        from distill.samples import teacher_student_grid

        model = self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.student)
        if self.fsdp:  # every process gathers; the main process draws with a plain copy
            model = GatheredModel(model).gather().unsharded()
            model = model.to(self.device) if model is not None else None
        if not self.accelerator.is_main_process:
            return
        side = self.e2e.side if self.e2e is not None else None  # the student's own encoders + VAE
        grid = teacher_student_grid(self.teacher, model, self.recipe, self.data.example_pixel_hw, student_side=side)
        out = self.run_dir / "samples" / f"step-{step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        if writer is not None:
            import numpy as np

            writer.add_image("samples/teacher_student", np.asarray(grid), step, dataformats="HWC")

    @torch.no_grad()
    def final_fidelity(self) -> dict[str, Any] | None:
        """Toy-world runs with `evaluation.at_end`: the toy grader's rates for the teacher and the
        student (EMA) on held-out prompts, same sampler, guidance and seeds; None otherwise."""
        r = self.recipe
        n = int(r.evaluation.at_end)
        # (sharded: a gathered copy would be needed; `cli.py eval` grades a sharded run's checkpoint)
        if not n or r.data.root is not None or self.fsdp or not self.accelerator.is_main_process:
            return None
        from distill.evaluate import toy_fidelity, toy_prompts
        from distill.samples import student_fn
        from distill.sampling import teacher_denoiser

        model = self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.student)
        was_training = model.training
        model.eval()
        s = r.sampling
        t0 = time.perf_counter()
        try:
            rates = toy_fidelity(self.teacher, {"teacher": teacher_denoiser(self.teacher), "student": student_fn(model)},
                                 toy_prompts(r, n), scheduler=s.scheduler, steps=s.num_inference_steps,
                                 guidance_scale=s.guidance_scale, seed=s.seed,
                                 sides={"student": self.e2e.side} if self.e2e is not None else None)
        finally:
            model.train(was_training)
        teacher_all = rates["teacher"]["all"]
        rates["ratio_all"] = rates["student"]["all"] / teacher_all if teacher_all else None
        rates["prompts"] = n
        rates["sampler"] = f"{s.scheduler}, {s.num_inference_steps} steps, guidance {s.guidance_scale}"
        rates["seconds"] = round(time.perf_counter() - t0, 1)
        return rates

    def summarize(self, before: dict | None, after: dict | None, fidelity: dict | None = None) -> dict[str, Any]:
        summary = {"steps": self.state.step, "bad_steps": self.state.bad_steps, "run_dir": str(self.run_dir),
                   "agreement_before": before, "agreement_after": after}
        failed = self.data.load_failures
        if failed:
            summary["load_failures"] = {"files": len(failed), "dropped_buckets": sorted(self.data.dead_buckets),
                                        "errors": dict(sorted(failed.items()))}
            self.log(f"{len(failed)} image(s) failed to load and were skipped (listed in summary.json):"
                     + "".join(f"\n  {p}: {e}" for p, e in sorted(failed.items())[:5])
                     + ("\n  ..." if len(failed) > 5 else ""))
        if before and after:
            ratio = before["teacher_mse"] / max(after["teacher_mse"], 1e-12)
            summary["closer_to_teacher_x"] = ratio
            line = (f"student vs teacher eps MSE on a fixed probe: {before['teacher_mse']:.4f} -> "
                    f"{after['teacher_mse']:.4f} ({ratio:.1f}x closer)")
            if "teacher_mse_ema" in after:
                line += f"; EMA {after['teacher_mse_ema']:.4f}"
            self.log(line)
        if fidelity is not None:
            summary["fidelity"] = fidelity
            for who in ("teacher", "student"):
                f = fidelity[who]
                self.log(f"{who} prompt fidelity on {fidelity['prompts']} held-out prompts ({fidelity['sampler']}): "
                         f"colour {f['colour']:.2f}, shape {f['shape']:.2f}, position {f['position']:.2f}, "
                         f"all three {f['all']:.2f}")
            a = fidelity["student"]["agreement"]
            self.log(f"the student draws what the teacher draws (same prompt and seed): colour {a['colour']:.2f}, "
                     f"shape {a['shape']:.2f}, position {a['position']:.2f}, all three {a['all']:.2f}")
            if fidelity["ratio_all"] is not None:
                self.log(f"student / teacher, all three right: {fidelity['ratio_all']:.2f}")
        if self.accelerator.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def train(recipe: DictConfig) -> dict[str, Any]:
    """Run a recipe to the end; returns the run summary (also written to summary.json)."""
    return Distiller(recipe).fit()
