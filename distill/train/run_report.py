"""What a run reports besides its losses: the teacher-agreement probe, sample grids, the final
prompt-fidelity grading and `summary.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from sitdistill.core.modules import eval_mode
from sitdistill.train.losses import teacher_loss


@torch.no_grad()
def probe_batch(objective, data) -> dict | None:
    """A fixed set of (x_t, t, cond) with the teacher's target, from the first data batch and a
    generator of its own: the same every time, so 'closer to the teacher' is measured on identical
    inputs before and after. None for a data-free run."""
    if not data.needs_images:
        return None
    device, teacher, schedule = objective.device, objective.teacher, objective.schedule
    batch = next(iter(data.epoch_batches(0, 0)))
    g = torch.Generator(device).manual_seed(12345)
    cond, _ = objective.encode(list(batch["caption"]), batch)
    if "latent_mean" in batch:
        x0 = batch["latent_mean"].to(device)
    else:
        x0 = teacher.encode_images(batch["pixel_values"].to(device), sample=False)
    noise = torch.randn(x0.shape, generator=g, device=device)
    n = x0.shape[0]
    t = torch.linspace(50, schedule.num_train_timesteps - 50, n, device=device).long()
    x_t = schedule.add_noise(x0, noise, t)
    return {"x_t": x_t, "t": t, "cond": cond, "eps": objective.teacher_target(x_t, t, cond),
            "captions": list(batch["caption"]), "sizes": objective.size_kwargs(batch)}


@torch.no_grad()
def agreement(probe: dict | None, student, ema, e2e, device, fsdp: bool) -> dict[str, float] | None:
    """MSE between student and teacher targets on the probe (raw weights, and EMA); `student`
    unwrapped, `ema` the `EMA` or None, `e2e` the end-to-end stage or None."""
    if probe is None:
        return None
    with eval_mode(student):
        cond = probe["cond"]  # the student's conditioning: its own encoders' in the end-to-end stage
        if e2e is not None and e2e.text_encoders:
            cond = e2e.encode(probe["captions"], **probe["sizes"])
        pred = student(probe["x_t"], probe["t"], **cond).float()
        out = {"teacher_mse": float(teacher_loss(pred, probe["eps"]).mean())}
        if ema is not None:
            # (a sharded EMA computes on the accelerator even when its shard is kept on the CPU)
            dev = device if fsdp else next(ema.model.parameters()).device
            xs = {k: v.to(dev) for k, v in probe.items() if torch.is_tensor(v)}
            cond = {k: v.to(xs["x_t"].device) for k, v in cond.items()}
            pred = ema.model(xs["x_t"], xs["t"], **cond).float()
            out["teacher_mse_ema"] = float(teacher_loss(pred, xs["eps"]).mean())
    return out


def save_sample_grid(out: Path, step: int, writer, teacher, model, recipe: DictConfig, pixel_hw, e2e) -> None:
    """Teacher | student samples of the recipe's prompts as `out`, and in tensorboard."""
    from sitdistill.infer.samples import teacher_student_grid

    side = e2e.side if e2e is not None else None  # the student's own encoders + VAE
    grid = teacher_student_grid(teacher, model, recipe, pixel_hw, student_side=side)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    if writer is not None:
        import numpy as np

        writer.add_image("samples/teacher_student", np.asarray(grid), step, dataformats="HWC")


@torch.no_grad()
def final_fidelity(recipe: DictConfig, teacher, model, e2e) -> dict[str, Any]:
    """The toy grader's rates for the teacher and `model` on `evaluation.at_end` held-out prompts,
    same sampler, guidance and seeds."""
    from sitdistill.evaluation.evaluate import recipe_toy_fidelity, toy_prompts
    from sitdistill.infer.samples import student_fn
    from sitdistill.infer.sampling import teacher_denoiser

    n = int(recipe.evaluation.at_end)
    s = recipe.sampling
    t0 = time.perf_counter()
    with eval_mode(model):
        rates = recipe_toy_fidelity(recipe, teacher, {"teacher": teacher_denoiser(teacher), "student": student_fn(model)},
                                    toy_prompts(recipe, n), sides={"student": e2e.side} if e2e is not None else None)
    teacher_all = rates["teacher"]["all"]
    rates["ratio_all"] = rates["student"]["all"] / teacher_all if teacher_all else None
    rates["prompts"] = n
    rates["sampler"] = f"{s.scheduler}, {s.num_inference_steps} steps, guidance {s.guidance_scale}"
    rates["seconds"] = round(time.perf_counter() - t0, 1)
    return rates


def summarize(summary: dict[str, Any], data, before: dict | None, after: dict | None, fidelity: dict | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    """`summary` (steps, run folder) completed with load failures, agreement and fidelity, each
    also said on the console."""
    summary.update(agreement_before=before, agreement_after=after)
    failed = data.load_failures
    if failed:
        summary["load_failures"] = {"files": len(failed), "dropped_buckets": sorted(data.dead_buckets),
                                    "errors": dict(sorted(failed.items()))}
        log(f"{len(failed)} image(s) failed to load and were skipped (listed in summary.json):"
            + "".join(f"\n  {p}: {e}" for p, e in sorted(failed.items())[:5]) + ("\n  ..." if len(failed) > 5 else ""))
    if before and after:
        ratio = before["teacher_mse"] / max(after["teacher_mse"], 1e-12)
        summary["closer_to_teacher_x"] = ratio
        line = (f"student vs teacher eps MSE on a fixed probe: {before['teacher_mse']:.4f} -> "
                f"{after['teacher_mse']:.4f} ({ratio:.1f}x closer)")
        if "teacher_mse_ema" in after:
            line += f"; EMA {after['teacher_mse_ema']:.4f}"
        log(line)
    if fidelity is not None:
        summary["fidelity"] = fidelity
        for who in ("teacher", "student"):
            f = fidelity[who]
            log(f"{who} prompt fidelity on {fidelity['prompts']} held-out prompts ({fidelity['sampler']}): "
                f"colour {f['colour']:.2f}, shape {f['shape']:.2f}, position {f['position']:.2f}, all three {f['all']:.2f}")
        a = fidelity["student"]["agreement"]
        log(f"the student draws what the teacher draws (same prompt and seed): colour {a['colour']:.2f}, "
            f"shape {a['shape']:.2f}, position {a['position']:.2f}, all three {a['all']:.2f}")
        if fidelity["ratio_all"] is not None:
            log(f"student / teacher, all three right: {fidelity['ratio_all']:.2f}")
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
