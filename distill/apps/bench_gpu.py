"""`cli.py bench --gpu --output_dir DIR [--tiny]`: the real-size benchmark, one run, <= 8 minutes.

What it times is the trainer's own step (`Distiller.step`, sections from its SectionTimer, as
`cli.py bench` does), with the shipped recipes as they are except the batch and the benchmark's
overrides (gradient accumulation 1, so every step has its optimizer and EMA update; no samples or
tensorboard):

- `sd15-xl512`: `recipes/sd15_sit_xl.yaml`: the SD1.5 UNet (its real config, random weights) teaching
  SiT-XL/2 at 512 px (64x64 latents, 1024 tokens, 77x768 text), bf16 autocast, batch 16 and 32;
- `sdxl-2b1024`: `recipes/sdxl_sit_2b.yaml`: the SDXL UNet (time ids and pooled text) teaching the
  `2b` preset at 1024 px (4096 tokens, 77x2048 text), gradient checkpointing on and off, batch 4, 8.

Every measurement is behind the global budget (one that would not finish in the time left is
skipped with a note), so the sections run in order of priority: sd15 rows; its SDPA backends and
channels-last teacher; sdxl rows; the memory levers for SDXL -> 2b at batch 1 (teacher in bf16,
gradient checkpointing, EMA on the CPU, 8-bit AdamW); sdxl's SDPA backends and channels-last
teacher; our student against the plain reference implementation of `benchmarks/bench_student.py`;
`torch.compile` of the student's blocks; the largest batch that fits, by doubling until out of
memory. Results go to `results.json` and `results.md` after every measurement, so a run cut short
still leaves what it measured.

Text encoders and VAE are tiny (`sitdistill.apps.bench_models`): latents and text embeddings are cached and
out of the step. Models are built on the GPU directly. Peak memory is
`torch.cuda.max_memory_allocated` from the end of the trainer's construction to the last timed step
(teacher, student, EMA and optimizer state included). MFU: `sitdistill.apps.flops`.

`--tiny` runs the same code on the CPU with stand-in sizes (the shipped UNet configs shrunk, a
2-block SiT of width 64, 64 and 128 px images) in well under a minute; `torch.compile` then uses
the `eager` backend (dynamo only: inductor's C++ build alone takes minutes on a CPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sitdistill.apps.bench import ROOT
from sitdistill.apps.bench_models import real_unet_config, tiny_unet_config
from sitdistill.apps.bench_runner import GpuBench, Profile, Setting, double_until

_TINY_STUDENT = {"hidden_size": 64, "depth": 2, "num_heads": 2}
_TINY_DATA = ("data.min_size=32", "data.bucket_step=16")
GPU = Profile("gpu", (
    Setting("sd15-xl512", "sd15", "sd15_sit_xl.yaml", 512, (16, 32), (True,), 512),
    Setting("sdxl-2b1024", "sdxl", "sdxl_sit_2b.yaml", 1024, (4, 8), (True, False), 64),
), real_unet_config, steps=5, warmup=2, budget_s=420.0, compile_backend="inductor", reserve_s=10.0)
TINY = Profile("tiny", (
    Setting("sd15-xl512", "sd15", "sd15_sit_xl.yaml", 64, (2, 4), (True,), 8,
            _TINY_DATA + ("data.bucket_min_side=32", "data.bucket_max_side=128"), _TINY_STUDENT),
    Setting("sdxl-2b1024", "sdxl", "sdxl_sit_2b.yaml", 128, (1, 2), (True, False), 4,
            _TINY_DATA + ("data.bucket_min_side=64", "data.bucket_max_side=256"), _TINY_STUDENT),
), tiny_unet_config, steps=2, warmup=1, budget_s=50.0, compile_backend="eager", reserve_s=0.0)

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# The memory levers, added one at a time to a baseline without any (SDXL -> 2b, 1024 px, batch 1).
LEVER_BASE = ("teacher.dtype=float32", "student.gradient_checkpointing=false", "training.ema_on_cpu=false",
              "optimizer.name=adamw")
LEVERS = (("teacher bf16", "teacher.dtype=bfloat16"), ("gradient checkpointing", "student.gradient_checkpointing=true"),
          ("EMA on CPU", "training.ema_on_cpu=true"), ("8-bit AdamW", "optimizer.name=adamw8bit"))


def core(b: GpuBench, s: Setting) -> None:
    """Every batch of the setting, with each of its gradient-checkpointing settings."""
    for ckpt in s.checkpointing:
        for batch in s.batches:
            if b.budget.allows(b.estimate(s, batch, b.p.steps, b.p.warmup), f"{s.name} batch {batch}"):
                b.results["rows"].append(b.measure(s, batch, (f"student.gradient_checkpointing={str(ckpt).lower()}",),
                                                   what=f"checkpointing {'on' if ckpt else 'off'}",
                                                   gradient_checkpointing=ckpt))
                b.save()


@contextlib.contextmanager
def channels_last(module: torch.nn.Module):
    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


def variants(b: GpuBench, s: Setting, batch: int) -> None:
    """One trainer, timed as it is, under each SDPA backend alone (the student's and the teacher's
    attention both), and with the teacher UNet in channels-last memory format."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    contexts = [("default", "default", contextlib.nullcontext)]
    contexts += [(f"SDPA {name.lower()}", "sdpa", functools.partial(sdpa_kernel, getattr(SDPBackend, name)))
                 for name in SDPA_BACKENDS]
    contexts.append(("teacher channels-last", "channels_last", lambda: channels_last(b.teacher(s).unet)))

    def run() -> None:
        d = b.distiller(s, batch)
        for name, kind, context in contexts:
            if not b.budget.allows(b.estimate(s, batch, b.p.steps, b.p.warmup), f"{s.name} variant {name}"):
                return
            row, error = b.attempt(f"{s.name} {name}", lambda: b.timed(d, s, context), catch=(RuntimeError,))
            _variant(b, s, batch, name, kind, row, error)

    b.attempt(f"{s.name} variants", run)


def compiled(b: GpuBench, s: Setting, batch: int) -> None:
    """`torch.compile` of each student block (regional compilation: the blocks are alike, so one
    graph serves all of them and compiling takes one block's time). Compared with the `default`
    variant; the compile time is in the warm-up, reported apart."""
    need = 90.0 if b.device.type == "cuda" else 0.0  # inductor compiles one block's forward and backward
    if not b.budget.allows(need + b.estimate(s, batch, b.p.steps, b.p.warmup), f"{s.name} torch.compile"):
        return
    name = f"torch.compile ({b.p.compile_backend}, per block)"

    def run() -> dict[str, Any]:
        d = b.distiller(s, batch)
        for block in d.accelerator.unwrap_model(d.student).blocks:
            block.compile(backend=b.p.compile_backend)
        start = time.monotonic()
        row = b.timed(d, s)
        return {**row, "compile_and_run_s": time.monotonic() - start}

    row, error = b.attempt(f"{s.name} {name}", run, catch=(RuntimeError,))
    _variant(b, s, batch, name, "compile", row, error)


def _variant(b: GpuBench, s: Setting, batch: int, name: str, kind: str, row: dict | None, error: str | None) -> None:
    if row is not None:
        b.log(f"{s.name} batch {batch} {name}: step {row['step_ms']:.0f} ms")
    b.results["variants"].append({"config": s.name, "batch": batch, "variant": name, "kind": kind,
                                  **(row or {"error": error})})
    b.save()


def levers(b: GpuBench, s: Setting) -> None:
    """Batch 1 with no memory lever, then adding one lever at a time (LEVERS)."""
    from sitdistill.train.build import lowbit_adamw_backend

    for k in range(len(LEVERS) + 1):
        on = LEVERS[:k]
        names = [n for n, _ in on]
        if k == len(LEVERS) and lowbit_adamw_backend() is None:
            b.budget.notes.append("8-bit AdamW not measured: neither torchao nor bitsandbytes is importable "
                                  "(pip install 'sitdistill[lowbit]')")
            break
        # torchao's 8-bit AdamW compiles its update once per weight shape on the first step
        extra_s = 90.0 if k == len(LEVERS) and b.device.type == "cuda" else 0.0
        if not b.budget.allows(extra_s + b.estimate(s, 1, b.p.steps, b.p.warmup), f"levers {', '.join(names)}"):
            break
        row = b.measure(s, 1, LEVER_BASE + tuple(o for _, o in on), what="levers: " + (", ".join(names) or "none"),
                        levers=names)
        b.results["levers"].append(row)
        b.save()


def _bench_student():
    """benchmarks/bench_student.py (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_student", ROOT / "benchmarks" / "bench_student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(b: GpuBench, s: Setting) -> None:
    """Our SiT against the plain DiT-style reference of benchmarks/bench_student.py: the same preset,
    latent size and weights, class-conditional (the reference has no text path), forward + backward
    under bf16 autocast, interleaved. Batch halved on out-of-memory (the reference materialises
    every attention matrix)."""
    bs = _bench_student()
    b.teacher(None)  # the student alone on the device
    preset, latent, dev = b.base(s).student.preset, s.resolution // 8, b.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def pair(batch: int) -> dict[str, Any]:
        ours, ref = bs.build_pair(preset, latent, dev, **s.student)
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(batch, 4, latent, latent, generator=g, device=dev)
        t = torch.randint(0, 1000, (batch,), generator=g, device=dev)
        y = torch.randint(0, bs.NUM_CLASSES, (batch,), generator=g, device=dev)
        with torch.no_grad():  # the two compute the same (fp32, one sample)
            diff = float((ours(x[:1], t[:1], class_labels=y[:1]) - ref(x[:1], t[:1], y[:1])).abs().max())

        def step(model, *args):
            model.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                model(x, t, *args).float().square().mean().backward()

        ms = bs.interleaved({"ours": lambda: step(ours, None, None, None, y), "ref": lambda: step(ref, y)},
                            b.p.steps, sync)
        return {"config": s.name, "student": preset, "latent": latent, "batch": batch, "ours_ms": ms["ours"],
                "reference_ms": ms["ref"], "ratio": ms["ref"] / ms["ours"], "max_abs_diff_fp32": diff}

    batch = s.batches[0]
    while batch >= 1 and b.budget.allows(b.p.reserve_s * 2, f"{s.name} reference at batch {batch}"):
        row, error = b.attempt(f"{s.name} reference batch {batch}", lambda: pair(batch))
        if row is not None:
            b.log(f"{s.name} reference batch {batch}: ours {row['ours_ms']:.0f} ms, reference "
                  f"{row['reference_ms']:.0f} ms")
        b.results["reference"].append(row or {"config": s.name, "student": preset, "batch": batch, "error": error})
        b.save()
        if row is not None or error != "out of memory":
            return
        batch //= 2


class _OutOfBudget(Exception):
    pass


def largest_batch(b: GpuBench, s: Setting) -> None:
    """Double the batch from twice the largest timed one until it does not fit (the recipe's
    gradient checkpointing), one warm-up and one timed step each."""
    ckpt = bool(b.base(s).student.gradient_checkpointing)
    fitted = [r["batch"] for r in b.results["rows"]
              if r["config"] == s.name and "error" not in r and r["gradient_checkpointing"] == ckpt]

    def fits(batch: int) -> bool:
        if not b.budget.allows(b.estimate(s, batch, 1, 1), f"{s.name} batch {batch} (largest-batch search)"):
            raise _OutOfBudget
        row = b.measure(s, batch, steps=1, warmup=1, what="(largest-batch search)", gradient_checkpointing=ckpt)
        b.results["max_batch"].append(row)
        b.save()
        return "error" not in row

    try:
        best, why = double_until(fits, 2 * max(s.batches), s.max_batch)
    except _OutOfBudget:
        best, why = None, "the budget ran out"
    found = [r["batch"] for r in b.results["max_batch"] if r["config"] == s.name and "error" not in r]
    largest = max(fitted + found + ([best] if best else []), default=None)
    b.results.setdefault("largest_batch", []).append({"config": s.name, "largest": largest, "ended": why})
    b.save()


def run_gpu_bench(out_dir: str | Path, tiny: bool = False, budget_s: float | None = None) -> dict[str, Any]:
    """The whole benchmark; writes results.json and results.md into `out_dir` and returns the results."""
    profile = TINY if tiny else GPU
    threads = torch.get_num_threads()
    if tiny:  # tiny models: more threads only add synchronisation (FACTS.md)
        torch.set_num_threads(1)
    try:
        return _run(profile, out_dir, budget_s)
    finally:
        torch.set_num_threads(threads)


def _run(profile: Profile, out_dir: str | Path, budget_s: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sitdistill-gpu-bench-") as work:
        b = GpuBench(profile, Path(out_dir), Path(work), budget_s)
        b.log(f"{profile.name} profile on {b.results['device']}, budget {b.budget.left():.0f} s")
        sd15, sdxl = profile.settings
        core(b, sd15)
        variants(b, sd15, sd15.batches[0])
        core(b, sdxl)
        levers(b, sdxl)
        variants(b, sdxl, sdxl.batches[0])
        reference(b, sd15)
        reference(b, sdxl)
        compiled(b, sd15, sd15.batches[0])
        largest_batch(b, sdxl)
        largest_batch(b, sd15)
        b.teacher(None)
        b.save()
        b.log(f"done; {b.out / 'results.md'}")
    return b.results
