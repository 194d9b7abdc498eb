"""The toy teacher's parts: its BPE tokenizer, the small VAE, text encoder(s) and UNet built from
`PRESETS`, and the text conditioning as the pipelines build it (see `sitdistill.teachers.toy`)."""
from __future__ import annotations

import json
from typing import Sequence

import torch

from sitdistill.data import toy as world
from sitdistill.teachers.frontend import final_layer_norm

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SDXL_PAD = "!"

# Model sizes. "small" is the real toy teacher; "tiny" exists for tests (seconds to build).
PRESETS = {
    "small": dict(vae_channels=(16, 32, 32), unet_channels=(32, 64, 64), text_hidden=64, text_hidden_2=64,
                  text_layers=2, text_heads=4, projection_dim=32, time_embed_dim=8, attention_head_dim=8),
    "tiny": dict(vae_channels=(8, 16, 16), unet_channels=(16, 32, 32), text_hidden=16, text_hidden_2=16,
                 text_layers=2, text_heads=2, projection_dim=8, time_embed_dim=4, attention_head_dim=4),
}

# --- Tokenizer ----------------------------------------------------------------------------------
def toy_corpus() -> list[str]:
    """Every caption the world can write (full and short forms): the tokenizer's training text."""
    out = []
    for colour, shape in world.all_combos():
        for pos in world.POSITIONS:
            short = f"a {colour} {shape} {world.POSITION_PHRASES[pos]}"
            out.append(short)
            for size in world.SIZES:
                for bg in world.BACKGROUNDS:
                    out.append(world.ToySpec(colour, shape, pos, size, bg).caption)
    return out


def train_tokenizer(max_length: int, pad_token: str = EOS):
    """BPE trained with the ``tokenizers`` library on the toy corpus, wrapped as a CLIPTokenizer.

    CLIP's BPE marks word ends with ``</w>`` and needs every byte-level character, alone and with
    ``</w>``, in the vocabulary (so any text tokenizes); merges then make each toy word one token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=100_000, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  special_tokens=[BOS, EOS], show_progress=False)
    bpe.train_from_iterator(toy_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # The trainer's merges are the same on every run, but the ids it gives the base characters are
    # not (they follow a hash set's order), and the ids decide which embedding row each word gets:
    # two builds of one setting then start from different text encoders. So the ids are assigned
    # here: the special tokens, the base pieces sorted, then each merge's token in merge order.
    merged = list(dict.fromkeys(a + b for a, b in merges))
    base = sorted(set(model["vocab"]) - set(merged) - {BOS, EOS})
    vocab: dict[str, int] = {tok: i for i, tok in enumerate([BOS, EOS] + base + merged)}
    for ch in sorted(alphabet):
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=max_length)


def swap_words(caption: str, a: str, b: str) -> str:
    """The caption with the words ``a`` and ``b`` exchanged ("top left" -> "top right" for left/right)."""
    swap = {a: b, b: a}
    return " ".join(swap.get(w, w) for w in caption.split(" "))


def _tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    # Exactly what the pipelines do: pad to model_max_length, truncate.
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# --- Models -------------------------------------------------------------------------------------
def build_vae(preset: str):
    from diffusers import AutoencoderKL
    ch = PRESETS[preset]["vae_channels"]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=ch,
                         down_block_types=("DownEncoderBlock2D",) * len(ch),
                         up_block_types=("UpDecoderBlock2D",) * len(ch), layers_per_block=1,
                         norm_num_groups=8, sample_size=64, mid_block_add_attention=False)


def build_text_encoder(preset: str, tokenizer, hidden: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    p = PRESETS[preset]
    # eos_token_id must be the tokenizer's: the default (2) selects the legacy argmax pooling.
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"],
                            max_position_embeddings=tokenizer.model_max_length, projection_dim=p["projection_dim"],
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_unet(preset: str, family: str, cross_attention_dim: int, sample_size: int = 16, text_pool: bool = False,
               levels: int = 3):
    """``levels``: 3 (16, 8, 4 on a 16x16 latent) or 4, which adds a 2x2 level whose cells are the
    image's quadrants, as SD's UNet has four (64 -> 8 latent at 512 px)."""
    from diffusers import UNet2DConditionModel
    p = PRESETS[preset]
    if levels not in (3, 4):
        raise ValueError(f"toy UNet levels must be 3 or 4, got {levels}")
    channels = tuple(p["unet_channels"]) + ((p["unet_channels"][-1],) if levels == 4 else ())
    extra = {}
    if text_pool and family == "sd15":
        # diffusers' addition_embed_type="text" (DeepFloyd IF's): an attention pooling of the text
        # states added to the time embedding, a global text signal like SDXL's pooled embeds. The
        # SD pipeline needs no extra input for it.
        extra = dict(addition_embed_type="text", addition_embed_type_num_heads=p["text_heads"])
    if family == "sdxl":
        # Pooled text (projection_dim) + 6 micro-conditioning ids, each embedded in time_embed_dim.
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=p["time_embed_dim"],
                     projection_class_embeddings_input_dim=p["projection_dim"] + 6 * p["time_embed_dim"])
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim, attention_head_dim=p["attention_head_dim"],
        norm_num_groups=8, **extra)


# --- Text conditioning, as the pipelines build it ------------------------------------------------
def encode_text(family: str, encoders: list, ids: list[torch.Tensor], drop: torch.Tensor,
                norm_mix: float = 1.0) -> dict:
    """UNet keyword arguments for token ids; ``drop`` (B,) bool marks CFG-dropped captions.

    SD1.5: last hidden state of the encoder (ids of dropped captions are already the empty prompt's).
    ``norm_mix`` < 1 (SD1.5 only, during a build's text-norm warm-up, ``ToyTeacherSettings.
    text_norm_warmup``): the last layer's output before the encoder's final layer norm, blended with
    the normalised one in that proportion; 1 is what the pipeline computes.
    SDXL: penultimate hidden states of both encoders concatenated, pooled = encoder 2's projected
    output, dropped captions zeroed (``force_zeros_for_empty_prompt``) — StableDiffusionXLPipeline's
    ``encode_prompt``.
    """
    if family == "sd15" and norm_mix >= 1.0:
        return {"encoder_hidden_states": encoders[0](ids[0])[0]}  # (B, L, D)
    outputs = [e(i, output_hidden_states=True) for e, i in zip(encoders, ids)]
    return text_conditioning(family, encoders, outputs, drop, norm_mix)


def text_conditioning(family: str, encoders: list, outputs: list, drop: torch.Tensor, norm_mix: float = 1.0) -> dict:
    """`encode_text` from the encoders' outputs on the ids (called with ``output_hidden_states=True``)."""
    if family == "sd15":
        if norm_mix >= 1.0:
            return {"encoder_hidden_states": outputs[0].last_hidden_state}  # (B, L, D)
        pre = outputs[0].hidden_states[-1]  # before final_layer_norm
        if norm_mix <= 0.0:
            return {"encoder_hidden_states": pre}
        return {"encoder_hidden_states": torch.lerp(pre, final_layer_norm(encoders[0])(pre), norm_mix)}
    out1, out2 = outputs
    states = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
    pooled = out2.text_embeds  # (B, projection_dim)
    keep = (~drop).to(states.dtype)
    return {"encoder_hidden_states": states * keep[:, None, None], "text_embeds": pooled * keep[:, None]}


def unet_kwargs(family: str, encoders: list, ids: list[torch.Tensor], drop: torch.Tensor, height: int,
                width: int, norm_mix: float = 1.0) -> dict:
    """The UNet's conditioning keywords for token ids at one resolution: `encode_text`, and for SDXL
    the pooled embeds and the default micro-conditioning ids as ``added_cond_kwargs``."""
    return with_micro_conditioning(family, encode_text(family, encoders, ids, drop, norm_mix), height, width)


def with_micro_conditioning(family: str, cond: dict, height: int, width: int) -> dict:
    """`encode_text`'s result as UNet keywords: for SDXL, the pooled embeds and the default
    micro-conditioning ids moved into ``added_cond_kwargs``."""
    if family == "sd15":
        return cond
    states = cond["encoder_hidden_states"]
    return {"encoder_hidden_states": states,
            "added_cond_kwargs": {"text_embeds": cond["text_embeds"],
                                  "time_ids": sdxl_time_ids(height, width, states.shape[0])}}


def sdxl_time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """original_size (h, w) + crop (top, left) + target_size (h, w): the pipeline's default ids."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
