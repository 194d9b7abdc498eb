"""The end-to-end stage: trainable student-side VAE and CLIP text encoders beside a frozen teacher.

REPA-E (Leng et al. 2025, "REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion
Transformers") found that the plain diffusion loss, backpropagated into the VAE, collapses the
latent space (the easiest way to denoise is a latent that is easy to predict). Its recipe, kept
here: the diffusion losses see the VAE's latents through a stop-gradient; the VAE itself is kept
honest by its own losses. Ours, per sample (N,), logged as `loss/vae_*`:

    vae_recon  L1 and/or L2 between the pixels and their decoding through the student VAE
    vae_kl     KL(student posterior || N(0, I)), mean per latent element
    vae_align  MSE(student latent mean, frozen teacher latent mean)

The alignment term replaces REPA-E's representation alignment in one role: our student also
learns from a *teacher* whose noise targets are only valid in the teacher's latent space, so the
student latents must stay close to it. `e2e.diffusion_grad_to_vae` lifts the stop-gradient for
ablations (with a warning).

Two sides, never mixed:
  * the teacher keeps its frozen VAE and text encoders; its conditioning and its latent targets
    always come from them (or from caches of them), so its predictions never drift;
  * the student side is a front end of its own (`sitdistill.teachers.frontend`, built by
    `teacher.front.with_modules`) whose `vae` / `text_encoder` / `text_encoder_2` are trainable
    copies (full fine-tuning or peft LoRA): the same encoding code on other weights, which builds a
    graph because those weights train.

Checkpoints hold the student-side parts as `vae/`, `text_encoder/`, `text_encoder_2/` folders:
`save_pretrained` folders in full mode, `adapter_model.safetensors` + `adapter_config.json` in
LoRA mode. `load_student_side(checkpoint, teacher)` rebuilds the student side for sampling,
export and evaluation.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from sitdistill.core import checkpoint as ckpt
from sitdistill.train.losses import Terms, mse_per_sample
from sitdistill.train.perturb import where_rows
from sitdistill.teachers.frontend import first_weight, scale_latents

Tensor = torch.Tensor

# LoRA targets (checked with peft 0.21): CLIP attention + MLP; the VAE's mid-block
# attention and every convolution of its resnets.
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
VAE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv1", "conv2", "conv_out", "conv_shortcut"]
LORA_WEIGHTS = "adapter_model.safetensors"  # peft's file names
LORA_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# Trainable copies, LoRA, checkpoint folders
# ---------------------------------------------------------------------------------------------


def trainable_copy(module: nn.Module, mode: str, *, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """A float32 copy of a frozen teacher part: every weight trainable (`full`) or a fresh LoRA
    adapter on `targets` with the base frozen (`lora`; B = 0, so it starts as the teacher's part)."""
    part = copy.deepcopy(module).float()
    if mode == "full":
        return part.requires_grad_(True).train()
    if mode != "lora":
        raise ValueError(f"mode must be full or lora, got {mode!r}")
    from peft import LoraConfig, inject_adapter_in_model

    # peft's injector works on any module (transformers' own `add_adapter` wants peft >= 0.22) and
    # leaves only the adapter trainable.
    part.requires_grad_(False)
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), part).train()


def is_lora(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")


class LoraWeights:
    """A LoRA-carrying module as a checkpoint entry: `save_pretrained` writes only the adapter
    (peft's file names), `load_state_dict` restores it; so `sitdistill.core.checkpoint` saves and resumes
    it like any model folder."""

    def __init__(self, module: nn.Module):
        self.module = module

    def save_pretrained(self, folder: str | Path) -> None:
        from peft.utils import get_peft_model_state_dict

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.module).items()}
        save_file(state, folder / LORA_WEIGHTS)
        self.module.peft_config["default"].save_pretrained(str(folder))

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = False):
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.module, state)
        # The base weights are "missing" by design; only adapter keys count.
        result.missing_keys[:] = [k for k in result.missing_keys if "lora_" in k]
        return result


def checkpoint_entry(module: nn.Module):
    return LoraWeights(module) if is_lora(module) else module


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``module`` into its base weights (W + scale * B @ A) and put the
    plain layers back, in place: the result is an ordinary diffusers/transformers module that
    ``save_pretrained`` writes and ``from_pretrained`` loads with no adapter left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return module


def load_part(teacher_part: nn.Module, folder: Path) -> nn.Module:
    """A student-side part from its checkpoint folder, for inference (frozen, eval mode): a LoRA
    adapter on a copy of the teacher's part, merged into it, or full weights loaded into a copy.
    Merged, the part runs as fast as the teacher's and saves (export) as a plain component."""
    if (folder / LORA_WEIGHTS).is_file():
        from peft import LoraConfig

        cfg = LoraConfig.from_pretrained(str(folder))
        part = trainable_copy(teacher_part, "lora", rank=cfg.r, alpha=cfg.lora_alpha,
                              targets=sorted(cfg.target_modules))
        ckpt.load_model_folder(LoraWeights(part), folder)
        part = merge_lora(part)
    else:
        part = copy.deepcopy(teacher_part).float()
        ckpt.load_model_folder(part, folder)
    return part.requires_grad_(False).eval()


def resolve_init(source: str | Path) -> Path:
    """`training.init_from`: a complete checkpoint folder, or a run folder (its latest one)."""
    path = Path(source)
    if ckpt.is_complete(path):
        return path
    latest = ckpt.find_latest(path)
    if latest is None:
        raise FileNotFoundError(f"training.init_from: {path} is neither a complete checkpoint nor a run "
                                "folder holding one")
    return latest


def load_student_side(checkpoint_dir: str | Path, teacher):
    """The student's own front end of a checkpoint (its VAE and text encoders), or None when the
    checkpoint holds none (a stage-1 checkpoint: the student samples through the teacher's).

    For sampling, export and evaluation: `side.encode_prompt(...)` gives the student's
    conditioning and `side.decode_latents(...)` decodes its samples. Parts the checkpoint does not
    hold are the teacher's frozen ones.
    """
    path = Path(checkpoint_dir)
    vae = load_part(teacher.vae, path / "vae") if (path / "vae").is_dir() else None
    front = teacher.front
    encoders = {name: load_part(getattr(front, name), path / name)
                for name in front.TEXT_ENCODERS if (path / name).is_dir()}
    if vae is None and not encoders:
        return None
    return front.with_modules(vae, **encoders)


# ---------------------------------------------------------------------------------------------
# Losses and measures
# ---------------------------------------------------------------------------------------------


def reconstruction_loss(recon: Tensor, pixels: Tensor, kind: str) -> Tensor:
    """Per-sample pixel error (N,): mean |d| (l1), mean d^2 (l2), or their sum (l1+l2)."""
    diff = (recon.float() - pixels.float()).flatten(1)  # (N, 3*H*W)
    parts = {"l1": lambda: diff.abs().mean(1), "l2": lambda: diff.square().mean(1)}
    return sum(parts[k]() for k in kind.split("+"))


def kl_per_element(dist) -> Tensor:
    """KL(posterior || N(0, I)) of a diffusers DiagonalGaussianDistribution, mean per element (N,)."""
    per_sample = dist.kl()  # (N,) summed over C, h, w
    return per_sample / dist.mean[0].numel()


def relative_drift(student: dict[str, Tensor], frozen: dict[str, Tensor]) -> Tensor:
    """Mean over samples and text keys of ||s - f|| / ||f||: how far the student's encodings
    moved from the frozen encoders' on the same captions (0 at the start of the stage)."""
    values = []
    for key in ("encoder_hidden_states", "text_embeds"):
        if key in student:
            s, f = student[key].detach().float().flatten(1), frozen[key].float().flatten(1)
            values.append(((s - f).norm(dim=1) / f.norm(dim=1).clamp_min(1e-8)).mean())
    return torch.stack(values).mean()


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class EndToEnd:
    """The student-side parts of a run and their losses; the trainer calls it from its step.

    `vae`: the trainable VAE or None; `text_encoders`: name -> trainable encoder (empty when the
    encoders stay frozen); `side`: the student's front end over them (the teacher's for the rest).
    """

    def __init__(self, recipe: DictConfig, teacher):
        t, e = recipe.training, recipe.e2e
        self.cfg, self.teacher = e, teacher
        lora = dict(rank=e.lora_rank, alpha=e.lora_alpha)
        self.vae = trainable_copy(teacher.vae, e.vae_mode, targets=VAE_LORA_TARGETS, **lora) \
            if t.train_vae else None
        if self.vae is not None and recipe.student.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        front = teacher.front
        self.text_encoders = {name: trainable_copy(getattr(front, name), e.text_encoder_mode,
                                                   targets=TEXT_LORA_TARGETS, **lora)
                              for name in front.TEXT_ENCODERS if t.train_text_encoder}
        self.side = front.with_modules(self.vae, **self.text_encoders)
        if e.diffusion_grad_to_vae and self.vae is not None:
            warnings.warn("e2e.diffusion_grad_to_vae=true: the diffusion losses train the VAE. REPA-E "
                          "reports that this collapses the latent space; use it for ablations only.",
                          stacklevel=2)

    def modules(self) -> dict[str, nn.Module]:
        """The trainable student-side parts by checkpoint folder name."""
        return {**({"vae": self.vae} if self.vae is not None else {}), **self.text_encoders}

    def checkpoint_models(self) -> dict[str, Any]:
        """Entries for `sitdistill.core.checkpoint`: full modules, or LoRA adapters only."""
        return {name: checkpoint_entry(m) for name, m in self.modules().items()}

    def param_groups(self, opt: DictConfig) -> list[dict]:
        """One optimizer group per kind of part, each with its own learning rate, in a fixed
        order (vae, then text encoders) so that optimizer state lines up across resumes."""
        groups = []
        if self.vae is not None:
            groups.append({"params": [p for p in self.vae.parameters() if p.requires_grad],
                           "lr": opt.vae_lr if opt.vae_lr is not None else opt.lr})
        if self.text_encoders:
            groups.append({"params": [p for m in self.text_encoders.values() for p in m.parameters()
                                      if p.requires_grad],
                           "lr": opt.text_encoder_lr if opt.text_encoder_lr is not None else opt.lr})
        return groups

    # ------------------------------------------------------------------ the step's pieces
    def encode(self, captions: list[str], with_uncond: bool = False, **sizes):
        """The student's conditioning through the student-side encoders, with gradients:
        `cond`, or `(cond, uncond)` (the empty prompt, zeros where the pipeline forces them)."""
        return self.side.encode_prompt(list(captions), do_cfg=with_uncond, **sizes)

    def conditioning(self, captions: list[str], drop: Tensor, frozen_cond: dict, **sizes) -> tuple[dict, Terms]:
        """The student's conditioning for a batch (dropped captions get the student-side
        unconditional input), with its drift from the frozen encoders' `frozen_cond` (logged as
        `drift/text_encoder`) and the optional alignment term."""
        out = Terms()
        if bool(drop.any()):
            cond, uncond = self.encode(captions, with_uncond=True, **sizes)
        else:
            cond, uncond = self.encode(captions, **sizes), None
        out.logs["drift/text_encoder"] = relative_drift(cond, frozen_cond)
        if self.cfg.text_encoder_align:
            out.add("text_encoder_align", sum(mse_per_sample(cond[k], frozen_cond[k]) for k in cond if k != "time_ids"),
                    self.cfg.text_encoder_align)
        if uncond is None:
            return cond, out
        return where_rows(drop, uncond, cond), out

    def latents(self, pixels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None, Terms]:
        """Clean latents x0 (N, C, h, w) from the student VAE (a posterior sample drawn with
        `generator`), detached unless `diffusion_grad_to_vae`, and the VAE's own loss terms. The
        second value is x0 with its graph for `feature_grad_to_vae_` (REPA-E's path), else None
        (with diffusion_grad_to_vae the main backward already gets there)."""
        e, vae = self.cfg, self.vae
        out = Terms()
        dist = vae.encode(pixels.to(first_weight(vae).dtype)).latent_dist
        z = dist.sample(generator=generator)  # (N, C, h, w), unscaled
        recon = vae.decode(z, return_dict=False)[0]  # (N, 3, H, W)
        target = self.teacher.encode_images(pixels, sample=False)  # frozen teacher latent mean, no grad
        out.add("vae_recon", reconstruction_loss(recon, pixels, e.vae_recon_kind), e.vae_recon)
        out.add("vae_kl", kl_per_element(dist), e.vae_kl)
        out.add("vae_align", mse_per_sample(scale_latents(vae, dist.mean), target), e.vae_align)
        x0 = scale_latents(vae, z).to(pixels.dtype)
        attached = x0 if e.feature_grad_to_vae and not e.diffusion_grad_to_vae else None
        return (x0 if e.diffusion_grad_to_vae else x0.detach()), attached, out  # REPA-E's stop-gradient

    @staticmethod
    def feature_grad_to_vae_(weighted_feature_loss: Tensor, x_t: Tensor, x0_attached: Tensor, noise: Tensor,
                             t: Tensor, schedule) -> None:
        """REPA-E: the alignment term's gradient at x_t, carried back through x_t = add_noise(x0,
        noise, t) into the student VAE's `.grad` (`x0_attached`: the VAE latents with their graph,
        from `latents`); the student's own gradients come from the main backward. `x_t` is the
        (detached, grad-requiring) state the student ran on. This is a backward of its own, run
        before the main one, which frees the student's graph that it needs; it keeps the VAE
        encoder's graph, which the main backward needs for the VAE's own terms."""
        (g,) = torch.autograd.grad(weighted_feature_loss, x_t, retain_graph=True)
        schedule.add_noise(x0_attached, noise, t).backward(g, retain_graph=True)

    def sync_gradients(self, accelerator) -> None:
        """Average the parts' gradients over processes (they are not DDP-wrapped: the encoding code
        calls `vae.encode` / `encoder(...)` directly, which DDP would not see)."""
        if accelerator.num_processes == 1:
            return
        world = accelerator.num_processes
        for module in self.modules().values():
            for p in module.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)

    def all_finite(self) -> bool:
        return all(torch.isfinite(p).all() for m in self.modules().values() for p in m.parameters())

    def num_trainable(self) -> int:
        return sum(p.numel() for m in self.modules().values() for p in m.parameters() if p.requires_grad)

    def describe(self) -> str:
        parts = [f"{name} ({'LoRA' if is_lora(m) else 'full'})" for name, m in self.modules().items()]
        return (f"end-to-end stage: training {', '.join(parts)}: {self.num_trainable() / 1e6:.2f}M parameters; "
                "the teacher keeps its frozen copies")


__all__ = ["EndToEnd", "load_student_side", "resolve_init",
           "trainable_copy", "LoraWeights", "TEXT_LORA_TARGETS", "VAE_LORA_TARGETS"]
