"""Does a toy teacher's UNet use the caption's words? The word-gain probe.

For 64 held-out drawings (64 x 64 px), noised at fixed high timesteps with fixed noise, the UNet
predicts the noise four times: with the true caption, and with the caption's position,
colour or shape word(s) swapped for another. The *gain* of a word is how much worse the prediction
gets when it is wrong: ``mse(wrong) / mse(true) - 1``. A UNet that ignores the position words has a
position gain of about 0, whatever its loss; one that reads them has a gain like its colour's.

It needs no sampling (12 UNet calls of 64 latents: 1.9 s for the small toy UNet on 2 cores), so the
build can log it every few hundred steps (``build_toy_teacher(word_gain_every=N)``,
``cli.py toy-teacher --word_gain_every N``), and it
shows *when* a UNet starts to read its position words: the SDXL-style toy UNet does so abruptly,
between 1500 and 2000 steps; the SD1.5-style one never did with the text encoder's final layer norm
in its context, and does from about 2250 steps with its build's text-norm warm-up (README, "The
SD1.5-style toy teacher").

Position also per axis: ``left_right`` and ``top_bottom``, the gain of swapping only those two
words, over the drawings not in the center (the SD1.5-style teacher reads top/bottom and not
left/right).

Two bands of timesteps: ``high`` (850-999), where an image's layout is decided and SD's schedule
leaves 0.5-2.3 % of the signal's variance (alpha_bar), and ``mid`` (500-849).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from sitdistill.core.modules import eval_mode
from sitdistill.data import toy as world
from sitdistill.teachers.toy_parts import _tokenize, swap_words, unet_kwargs

WORD_GAIN_SEED = 20_011   # held-out drawings: a seed the training data (seed 0.. by default) does not use
BANDS = {"high": (850, 999), "mid": (500, 849)}
WORDS = {"position": world.POSITIONS, "colour": world.COLOURS, "shape": world.SHAPES}
AXES = {"left_right": ("left", "right"), "top_bottom": ("top", "bottom")}


class WordGainProbe:
    """Built once per teacher (its VAE, tokenizers and scheduler config); called on its UNet and
    text encoders as they are at that moment. Everything it draws is fixed by ``seed``, so two calls
    on the same weights return the same numbers and calls at different steps are comparable."""

    def __init__(self, family: str, vae, tokenizers: list, scheduler_config: dict, n: int = 64,
                 seed: int = WORD_GAIN_SEED):
        from diffusers import DDPMScheduler

        self.family = family
        specs = world.ToyWorld(resolutions=((64, 64),)).sample(n, seed)
        pixels = np.stack([np.asarray(world.draw(s)) for s in specs]).astype(np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (n, 3, 64, 64)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            z0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor  # (n, 4, 16, 16)
        self.noise = torch.randn(z0.shape, generator=gen)
        scheduler = DDPMScheduler.from_config(scheduler_config)
        self.bands = {}
        for name, (lo, hi) in BANDS.items():
            t = torch.linspace(lo, hi, n).round().long()
            self.bands[name] = (t, scheduler.add_noise(z0, self.noise, t))
        rng = np.random.default_rng(seed)
        captions = {"true": [s.caption for s in specs]}
        for field, table in WORDS.items():
            names = list(table)
            wrong = []
            for s in specs:
                i = names.index(getattr(s, field))
                j = (i + 1 + int(rng.integers(len(names) - 1))) % len(names)  # any other value
                wrong.append(dataclasses.replace(s, **{field: names[j]}).caption)
            captions[field] = wrong
        # Per axis, on the drawings not in the center: only "left"/"right" swapped, only "top"/"bottom"
        # swapped (a UNet can read one and not the other: README, "The SD1.5-style toy teacher").
        self.off_center = torch.tensor([s.position != "center" for s in specs])
        for key, (a, b) in AXES.items():
            captions[key] = [swap_words(s.caption, a, b) for s in specs]
        self.ids = {k: [_tokenize(tok, caps) for tok in tokenizers] for k, caps in captions.items()}
        self.no_drop = torch.zeros(n, dtype=torch.bool)  # no caption dropped

    @torch.no_grad()
    def __call__(self, unet, encoders: list, norm_mix: float = 1.0) -> dict:
        """``{band: {"mse": true-caption MSE, "<word>": gain, "<axis>": gain}}`` for the bands, the words
        and the two position axes (their gains over the off-center drawings only)
        (``norm_mix``: the text conditioning as the build reads it at that step, `encode_text`)."""
        with eval_mode(unet, *encoders):
            cond = {k: unet_kwargs(self.family, encoders, ids, self.no_drop, 64, 64, norm_mix) for k, ids in self.ids.items()}
            out = {}
            for band, (t, x_t) in self.bands.items():
                err = {k: (unet(x_t, t, **c).sample - self.noise).square().mean(dim=(1, 2, 3)) for k, c in cond.items()}
                mse = {k: float(e.mean()) for k, e in err.items()}
                off = {k: float(e[self.off_center].mean()) for k, e in err.items()}
                out[band] = {"mse": round(mse["true"], 5),
                             **{w: round(mse[w] / mse["true"] - 1, 4) for w in WORDS},
                             **{a: round(off[a] / off["true"] - 1, 4) for a in AXES}}
        return out

    @torch.no_grad()
    def token_gains(self, unet, encoders: list, band: str = "high") -> dict:
        """Which token of the context carries each position axis: ``{axis: [gain per token]}``, the
        gain when only token j of the true caption's text states is replaced by that token's state
        in the axis-swapped caption (off-center drawings; ``band``'s timesteps). A UNet that reads a
        word from its own token shows the gain there; one that reads it from a summary, at the
        end-of-text token (README, "The SD1.5-style toy teacher")."""
        with eval_mode(unet, *encoders):
            t, x_t = (v[self.off_center] for v in self.bands[band])
            noise = self.noise[self.off_center]

            def cond(key):
                ids = [i[self.off_center] for i in self.ids[key]]
                return unet_kwargs(self.family, encoders, ids, self.no_drop[self.off_center], 64, 64)

            def mse(c):
                return float((unet(x_t, t, **c).sample - noise).square().mean())

            true = cond("true")
            base = mse(true)
            out = {}
            for axis in AXES:
                swapped = cond(axis)["encoder_hidden_states"]
                gains = []
                for j in range(swapped.shape[1]):
                    mixed = true["encoder_hidden_states"].clone()
                    mixed[:, j] = swapped[:, j]
                    gains.append(round(mse({**true, "encoder_hidden_states": mixed}) / base - 1, 4))
                out[axis] = gains
        return out


def _load(folder: str | Path):
    """A saved toy teacher's pipeline, family, and probe."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(Path(folder))
    family = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return pipe, encoders, WordGainProbe(family, pipe.vae, tokenizers, dict(pipe.scheduler.config))


def token_gains(folder: str | Path) -> dict:
    """`WordGainProbe.token_gains` on a saved toy teacher (high band), with the probe's tokens of its
    first off-center caption for reading the positions."""
    pipe, encoders, probe = _load(folder)
    first = int(probe.off_center.nonzero()[0])
    tokens = pipe.tokenizer.convert_ids_to_tokens(probe.ids["true"][0][first].tolist())
    return {"tokens": tokens, **probe.token_gains(pipe.unet, encoders)}


def word_gain(folder: str | Path) -> dict:
    """The probe on a saved toy teacher (a pipeline folder, loaded with diffusers' from_pretrained)."""
    pipe, encoders, probe = _load(folder)
    return probe(pipe.unet, encoders)
