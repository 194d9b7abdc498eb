"""Teachers against the diffusers pipelines they wrap: same conditioning, same eps, frozen."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sitdistill.teachers import TEACHER_FAMILIES, SD15Teacher, SDXLTeacher, detect_family, load_teacher
from tiny_models import make_tiny_sd15, make_tiny_sdxl, write_ldm_checkpoint
from tiny_models import one_thread  # noqa: F401  (autouse: one intra-op thread for this module)

PROMPTS = ["a red circle at the top left", "the blue square"]
LONG = "a " + "very " * 40 + "long prompt that the tokenizer truncates"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "sd15": make_tiny_sd15(root / "sd15"),
        "sd15_v": make_tiny_sd15(root / "sd15_v", prediction_type="v_prediction"),
        "sdxl": make_tiny_sdxl(root / "sdxl"),
        "sdxl_nozero": make_tiny_sdxl(root / "sdxl_nozero", force_zeros_for_empty_prompt=False),
    }


def _pipe(folder):
    cls = StableDiffusionXLPipeline if "sdxl" in folder.name else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_inputs(pipe, **call):
    """What the pipeline hands its UNet at the first denoising step (a forward pre-hook)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("kwargs", kwargs)

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0), **call)
    finally:
        handle.remove()
    kw = seen["kwargs"]
    out = {"encoder_hidden_states": kw["encoder_hidden_states"]}
    out.update(kw.get("added_cond_kwargs") or {})
    return out


def _assert_cond_equal(ours, ref):
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k], ref[k]), k


def test_family_detection_and_loading(folders):
    assert set(TEACHER_FAMILIES) == {"sd15", "sdxl"}
    sd15, sdxl = load_teacher(folders["sd15"]), load_teacher(folders["sdxl"])
    assert isinstance(sd15, SD15Teacher) and sd15.family == "sd15"
    assert isinstance(sdxl, SDXLTeacher) and sdxl.family == "sdxl"
    assert detect_family(dict(sdxl.unet.config)) == "sdxl"
    assert sd15.cond_dims == {"encoder_hidden_states": 32}
    assert sdxl.cond_dims == {"encoder_hidden_states": 16 + 32, "text_embeds": 24, "time_ids": 6}
    assert sd15.vae_scale_factor == 2 and sd15.latent_channels == 4
    assert load_teacher(folders["sd15_v"]).schedule.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="family"):
        load_teacher(folders["sd15"], family="sd3")


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_frozen(folders, name):
    teacher = load_teacher(folders[name])
    params = [p for m in teacher.modules().values() for p in m.parameters()]
    assert params and not any(p.requires_grad for p in params)
    assert not any(m.training for mod in teacher.modules().values() for m in mod.modules())
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    cond = teacher.encode_prompt(["x"])
    eps = teacher.predict_eps(x, torch.tensor([500]), cond)
    assert not eps.requires_grad and eps.grad_fn is None


def test_sd15_encode_prompt_equals_pipeline(folders):
    teacher, pipe = load_teacher(folders["sd15"]), _pipe(folders["sd15"])
    pos, neg = pipe.encode_prompt(PROMPTS + [LONG], "cpu", 1, True, ["blurry", "", "ugly"])
    cond, uncond = teacher.encode_prompt(PROMPTS + [LONG], ["blurry", "", "ugly"])
    assert torch.equal(cond["encoder_hidden_states"], pos) and torch.equal(uncond["encoder_hidden_states"], neg)
    # No negatives and no CFG: cond alone; with do_cfg: "" negatives, like the pipeline.
    assert torch.equal(teacher.encode_prompt(PROMPTS)["encoder_hidden_states"], pos[:2])
    _, empty = teacher.encode_prompt(PROMPTS, do_cfg=True)
    _, ref_empty = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert torch.equal(empty["encoder_hidden_states"], ref_empty)
    # What the UNet sees in the CFG batch [uncond, cond].
    seen = _unet_inputs(pipe, prompt=PROMPTS, negative_prompt=["blurry", "dark"], guidance_scale=3.0)
    cond, uncond = teacher.encode_prompt(PROMPTS, ["blurry", "dark"])
    assert torch.equal(seen["encoder_hidden_states"], torch.cat([uncond["encoder_hidden_states"],
                                                                 cond["encoder_hidden_states"]]))


@pytest.mark.parametrize("name", ["sdxl", "sdxl_nozero"])
def test_sdxl_encode_prompt_equals_pipeline(folders, name):
    teacher, pipe = load_teacher(folders[name]), _pipe(folders[name])
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond, uncond = teacher.encode_prompt(PROMPTS, do_cfg=True)
    assert torch.equal(cond["encoder_hidden_states"], pos) and torch.equal(cond["text_embeds"], pooled)
    assert torch.equal(uncond["encoder_hidden_states"], neg) and torch.equal(uncond["text_embeds"], neg_pooled)
    assert bool((uncond["encoder_hidden_states"] == 0).all()) == (name == "sdxl")  # force_zeros_for_empty_prompt
    # Explicit negatives are encoded (never zeroed), non-square size, micro-conditioning arguments.
    call = dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], guidance_scale=3.0, height=16, width=24,
                original_size=(40, 64), crops_coords_top_left=(4, 2), target_size=(16, 24))
    seen = _unet_inputs(pipe, **call)
    cond, uncond = teacher.encode_prompt(PROMPTS, ["blurry", "dark"], 16, 24, original_size=(40, 64),
                                         crops_coords_top_left=(4, 2), target_size=(16, 24))
    _assert_cond_equal({k: torch.cat([uncond[k], cond[k]]) for k in cond}, seen)
    assert cond["time_ids"][0].tolist() == [40, 64, 4, 2, 16, 24]
    # Defaults: original = target = (height, width), crop (0, 0); no CFG batch at guidance 1.
    seen = _unet_inputs(pipe, prompt=PROMPTS, guidance_scale=1.0, height=16, width=24)
    _assert_cond_equal(teacher.encode_prompt(PROMPTS, height=16, width=24), seen)


def test_sdxl_per_sample_time_ids(folders):
    teacher = load_teacher(folders["sdxl"])
    cond = teacher.encode_prompt(PROMPTS, original_size=[(32, 48), (48, 32)], crops_coords_top_left=[(0, 0), (8, 4)],
                                 target_size=torch.tensor([[16, 24], [24, 16]]))
    assert cond["time_ids"].tolist() == [[32, 48, 0, 0, 16, 24], [48, 32, 8, 4, 24, 16]]
    with pytest.raises(ValueError):
        teacher.encode_prompt(PROMPTS, original_size=[(32, 48)] * 3)


@pytest.mark.parametrize("name", ["sd15", "sd15_v", "sdxl"])
def test_predict_eps_and_cfg(folders, name):
    teacher = load_teacher(folders[name])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([30, 700])
    cond, uncond = teacher.encode_prompt(PROMPTS, do_cfg=True, height=16, width=24)
    with torch.no_grad():
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
        raw = teacher.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
    expected = raw if name != "sd15_v" else teacher.schedule.eps_from_v(x, raw, t)
    torch.testing.assert_close(teacher.predict_eps(x, t, cond), expected, atol=1e-5, rtol=1e-5)
    # CFG with a per-sample guidance scale equals the per-sample scalar results.
    scales = torch.tensor([1.5, 7.0])
    guided = teacher.predict_eps_cfg(x, t, cond, uncond, scales)
    for i in range(2):
        one = teacher.predict_eps_cfg(x, t, cond, uncond, float(scales[i]))
        torch.testing.assert_close(guided[i], one[i], atol=1e-5, rtol=1e-5)
    e_c, e_u = teacher.predict_eps(x, t, cond), teacher.predict_eps(x, t, uncond)
    torch.testing.assert_close(guided, e_u + scales.view(2, 1, 1, 1) * (e_c - e_u), atol=1e-4, rtol=1e-4)


def test_encode_decode_images_scaled(folders):
    teacher = load_teacher(folders["sd15"])
    vae = teacher.vae
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = teacher.encode_images(pixels, sample=False)
    assert latents.shape == (2, 4, 8, 12)
    with torch.no_grad():
        ref = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        ref_pixels = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(latents, ref)
    a = teacher.encode_images(pixels, generator=torch.Generator().manual_seed(1))
    b = teacher.encode_images(pixels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, latents)  # sampled from the posterior, seeded
    torch.testing.assert_close(teacher.decode_latents(latents), ref_pixels)


def test_options_vae_override_dtype(folders, tmp_path):
    other = make_tiny_sd15(tmp_path / "other", seed=7)
    teacher = load_teacher(folders["sd15"], vae=other / "vae", dtype="bfloat16", vae_fp32=True)
    assert teacher.dtype == torch.bfloat16 and teacher.front.text_encoder.dtype == torch.bfloat16
    assert teacher.vae.dtype == torch.float32
    ref = load_teacher(other).vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in teacher.vae.state_dict().items())
    x = torch.randn(1, 4, 8, 8)
    eps = teacher.predict_eps(x, torch.tensor([10]), teacher.encode_prompt(["a"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


@pytest.mark.parametrize("kind", ["unet.safetensors", "full.ckpt", "full.safetensors"])
def test_single_file_original_layout(folders, tmp_path, kind):
    """An ldm-layout file written from *different* weights than the config folder must win."""
    weights = make_tiny_sd15(tmp_path / "weights", prediction_type="v_prediction", seed=3)
    path = write_ldm_checkpoint(weights, tmp_path / kind, unet_only=kind.startswith("unet"))
    teacher = load_teacher(path, config=folders["sd15_v"])
    expected, config_only = load_teacher(weights), load_teacher(folders["sd15_v"])
    parts = ["unet"] if kind.startswith("unet") else ["unet", "vae", "text_encoder"]
    for part in ["unet", "vae", "text_encoder"]:
        ours = getattr(teacher, part).state_dict()
        want = (expected if part in parts else config_only)
        assert all(torch.equal(v, getattr(want, part).state_dict()[k]) for k, v in ours.items()), part
    assert teacher.schedule.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="teacher.config"):  # a size no real model has: its configs are needed
        load_teacher(path)


@pytest.mark.parametrize("unet_only", [True, False])
def test_single_file_sdxl(folders, tmp_path, unet_only):
    """sgm layout: CLIP-L under conditioner.embedders.0, OpenCLIP (fused qkv) under .1."""
    weights = make_tiny_sdxl(tmp_path / "weights", seed=5)
    path = write_ldm_checkpoint(weights, tmp_path / "xl.safetensors", unet_only=unet_only)
    teacher = load_teacher(path, config=folders["sdxl"])
    assert teacher.family == "sdxl"
    expected, config_only = load_teacher(weights), load_teacher(folders["sdxl"])
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"]:
        want = expected if part == "unet" or not unet_only else config_only
        ref = getattr(want, part).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in getattr(teacher, part).state_dict().items()), part
    if not unet_only:
        ours, ref = teacher.encode_prompt(PROMPTS), expected.encode_prompt(PROMPTS)
        for k in ref:  # the transposed text projection may take another matmul path: rounding only
            torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=1e-6)


def _hidden(encoder, tokenizer, prompts, index):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids, output_hidden_states=True).hidden_states[index]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_clip_skip_equals_the_pipelines_own(folders, name):
    """The prompt: the pipeline's own ``clip_skip``. The negative: the same formula (diffusers 0.42
    encodes negatives without clip skip; the project skips them too, as the teacher was trained)."""
    pipe, teacher = _pipe(folders[name]), load_teacher(folders[name], clip_skip=1)
    plain = load_teacher(folders[name])
    negatives = ["blurry", "dark"]
    cond, uncond = teacher.encode_prompt(PROMPTS, negatives)
    if name == "sd15":
        from sitdistill.teachers.frontend import final_layer_norm

        te = pipe.text_encoder
        norm = final_layer_norm(te)
        try:
            pos, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negatives, clip_skip=1)
        except AttributeError:  # diffusers 0.42 + transformers 5: `text_model` is gone; the formula instead
            pos = norm(_hidden(te, pipe.tokenizer, PROMPTS, -2))
        ref_neg = norm(_hidden(te, pipe.tokenizer, negatives, -2))
    else:
        pos, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                               negative_prompt=negatives, clip_skip=1)
        assert torch.equal(cond["text_embeds"], pooled)  # the pooled embedding is not skipped
        ref_neg = torch.cat([_hidden(pipe.text_encoder, pipe.tokenizer, negatives, -3),
                             _hidden(pipe.text_encoder_2, pipe.tokenizer_2, negatives, -3)], dim=-1)
    assert torch.equal(cond["encoder_hidden_states"], pos)
    assert torch.equal(uncond["encoder_hidden_states"], ref_neg)
    assert not torch.equal(cond["encoder_hidden_states"], plain.encode_prompt(PROMPTS)["encoder_hidden_states"])
    # Per call: 0 turns the teacher's clip skip off, a number overrides it.
    assert torch.equal(teacher.encode_prompt(PROMPTS, clip_skip=0)["encoder_hidden_states"],
                       plain.encode_prompt(PROMPTS)["encoder_hidden_states"])
    assert torch.equal(plain.encode_prompt(PROMPTS, clip_skip=1)["encoder_hidden_states"], pos)
    with pytest.raises(ValueError, match="clip_skip 9"):
        load_teacher(folders[name], clip_skip=9)


def test_clip_skip_reaches_the_text_cache_key_and_the_exported_pipeline(folders, tmp_path):
    from sitdistill.data.cache import TextCache
    from sitdistill.students import build_student
    from sitdistill.students.pipeline import SiTPipeline
    from sitdistill.infer.sampling import make_scheduler

    plain, skipped = load_teacher(folders["sd15"]), load_teacher(folders["sd15"], clip_skip=1)
    assert TextCache(plain.front, tmp_path).store.dir != TextCache(skipped.front, tmp_path).store.dir
    student = build_student("S/2", cond_dims=skipped.cond_dims, hidden_size=32, depth=1, num_heads=2)
    pipe = SiTPipeline.from_front_end(skipped.front, student, make_scheduler("ddim", skipped.scheduler_config))
    pipe.save_pretrained(tmp_path / "export")
    loaded = SiTPipeline.from_pretrained(tmp_path / "export")
    parts = loaded.front_end()
    assert parts.clip_skip == 1
    assert torch.equal(parts.encode_prompt(PROMPTS)["encoder_hidden_states"],
                       skipped.encode_prompt(PROMPTS)["encoder_hidden_states"])


def test_the_vae_override_loads_with_its_own_variant_never_the_teachers(folders, tmp_path):
    """A teacher repo with fp16 variant files and an override VAE repo without them (fp16-fix style)."""
    pipe = _pipe(folders["sd15"])
    pipe.save_pretrained(tmp_path / "teacher", variant="fp16")
    other = make_tiny_sd15(tmp_path / "other", seed=7)
    teacher = load_teacher(tmp_path / "teacher", variant="fp16", vae=other / "vae")
    ref = load_teacher(other).vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in teacher.vae.state_dict().items())
    # The override's own variant, when it has one.
    third = make_tiny_sd15(tmp_path / "third", seed=11)
    load_teacher(third).vae.save_pretrained(other / "vae", variant="v2")
    chosen = load_teacher(tmp_path / "teacher", variant="fp16", vae=other / "vae", vae_variant="v2")
    ref3 = load_teacher(third).vae.state_dict()
    assert all(torch.equal(v, ref3[k]) for k, v in chosen.vae.state_dict().items())


def test_vae_latents_mean_and_std_are_read_as_the_sdxl_pipeline_reads_them(folders, tmp_path):
    import json
    import shutil

    folder = tmp_path / "sdxl"
    shutil.copytree(folders["sdxl"], folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    mean, std = [0.5, -0.25, 0.1, 0.0], [2.0, 0.5, 1.5, 1.0]
    config.update(latents_mean=mean, latents_std=std)
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    teacher = load_teacher(folder)
    sf = teacher.vae.config.scaling_factor
    latents = torch.randn(2, 4, 8, 8)
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    # StableDiffusionXLPipeline: latents * latents_std / scaling_factor + latents_mean, then decode.
    ref = teacher.vae.decode(latents * s / sf + m).sample.float().clamp(-1, 1)
    assert torch.allclose(teacher.decode_latents(latents), ref, atol=1e-6)
    # Encoding is the inverse: the mode of an encoded image comes back normalised.
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    raw = teacher.vae.encode(pixels).latent_dist.mode()
    assert torch.allclose(teacher.encode_images(pixels, sample=False), (raw - m) * sf / s, atol=1e-5)
