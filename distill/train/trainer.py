"""The distillation trainer: the loop around one objective.

`Distiller.step` reads top to bottom: the objective's terms (`sitdistill.train.objective`: conditioning,
x_t, teacher, student, every loss term) -> weighted total -> finiteness guard -> backward -> clip
-> optimizer step -> EMA. `Distiller.fit` wraps it with logging, checkpoints (`sitdistill.train.run_io`),
sample grids and the run summary (`sitdistill.train.run_report`). Everything random in a step draws from
one explicit `torch.Generator` per process (saved in checkpoints), so a resumed run continues
exactly.
"""

from __future__ import annotations

import gc
import math
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sitdistill.data.pipeline import DataExhausted
from sitdistill.train import run_report
from sitdistill.train.build import (build_lr_scheduler, build_optimizer, build_student_from_recipe,
                                    load_teacher_from_recipe, student_param_groups)
from sitdistill.train.e2e import EndToEnd
from sitdistill.train.ema import EMA, local
from sitdistill.train.features import FeatureProjector, FeatureProjectors, capture
from sitdistill.train.losses import combine
from sitdistill.train.objective import DistillObjective
from sitdistill.core.precision import resolve_mixed_precision
from sitdistill.core.recipe import save_recipe
from sitdistill.train.run_io import RunIO, TrainingStopped, TrainState, torch_optimizer
from sitdistill.train.sharding import GatheredModel, check_fsdp, full, shard_model
from sitdistill.train.timing import SectionTimer
from sitdistill.train.validate import check_loaded, validate_recipe

__all__ = ["Distiller", "TrainingStopped", "TrainState", "clip_gradients", "foldable", "step_optimizer", "train"]


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


def foldable(optimizer, accelerator) -> bool:
    """Whether clipping can be folded into the optimizer step: a fused torch optimizer (which
    divides the gradients by its `grad_scale` inside the kernel, the protocol torch's GradScaler
    uses) and no fp16 loss scaler of accelerate's that would set it too."""
    inner = torch_optimizer(optimizer)
    fused = bool(inner.defaults.get("fused")) or getattr(inner, "folds_grad_scale", False)  # (MuonAdamW)
    return fused and getattr(inner, "_step_supports_amp_scaling", False) and getattr(accelerator, "scaler", None) is None


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


# The Accelerators the trainers of this process made (weakly held: a finished trainer lets go).
_ACCELERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _free_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one `AcceleratorState` per process and refuses an `Accelerator` with another
    `mixed_precision` once one exists. A single process that trains several recipes one after the
    other (a study, a curve, a test session) may change precision between them: drop the old
    precision state (not the process group) when nothing distributed holds it and no Accelerator
    of an earlier trainer is still alive (all Accelerators share that state, so a live one would
    silently take the new precision: that case keeps accelerate's refusal)."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if not state or state.get("_mixed_precision", mixed_precision) == mixed_precision:
        return
    if PartialState().num_processes != 1:
        return
    gc.collect()  # a finished trainer in a reference cycle still holds its Accelerator until collected
    if len(_ACCELERATORS) == 0:
        AcceleratorState._reset_state(reset_partial_state=False)


class Distiller:
    """Everything a run holds; `fit()` trains, `step()` is one micro-batch."""

    def __init__(self, recipe: DictConfig, accelerator=None, teacher=None, student=None):
        """`teacher`: an already loaded teacher instead of the recipe's (notebooks, benchmarks).
        `student`: an already built student, what `build_student_from_recipe(recipe.student,
        teacher)` returns, e.g. built on the GPU directly (`cli.py bench --gpu`: seconds instead of
        a CPU init of billions of weights)."""
        from accelerate import Accelerator

        from sitdistill.data.pipeline import build_train_data

        self.recipe = r = recipe
        t = r.training
        # Every recipe check, before any model is loaded (a caller that brings its own teacher may
        # use a placeholder source, and its own student another shape than the recipe's preset).
        validate_recipe(r, files=teacher is None, student=student is None)
        self.mixed_precision = resolve_mixed_precision(t.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
        if accelerator is None:
            _free_accelerator_state(self.mixed_precision)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=self.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),
        )
        _ACCELERATORS.add(self.accelerator)
        acc = self.accelerator
        self.device = acc.device
        self.run_dir = Path(r.output.dir)
        self.log = acc.print
        self.fsdp = check_fsdp(r, acc)

        # Frozen teacher; the student is built to take its conditioning sizes.
        torch.manual_seed(t.seed)  # the student's init is the same on every rank
        self.teacher = teacher if teacher is not None else load_teacher_from_recipe(r.teacher, self.device)
        self.schedule = self.teacher.schedule
        self.data = build_train_data(r, self.teacher, rank=acc.process_index, world_size=acc.num_processes)
        self.text_cache = self.data.text_cache
        for note in self.data.notes:
            self.log(note)
        student = student if student is not None else build_student_from_recipe(r.student, self.teacher)
        config = student.config  # (before accelerate's wrapper hides it)
        check_loaded(r, self.teacher, student, self.log)
        # End-to-end stage: trainable student-side copies of the VAE / text encoders (sitdistill.train.e2e).
        self.e2e = EndToEnd(r, self.teacher) if t.train_vae or t.train_text_encoder else None
        if self.e2e is not None:
            self.log(self.e2e.describe())

        self.projector = None
        if r.losses.feature:
            f = r.losses.features
            dims = self.teacher_feature_dims(list(f.teacher_modules))
            self.projector = FeatureProjectors(
                FeatureProjector(student.config.hidden_size, d, f.projector_hidden) for d in dims)

        self.total_steps = self.planned_steps()
        # The shadow goes where the student will train (accelerate moves the student only later),
        # or to the CPU. FSDP: copied from the whole student, then both are sharded (sitdistill.train.sharding).
        ema_device = None if self.fsdp else ("cpu" if t.ema_on_cpu else self.device)
        self.ema = EMA(student, decay=t.ema_decay, device=ema_device) if t.use_ema else None
        if self.fsdp:
            shard_model(student, self.device, self.mixed_precision)
            if self.ema is not None:
                shard_model(self.ema.model, self.device, offload=t.ema_on_cpu)
            for proj in self.projector or []:
                shard_model(proj, self.device, self.mixed_precision)
        params = student_param_groups(student, r.optimizer)
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
        self.before: dict | None = None  # the agreement before training (kept in checkpoints)
        self.timer = SectionTimer(enabled=False, device=self.device)  # `cli.py bench` turns it on
        self.objective = DistillObjective(r, self.teacher, student, self.gen, self.data, projector=self.projector,
                                          e2e=self.e2e, student_config=config, device=self.device,
                                          autocast=acc.autocast, timer=self.timer)
        self.io = RunIO(r, acc, student=student, ema=self.ema, projector=self.projector, e2e=self.e2e,
                        optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, generator=self.gen,
                        data=self.data, fsdp=self.fsdp, log=self.log)

    # ------------------------------------------------------------------ set-up helpers
    def planned_steps(self) -> int | None:
        t = self.recipe.training
        if t.max_steps is not None:
            return int(t.max_steps)
        return t.num_epochs * math.ceil(self.data.batches_per_epoch / t.gradient_accumulation_steps)

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

    # ------------------------------------------------------------------ the step
    def step(self, batch: dict) -> dict[str, float]:
        """One micro-batch: the objective's terms, backward; the optimizer steps at accumulation ends."""
        acc, timer = self.accelerator, self.timer
        terms, weights, extra = self.objective(batch)
        loss, logs = combine(terms, weights)
        finite = torch.isfinite(loss.detach()).float()
        if acc.num_processes > 1:  # every rank must agree, or one would wait in backward forever
            finite = acc.reduce(finite, reduction="sum") / acc.num_processes
        if finite.item() < 1.0:
            return self.bad_step(logs)
        if self.fsdp:  # accumulate unreduced gradients; reduce-scatter on the last micro-batch only
            for model in (self.student, *(self.projector or [])):
                model.set_requires_gradient_sync(acc.sync_gradients)
        with timer("backward"):
            acc.backward(loss)
        if acc.sync_gradients:
            if self.e2e is not None:
                self.e2e.sync_gradients(acc)
            with timer("optimizer"):
                norm, divisor = clip_gradients(acc, self.trainable, self.recipe.training.max_grad_norm,
                                               fold=self.fold_clip)
                if not torch.isfinite(norm):
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

    def bad_step(self, logs: dict) -> dict[str, float]:
        """A non-finite loss or gradient: the step is skipped (its gradients dropped), and the run
        stops after `training.max_bad_steps` of them in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.bad_steps += 1
        self.state.bad_in_row += 1
        self.log(f"non-finite loss or gradient at step {self.state.step}: skipped "
                 f"({self.state.bad_in_row} in a row, {self.state.bad_steps} in total)")
        if self.state.bad_in_row >= self.recipe.training.max_bad_steps:
            raise TrainingStopped(f"{self.state.bad_in_row} non-finite steps in a row "
                                  f"(training.max_bad_steps={self.recipe.training.max_bad_steps}); "
                                  + self.io.last_checkpoint_note())
        return {"bad_step": 1.0}

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        acc, r = self.accelerator, self.recipe
        resumed = self.maybe_resume()
        if acc.is_main_process:
            save_recipe(r, self.run_dir / "recipe.yaml")
        writer = self.tensorboard()
        try:
            probe = run_report.probe_batch(self.objective, self.data)
        except DataExhausted as e:
            raise TrainingStopped(f"{e}; {self.io.last_checkpoint_note()}") from None
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
            raise TrainingStopped(f"{e}; {self.io.last_checkpoint_note()}") from None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        after = self.agreement(probe)
        summary = {"steps": self.state.step, "bad_steps": self.state.bad_steps, "run_dir": str(self.run_dir)}
        summary = run_report.summarize(summary, self.data, before, after, self.final_fidelity(), self.log)
        if acc.is_main_process:
            run_report.write_summary(self.run_dir, summary)
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

    # ------------------------------------------------------------------ checkpoints, probe, samples
    def save(self) -> Path | None:
        return self.io.save(self.state, self.before)

    def maybe_resume(self) -> bool:
        """Resume from `training.resume` (see `RunIO.resume`); False for a fresh start or a new stage."""
        resumed = self.io.resume()
        self.resumed_before = resumed[1] if resumed is not None else None
        if resumed is not None:
            self.state = resumed[0]
        return resumed is not None

    def agreement(self, probe: dict | None) -> dict[str, float] | None:
        return run_report.agreement(probe, self.accelerator.unwrap_model(self.student), self.ema, self.e2e,
                                    self.device, self.fsdp)

    def sample_grid(self, step: int, writer) -> None:
        model = self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.student)
        if self.fsdp:  # every process gathers; the main process draws with a plain copy
            model = GatheredModel(model).gather().unsharded()
            model = model.to(self.device) if model is not None else None
        if self.accelerator.is_main_process:
            run_report.save_sample_grid(self.run_dir / "samples" / f"step-{step:07d}.png", step, writer, self.teacher,
                                        model, self.recipe, self.data.example_pixel_hw, self.e2e)

    def final_fidelity(self) -> dict[str, Any] | None:
        """Toy-world runs with `evaluation.at_end`: the grader's rates of teacher and student (EMA)."""
        r = self.recipe
        # (sharded: a gathered copy would be needed; `cli.py eval` grades a sharded run's checkpoint)
        if not r.evaluation.at_end or r.data.root is not None or self.fsdp or not self.accelerator.is_main_process:
            return None
        model = self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.student)
        return run_report.final_fidelity(r, self.teacher, model, self.e2e)


def train(recipe: DictConfig) -> dict[str, Any]:
    """Run a recipe to the end; returns the run summary (also written to summary.json)."""
    return Distiller(recipe).fit()
