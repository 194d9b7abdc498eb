"""The machinery of `cli.py bench --gpu` (`sitdistill.apps.bench_gpu`): settings, the global time budget,
building the trainer on the device, timing its real step, and absorbing out-of-memory errors."""

from __future__ import annotations

import contextlib
import gc
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sitdistill.apps.bench import ROOT, _peak_memory_mb, prime_caches, time_steps
from sitdistill.apps.bench_models import build_on, image_folder, random_teacher, set_teacher_dtype
from sitdistill.apps.bench_report import write_results
from sitdistill.apps.flops import peak_tflops, sit_forward_flops, train_flops


@dataclass(frozen=True)
class Setting:
    """A teacher -> student pairing at one resolution, from a shipped recipe."""
    name: str
    family: str
    recipe: str
    resolution: int
    batches: tuple[int, ...]
    checkpointing: tuple[bool, ...]  # gradient checkpointing settings timed at every batch
    max_batch: int                   # the doubling search stops here (and the image folder has this many)
    overrides: tuple[str, ...] = ()  # recipe overrides of the stand-in sizes
    student: dict = field(default_factory=dict)  # hidden_size / depth / num_heads of a stand-in student


@dataclass(frozen=True)
class Profile:
    name: str
    settings: tuple[Setting, ...]
    unet_config: Callable[[str], dict]
    steps: int
    warmup: int
    budget_s: float
    compile_backend: str
    reserve_s: float                 # what any measurement needs at least, besides its own estimate


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError)


def double_until(fits: Callable[[int], bool], start: int, cap: int) -> tuple[int | None, str]:
    """The largest of start, 2 start, 4 start, ... <= cap for which `fits(batch)` is true, trying
    in that order until the first False; (None, why) if `start` already fails."""
    best, batch = None, start
    while batch <= cap:
        if not fits(batch):
            return best, f"batch {batch} did not fit"
        best, batch = batch, batch * 2
    return best, f"stopped at the cap {cap}"


class Budget:
    """The global deadline: every section asks before it starts, and is skipped with a note when
    the time left is below what it needs."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds
        self.notes: list[str] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float, what: str) -> bool:
        if self.left() >= seconds:
            return True
        self.notes.append(f"skipped {what}: {max(self.left(), 0):.0f} s of the budget left, it needs about "
                          f"{seconds:.0f} s")
        return False


class GpuBench:
    def __init__(self, profile: Profile, out_dir: Path, workdir: Path, budget_s: float | None = None):
        self.p, self.out, self.work = profile, Path(out_dir), Path(workdir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.budget = Budget(profile.budget_s if budget_s is None else budget_s)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        peak, key = peak_tflops(name)
        self.peak = peak
        self.results: dict[str, Any] = {
            "profile": profile.name, "device": name, "torch": torch.__version__, "peak_bf16_tflops": peak,
            "peak_table_key": key, "budget_s": self.budget.end - self.budget.start,
            "rows": [], "variants": [], "levers": [], "reference": [], "max_batch": [], "notes": self.budget.notes}
        if peak is None:
            self.budget.notes.append(f"MFU not reported: no dense bf16 peak for device {name!r} in "
                                     "sitdistill.apps.flops.PEAK_BF16_TFLOPS")
        self._teacher = (None, None)
        self._primed: set[str] = set()
        self._base: dict[str, Any] = {}

    # ------------------------------------------------------------------ building
    def log(self, line: str) -> None:
        print(f"[{time.monotonic() - self.budget.start:5.0f} s] {line}", flush=True)

    def recipe(self, s: Setting, batch: int, extra: tuple[str, ...] = ()):
        from sitdistill.core.recipe import load_recipe

        images = self.work / f"images-{s.name}"
        if not images.is_dir():
            image_folder(images, s.resolution, s.max_batch)
        student = tuple(f"student.{k}={v}" for k, v in s.student.items())
        return load_recipe(ROOT / "recipes" / s.recipe, [
            f"data.root={images}", f"data.resolution={s.resolution}", f"data.cache_dir={self.work / 'cache'}",
            f"output.dir={self.work / 'run'}", "training.sample_every=0", "output.tensorboard=false",
            "training.gradient_accumulation_steps=1", f"training.batch_size={batch}", *s.overrides, *student,
            *extra])

    def base(self, s: Setting):
        """The setting's recipe as the benchmark runs it (read once: preset, teacher dtype, ...)."""
        if s.name not in self._base:
            self._base[s.name] = self.recipe(s, s.batches[0])
        return self._base[s.name]

    def teacher(self, s: Setting | None):
        """The setting's teacher, built once and kept while the setting's sections run (only one
        teacher is resident, so no peak memory includes another setting's)."""
        if self._teacher[0] != (s.name if s else None):
            self._teacher = (None, None)
            self.free()
            if s is not None:
                from sitdistill.train.build import DTYPES

                dtype = DTYPES[self.base(s).teacher.dtype]
                built = random_teacher(s.family, self.p.unet_config(s.family), self.device, dtype,
                                       tiny=self.p.name == "tiny")
                self._teacher = (s.name, built)
        return self._teacher[1]

    def distiller(self, s: Setting, batch: int, extra: tuple[str, ...] = ()):
        from sitdistill.train.build import DTYPES, build_student_from_recipe
        from sitdistill.train.trainer import Distiller

        recipe = self.recipe(s, batch, extra)
        teacher = self.teacher(s)
        set_teacher_dtype(teacher, DTYPES[recipe.teacher.dtype])
        student = build_on(self.device, build_student_from_recipe, recipe.student, teacher)
        with contextlib.redirect_stdout(io.StringIO()):  # the data scan's notes, once per build
            d = Distiller(recipe, teacher=teacher, student=student)
        if s.name not in self._primed:
            prime_caches(d)
            self._primed.add(s.name)
        return d

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ measuring
    def timed(self, d, s: Setting, context=contextlib.nullcontext, steps: int | None = None,
              warmup: int | None = None) -> dict[str, Any]:
        """Time the real step of `d`; sections, samples/s, overhead, peak memory, student MFU."""
        student = d.accelerator.unwrap_model(d.student)
        calls: list[tuple[int, int, int, int]] = []

        def count(module, args, kwargs):  # every student forward of the step, with its shape
            x, text = args[0], kwargs.get("encoder_hidden_states")
            calls.append((x.shape[0], x.shape[2], x.shape[3], 0 if text is None else text.shape[1]))

        hook = student.register_forward_pre_hook(count, with_kwargs=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        steps = steps or self.p.steps
        try:
            with context():
                t = time_steps(d, steps, self.p.warmup if warmup is None else warmup, after_warmup=calls.clear)
        finally:
            hook.remove()
        flops = train_flops(sum(sit_forward_flops(student.config, *c) for c in calls)) / steps
        sec = t["sections_ms"]
        fb_s = (sec["student_forward"] + sec["backward"]) / 1000
        achieved = flops / fb_s / 1e12 if fb_s > 0 else None
        batch = d.recipe.training.batch_size
        h, w = d.data.example_latent_hw
        return {
            "config": s.name, "batch": batch, "student": d.recipe.student.preset + (
                f" (stand-in, width {student.config.hidden_size}, depth {student.config.depth})" if s.student else ""),
            "gradient_checkpointing": bool(d.recipe.student.gradient_checkpointing),
            "teacher_dtype": d.recipe.teacher.dtype, "latent_hw": [h, w],
            "tokens": (h // student.config.patch_size) * (w // student.config.patch_size),
            "text_len": calls[0][3] if calls else None,
            "student_params_M": sum(p.numel() for p in student.parameters()) / 1e6,
            "teacher_unet_params_M": sum(p.numel() for p in d.teacher.unet.parameters()) / 1e6,
            "steps": steps, "step_ms": t["step_ms"], "sections_ms": sec, "samples_per_s": batch / t["step_ms"] * 1000,
            "overhead_ratio": t["overhead_ratio"], "peak_memory_MiB": _peak_memory_mb(self.device),
            "student_forwards_per_step": len(calls) / steps, "student_tflop_per_step": flops / 1e12,
            "student_tflops": achieved, "mfu": achieved / self.peak if achieved and self.peak else None,
            "bad_steps": d.state.bad_steps,
        }

    def attempt(self, what: str, fn: Callable[[], Any], catch: tuple = ()) -> tuple[Any, str | None]:
        """fn() -> (value, None); out of memory (or an error of `catch`) -> (None, why), memory freed."""
        error = None
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 -- only OOM and `catch` are absorbed, the rest re-raised
            if not (is_oom(e) or isinstance(e, catch)):
                raise
            error = "out of memory" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        self.free()
        self.log(f"{what}: {error}")
        return None, error

    def estimate(self, s: Setting, batch: int, steps: int, warmup: int) -> float:
        """Seconds a measurement needs, from the setting's last timed step scaled by batch."""
        rows = [r for r in self.results["rows"] + self.results["max_batch"] if r["config"] == s.name and "step_ms" in r]
        if not rows:
            return self.p.reserve_s
        last = rows[-1]
        return self.p.reserve_s + (steps + warmup + 1) * last["step_ms"] / 1000 * batch / last["batch"]

    def save(self) -> None:
        self.results["elapsed_s"] = time.monotonic() - self.budget.start
        write_results(self.results, self.out)

    def measure(self, s: Setting, batch: int, extra=(), what: str = "", steps=None, warmup=None, **row) -> dict:
        """Build the trainer, time it, and return the row (or an out-of-memory row)."""
        label = f"{s.name} batch {batch} {what}".strip()

        def run():
            d = self.distiller(s, batch, extra)
            return self.timed(d, s, steps=steps, warmup=warmup)

        result, error = self.attempt(label, run)
        self.free()
        if result is None:
            return {"config": s.name, "batch": batch, "error": error, **row}
        mfu = f", MFU {result['mfu']:.2f}" if result["mfu"] is not None else ""
        self.log(f"{label}: step {result['step_ms']:.0f} ms, {result['samples_per_s']:.1f} samples/s, "
                 f"peak {result['peak_memory_MiB'] / 1024:.1f} GiB{mfu}")
        if result["bad_steps"]:
            self.budget.notes.append(f"{label}: {result['bad_steps']} non-finite step(s) skipped their backward: "
                                     "its times are too low")
        return {**result, **row}
