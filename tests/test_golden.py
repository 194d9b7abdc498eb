"""Golden training: a few steps of the toy recipe, with every loss term and perturbation part on,
must give the weights recorded in `tests/golden_weights.json`.

Three runs, each `Distiller(recipe).fit()` on the tiny teachers of `tests/conftest.py`, with a
fresh private cache (a warm latent cache would hand over latents encoded in other batches):

- `sd15`: SD1.5-style teacher; data term with min-SNR weighting, teacher term (guided, scale
  drawn per sample, no w input), feature alignment, every perturbation part (input_noise,
  caption_mix, prompt_file, embedding_noise, timestep_jitter, trajectory on the data captions),
  teacher terms min-SNR weighted, caption dropout.
- `sdxl`: SDXL-style teacher (two encoders, pooled text, size conditioning); the guided teacher
  with the student's w input (`student.guidance_embed`, which refuses the data term), v weighting
  of the teacher terms, text pooling, feature alignment, every perturbation part, trajectory
  prompts from the prompt file.
- `e2e`: the end-to-end stage of `recipes/toy_e2e.yaml` on the SDXL-style teacher: the
  student-side VAE (full) and both text encoders (LoRA) train beside the student, with the VAE
  terms, the text-encoder alignment term, REPA-E's feature-to-VAE path and the batch perturbation
  parts (the trajectory part is refused with trainable text encoders).

What is compared: every tensor of every model folder of the final checkpoint (student, EMA,
projectors, student-side VAE and text encoders or their LoRA adapters), as one SHA-256 per folder
over (name, dtype, shape, bytes), and as a float64 summary per folder: element count, then sum,
sum of absolute values and sum of squares of the weights and of their change over the run (a
checkpoint saved before the first step gives the start).

Why two levels: float results depend on the CPU's vector kernels (oneDNN/MKL pick AVX2 or AVX-512
paths, and reduction orders follow), on the thread count and on the library versions. On the
machine the reference was recorded on (its signature: CPU model, torch's CPU capability, torch /
diffusers / transformers / peft / accelerate versions; one intra-op thread, set here) the hashes
must match exactly: that is the bit-identity a refactor has to keep. Elsewhere (another x86 CPU in
CI) an exact hash would fail for reasons that are no regression, so the summaries are compared
with rtol 1e-5 instead (a signed sum against 1e-5 of its absolute sum, since it may cancel to near
0). The weights' own sums hardly see training (a few steps move each weight by about the learning
rate, against weights of about 0.05), so the sums of the change carry the check: a 0.1 % change of
the learning rate moves them by about 1e-3 relative, a hundred times the tolerance, while
kernel-order differences (about 1e-7 relative per weight; AdamW's eps keeps a gradient that is
only rounding noise from taking a full step) stay below it.

Regenerate the reference only on purpose, on a commit whose training behaviour is the one to
keep: `SITDISTILL_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sitdistill.core import checkpoint as ckpt
from sitdistill.core.recipe import load_recipe
from sitdistill.train.trainer import Distiller

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "golden_weights.json"
WRITE = os.environ.get("SITDISTILL_WRITE_GOLDEN") == "1"
RTOL = 1e-5

PP = "losses.perturbations"
TINY = ("student.hidden_size=32", "student.depth=2", "student.num_heads=2", "data.toy.num_images=24",
        "training.batch_size=4", "training.max_steps=3", "training.checkpoint_every=1000",
        "training.sample_every=0", "training.log_every=1", "optimizer.warmup_steps=0", "optimizer.lr=1e-3",
        "optimizer.name=adamw",  # the golden weights were recorded with AdamW (the toy default is Muon now)
        "training.mixed_precision=no",  # ... in float32 (the toy default `auto` picks bf16 on CPUs that multiply it)
        "evaluation.at_end=0", "output.tensorboard=false", "data.caption_dropout=0.3")
FEATURE = ("losses.feature=0.5", "losses.features.student_blocks=[1]", "losses.features.teacher_modules=[mid_block]",
           "losses.features.projector_hidden=16")
BATCH_PARTS = (f"{PP}.input_noise.enabled=true", f"{PP}.caption_mix.enabled=true", f"{PP}.prompt_file.enabled=true",
               f"{PP}.embedding_noise.enabled=true", f"{PP}.timestep_jitter.enabled=true")
TRAJECTORY = (f"{PP}.trajectory.enabled=true", f"{PP}.trajectory.num_steps=2", f"{PP}.trajectory.guidance_scale=2.0")
CASES = {
    "sd15": ("sd15", "toy.yaml", (
        "losses.eps=1.0", "losses.min_snr_gamma=5.0", "losses.teacher=1.0", "losses.teacher_weighting=min_snr",
        "losses.guided_teacher=true", "losses.guidance_range=[1.0,3.0]", "losses.perturb=0.5",
        *FEATURE, *BATCH_PARTS, *TRAJECTORY)),
    "sdxl": ("sdxl", "toy.yaml", (
        "losses.eps=0", "losses.teacher=1.0", "losses.teacher_weighting=v", "losses.guided_teacher=true",
        "losses.guidance_range=[2.0,5.0]", "student.guidance_embed=true", "student.text_pool=true",
        "losses.perturb=0.5", *FEATURE, *BATCH_PARTS, *TRAJECTORY, f"{PP}.trajectory.prompts=prompt_file")),
    "e2e": ("sdxl", "toy_e2e.yaml", (
        "training.init_from=null", "training.max_steps=2", "losses.eps=1.0", "losses.teacher=1.0",
        "losses.perturb=0.5", *FEATURE, *BATCH_PARTS, "e2e.lora_rank=2", "e2e.lora_alpha=2.0",
        "e2e.text_encoder_align=0.1", "optimizer.vae_lr=1e-3", "optimizer.text_encoder_lr=1e-3",
        "data.caption_dropout=0.5")),
    "e2e_repa": ("sd15", "toy_e2e.yaml", (
        "training.init_from=null", "training.max_steps=2", "training.train_text_encoder=false", "losses.eps=1.0",
        "losses.teacher=1.0", *FEATURE, "e2e.feature_grad_to_vae=true", "e2e.vae_recon=0", "e2e.vae_kl=0",
        "e2e.vae_align=0", "optimizer.vae_lr=1e-3")),
}


def signature() -> dict[str, str]:
    """What the bits of a float result depend on, besides the code."""
    import accelerate
    import diffusers
    import peft
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "threads": "1"}


def digest(tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict:
    """SHA-256 over (name, dtype, shape, bytes) in name order, and a float64 summary of the weights
    and of what training moved them by (`start`: the same tensors before the first step)."""
    h = hashlib.sha256()
    out = dict.fromkeys(("sum", "abs", "sq", "delta_sum", "delta_abs", "delta_sq"), 0.0)
    out["n"] = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        w, delta = t.double(), t.double() - start[name].double()
        out["n"] += t.numel()
        for prefix, x in (("", w), ("delta_", delta)):
            out[prefix + "sum"] += float(x.sum())
            out[prefix + "abs"] += float(x.abs().sum())
            out[prefix + "sq"] += float(x.square().sum())
    out["sha256"] = h.hexdigest()
    return out


def train_case(case: str, teachers: dict, tmp_path: Path, monkeypatch) -> dict[str, dict]:
    from test_e2e import like_stage_one

    family, recipe, overrides = CASES[case]
    monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path / "cache"))  # cold caches: the same inputs every time
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top left\na blue square in the center\na green triangle\n")
    r = load_recipe(ROOT / "recipes" / recipe, [
        f"teacher.source={teachers[family]}", f"output.dir={tmp_path / 'run'}", *TINY, *overrides,
        f"{PP}.prompt_file.path={prompts}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = Distiller(r)
        if case.startswith("e2e"):  # stage 2 starts from a trained student (see test_e2e.like_stage_one)
            like_stage_one(d.accelerator.unwrap_model(d.student))
        start = d.save()  # checkpoint-0: the weights before the first step (saving draws nothing)
        summary = d.fit()
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == r.training.max_steps and summary["bad_steps"] == 0
    latest = ckpt.find_latest(tmp_path / "run")
    assert latest != start

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(next(folder.glob("*.safetensors")))

    return {folder.name: digest(tensors(folder), tensors(start / folder.name))
            for folder in sorted(p for p in latest.iterdir() if p.is_dir())}


def close(got: dict, want: dict) -> list[str]:
    """The summary entries that differ beyond RTOL (a signed sum measured against its absolute one)."""
    bad = []
    if got["n"] != want["n"]:
        bad.append(f"n {got['n']} != {want['n']}")
    for key, scale in (("abs", "abs"), ("sq", "sq"), ("sum", "abs"),
                       ("delta_abs", "delta_abs"), ("delta_sq", "delta_sq"), ("delta_sum", "delta_abs")):
        scale = want[scale]
        if abs(got[key] - want[key]) > RTOL * abs(scale):
            bad.append(f"{key} {got[key]!r} vs {want[key]!r}")
    return bad


@pytest.mark.parametrize("case", list(CASES))
def test_golden_weights(case, tiny_teachers, tmp_path, monkeypatch):
    got = train_case(case, tiny_teachers, tmp_path, monkeypatch)
    if WRITE:
        reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
        if reference.get("signature") != signature():
            reference = {"signature": signature(), "cases": {}}
        reference["cases"][case] = got
        REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
        return
    reference = json.loads(REFERENCE.read_text())
    want = reference["cases"][case]
    assert sorted(got) == sorted(want), "the checkpoint holds other model folders"
    if reference["signature"] == signature():  # the recording machine: bit for bit
        differ = {name: close(got[name], want[name]) for name in want if got[name]["sha256"] != want[name]["sha256"]}
        assert not differ, f"weights are not bit-identical to the reference ({case}): {differ}"
    else:  # another CPU or library build: the summaries within RTOL
        differ = {name: close(got[name], want[name]) for name in want}
        assert not any(differ.values()), f"weights differ from the reference beyond rtol {RTOL} ({case}): {differ}"
