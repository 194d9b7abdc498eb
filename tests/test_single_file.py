"""Single-file teachers offline: the model type from the keys, the package's configs, tokenizers
found locally in a fixed order (or a clear error), and a real-size SD1.5 file loaded with no network."""
import json
import os
from pathlib import Path

import pytest
import torch

from sitdistill.teachers.single_file import CONFIGS, SingleFileError, config_folder, detect, scheduler_overrides
from tiny_models import (clip_state_dict_to_ldm, make_tiny_tokenizer, open_clip_state_dict_to_ldm,
                         unet_state_dict_to_ldm, vae_state_dict_to_ldm)

# The real models' sizes (diffusers / transformers parameter counts of SD1.5, SD2.1, SDXL base).
REAL_COUNTS = {"sd1": (859_520_964, 83_653_863, 123_060_480), "sd2": (865_910_724, 83_653_863, 340_387_840),
               "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)}


def _models(kind: str, device: str = "meta"):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    read = lambda part: json.loads((CONFIGS / kind / part / "config.json").read_text())  # noqa: E731
    with torch.device(device):
        out = [UNet2DConditionModel.from_config(read("unet")), AutoencoderKL.from_config(read("vae")),
               CLIPTextModel(CLIPTextConfig(**read("text_encoder")))]
        if kind == "sdxl":
            out.append(CLIPTextModelWithProjection(CLIPTextConfig(**read("text_encoder_2"))))
    return out


def _ldm_state(kind: str, models, unet_only: bool = False) -> dict:
    unet, vae, *text = models
    state = unet_state_dict_to_ldm(unet)
    if unet_only:
        return state
    state.update(vae_state_dict_to_ldm(vae))
    if kind == "sd1":
        state.update(clip_state_dict_to_ldm(text[0]))
    elif kind == "sd2":  # OpenCLIP layout (the file also holds a projection, which diffusers drops)
        from transformers import CLIPTextModelWithProjection

        with torch.device("meta"):
            with_projection = CLIPTextModelWithProjection(text[0].config)
        state.update(open_clip_state_dict_to_ldm(with_projection, "cond_stage_model.model."))
    else:
        state.update(clip_state_dict_to_ldm(text[0], "conditioner.embedders.0.transformer."))
        state.update(open_clip_state_dict_to_ldm(text[1]))
    return state


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_the_shipped_configs_build_the_real_models(kind):
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in _models(kind))
    assert counts == REAL_COUNTS[kind]


@pytest.mark.parametrize("kind,family", [("sd1", "sd15"), ("sd2", "sd15"), ("sdxl", "sdxl")])
def test_the_model_type_is_read_from_the_real_key_layout(kind, family):
    models = _models(kind)
    shapes = {k: tuple(v.shape) for k, v in _ldm_state(kind, models).items()}
    found = detect(shapes)
    assert (found["kind"], found["family"], found["unet_only"]) == (kind, family, False)
    assert found["prediction_type"] is None and found["zero_terminal_snr"] is None
    unet_only = detect({k: tuple(v.shape) for k, v in _ldm_state(kind, models, unet_only=True).items()})
    assert (unet_only["kind"], unet_only["unet_only"]) == (kind, True)
    # Marker keys of v-prediction / zero-terminal-SNR checkpoints (ComfyUI, kohya).
    marked = detect({**shapes, "v_pred": (), "ztsnr": ()})
    assert marked["prediction_type"] == "v_prediction" and marked["zero_terminal_snr"] is True
    assert scheduler_overrides(marked, None, None) == {"prediction_type": "v_prediction",
                                                       "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert scheduler_overrides(marked, "epsilon", False) == {"prediction_type": "epsilon",
                                                             "rescale_betas_zero_snr": False}  # the recipe wins
    inpaint = dict(shapes, **{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(SingleFileError, match="9 input channels"):
        detect(inpaint)


def test_a_file_without_an_sd_unet_is_refused():
    with pytest.raises(SingleFileError, match="no Stable Diffusion UNet"):
        detect({"model.weight": (3, 3)})


def _bpe_files(folder: Path, pad: str | None = None) -> Path:
    """A small CLIP tokenizer saved as transformers writes it (tokenizer.json + tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(pad_token=pad)
    tok.save_pretrained(folder)
    return folder


def _fake_hf_cache(root: Path, repo: str = "openai/clip-vit-large-patch14") -> Path:
    """The hub cache layout (refs/main -> snapshots/<commit>/) holding CLIP's BPE files."""
    commit = "0" * 40
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    _bpe_files(entry / "snapshots" / commit)
    return root


def test_tokenizers_are_found_offline_in_order_or_named_in_the_error(tmp_path):
    empty_cache = tmp_path / "hf-empty"
    empty_cache.mkdir()
    # Nothing anywhere: the error names both files and the folder(s) to place them in.
    with pytest.raises(SingleFileError) as e:
        config_folder("sdxl", root=tmp_path / "a", hf_cache=empty_cache)
    text = str(e.value)
    assert "vocab.json" in text and "merges.txt" in text and str(tmp_path / "a" / "sdxl" / "tokenizer_2") in text
    # The local hugging-face cache.
    folder = config_folder("sd1", root=tmp_path / "b", hf_cache=_fake_hf_cache(tmp_path / "hf"))
    assert (folder / "tokenizer" / "tokenizer.json").is_file() and (folder / "unet" / "config.json").is_file()
    # teacher.config comes first: its files win over the cache's.
    user = tmp_path / "user"
    _bpe_files(user / "tokenizer")
    (user / "tokenizer" / "tokenizer.json").write_text((user / "tokenizer" / "tokenizer.json").read_text() + "\n")
    folder = config_folder("sd1", config=user, root=tmp_path / "c", hf_cache=tmp_path / "hf")
    assert (folder / "tokenizer" / "tokenizer.json").read_text() == (user / "tokenizer" / "tokenizer.json").read_text()
    # Files a user placed in the assembled folder are found next time, with no cache at all.
    again = config_folder("sd1", root=tmp_path / "b", hf_cache=empty_cache)
    assert (again / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_real_size_sd15_single_file_loads_offline_with_the_packages_configs(tmp_path, monkeypatch):
    """Random weights in the real SD1.5 key layout (fp16, ~2 GB), loaded with no network and no
    teacher.config: the family, the weights and the prompt path all come out right."""
    from safetensors.torch import save_file

    from sitdistill.teachers import load_teacher

    torch.manual_seed(0)
    models = _models("sd1", device="meta")
    for m in models:
        m.to_empty(device="cpu")
        for p in m.parameters():
            p.data.normal_(0, 0.02)
    state = {k: v.half() for k, v in _ldm_state("sd1", models).items()}
    path = tmp_path / "community-model.safetensors"
    save_file(state, str(path))
    del state
    monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path / "cache"))
    _bpe_files(tmp_path / "cache" / "single-file" / "sd1" / "tokenizer")  # as a user would place them
    teacher = load_teacher(path, zero_terminal_snr=True, prediction_type="v_prediction")
    assert teacher.family == "sd15" and teacher.cond_dims == {"encoder_hidden_states": 768}
    assert teacher.prediction_type == "v_prediction" and teacher.scheduler_config["rescale_betas_zero_snr"]
    ref = models[0].state_dict()["conv_in.weight"].half().float()
    assert torch.equal(teacher.unet.conv_in.weight.float(), ref)
    cond = teacher.encode_prompt(["a red circle"])
    eps = teacher.predict_eps(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond)
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SITDISTILL_BIG_TESTS"), reason="writes a 7 GB SDXL file and needs ~16 GB RAM: "
                    "set SITDISTILL_BIG_TESTS=1")
def test_a_real_size_sdxl_single_file_loads_offline_with_the_packages_configs(tmp_path, monkeypatch):
    """The community format: one SDXL file (both text encoders in the sgm layout), fp16 random weights,
    loaded with no network and no teacher.config, marked v-pred + ZSNR by its keys."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sitdistill.teachers import load_teacher

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        models = _models("sdxl", device="meta")
    finally:
        torch.set_default_dtype(default)
    for m in models:
        m.to_empty(device="cpu")
        for p in m.parameters():
            p.data.normal_(0, 0.02)
    state = _ldm_state("sdxl", models)
    state.update(v_pred=torch.zeros(0), ztsnr=torch.zeros(0))  # what ComfyUI / kohya write into such files
    path = tmp_path / "noob-style-vpred.safetensors"
    save_file(state, str(path))
    del state, models
    monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path / "cache"))
    for role in ("tokenizer", "tokenizer_2"):
        _bpe_files(tmp_path / "cache" / "single-file" / "sdxl" / role)
    # The markers pick the schedule, so the assembled folder is the one of that schedule.
    teacher = load_teacher(path, dtype="float16", vae_fp32=False)
    assert teacher.family == "sdxl" and teacher.cond_dims == {"encoder_hidden_states": 2048, "text_embeds": 1280,
                                                               "time_ids": 6}
    assert teacher.prediction_type == "v_prediction" and teacher.scheduler_config["rescale_betas_zero_snr"]
    with safe_open(str(path), framework="pt") as f:
        ref = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert torch.equal(teacher.unet.conv_in.weight, ref)
    cond = teacher.encode_prompt(["a red circle"], height=64, width=64)
    assert cond["encoder_hidden_states"].shape == (1, 77, 2048) and cond["text_embeds"].shape == (1, 1280)
