"""A run's files: save a checkpoint, resume from one, start a new stage from another run's.

`RunIO` knows which models a run saves (student, EMA, feature projectors, the end-to-end stage's
student-side parts) and how (under FSDP: gathered to full weights on every process, written by
the main process); `sitdistill.core.checkpoint` does the atomic writing, rotation and checksums. The
trainer's position (`TrainState`), the generator's state and the data sampler's position travel
with every checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from sitdistill.core import checkpoint as ckpt
from sitdistill.core.muon import MUON_SETTINGS
from sitdistill.train.e2e import resolve_init
from sitdistill.core.recipe import RecipeError, to_yaml
from sitdistill.train.sharding import GatheredModel, GatheredOptimizer, all_finite


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many non-finite steps in a row)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` consumed on this rank (data position)
    bad_steps: int = 0  # non-finite steps skipped in total
    bad_in_row: int = 0


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind accelerate's `AcceleratedOptimizer` wrapper (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class RunIO:
    """Checkpoints of one run (`recipe.output.dir`). `student`, `projector` and `optimizer` as
    accelerate prepared them; `ema` the `EMA` or None; `e2e` the `EndToEnd` stage or None."""

    def __init__(self, recipe: DictConfig, accelerator, *, student, ema, projector, e2e, optimizer, lr_scheduler,
                 generator: torch.Generator, data, fsdp: bool, log: Callable[[str], None]):
        self.recipe, self.accelerator, self.run_dir = recipe, accelerator, Path(recipe.output.dir)
        self.student, self.ema, self.projector, self.e2e = student, ema, projector, e2e
        self.optimizer, self.lr_scheduler, self.gen, self.data = optimizer, lr_scheduler, generator, data
        self.fsdp, self.log = fsdp, log

    def models(self) -> dict[str, Any]:
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

    def optimizer_view(self):
        """The optimizer as the checkpoint sees it (under FSDP: full state keyed by parameter name)."""
        if not self.fsdp:
            return self.optimizer
        owners = {"student": self.student, **{f"projector_{i}": p for i, p in enumerate(self.projector or [])}}
        return GatheredOptimizer(torch.nn.ModuleDict(owners), torch_optimizer(self.optimizer))

    def last_checkpoint_note(self) -> str:
        latest = ckpt.find_latest(self.run_dir)
        return f"the last checkpoint, {latest}, is intact" if latest is not None else "no checkpoint was written yet"

    # ------------------------------------------------------------------ save
    def save(self, state: TrainState, before: dict | None) -> Path | None:
        """A checkpoint at `state.step`; `before`: the agreement before training (summary.json's
        "before" after a resume)."""
        acc = self.accelerator
        student = acc.unwrap_model(self.student)
        if not all_finite(student) or (self.e2e and not self.e2e.all_finite()):
            raise TrainingStopped("non-finite student weights: not saved; " + self.last_checkpoint_note())
        models = self.models()
        optimizer = self.optimizer_view()
        if self.fsdp:  # every process takes part in the gathers; the main process writes
            for part in (*models.values(), optimizer):
                part.gather()
        rng = ckpt.capture_rng_state({"train": self.gen})
        rng_states = acc.gather_for_metrics([rng], use_gather_object=True) if acc.num_processes > 1 else [rng]
        saved = asdict(state)
        saved["sampler"] = self.data.sampler_state(state.epoch, state.batch_in_epoch)
        saved["fsdp"] = self.fsdp  # the optimizer file's layout
        saved["optimizer"] = self.recipe.optimizer.name  # its state's layout too
        saved["agreement_before"] = before
        path = ckpt.save_checkpoint(
            self.run_dir, state.step, models=models, optimizer=optimizer, lr_scheduler=self.lr_scheduler,
            train_state=saved, recipe_yaml=to_yaml(self.recipe), rng_states=rng_states,
            keep_last=self.recipe.training.keep_checkpoints, is_main_process=acc.is_main_process,
        )
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ resume, init_from
    def resume(self) -> tuple[TrainState, dict | None] | None:
        """Resume from `training.resume`: (the saved state, the saved agreement before), or None
        when there is nothing to resume (then `training.init_from`, if set, loads its weights).
        With "latest", a checkpoint that fails to load is moved aside (never deleted) and the next
        older one is tried; when none loads, RecipeError."""
        t = self.recipe.training
        path = ckpt.resolve_resume(self.run_dir, t.resume)
        if path is None:
            if t.init_from:
                self.init_from(t.init_from)
            return None
        fallback = str(t.resume) == "latest"
        failures = []
        wanted = self.optimizer_settings()  # the recipe's, before any checkpoint's are loaded
        while path is not None:
            try:
                resumed = self.load(path, wanted)
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
        self.log(f"resumed from {path} at step {resumed[0].step}")
        return resumed

    def load(self, path: Path, wanted: list[dict]) -> tuple[TrainState, dict | None]:
        """Restore everything from one checkpoint; then the recipe's optimizer settings (`wanted`) apply."""
        try:
            saved = json.loads((path / ckpt.TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ckpt.CheckpointDamaged(f"{path / ckpt.TRAIN_STATE_FILE}: {e}") from None
        if saved.get("fsdp", False) != self.fsdp:
            raise RecipeError(f"'training.fsdp' is {self.fsdp} but {path} was saved with {saved.get('fsdp', False)}; "
                              "resume it with the same setting")
        name = self.recipe.optimizer.name
        if saved.get("optimizer", name) != name:  # (checkpoints written before the key existed: not checked)
            raise RecipeError(f"'optimizer.name' is {name} but {path} was saved with {saved['optimizer']}, whose "
                              "state does not carry over; resume it with the same optimizer, or start a new stage "
                              "from it (training.init_from)")
        self.check_student_config(path)
        state = ckpt.load_checkpoint(path, models=self.models(), optimizer=self.optimizer_view(),
                                     lr_scheduler=self.lr_scheduler, generators={"train": self.gen},
                                     rank=self.accelerator.process_index)
        sampler = state.pop("sampler", None)
        train_state = TrainState(**{k: state[k] for k in asdict(TrainState()) if k in state})
        if sampler is not None:
            self.data.load_sampler_state(sampler)
        self.apply_optimizer_settings(wanted)
        return train_state, state.get("agreement_before")

    def check_student_config(self, path: Path) -> None:
        """The checkpoint's student was built like this one (shape, conditioning widths, time input):
        RecipeError naming the first config key that differs, before any weight is loaded."""
        from sitdistill.students import SiT

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
        """Per parameter group: the recipe's peak lr, betas, weight decay and eps (as built), and Muon's
        momentum and Newton-Schulz precision and form."""
        return [{"lr": g.get("initial_lr", g["lr"]), "betas": tuple(g["betas"]), "weight_decay": g["weight_decay"],
                 "eps": g["eps"], **{k: g[k] for k in MUON_SETTINGS if k in g}}
                for g in torch_optimizer(self.optimizer).param_groups]

    def apply_optimizer_settings(self, wanted: list[dict]) -> None:
        """After a resume: the recipe's optimizer settings replace the checkpoint's, with a notice.
        The LR schedule keeps its step; its peak becomes the recipe's lr."""
        groups = torch_optimizer(self.optimizer).param_groups
        sched = self.lr_scheduler
        changes = []
        for i, (g, w) in enumerate(zip(groups, wanted)):
            name = "" if len(groups) == 1 else f" (group {i})"
            for key in ("betas", "weight_decay", "eps", *MUON_SETTINGS):
                if key not in w:
                    continue
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
        for name, model in self.models().items():
            if (path / name).is_dir():
                ckpt.load_model_folder(model, path / name)
                loaded.append(name)
            elif name == "student":
                raise FileNotFoundError(f"training.init_from: {path} holds no student folder")
        if self.ema is not None and "ema" not in loaded:
            self.ema.model.load_state_dict(self.accelerator.unwrap_model(self.student).state_dict())
        self.log(f"initialised from {path} ({', '.join(loaded)}); a new stage starts at step 0")
