"""Builders for tiny SD1.5-like and SDXL-like diffusers pipelines, saved with ``save_pretrained``.

They are real pipelines at toy width (every component of the real architecture, a few thousand
parameters each), seeded so two calls with the same arguments write the same weights. Tests load
them back through the same code users use (``sitdistill.teachers.load_teacher``, ``*.from_pretrained``).

Also here: ``write_ldm_checkpoint``, which writes a pipeline folder as one original-layout (ldm /
CompVis) single-file checkpoint. The diffusers package ships only the original -> diffusers
direction, so the inverse key mapping is built here for the tiny architectures.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module to run it with one intra-op thread: for tiny models the threads
    only add overhead, and on a shared CPU they contend badly (measured: the teacher and sampling
    tests 172 s with 2 threads vs 42-49 s with 1, at load average 5-9 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A tiny CLIP-style BPE tokenizer: every byte-level character alone and with the end-of-word
# suffix is in the vocabulary (so any text tokenizes), plus a handful of merges so that the
# tokenizer really merges.
_MERGES = [("r", "e</w>"), ("c", "i"), ("ci", "r"), ("l", "e</w>"), ("t", "h"), ("th", "e</w>"),
           ("r", "e"), ("re", "d</w>"), ("a", "t</w>")]
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_level_chars() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE maps bytes to."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def make_tiny_tokenizer(max_length: int = 16, pad_token: str | None = None):
    """A ``CLIPTokenizer`` with a byte-level vocabulary; ``pad_token="!"`` is SDXL's second tokenizer."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in _byte_level_chars():
        vocab[c] = len(vocab)
    for c in _byte_level_chars():
        vocab[c + "</w>"] = len(vocab)
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    kwargs = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=max_length, **kwargs)


def _text_config(tokenizer, hidden: int, layers: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        # The pooled output is taken at eos_token_id (transformers' CLIP): it must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim or hidden,
    )


def _tiny_vae(vae_blocks: int):
    from diffusers import AutoencoderKL

    channels = (16, 16, 32, 32)[:vae_blocks]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels, layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks, sample_size=8 * 2 ** (vae_blocks - 1),
    )


def _sd_scheduler_config(prediction_type: str) -> dict:
    """The scheduler config SD1.5/SDXL ship (steps_offset=1, clip_sample=False, ...); built with
    ``from_config`` so keys the class does not take are kept for the schedulers swapped in later."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False,
                prediction_type=prediction_type,
                timestep_spacing="leading")


def make_tiny_sd15(path: str | Path, prediction_type: str = "epsilon", sample_size: int = 8, *,
                   text_hidden: int = 32, text_layers: int = 2, max_length: int = 16, vae_blocks: int = 2,
                   seed: int = 0) -> Path:
    """Write a tiny SD1.5-like ``StableDiffusionPipeline`` folder and return its path.

    ``prediction_type="v_prediction"`` gives an SD2.x-style v teacher. ``vae_blocks`` sets the VAE
    depth (downsample factor ``2 ** (vae_blocks - 1)``; 4 is SD's factor 8).
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = make_tiny_tokenizer(max_length)
    text_encoder = CLIPTextModel(_text_config(tokenizer, text_hidden, text_layers))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(vae_blocks), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(_sd_scheduler_config(prediction_type)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl(path: str | Path, prediction_type: str = "epsilon", sample_size: int = 8, *,
                   text_hidden: int = 16, text_hidden_2: int = 32, projection_dim: int = 24,
                   addition_time_embed_dim: int = 8, max_length: int = 16, vae_blocks: int = 2,
                   force_zeros_for_empty_prompt: bool = True, seed: int = 0) -> Path:
    """Write a tiny SDXL-like ``StableDiffusionXLPipeline`` folder and return its path.

    Two text encoders of different widths (so a wrong concatenation order shows), the second with a
    projection (pooled ``text_embeds``), and a UNet with ``addition_embed_type="text_time"``.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = make_tiny_tokenizer(max_length)
    tokenizer_2 = make_tiny_tokenizer(max_length, pad_token="!")
    text_encoder = CLIPTextModel(_text_config(tokenizer, text_hidden, 2))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, text_hidden_2, 2, projection_dim))
    num_time_ids = 6  # original (h, w) + crop (top, left) + target (h, w)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=text_hidden + text_hidden_2, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=projection_dim + num_time_ids * addition_time_embed_dim,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(vae_blocks), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_sd_scheduler_config(prediction_type)),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- original (ldm) layout
_LDM_UNET_PREFIX = "model.diffusion_model."
_LDM_VAE_PREFIX = "first_stage_model."
_LDM_CLIP_PREFIX = "cond_stage_model.transformer."
_SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."
_SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.rpartition(".")  # tail = weight / bias
    return f"{table.get(head, head)}.{tail}"


def _unet_key_to_ldm(key: str, layers: int, up_has_attention: list[bool]) -> str:
    """One diffusers UNet2DConditionModel key -> the ldm ``openaimodel.UNetModel`` key."""
    head, _, tail = key.rpartition(".")
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + b * (layers + 1) + i
        return f"input_blocks.{block}.0.{_rename_first(rest, _UNET_RESNET)}" if kind == "resnets" \
            else f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _UNET_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = b * (layers + 1) + i  # up blocks have layers + 1 resnets
        return f"output_blocks.{block}.0.{_rename_first(rest, _UNET_RESNET)}" if kind == "resnets" \
            else f"output_blocks.{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        return f"output_blocks.{b * (layers + 1) + layers}.{2 if up_has_attention[b] else 1}.conv.{m[2]}"
    raise KeyError(f"no ldm name for UNet key {key}")


def _vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> the ldm ``AutoencoderKL`` key."""
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_rename_first(m[2], _VAE_ATTN)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The ldm decoder numbers its up blocks from the lowest resolution upwards, diffusers the other way.
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def unet_state_dict_to_ldm(unet) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under their ldm names (prefixed ``model.diffusion_model.``)."""
    cfg = unet.config
    layers = cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else cfg.layers_per_block[0]
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    return {_LDM_UNET_PREFIX + _unet_key_to_ldm(k, layers, up_attn): v.contiguous()
            for k, v in unet.state_dict().items()}


def vae_state_dict_to_ldm(vae) -> dict[str, torch.Tensor]:
    """A diffusers VAE's weights under their ldm names; mid-attention linears become 1x1 convs."""
    n = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        new = _vae_key_to_ldm(k, n)
        if ".mid.attn_1." in new and new.rpartition(".")[0].rpartition(".")[2] in ("q", "k", "v", "proj_out") \
                and v.ndim == 2:
            v = v[:, :, None, None]
        out[_LDM_VAE_PREFIX + new] = v.contiguous()
    return out


def clip_state_dict_to_ldm(text_encoder, prefix: str = _LDM_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A HF CLIP text encoder under ``<prefix>text_model.*`` (SD1.x; SDXL's first encoder)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out[prefix + k] = v.contiguous()
    return out


_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}


def open_clip_state_dict_to_ldm(text_encoder, prefix: str = _SGM_OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SDXL's second encoder (CLIPTextModelWithProjection) in the OpenCLIP layout of the sgm
    checkpoints: fused q/k/v ``in_proj``, ``positional_embedding``, ``text_projection`` transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T}  # OpenCLIP: x @ P, P (hidden, proj)
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for ours, theirs in _OPEN_CLIP.items():
                out[dst + f"{theirs}.{kind}"] = sd[src + f"{ours}.{kind}"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_ldm_checkpoint(pipeline_dir: str | Path, path: str | Path, unet_only: bool = False) -> Path:
    """Write an SD1.x or SDXL pipeline folder (or only its UNet) as one original-layout checkpoint
    (ldm for SD1.x, sgm ``conditioner.embedders.{0,1}`` for SDXL).

    ``.safetensors`` is written with safetensors; any other suffix as a ``{"state_dict": ...}``
    torch pickle of plain tensors (loadable with ``weights_only=True``).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipeline_dir, path = Path(pipeline_dir), Path(path)
    state = unet_state_dict_to_ldm(UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet"))
    if not unet_only:
        state.update(vae_state_dict_to_ldm(AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")))
        text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
        if (pipeline_dir / "text_encoder_2").is_dir():
            state.update(clip_state_dict_to_ldm(text_encoder, _SGM_CLIP_PREFIX))
            encoder_2 = CLIPTextModelWithProjection.from_pretrained(pipeline_dir, subfolder="text_encoder_2")
            state.update(open_clip_state_dict_to_ldm(encoder_2))
        else:
            state.update(clip_state_dict_to_ldm(text_encoder))
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, str(path))
    return path


def make_zsnr_v(path: str | Path, **kw) -> Path:
    """A tiny SD1.5-style pipeline that predicts v on a zero-terminal-SNR schedule with trailing
    spacing (how NoobAI-XL v-pred style teachers ship their scheduler config)."""
    import json

    folder = make_tiny_sd15(path, prediction_type="v_prediction", **kw)
    config_file = Path(folder) / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))
    return Path(folder)
