"""Random-weight teachers and image folders for the benchmarks (`cli.py bench`), never downloaded.

The UNet is built from the real config shipped in `teachers/configs/<sd1|sdxl>/unet/config.json`
(or, for the CPU stand-in, the same config with every width shrunk and every key kept), so its
layers, attention layout and conditioning (SDXL's pooled text and time ids) are the real ones.
Text encoders are the shipped CLIP configs cut to one layer and the VAE is tiny: with latent and
text caching on, both run once per image or caption to fill the caches and are out of the timed
step. Weights are random (each module's own init), which costs nothing in speed or memory.

Big models are built with the target device as torch's default device: every parameter is
allocated and initialised there by the module's own init, so an SDXL UNet (2.6 B parameters) is
ready in seconds on a GPU. (That is what building on the meta device followed by `to_empty` and an
init would give, without a second init pass or buffers left to fill by hand.)
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "teachers" / "configs"
CONFIG_DIRS = {"sd15": "sd1", "sdxl": "sdxl"}
TEXT_LEN = 77  # CLIP's context length: the 77 text tokens both families cross-attend to

# The CPU stand-in: the shipped configs with the widths shrunk (every key kept, block types too).
TINY_UNET = {
    "sd15": dict(sample_size=8, layers_per_block=1, block_out_channels=[16, 16, 32, 32], norm_num_groups=8,
                 attention_head_dim=2, cross_attention_dim=32),
    "sdxl": dict(sample_size=16, layers_per_block=1, block_out_channels=[16, 32, 64], norm_num_groups=8,
                 attention_head_dim=[2, 2, 4], transformer_layers_per_block=[1, 1, 2], cross_attention_dim=64,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
}
TINY_TEXT = {  # per encoder folder: widths that add up to the tiny UNet's cross_attention_dim
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32),
    "text_encoder_2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32),
}


def _read(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}


def real_unet_config(family: str) -> dict[str, Any]:
    """The UNet config of the real model (SD1.5 or SDXL base), as shipped with the package."""
    return _read(CONFIGS / CONFIG_DIRS[family] / "unet" / "config.json")


def tiny_unet_config(family: str) -> dict[str, Any]:
    """The real config with tiny widths: same keys, same block types, same conditioning."""
    config = real_unet_config(family)
    unknown = set(TINY_UNET[family]) - set(config)
    assert not unknown, f"tiny {family} UNet sets keys the real config does not have: {unknown}"
    return {**config, **TINY_UNET[family]}


def scheduler_config(family: str) -> dict[str, Any]:
    return json.loads((CONFIGS / CONFIG_DIRS[family] / "scheduler" / "scheduler_config.json").read_text())


@functools.lru_cache(maxsize=None)
def tokenizer(pad_token: str | None = None):
    """The toy BPE tokenizer at CLIP's 77 tokens (SDXL's second one pads with "!")."""
    from sitdistill.teachers.toy_parts import EOS, train_tokenizer

    return train_tokenizer(TEXT_LEN, pad_token or EOS)


def text_encoder(family: str, folder: str, tok, tiny: bool):
    """The shipped CLIP text-encoder config with one layer (and tiny widths for the stand-in)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    raw = _read(CONFIGS / CONFIG_DIRS[family] / folder / "config.json")
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in raw.get("architectures", []) \
        else CLIPTextModel
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
    # eos_token_id must be the tokenizer's: pooling picks the first eos position (FACTS.md).
    raw.update(num_hidden_layers=1, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               **(TINY_TEXT[folder] if tiny else {}))
    return cls(CLIPTextConfig(**raw))


def tiny_vae():
    """A 4-block VAE (factor 8, like SD's) of a few hundred thousand parameters. No mid-block
    attention: at 1024 px it would attend over 128 x 128 latent positions to fill a cache."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 16, 32, 32), latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         mid_block_add_attention=False)


def build_on(device: torch.device | str, fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)` with `device` as the default device: parameters are created and
    initialised there (seconds for billions of parameters on a GPU, no CPU copy)."""
    with torch.device(device):
        return fn(*args, **kwargs)


def random_teacher(family: str, unet_config: dict[str, Any], device: torch.device | str,
                   dtype: torch.dtype = torch.float32, tiny: bool = False, seed: int = 0):
    """An SD1.5- or SDXL-family teacher with random weights behind the real adapter
    (`sitdistill.teachers.sd`): UNet of `unet_config` in `dtype` on `device`, one-layer text encoders (the
    real widths, or `TINY_TEXT` for a `tiny_unet_config`), the tiny VAE in float32."""
    from diffusers import UNet2DConditionModel

    from sitdistill.teachers.sd import SD15Teacher, SDXLTeacher

    torch.manual_seed(seed)
    unet = build_on(device, UNet2DConditionModel.from_config, unet_config).to(dtype)
    vae = tiny_vae().to(device)
    tok = tokenizer()
    if family == "sd15":
        te = text_encoder(family, "text_encoder", tok, tiny).to(device, dtype)
        teacher = SD15Teacher(unet, vae, te, tok, scheduler_config(family))
    else:
        tok2 = tokenizer("!")
        te = text_encoder(family, "text_encoder", tok, tiny).to(device, dtype)
        te2 = text_encoder(family, "text_encoder_2", tok2, tiny).to(device, dtype)
        teacher = SDXLTeacher(unet, vae, te, te2, tok, tok2, scheduler_config(family))
    widths = {k: int(v) for k, v in teacher.cond_dims.items()}
    assert widths["encoder_hidden_states"] == unet_config["cross_attention_dim"], widths
    return teacher.to(device)


def set_teacher_dtype(teacher, dtype: torch.dtype) -> None:
    """UNet and text encoders in `dtype` (what `teacher.dtype` of a recipe sets); the VAE stays."""
    for name, module in teacher.modules().items():
        if name != "vae":
            module.to(dtype)
    teacher.front.dtype = dtype  # the dtype conditioning is handed over in: the UNet's


def image_folder(out: Path, side: int, n: int, unique: int = 8, seed: int = 0) -> Path:
    """`n` square toy images of `side` px with captions: `unique` drawn, the rest copies (a batch
    of 512 costs 8 drawings; every file is its own cache entry all the same)."""
    from sitdistill.data.toy import ToyWorld

    out.mkdir(parents=True, exist_ok=True)
    drawn = ToyWorld(resolutions=((side, side),)).write_folder(out, min(unique, n), seed, metadata=False)
    for i in range(len(drawn), n):
        source = drawn[i % len(drawn)]
        shutil.copyfile(source, out / f"{i:06d}.png")
        shutil.copyfile(source.with_suffix(".txt"), out / f"{i:06d}.txt")
    return out
