"""Toy teachers: tiny SD1.5-style and SDXL-style pipelines trained here, on the toy world, on a CPU.

What gets built (all from small configs, all saved as an ordinary diffusers pipeline folder):

* a BPE tokenizer trained with the ``tokenizers`` library on the toy world's captions, wrapped as a
  ``CLIPTokenizer`` (byte-level alphabet, ``</w>`` word ends, CLIP's special tokens; no external
  vocabulary). SDXL's second tokenizer is the same vocabulary padded with ``"!"``, as in SDXL.
* an ``AutoencoderKL`` with downsampling factor 4 (three blocks): a 64 px image gives a 16x16 latent,
  i.e. 8x8 = 64 tokens for a patch-2 SiT student (factor 8 would leave 16 tokens). No mid-block
  attention (the toy images need none; it is the most expensive layer). Trained on 32 px crops with
  L1 + MSE weighted toward the shapes' pixels + a small KL term, starting from a small posterior std;
  ``scaling_factor`` = 1 / (measured latent std), as SD did. Trained once and shared by both
  families (cached under its own key).
* ``CLIPTextModel`` (SDXL adds ``CLIPTextModelWithProjection``), trained jointly with the UNet by the
  diffusion loss alone: the encoder only has to separate a few dozen words, no contrastive stage.
* ``UNet2DConditionModel`` with cross-attention only at the lower resolutions (attention at the
  highest resolution dominates a tiny UNet's cost). SDXL: ``addition_embed_type="text_time"`` with
  pooled text embeds and the six micro-conditioning ids. SD1.5 family: cross-attention only (with
  ``text_pool``, ``addition_embed_type="text"``: an attention pooling of the text states added to
  the time embedding, as DeepFloyd IF's UNet has; it did not make the position words count).
  Both builds add the caption-words objective (``caption_words``): a linear read-out of each text
  encoder's end-of-text state must tell every factor of the caption, as a CLIP encoder's
  end-of-text state summarises its caption; without it the jointly trained SD1.5-style encoder's
  summary, the token the UNet reads position from, never told left from right, and the SDXL-style
  teacher learned position in some builds only (README, "The SD1.5-style toy teacher", "Which
  SDXL-style teacher"). The read-out is not saved: the folder is an ordinary pipeline.
* The scheduler config of the real teacher it imitates (SD1.5: PNDM, SDXL: Euler; both 1000 steps,
  scaled_linear 0.00085 -> 0.012, epsilon). Training noise comes from ``DDPMScheduler`` built from
  that same config, so ``add_noise`` is the convention by definition.

Classifier-free guidance: 10 % of captions are dropped. SD1.5 drops to the empty prompt (what the
pipeline encodes for the negative); SDXL drops to all-zero embeddings, because its pipeline's
``force_zeros_for_empty_prompt`` makes the unconditional branch exactly zero.

Building is cached: ``ensure_toy_teacher(family)`` returns ``<cache>/toy-teacher/<family>-<key>``,
key = hash of the settings and ``TOY_TEACHER_VERSION``; builds go to a temporary folder renamed into
place at the end, so an interrupted build never looks finished.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sitdistill.core.modules import eval_mode
from sitdistill.core.muon import MuonAdamW
from sitdistill.data import toy as world
from sitdistill.teachers.frontend import final_layer_norm
from sitdistill.teachers.toy_cache import FINISHED_MARKER, atomic_dir, cache_key, default_cache_root, is_finished
from sitdistill.teachers.toy_split import HalfBatchWorker, split_rows
from sitdistill.teachers.toy_probe import WordGainProbe
from sitdistill.teachers.toy_parts import (PRESETS, SDXL_PAD, _tokenize, build_text_encoder, build_unet, build_vae,
                                encode_text, swap_words, text_conditioning, train_tokenizer,
                                with_micro_conditioning)

# Bump when a change here alters what a UNet/text-encoder build computes; one that only rounds
# differently (the same loss in another order) keeps the key: a cached build is still a build of its settings.
TOY_TEACHER_VERSION = "3"
TOY_VAE_VERSION = "1"      # bump when a change here alters what the (shared) VAE build produces
FAMILIES = ("sd15", "sdxl")
# UNet training steps by family: with the caption-words objective both draw all three right
# 0.85-0.95 of the time after 4000 (README, "The SD1.5-style toy teacher", "Which SDXL-style teacher").
UNET_STEPS = {"sd15": 4000, "sdxl": 4000}
# Pooled text in the SD1.5-style UNet's time embedding: off (it did not make the position words
# count; README). SDXL's UNet has its own pooled input and ignores this; True there keeps the
# earlier SDXL-style builds' cache keys.
TEXT_POOL = {"sd15": False, "sdxl": True}
# Weight of the caption-words objective by family (ToyTeacherSettings.caption_words): without it the
# jointly trained SD1.5-style text encoder's end-of-text state, the token its UNet reads position
# from, never told left from right (all three right 0.66 at best); with it 0.95 (README). The
# SDXL-style teacher learns position without it in most builds, but not in all (0.55 to 0.99 for the
# same settings); with it, position 1.00 in each of three seeds (README, "Which SDXL-style teacher").
CAPTION_WORDS = {"sd15": 0.1, "sdxl": 0.1}
# The SD1.5-style UNet's text-norm warm-up and ramp as shares of its steps (ToyTeacherSettings): the
# previous fix for the position words (0.38 -> 0.66), not needed with the caption-words objective,
# which reads them through the final layer norm from the start (README). Kept as an option.
TEXT_NORM_WARMUP = {"sd15": 0.0, "sdxl": 0.0}
TEXT_NORM_RAMP = 0.2
VAE_INIT_LOGVAR = -6.0

# The real teachers' scheduler configs (what SD1.5 / SDXL ship), so the toy teachers are read by
# the same loading and schedule code as the real ones.
SCHEDULER_CONFIGS = {
    "sd15": {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
             "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
             "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
             "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True},
}

# Settings added after TOY_TEACHER_VERSION 3, at their defaults (ToyTeacherSettings.key_settings).
LATER_DEFAULTS = {"optimizer": "adamw", "muon_lr_scale": 5.0, "multires_noise": 0, "multires_discount": 0.5,
                  "text_norm_warmup": 0, "text_norm_ramp": 500, "mirror": False, "caption_words": 0.0}
# The caption factors the caption-words objective asks the text encoder's end-of-text state to tell
# (ToyTeacherSettings.caption_words).
CAPTION_FACTORS = (("colour", world.COLOURS), ("shape", world.SHAPES), ("position", world.POSITIONS),
                   ("size", world.SIZES), ("background", world.BACKGROUNDS))


@dataclass(frozen=True)
class ToyTeacherSettings:
    """Everything that determines a toy teacher (its cache key is a hash of these)."""
    family: str = "sd15"
    preset: str = "small"
    seed: int = 0
    n_images: int = 3000            # training images drawn from the toy world
    resolutions: tuple = world.RESOLUTIONS
    max_length: int = 16            # tokenizer/text-encoder context (captions are <= 14 tokens)
    vae_steps: int = 1500
    vae_batch: int = 8
    vae_crop: int = 32              # the VAE is fully convolutional: train on crops, 4x cheaper
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-4
    vae_fg_weight: float = 4.0      # extra reconstruction weight on saturated (shape) pixels
    unet_steps: int | None = None   # None: the family's default (UNET_STEPS)
    batch_size: int = 24
    lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    loss_weighting: str = "min_snr"  # a key of sitdistill.core.schedule.LOSS_WEIGHTINGS
    text_pool: bool | None = None   # SD1.5 family: pooled text added to the time embedding (build_unet);
                                    # None: the family's default (TEXT_POOL)
    unet_levels: int = 3            # resolution levels of the UNet (build_unet)
    snr_gamma: float | None = 5.0   # gamma of min-SNR-gamma (Hang et al. 2023)
    optimizer: str = "adamw"        # or "muon": Muon for the UNet's matrices and kernels (sitdistill.core.muon)
    muon_lr_scale: float = 5.0      # Muon's learning rate over `lr` (its update RMS = lr at 5)
    multires_noise: int = 0         # > 0: training noise with this many coarser levels added (_training_noise)
    multires_discount: float = 0.5  # weight of level i is multires_discount ** i
    # SD1.5 family: for this many UNet steps the UNet reads the text encoder's last layer *before*
    # its final layer norm; then the norm, set to about the identity on the states so far, is blended
    # in over text_norm_ramp steps, so the finished teacher is an ordinary SD pipeline (_text_norm_mix).
    # None: the family's share of unet_steps (TEXT_NORM_WARMUP, TEXT_NORM_RAMP).
    text_norm_warmup: int | None = None
    text_norm_ramp: int | None = None
    # Mirror half of each batch left-right, with "left" and "right" swapped in its captions (every toy
    # shape is mirror-symmetric, so the mirrored drawing is the swapped caption's drawing).
    mirror: bool = False
    # Weight of the caption-words objective: a linear read-out of each text encoder's end-of-text
    # state (its last layer, before the final layer norm) must tell every factor of the caption
    # (cross-entropy, CaptionWordsHead). A real CLIP text encoder's end-of-text state summarises the
    # whole caption because of its contrastive pretraining; a toy encoder trained by the diffusion
    # loss alone summarises only what the UNet already reads. 0: off.
    caption_words: float | None = None  # None: the family's default (CAPTION_WORDS)

    def __post_init__(self) -> None:
        from sitdistill.core.schedule import LOSS_WEIGHTINGS

        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.loss_weighting!r}; choose from {list(LOSS_WEIGHTINGS)}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown toy-teacher family {self.family!r}; choose from {FAMILIES}")
        if self.unet_steps is None:
            object.__setattr__(self, "unet_steps", UNET_STEPS[self.family])
        if self.text_pool is None:
            object.__setattr__(self, "text_pool", TEXT_POOL[self.family])
        if self.caption_words is None:
            object.__setattr__(self, "caption_words", CAPTION_WORDS[self.family])
        if self.text_norm_warmup is None:
            object.__setattr__(self, "text_norm_warmup", round(self.unet_steps * TEXT_NORM_WARMUP[self.family]))
        if self.text_norm_ramp is None:
            object.__setattr__(self, "text_norm_ramp", round(self.unet_steps * TEXT_NORM_RAMP) if self.text_norm_warmup
                               else LATER_DEFAULTS["text_norm_ramp"])
        if self.preset not in PRESETS:
            raise ValueError(f"unknown toy-teacher preset {self.preset!r}; choose from {list(PRESETS)}")
        if self.multires_noise < 0 or not 0.0 < self.multires_discount <= 1.0:
            raise ValueError(f"multires_noise must be >= 0 and multires_discount in (0, 1], got "
                             f"{self.multires_noise} and {self.multires_discount}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown toy-teacher optimizer {self.optimizer!r}; choose from adamw, muon")
        if self.caption_words < 0:
            raise ValueError(f"caption_words must be >= 0, got {self.caption_words}")
        if self.text_norm_warmup < 0 or self.text_norm_ramp < 0:
            raise ValueError(f"text_norm_warmup and text_norm_ramp must be >= 0, got {self.text_norm_warmup} "
                             f"and {self.text_norm_ramp}")
        if self.text_norm_warmup and self.family != "sd15":
            raise ValueError("text_norm_warmup applies to the sd15 family only (SDXL reads pre-norm states anyway)")
        if self.text_norm_warmup and self.text_norm_warmup + self.text_norm_ramp > self.unet_steps:
            raise ValueError(f"text_norm_warmup + text_norm_ramp ({self.text_norm_warmup + self.text_norm_ramp}) "
                             f"must be at most unet_steps ({self.unet_steps})")

    def key_settings(self) -> dict:
        """The settings as the cache key and the finished marker hold them: the ones added after
        version 3 only when they differ from their defaults, so every earlier build keeps its key."""
        return {k: v for k, v in asdict(self).items() if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}

    def vae_part(self) -> dict:
        """The settings the VAE depends on (the VAE is shared by both families)."""
        return {k: getattr(self, k) for k in ("preset", "seed", "n_images", "resolutions", "vae_steps",
                                             "vae_batch", "vae_crop", "vae_lr", "vae_kl_weight", "vae_fg_weight")}


# --- Data ---------------------------------------------------------------------------------------
def _draw_groups(settings: ToyTeacherSettings) -> dict[tuple[int, int], dict]:
    """Training set grouped by resolution (a batch is one resolution): pixels in [-1, 1] + captions."""
    specs = world.ToyWorld(resolutions=tuple(map(tuple, settings.resolutions))).sample(settings.n_images,
                                                                                     settings.seed)
    groups: dict[tuple[int, int], dict] = {}
    for spec in specs:
        g = groups.setdefault((spec.width, spec.height), {"pixels": [], "captions": []})
        g["pixels"].append(np.asarray(world.draw(spec)))
        g["captions"].append(spec.caption)
    for g in groups.values():
        arr = np.stack(g["pixels"]).astype(np.float32) / 127.5 - 1.0  # (N, H, W, 3)
        g["pixels"] = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return groups


def _caption_labels(captions: Sequence[str]) -> torch.Tensor:
    """(N, len(CAPTION_FACTORS)) index of each caption's colour, shape, position, size, background."""
    rows = []
    for caption in captions:
        fields = world.parse_caption(caption)
        rows.append([list(table).index(fields[name]) for name, table in CAPTION_FACTORS])
    return torch.tensor(rows, dtype=torch.long)


class CaptionWordsHead(torch.nn.Module):
    """The caption-words objective's read-out (trained with the build, not saved): a layer norm and
    one linear classifier per caption factor on a text encoder's end-of-text state."""

    def __init__(self, hidden: int, eos_token_id: int):
        super().__init__()
        self.eos_token_id = eos_token_id
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(table)) for _, table in CAPTION_FACTORS)

    def forward(self, states: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the factors, read from a text encoder's last-layer states (B, L, D)
        on ``ids`` (before its final layer norm: ``hidden_states[-1]``) at each row's first
        end-of-text token."""
        eos = (ids == self.eos_token_id).int().argmax(dim=-1)  # CLIP's pooling position
        h = self.norm(states[torch.arange(ids.shape[0]), eos])
        return torch.stack([F.cross_entropy(head(h), labels[:, i]) for i, head in enumerate(self.heads)]).mean()


def _caption_conditioning(fam: str, encoders: list, caption_ids: list[torch.Tensor], empty_ids: list[torch.Tensor],
                          drop: torch.Tensor, height: int, width: int, norm_mix: float = 1.0) -> tuple[dict, list]:
    """`unet_kwargs` of the batch with its rows in ``drop`` replaced by the empty prompt, from one
    pass of each encoder over the batch's *undropped* captions (and, SD1.5, one over the empty
    prompt), returned with those passes' outputs, whose states the caption-words objective reads."""
    outputs = [e(c, output_hidden_states=True) for e, c in zip(encoders, caption_ids)]
    cond = text_conditioning(fam, encoders, outputs, drop, norm_mix)  # SDXL: dropped rows are zeroed here
    if fam == "sd15" and bool(drop.any()):
        empty = encode_text(fam, encoders, empty_ids, drop[:1], norm_mix)["encoder_hidden_states"]  # (1, L, D)
        cond["encoder_hidden_states"] = torch.where(drop[:, None, None], empty, cond["encoder_hidden_states"])
    return with_micro_conditioning(fam, cond, height, width), outputs


def _batch_loss(models: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The build's loss on ``batch`` (a step's batch or some of its rows: ``x_t``, ``t``, ``noise``,
    the loss ``weight``, caption ``drop``, ``labels``, token ``ids`` per encoder, the pixel ``height``
    and ``width``, the text-norm ``mix``, and the ``total`` rows of the step's batch) as that many
    rows' share of the step's loss: the loss of two halves adds up to the whole batch's. Returns it
    with the caption-words term (None without that objective). Module-level: the build's worker
    process calls it too (sitdistill.teachers.toy_split)."""
    fam, encoders, heads = models["family"], models["encoders"], models["heads"]
    # One pass over the undropped captions serves the UNet and the caption-words objective.
    cond, outputs = _caption_conditioning(fam, encoders, batch["ids"], models["empty_ids"], batch["drop"],
                                          batch["height"], batch["width"], norm_mix=batch["mix"])
    pred = models["unet"](batch["x_t"], batch["t"], **cond).sample  # epsilon prediction, like SD
    per_sample = (pred - batch["noise"]).square().mean(dim=(1, 2, 3)) * batch["weight"]  # (B,)
    share = len(batch["t"]) / batch["total"]
    loss = per_sample.mean() * share
    words = None
    if heads:
        # Every caption of the batch (dropped ones too: the objective is about the encoder).
        words = torch.stack([h(o.hidden_states[-1], c_ids, batch["labels"])
                             for h, o, c_ids in zip(heads, outputs, batch["ids"])]).mean()
        loss = loss + models["caption_words"] * words * share
    return loss, words


def _backward(models: dict, batch: dict, worker: HalfBatchWorker | None) -> tuple[float, float | None]:
    """The step's gradient on ``batch`` into the parameters' ``.grad``: here, or with ``worker``
    rows [b // 2, b) there and [0, b // 2) here at the same time (sitdistill.teachers.toy_split).
    Returns the step's loss and caption-words term (None without that objective)."""
    b = batch["total"]
    if worker is not None:
        worker.submit(split_rows(batch, b // 2, b))
        batch = split_rows(batch, 0, b // 2)
    loss, words = _batch_loss(models, batch)
    loss.backward()
    if worker is None:
        return loss.item(), None if words is None else words.item()
    other_loss, other_words = worker.add_grads()
    return loss.item() + other_loss, None if words is None else (words.item() + other_words) / 2


def _model_params(models: dict) -> list[torch.nn.Parameter]:
    """The build's trained parameters in one order: the UNet's, the text encoders', the caption-words heads'."""
    return [q for m in [models["unet"], *models["encoders"], *models["heads"]] for q in m.parameters()]


def _worker_spec(models: dict) -> dict:
    """What the build's worker process needs to build the same models (`_worker_models`)."""
    return {"family": models["family"], "unet": models["unet"].config,
            "encoders": [(type(e), e.config) for e in models["encoders"]],
            "heads": [(h.norm.normalized_shape[0], h.eos_token_id) for h in models["heads"]],
            "empty_ids": models["empty_ids"], "caption_words": models["caption_words"]}


def _worker_models(spec: dict) -> tuple[dict, list[torch.nn.Parameter]]:
    """The models of `_worker_spec`, freshly built in training mode, and their `_model_params`."""
    from diffusers import UNet2DConditionModel

    models = {"family": spec["family"], "unet": UNet2DConditionModel.from_config(spec["unet"]).train(),
              "encoders": [cls(config).train() for cls, config in spec["encoders"]],
              "heads": [CaptionWordsHead(hidden, eos).train() for hidden, eos in spec["heads"]],
              "empty_ids": spec["empty_ids"], "caption_words": spec["caption_words"]}
    return models, _model_params(models)


# The build splits each step's batch over two processes (sitdistill.teachers.toy_split) by default
# where torch runs two threads, the 2-core machines it was measured on, and the build is long
# enough to repay the worker's start (a few seconds of imports).
SPLIT_MIN_STEPS = 500


def build_processes(settings: ToyTeacherSettings, processes: int | None = None) -> int:
    """How many processes share the build's UNet steps: ``processes`` (1 or 2) if given; by default
    2 where torch runs two threads and the build has at least SPLIT_MIN_STEPS UNet steps, else 1."""
    if processes is not None:
        if processes not in (1, 2):
            raise ValueError(f"a toy teacher builds on 1 or 2 processes, got {processes}")
        return processes
    return 2 if torch.get_num_threads() == 2 and settings.unet_steps >= SPLIT_MIN_STEPS else 1


def _mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored drawing: "left" and "right" swapped."""
    return swap_words(caption, "left", "right")


@torch.no_grad()
def _posteriors(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for each image, encoded in chunks of 256."""
    dist = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
    return torch.cat([d.mean for d in dist]), torch.cat([d.std for d in dist])


def _pick_group(groups: dict, gen: torch.Generator) -> dict:
    """A resolution group, chosen in proportion to its size."""
    keys = sorted(groups)
    sizes = torch.tensor([len(groups[k]["captions"]) for k in keys], dtype=torch.float)
    return groups[keys[int(torch.multinomial(sizes, 1, generator=gen))]]


def _training_noise(shape: torch.Size, gen: torch.Generator, levels: int, discount: float) -> torch.Tensor:
    """The UNet's training noise: Gaussian, or with ``levels`` > 0 multi-resolution noise: Gaussian
    noise drawn at 1/2, 1/4, ... of the latent's size, upsampled and added with weight
    ``discount ** i``, each sample then rescaled to unit standard deviation (the "pyramid" or
    multires noise of community SD fine-tuning, kohya's ``--multires_noise_iterations``).

    The idea: with SD's scaled_linear schedule the signal is not gone at t = 999 (sqrt(alpha_bar)
    = 0.068), and on a 16 x 16 latent the coarse layout of x_t still shows where the object is;
    coarse noise hides it. Measured on the SD1.5-style teacher it did not make the position words
    count (README, "The SD1.5-style toy teacher"); it stays an option, off by default.
    """
    noise = torch.randn(shape, generator=gen)
    if levels <= 0:
        return noise
    b, c, h, w = shape
    for i in range(1, levels + 1):
        sh, sw = max(1, h >> i), max(1, w >> i)
        coarse = torch.randn((b, c, sh, sw), generator=gen)
        noise = noise + discount ** i * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        if sh == 1 and sw == 1:
            break
    return noise / noise.flatten(1).std(dim=1).view(b, 1, 1, 1)


def _text_norm_mix(step: int, settings: ToyTeacherSettings) -> float:
    """How much of the text encoder's final layer norm the UNet reads at this step: 0 during
    ``text_norm_warmup``, then rising linearly to 1 over ``text_norm_ramp`` steps."""
    if step < settings.text_norm_warmup:
        return 0.0
    if settings.text_norm_warmup == 0 or settings.text_norm_ramp == 0:
        return 1.0
    return min(1.0, (step - settings.text_norm_warmup + 1) / settings.text_norm_ramp)


@torch.no_grad()
def _fit_text_norm(encoder, ids: torch.Tensor) -> tuple[float, float]:
    """Set the encoder's final layer norm to about the identity on its current last-layer states:
    gain = median per-token standard deviation, bias = mean per-token mean (the norm removes both).
    Returns (gain, bias)."""
    with eval_mode(encoder):
        pre = encoder(ids, output_hidden_states=True).hidden_states[-1]  # (N, L, D)
    norm = final_layer_norm(encoder)
    gain = float(pre.std(dim=-1, unbiased=False).median())
    bias = float(pre.mean(dim=-1).mean())
    norm.weight.fill_(gain)
    norm.bias.fill_(bias)
    return gain, bias


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# --- VAE ----------------------------------------------------------------------------------------
def train_vae(settings: ToyTeacherSettings, groups: dict, out_dir: Path | None = None):
    """Train the factor-4 VAE on random crops; set scaling_factor = 1 / latent std; optionally save."""
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        vae = build_vae(settings.preset)
        # Start with a small posterior std (logvar bias VAE_INIT_LOGVAR): at the default init (std 1)
        # the sampled latent is mostly noise and a short run only learns washed-out colours.
        with torch.no_grad():
            vae.quant_conv.weight[4:].mul_(0.1)
            vae.quant_conv.bias[4:].fill_(VAE_INIT_LOGVAR)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)
    crop = settings.vae_crop
    t0 = time.time()
    bar = tqdm(range(settings.vae_steps), desc="toy VAE", mininterval=5, file=sys.stdout)
    for step in bar:
        g = _pick_group(groups, gen)
        n, _, h, w = g["pixels"].shape
        idx = torch.randint(n, (settings.vae_batch,), generator=gen)
        top = int(torch.randint(h - crop + 1, (1,), generator=gen))
        left = int(torch.randint(w - crop + 1, (1,), generator=gen))
        x = g["pixels"][idx, :, top:top + crop, left:left + crop]  # (B, 3, c, c)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # L1 + L2, weighted toward saturated (shape) pixels: the grey background is most of the
        # image, and a plain mean lets the shapes' colours drift while the loss looks fine.
        weight = 1 + settings.vae_fg_weight * (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2  # (B, 1, c, c)
        err = recon - x
        rec = (weight * (err.abs() + err.square())).mean() / weight.mean()
        loss = rec + settings.vae_kl_weight * posterior.kl().mean() / z[0].numel()
        for group_ in opt.param_groups:
            group_["lr"] = settings.vae_lr * _lr_factor(step, settings.vae_steps, settings.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    # SD's scaling_factor (0.18215) is 1 / std of its latents, so the diffusion sees unit variance.
    with torch.no_grad():
        stds = [vae.encode(g["pixels"][:256]).latent_dist.sample(generator=gen).std() for g in groups.values()]
    vae.register_to_config(scaling_factor=float(1.0 / torch.stack(stds).mean()))
    print(f"toy VAE: {settings.vae_steps} steps in {time.time() - t0:.0f} s, final loss {loss.item():.4f}, "
          f"scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    if out_dir is not None:
        vae.save_pretrained(out_dir)
    return vae


def ensure_toy_vae(settings: ToyTeacherSettings, groups: dict, cache_dir: Path | None):
    """The shared VAE: loaded from ``<cache>/toy-teacher/vae-<key>`` when built before."""
    from diffusers import AutoencoderKL
    if cache_dir is None:
        return train_vae(settings, groups)
    final = Path(cache_dir) / "toy-teacher" / f"vae-{cache_key(settings.vae_part(), TOY_VAE_VERSION)}"
    if not (final / "config.json").exists() or not (final / "diffusion_pytorch_model.safetensors").exists():
        with atomic_dir(final) as tmp:
            train_vae(settings, groups, tmp)
    print(f"toy VAE from {final}", flush=True)
    return AutoencoderKL.from_pretrained(final).eval().requires_grad_(False)


# --- The build ----------------------------------------------------------------------------------
def _pipeline(fam: str, vae, encoders: list, tokenizers: list, unet, scheduler_config: dict):
    """The toy teacher's diffusers pipeline (SD or SDXL) around these parts."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.schedulers import EulerDiscreteScheduler, PNDMScheduler

    scheduler_cls = {"sd15": PNDMScheduler, "sdxl": EulerDiscreteScheduler}[fam]
    scheduler = scheduler_cls.from_config(scheduler_config)
    if fam == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)


@torch.no_grad()
def _swap(params: list, ema: list) -> None:
    """Exchange the trained weights with their EMA in place (twice restores both, bit for bit)."""
    for q, e in zip(params, ema):
        held = q.detach().clone()
        q.copy_(e)
        e.copy_(held)


def _unet_optimizer(unet: torch.nn.Module, encoders: list, settings: ToyTeacherSettings,
                    extra: Sequence[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """AdamW over the UNet and text encoders (and ``extra``, the caption-words heads); or Muon for
    the UNet's matrices and convolution kernels (all but its first and last convolution) with AdamW
    for the rest (norms, biases, embeddings, the encoders). Each group carries its peak rate
    ("peak_lr") for the warm-up and decay."""
    params = list(unet.parameters()) + [q for e in encoders for q in e.parameters()] + list(extra)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW([{"params": params, "peak_lr": settings.lr}], lr=settings.lr, weight_decay=0.0,
                                 fused=True)
    muon = [q for n, q in unet.named_parameters() if q.ndim >= 2 and not n.startswith(("conv_in.", "conv_out."))]
    in_muon = {id(q) for q in muon}
    rest = [q for q in params if id(q) not in in_muon]
    peak = settings.lr * settings.muon_lr_scale
    return MuonAdamW([{"params": muon, "muon": True, "lr": peak, "peak_lr": peak},
                      {"params": rest, "peak_lr": settings.lr}], lr=settings.lr)


def new_models(settings: ToyTeacherSettings) -> tuple[list, list, torch.nn.Module, list]:
    """A build's tokenizers, its text encoders, UNet and caption-words heads (none without that
    objective), freshly initialised from the settings' seed."""
    fam, p = settings.family, PRESETS[settings.preset]
    tokenizers = [train_tokenizer(settings.max_length)]
    if fam == "sdxl":
        tokenizers.append(train_tokenizer(settings.max_length, pad_token=SDXL_PAD))
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed + 1)
        encoders = [build_text_encoder(settings.preset, tokenizers[0], p["text_hidden"])]
        if fam == "sdxl":
            encoders.append(build_text_encoder(settings.preset, tokenizers[1], p["text_hidden_2"], with_projection=True))
        unet = build_unet(settings.preset, fam, sum(e.config.hidden_size for e in encoders),
                          text_pool=settings.text_pool, levels=settings.unet_levels)
        heads = ([CaptionWordsHead(e.config.hidden_size, e.config.eos_token_id) for e in encoders]
                 if settings.caption_words else [])
    return tokenizers, encoders, unet, heads


def build_toy_teacher(out_dir: str | Path, settings: ToyTeacherSettings, cache_dir: str | Path | None = None,
                      snapshots: Sequence[int] = (), snapshot_dir: str | Path | None = None,
                      word_gain_every: int = 0, processes: int | None = None) -> Path:
    """Train a toy teacher and save it as a diffusers pipeline folder at ``out_dir`` (atomically).

    ``cache_dir`` (optional) is where the shared VAE is cached; without it the VAE is trained here.
    ``snapshots``: UNet steps after which the EMA weights so far are also saved, as pipeline folders
    ``<snapshot_dir>/step-<n>`` (the teacher's own training curve, `cli.py curve`); the training
    itself is unchanged by them. ``word_gain_every``: every that many UNet steps, the word-gain probe
    (`sitdistill.teachers.toy_probe`) on the EMA weights, printed and kept in the finished marker
    (``word_gain``); it draws from its own generator, so the build is unchanged by it too.
    ``processes``: 2 splits each UNet step's batch between this process and a worker, each with
    half of torch's threads (the same update up to rounding); None: `build_processes`' choice.
    """
    from diffusers import DDPMScheduler

    from sitdistill.core.schedule import NoiseSchedule

    snapshots = {int(n) for n in snapshots}
    if snapshots and snapshot_dir is None:
        raise ValueError("snapshots need a snapshot_dir")

    out_dir = Path(out_dir)
    fam, t_start = settings.family, time.time()
    timings: dict[str, float] = {}
    cpu_start = time.process_time()
    groups = _draw_groups(settings)
    timings["draw_s"] = time.time() - t_start

    t0 = time.time()
    vae = ensure_toy_vae(settings, groups, None if cache_dir is None else Path(cache_dir))
    timings["vae_s"] = time.time() - t0

    tokenizers, encoders, unet, heads = new_models(settings)

    # Latent posteriors, computed once: each step samples z = mean + std * noise (as SD training does).
    t0 = time.time()
    with torch.no_grad():
        for g in groups.values():
            g["mean"], g["std"] = _posteriors(vae, g["pixels"])
            g["ids"] = [_tokenize(tok, g["captions"]) for tok in tokenizers]
            g["labels"] = _caption_labels(g["captions"])
            if settings.mirror:
                mean, std = _posteriors(vae, g["pixels"].flip(-1))
                mirrored = [_mirror_caption(c) for c in g["captions"]]
                g["mirror"] = {"mean": mean, "std": std, "ids": [_tokenize(tok, mirrored) for tok in tokenizers],
                               "labels": _caption_labels(mirrored)}
    empty_ids = [_tokenize(tok, [""]) for tok in tokenizers]  # what the pipeline encodes as negative
    timings["encode_s"] = time.time() - t0

    scheduler_config = SCHEDULER_CONFIGS[fam]
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)  # training noise: add_noise *is* the convention
    num_t = noise_scheduler.config.num_train_timesteps
    schedule = NoiseSchedule.from_config(scheduler_config)
    scaling = vae.config.scaling_factor
    params = list(unet.parameters()) + [q for e in encoders for q in e.parameters()]
    opt = _unet_optimizer(unet, encoders, settings, [q for h in heads for q in h.parameters()])
    ema = [q.detach().clone() for q in params]
    gen = torch.Generator().manual_seed(settings.seed + 2)
    probe = WordGainProbe(fam, vae, tokenizers, scheduler_config) if word_gain_every > 0 else None
    word_gains: list[dict] = []
    unet.train()
    for e in encoders:
        e.train()

    models = {"family": fam, "unet": unet, "encoders": encoders, "heads": heads, "empty_ids": empty_ids,
              "caption_words": settings.caption_words}
    processes = build_processes(settings, processes)
    threads = torch.get_num_threads()
    worker = None
    if processes == 2:
        torch.set_num_threads(max(1, threads // 2))
        worker = HalfBatchWorker(_batch_loss, _worker_models, _worker_spec(models), _model_params(models),
                                 threads=torch.get_num_threads())
    t0 = time.time()
    try:
        bar = tqdm(range(settings.unet_steps), desc=f"toy {fam} UNet", mininterval=5, file=sys.stdout)
        for step in bar:
            mix = _text_norm_mix(step, settings)
            if settings.text_norm_warmup and step == settings.text_norm_warmup:
                # The final layer norm has not been trained (no gradient reached it): start it near the
                # identity on the states the UNet has learnt to read, in the weights and in their EMA.
                gain, bias = _fit_text_norm(encoders[0], torch.cat([g_["ids"][0][:128] for g_ in groups.values()]))
                by_id = {id(q): i for i, q in enumerate(params)}
                for q in final_layer_norm(encoders[0]).parameters():
                    ema[by_id[id(q)]].copy_(q.detach())
                print(f"toy {fam} UNet: text encoder's final layer norm blended in from step {step} "
                      f"(gain {gain:.3f}, bias {bias:.3f})", flush=True)
            g = _pick_group(groups, gen)
            b = settings.batch_size
            idx = torch.randint(len(g["captions"]), (b,), generator=gen)
            mean, std, caption_ids = g["mean"][idx], g["std"][idx], [t_ids[idx] for t_ids in g["ids"]]
            labels = g["labels"][idx]
            if settings.mirror:
                m = g["mirror"]
                flip = torch.rand(b, generator=gen) < 0.5
                mean = torch.where(flip[:, None, None, None], m["mean"][idx], mean)
                std = torch.where(flip[:, None, None, None], m["std"][idx], std)
                caption_ids = [torch.where(flip[:, None], m_ids[idx], c) for m_ids, c in zip(m["ids"], caption_ids)]
                labels = torch.where(flip[:, None], m["labels"][idx], labels)
            latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling  # (B, 4, h, w)
            drop = torch.rand(b, generator=gen) < settings.caption_dropout
            noise = _training_noise(latents.shape, gen, settings.multires_noise, settings.multires_discount)
            t = torch.randint(0, num_t, (b,), generator=gen)
            x_t = noise_scheduler.add_noise(latents, noise, t)
            # The loss weighting decides how much the high-noise steps, where layout and shape are
            # decided, count (sitdistill.core.schedule.NoiseSchedule.loss_weight).
            weight = schedule.loss_weight(t, settings.loss_weighting, settings.snr_gamma)
            batch = {"x_t": x_t, "t": t, "noise": noise, "weight": weight, "drop": drop, "labels": labels,
                     "ids": caption_ids, "height": g["pixels"].shape[-2], "width": g["pixels"].shape[-1],
                     "mix": mix, "total": b}
            for pg in opt.param_groups:
                pg["lr"] = pg["peak_lr"] * _lr_factor(step, settings.unet_steps, settings.warmup_steps)
            opt.zero_grad(set_to_none=True)
            loss_value, words_value = _backward(models, batch, worker)
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            # EMA with a warm-up (decay grows with the step), as short runs need it to forget the init.
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - decay)
            if step == 0:  # the first step carries the start-up (first-call allocations; the worker's start)
                timings["unet_first_step_s"] = time.time() - t0
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}", **({"words": f"{words_value:.3f}"} if heads else {}))
            if probe is not None and (step + 1) % word_gain_every == 0:
                _swap(params, ema)
                word_gains.append({"step": step + 1, **probe(unet, encoders, norm_mix=mix)})
                _swap(params, ema)
                print(f"toy {fam} UNet word gain {json.dumps(word_gains[-1])}", flush=True)
            if step + 1 in snapshots:
                _swap(params, ema)
                with atomic_dir(Path(snapshot_dir) / f"step-{step + 1}") as tmp:
                    _pipeline(fam, vae, encoders, tokenizers, unet, scheduler_config).save_pretrained(
                        tmp, safe_serialization=True)
                    (tmp / FINISHED_MARKER).write_text(json.dumps(
                        {"version": TOY_TEACHER_VERSION, "settings": settings.key_settings(), "snapshot_step": step + 1},
                        indent=1, default=list) + "\n")
                _swap(params, ema)
    finally:
        if worker is not None:
            worker.close()
            torch.set_num_threads(threads)
    timings["unet_s"] = time.time() - t0
    with torch.no_grad():
        for q, e in zip(params, ema):
            q.copy_(e)
    unet.eval().requires_grad_(False)
    for e in encoders:
        e.eval().requires_grad_(False)

    pipe = _pipeline(fam, vae, encoders, tokenizers, unet, scheduler_config)
    timings["total_s"] = time.time() - t_start
    timings["cpu_s"] = time.process_time() - cpu_start  # CPU time: the honest figure on a shared machine
    info = {"version": TOY_TEACHER_VERSION, "settings": settings.key_settings(), "timings": timings,
            "final_loss": loss_value, "torch_threads": torch.get_num_threads(), "processes": processes}
    if word_gains:
        info["word_gain"] = word_gains
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / FINISHED_MARKER).write_text(json.dumps(info, indent=1, default=list) + "\n")
    print(f"toy {fam} teacher saved to {out_dir}: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
          flush=True)
    return out_dir


def toy_teacher_dir(settings: ToyTeacherSettings, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return root / "toy-teacher" / f"{settings.family}-{cache_key(settings.key_settings(), TOY_TEACHER_VERSION)}"


def ensure_toy_teacher(family: str = "sd15", cache_dir: str | Path | None = None, **settings) -> Path:
    """The cached toy teacher folder for these settings; built on first use (minutes on a CPU)."""
    s = ToyTeacherSettings(family=family, **settings)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = toy_teacher_dir(s, root)
    if not is_finished(final):
        build_toy_teacher(final, s, cache_dir=root)
    return final
