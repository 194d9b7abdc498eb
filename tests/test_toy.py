"""The toy world (drawing, captions, grader, tagutl folder) and the toy teachers (tiny builds, caching)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sitdistill.data import toy
from sitdistill.teachers import toy as toy_teacher
from sitdistill.teachers import toy_cli, toy_parts

# A toy teacher small enough to build in seconds: 32 px images, a handful of steps.
TINY = dict(preset="tiny", n_images=24, resolutions=((32, 32), (32, 16)), vae_steps=2, vae_batch=4, vae_crop=16,
            unet_steps=2, batch_size=4, warmup_steps=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared CPU: one thread avoids OpenMP oversubscription stalls.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- The world -----------------------------------------------------------------------------------
def test_sampling_and_drawing_are_deterministic_by_seed():
    a, b = toy.ToyWorld().sample(30, seed=3), toy.ToyWorld().sample(30, seed=3)
    assert a == b
    assert a != toy.ToyWorld().sample(30, seed=4)
    assert np.array_equal(np.asarray(toy.draw(a[0])), np.asarray(toy.draw(b[0])))
    other = toy.ToySpec(**{**a[0].__dict__, "seed": a[0].seed + 1})
    assert not np.array_equal(np.asarray(toy.draw(a[0])), np.asarray(toy.draw(other)))


def test_caption_round_trip_and_grammar():
    for spec in toy.ToyWorld().sample(100, seed=0):
        assert toy.spec_from_caption(spec.caption, spec.width, spec.height, spec.seed) == spec
    assert toy.parse_caption("a red circle at the top left") == {
        "size": None, "colour": "red", "shape": "circle", "position": "top left", "background": None}
    assert toy.parse_caption("A  small blue square in the center on a noisy background")["size"] == "small"
    for bad in ("a red circle", "a purple circle at the top left", "the red circle at the top left"):
        with pytest.raises(ValueError):
            toy.parse_caption(bad)


def test_aspect_ratios_and_sizes():
    specs = toy.ToyWorld().sample(60, seed=1)
    assert {(s.width, s.height) for s in specs} == set(toy.RESOLUTIONS)
    for s in specs[:12]:
        assert toy.draw(s).size == (s.width, s.height)
    # Pixel sides divide by VAE factor 4 x student patch 2 x the UNet's two halvings.
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in toy.RESOLUTIONS)


def test_combo_filters():
    held_out = (("red", "circle"), ("blue", "square"))
    specs = toy.ToyWorld(exclude_combos=held_out).sample(300, seed=2)
    assert not {s.combo for s in specs} & set(held_out)
    assert {s.combo for s in toy.ToyWorld(only_combos=held_out).sample(50, seed=2)} == set(held_out)
    with pytest.raises(ValueError):
        toy.ToyWorld(only_combos=held_out, exclude_combos=held_out).sample(1, seed=0)


def test_grader_is_right_on_real_toy_images():
    specs = toy.ToyWorld().sample(150, seed=11)
    rates = toy.fidelity([toy.draw(s) for s in specs], specs)
    assert rates["colour"] >= 0.95 and rates["shape"] >= 0.95 and rates["position"] >= 0.95, rates
    # Captions grade the same as specs; tensors in [-1, 1] the same as PIL images.
    img = toy.draw(specs[0])
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    assert toy.grade(tensor, specs[0].caption) == toy.grade(img, specs[0]) == dict(colour=True, shape=True,
                                                                                   position=True)


def test_grader_is_fair_on_blurred_drawings_and_not_loose_on_wrong_ones():
    """Samples are blurrier than drawings: a Gaussian blur of 1 px still grades right; a drawing of
    another shape, position or colour than the caption asks is graded wrong, blurred or not."""
    import dataclasses

    from PIL import ImageFilter

    specs = toy.ToyWorld().sample(120, seed=21)
    blurred = toy.fidelity([toy.draw(s).filter(ImageFilter.GaussianBlur(1)) for s in specs], specs)
    assert blurred["all"] >= 0.95, blurred
    rng = np.random.default_rng(0)
    for factor, table in (("shape", toy.SHAPES), ("position", list(toy.POSITIONS)), ("colour", list(toy.COLOURS))):
        wrong = []
        for s in specs:
            other = [v for v in table if v != getattr(s, factor)]
            wrong.append(toy.draw(dataclasses.replace(s, **{factor: other[rng.integers(len(other))]})))
        assert toy.fidelity(wrong, specs)[factor] == 0.0, factor
        soft = [w.filter(ImageFilter.GaussianBlur(2)) for w in wrong]
        assert toy.fidelity(soft, specs)[factor] <= 0.15, factor


def test_grader_is_near_chance_on_noise_images():
    specs = toy.ToyWorld().sample(300, seed=12)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (s.height, s.width, 3), dtype=np.uint8) for s in specs]
    rates = toy.fidelity(noise, specs)
    for factor, k in (("colour", len(toy.COLOURS)), ("shape", len(toy.SHAPES)), ("position", len(toy.POSITIONS))):
        assert rates[factor] <= 1 / k + 0.1, (factor, rates)
    # A blank grey image shows nothing: every grade is False.
    assert not any(toy.grade(np.full((64, 64, 3), 128, np.uint8), specs[0]).values())


def test_write_folder_is_a_tagutl_folder(tmp_path):
    paths = toy.write_folder(tmp_path, 6, seed=5, sizes=[(64, 48), (48, 64)])
    assert len(paths) == 6 and sorted(p.name for p in tmp_path.glob("*.png")) == [p.name for p in paths]
    for p in paths:
        caption = p.with_suffix(".txt").read_text().strip()
        meta = json.loads(p.with_suffix(".json").read_text())
        assert meta["caption"] == caption and toy.parse_caption(caption)["colour"] == meta["colour"]
        img = Image.open(p)
        assert img.size == (meta["width"], meta["height"]) and img.size in {(64, 48), (48, 64)}
        assert all(toy.grade(img, caption).values())
    assert toy.write_folder(tmp_path / "again", 6, seed=5, sizes=[(64, 48), (48, 64)], metadata=False)
    assert not list((tmp_path / "again").glob("*.json"))
    assert (tmp_path / "again" / "000003.png").read_bytes() == paths[3].read_bytes()


# --- Toy teachers --------------------------------------------------------------------------------
def test_tokenizer_is_trained_on_the_toy_vocabulary():
    tok = toy_teacher.train_tokenizer(16)
    ids = tok("a small magenta diamond at the bottom right on a noisy background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 14  # one token a word
    assert tok.eos_token_id != 2 or tok.convert_ids_to_tokens(2) == "<|endoftext|>"
    assert len(tok("zebra!").input_ids) > 3  # unseen words still tokenize (byte-level alphabet)
    # Trained again, the same ids (the embedding row each word gets depends on them).
    assert toy_teacher.train_tokenizer(16).get_vocab() == tok.get_vocab()
    tok2 = toy_teacher.train_tokenizer(16, pad_token="!")
    assert tok2("a red", padding="max_length", max_length=16).input_ids[-1] == tok2.convert_tokens_to_ids("!")


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, {fam: toy_teacher.ensure_toy_teacher(fam, cache_dir=cache, **TINY) for fam in toy_teacher.FAMILIES}


def test_tiny_sd15_teacher_loads_in_diffusers_and_runs(tiny_teachers):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teachers[1]["sd15"])
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.scaling_factor != 0.18215
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    out = pipe("a red circle at the top left", num_inference_steps=2, height=16, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 32, 3) and np.isfinite(out).all()
    # The conditioning the teacher was trained with is exactly what the pipeline builds.
    ids = toy_teacher._tokenize(pipe.tokenizer, ["a red circle at the top left", ""])
    ours = toy_parts.encode_text("sd15", [pipe.text_encoder], [ids], torch.tensor([False, True]))
    pos, neg = pipe.encode_prompt("a red circle at the top left", "cpu", 1, True)
    torch.testing.assert_close(ours["encoder_hidden_states"], torch.cat([pos, neg]))


def test_tiny_sdxl_teacher_loads_in_diffusers_and_runs(tiny_teachers):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_teachers[1]["sdxl"])
    assert pipe.tokenizer_2.pad_token == "!" and pipe.unet.config.addition_embed_type == "text_time"
    out = pipe("a red circle at the top left", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    prompt = "a blue square in the center"
    ids = [toy_teacher._tokenize(t, [prompt, ""]) for t in (pipe.tokenizer, pipe.tokenizer_2)]
    ours = toy_parts.encode_text("sdxl", [pipe.text_encoder, pipe.text_encoder_2], ids, torch.tensor([False, True]))
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(ours["encoder_hidden_states"], torch.cat([pos, neg]))
    torch.testing.assert_close(ours["text_embeds"], torch.cat([pooled, neg_pooled]))


@pytest.mark.parametrize("family", toy_teacher.FAMILIES)
def test_caption_words_build_encodes_each_batch_once_with_the_same_conditioning(tiny_teachers, family):
    """A build step encodes the undropped captions once (and the empty prompt): the UNet gets the
    conditioning `unet_kwargs` computes on the batch whose dropped rows are the empty prompt, and the
    objective gets the captions' own states."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(tiny_teachers[1][family])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    captions = ["a red circle at the top left", "a blue square in the center",
                "a small green triangle at the bottom right"]
    caption_ids = [toy_teacher._tokenize(t, captions) for t in tokenizers]
    empty_ids = [toy_teacher._tokenize(t, [""]) for t in tokenizers]
    drop = torch.tensor([False, True, False])
    dropped = [torch.where(drop[:, None], e, c) for e, c in zip(empty_ids, caption_ids)]
    for mix in ((1.0, 0.5) if family == "sd15" else (1.0,)):
        with torch.no_grad():
            cond, outputs = toy_teacher._caption_conditioning(family, encoders, caption_ids, empty_ids, drop,
                                                              32, 32, mix)
            expected = toy_parts.unet_kwargs(family, encoders, dropped, drop, 32, 32, mix)
            own = [e(c, output_hidden_states=True).hidden_states[-1] for e, c in zip(encoders, caption_ids)]
        torch.testing.assert_close(cond, expected)
        if family == "sd15":  # row 1 is the empty prompt's, not its caption's
            assert not torch.allclose(cond["encoder_hidden_states"][1], outputs[0].last_hidden_state[1])
        else:  # force_zeros_for_empty_prompt
            assert not cond["encoder_hidden_states"][1].any() and cond["encoder_hidden_states"][0].any()
        for out, states in zip(outputs, own):
            torch.testing.assert_close(out.hidden_states[-1], states)  # the objective reads the true captions


def test_sd15_teacher_with_pooled_text_and_four_levels_is_still_an_sd15_pipeline(tmp_path):
    """text_pool (diffusers' addition_embed_type="text") and a fourth UNet level: the SD pipeline
    runs it with no extra input, on every toy aspect ratio, and the project loads it as SD1.5."""
    from diffusers import StableDiffusionPipeline

    from sitdistill.teachers import load_teacher

    settings = {**TINY, "text_pool": True, "unet_levels": 4}
    folder = toy_teacher.ensure_toy_teacher("sd15", cache_dir=tmp_path, **settings)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.unet.config.addition_embed_type == "text" and len(pipe.unet.config.down_block_types) == 4
    for h, w in ((32, 32), (32, 16), (16, 32)):
        out = pipe("a red circle at the top left", num_inference_steps=2, height=h, width=w, output_type="np").images
        assert out.shape == (1, h, w, 3) and np.isfinite(out).all()
    teacher = load_teacher(str(folder))
    assert teacher.family == "sd15" and set(teacher.cond_dims) == {"encoder_hidden_states"}
    cond = teacher.encode_prompt(["a blue square in the center", "a red circle at the top left"])
    x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)  # the same x_t for both prompts
    eps = teacher.predict_eps(x, torch.tensor([500, 500]), cond)
    assert not torch.allclose(eps[0], eps[1])  # the prompt reaches the UNet
    with pytest.raises(ValueError, match="levels"):
        toy_teacher.build_unet("tiny", "sd15", 16, levels=5)


def test_cache_returns_the_same_folder_without_rebuilding(tiny_teachers, monkeypatch):
    cache, built = tiny_teachers
    assert built["sd15"].parent == cache / "toy-teacher" and built["sd15"] != built["sdxl"]
    assert len(list((cache / "toy-teacher").glob("vae-*"))) == 1  # both families share one VAE

    def must_not_build(*a, **k):
        raise AssertionError("rebuilt a cached toy teacher")
    monkeypatch.setattr(toy_teacher, "build_toy_teacher", must_not_build)
    assert toy_teacher.ensure_toy_teacher("sd15", cache_dir=cache, **TINY) == built["sd15"]
    # Different settings -> a different key -> a build.
    with pytest.raises(AssertionError, match="rebuilt"):
        toy_teacher.ensure_toy_teacher("sd15", cache_dir=cache, **{**TINY, "seed": 1})


def test_interrupted_build_is_not_taken_as_finished(tiny_teachers, monkeypatch):
    cache, _ = tiny_teachers
    settings = {**TINY, "unet_steps": 1}
    final = toy_teacher.toy_teacher_dir(toy_teacher.ToyTeacherSettings(family="sd15", **settings), cache)

    # A build killed while saving: the exception escapes, nothing is left under the final name.
    from diffusers import DiffusionPipeline

    def killed(self, save_directory, **kw):
        (save_directory / "unet").mkdir()
        raise KeyboardInterrupt
    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        toy_teacher.ensure_toy_teacher("sd15", cache_dir=cache, **settings)
    assert not final.exists() and not list(final.parent.glob(f".{final.name}.partial-*"))
    monkeypatch.undo()

    # A folder under the final name without the finished marker (e.g. copied half-way) is rebuilt.
    (final / "unet").mkdir(parents=True)
    (final / "model_index.json").write_text("{}")
    assert not toy_teacher.is_finished(final)
    assert toy_teacher.ensure_toy_teacher("sd15", cache_dir=cache, **settings) == final
    assert toy_teacher.is_finished(final) and (final / "unet" / "config.json").exists()


def test_a_muon_teacher_builds_under_its_own_key_and_earlier_keys_stay(tmp_path):
    """`optimizer="muon"` trains the UNet's matrices and kernels with Muon: a working pipeline under a
    key of its own, while the default settings keep the key they had before the option existed (no
    cached teacher is rebuilt)."""
    from dataclasses import asdict

    from sitdistill.core.muon import MuonAdamW

    plain = toy_teacher.ToyTeacherSettings(family="sd15", text_norm_warmup=0, caption_words=0.0, **TINY)
    muon = toy_teacher.ToyTeacherSettings(family="sd15", text_norm_warmup=0, caption_words=0.0, optimizer="muon", **TINY)
    before = {k: v for k, v in asdict(plain).items() if k not in toy_teacher.LATER_DEFAULTS}
    assert plain.key_settings() == before
    assert toy_teacher.toy_teacher_dir(muon, tmp_path) != toy_teacher.toy_teacher_dir(plain, tmp_path)
    unet, encoders = toy_teacher.build_unet("tiny", "sd15", 16), []
    opt = toy_teacher._unet_optimizer(unet, encoders, muon)
    assert isinstance(opt, MuonAdamW)
    muon_group = next(g for g in opt.param_groups if g["muon"])
    assert any(q.ndim == 4 for q in muon_group["params"]) and any(q.ndim == 2 for q in muon_group["params"])
    assert all(q is not unet.conv_in.weight for q in muon_group["params"])
    folder = toy_teacher.ensure_toy_teacher("sd15", cache_dir=tmp_path, optimizer="muon", text_norm_warmup=0, caption_words=0.0, **TINY)
    assert toy_teacher.is_finished(folder) and folder == toy_teacher.toy_teacher_dir(muon, tmp_path)
    with pytest.raises(ValueError, match="optimizer"):
        toy_teacher.ToyTeacherSettings(optimizer="sgd")


def test_multires_training_noise_hides_the_coarse_layout_and_is_off_by_default():
    """Level 0 is exactly the Gaussian noise the builds drew before the option existed (same
    generator stream); levels > 0 keep each sample at unit std but put more energy in the coarse
    (quadrant-sized) averages, which is what hides the layout x_t leaks at t = 999."""
    shape = torch.Size((64, 4, 16, 12))
    plain = toy_teacher._training_noise(shape, torch.Generator().manual_seed(3), 0, 0.5)
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    multi = toy_teacher._training_noise(shape, torch.Generator().manual_seed(3), 3, 0.8)
    assert multi.shape == shape
    assert torch.allclose(multi.flatten(1).std(dim=1), torch.ones(64), atol=1e-5)
    coarse = lambda x: torch.nn.functional.avg_pool2d(x, (8, 6)).std()  # noqa: E731  the quadrants
    assert coarse(multi) > 2 * coarse(plain)
    with pytest.raises(ValueError, match="multires"):
        toy_teacher.ToyTeacherSettings(multires_noise=2, multires_discount=0.0)
    assert "multires_noise" not in toy_teacher.ToyTeacherSettings().key_settings()
    assert toy_teacher.ToyTeacherSettings(multires_noise=3).key_settings()["multires_noise"] == 3


class _FakeToyPipe:
    """A stand-in pipeline that draws the toy world itself: at the caption's position (``reads``) or
    at a position chosen by its initial latent (a teacher that ignores the position words)."""

    def __init__(self, reads: bool):
        from types import SimpleNamespace
        self.reads, self.vae_scale_factor = reads, 4
        self.scheduler = SimpleNamespace(config={"num_train_timesteps": 1000})
        self.unet = SimpleNamespace(config=SimpleNamespace(in_channels=4))

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, captions, width, height, latents, **kw):
        from types import SimpleNamespace
        images = []
        for caption, latent in zip(captions, latents):
            spec = toy.spec_from_caption(caption, width, height)
            if not self.reads:
                spec = dataclasses.replace(spec, position=list(toy.POSITIONS)[int(latent.abs().sum() * 1000) % 5])
            images.append(toy.draw(spec))
        return SimpleNamespace(images=images)


@pytest.mark.parametrize("reads", [True, False])
def test_position_probe_tells_a_caption_led_teacher_from_a_noise_led_one(reads, monkeypatch):
    import diffusers
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", staticmethod(lambda folder: _FakeToyPipe(reads)))
    got = toy_cli.position_probe("unused", n_seeds=6, steps=2)
    if reads:
        assert got["position"] == 1.0 and got["same_place"] == 0.0 and got["all_five_together"] == 0.0
    else:
        assert got["position"] == pytest.approx(0.2) and got["same_place"] == 1.0 and got["all_five_together"] == 1.0


def test_cli_parser_builds_into_out(tmp_path, monkeypatch):
    monkeypatch.setenv("SITDISTILL_CACHE", str(tmp_path / "cache"))
    args = toy_cli.build_parser().parse_args(["--family", "sdxl", "--out", str(tmp_path / "t"), "--eval", "4"])
    assert args.family == "sdxl" and args.eval == 4 and args.out == tmp_path / "t"
    with pytest.raises(SystemExit):
        toy_cli.build_parser().parse_args(["--family", "sd3"])



def test_cli_bad_setting_combination_exits_2_with_one_line(tmp_path, capsys):
    args = toy_cli.build_parser().parse_args(["--family", "sdxl", "--text-norm-warmup", "5",
                                              "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        toy_cli.run(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "text_norm_warmup" in err
    assert not list(tmp_path.iterdir())  # nothing built


def test_toy_vae_training_is_deterministic_by_seed():
    s = toy_teacher.ToyTeacherSettings(**{**TINY, "n_images": 8})
    groups = toy_teacher._draw_groups(s)
    a, b = toy_teacher.train_vae(s, groups), toy_teacher.train_vae(s, groups)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.config.scaling_factor == b.config.scaling_factor and a.config.block_out_channels == (8, 16, 16)


class _ColourOnlyUNet(torch.nn.Module):
    """Predicts the probe's noise, off by 0.1, and by 0.1 more when one of the given words (by
    default the colour words) is not the true caption's: a UNet that reads those words and no other."""

    def __init__(self, probe, word_ids):
        super().__init__()
        self.probe, self.word_ids = probe, word_ids
        self.true = probe.ids["true"][0]

    def forward(self, x_t, t, encoder_hidden_states):
        from types import SimpleNamespace
        ids = encoder_hidden_states[..., 0].long()  # the stand-in encoder passes the ids through
        rows = slice(None) if len(ids) == len(self.true) else self.probe.off_center  # token_gains: off-center
        true = self.true[rows]
        wrong = ((ids != true) & torch.isin(true, self.word_ids)).any(dim=1).float()
        return SimpleNamespace(sample=self.probe.noise[rows] + 0.1 + 0.1 * wrong[:, None, None, None])


class _IdsThrough(torch.nn.Module):
    """A stand-in text encoder: the token ids, as a (B, L, 1) float state."""

    def forward(self, ids):
        return (ids[:, :, None].float(),)


def test_word_gain_probe_measures_the_word_a_unet_reads():
    from sitdistill.teachers.toy_probe import WordGainProbe
    torch.manual_seed(0)
    vae = toy_teacher.build_vae("tiny")
    tok = toy_teacher.train_tokenizer(16)
    probe = WordGainProbe("sd15", vae, [tok], toy_teacher.SCHEDULER_CONFIGS["sd15"], n=8)
    colour_ids = torch.tensor([tok.convert_tokens_to_ids(c + "</w>") for c in toy.COLOURS])
    got = probe(_ColourOnlyUNet(probe, colour_ids), [_IdsThrough()])
    for band in ("high", "mid"):
        assert got[band]["mse"] == pytest.approx(0.01, rel=1e-4)
        assert got[band]["colour"] == pytest.approx(3.0, abs=1e-3)   # (0.2^2) / (0.1^2) - 1
        assert got[band]["position"] == 0.0 and got[band]["shape"] == 0.0
        assert got[band]["left_right"] == 0.0 and got[band]["top_bottom"] == 0.0
    # A UNet that reads "left"/"right" only: the left/right axis gets the full gain, top/bottom none.
    lr_ids = torch.tensor([tok.convert_tokens_to_ids(w + "</w>") for w in ("left", "right")])
    got = probe(_ColourOnlyUNet(probe, lr_ids), [_IdsThrough()])
    assert bool(probe.off_center.any())
    for band in ("high", "mid"):
        assert got[band]["left_right"] == pytest.approx(3.0, abs=1e-3) and got[band]["top_bottom"] == 0.0
        assert got[band]["colour"] == 0.0 and 0.0 < got[band]["position"] < 3.0
    # Per token: the whole left/right gain sits at the token of "left"/"right" (index 8 of "<bos> a
    # <size> <colour> <shape> at the <top|bottom> <left|right> ..."), none anywhere for top/bottom.
    per_token = probe.token_gains(_ColourOnlyUNet(probe, lr_ids), [_IdsThrough()])
    assert per_token["left_right"][8] == pytest.approx(3.0, abs=1e-3)
    assert all(g == 0.0 for j, g in enumerate(per_token["left_right"]) if j != 8)
    assert len(per_token["top_bottom"]) == 16 and all(g == 0.0 for g in per_token["top_bottom"])


def test_word_gain_during_a_build_is_logged_and_leaves_the_build_unchanged(tmp_path):
    from safetensors.torch import load_file
    plain = toy_teacher.build_toy_teacher(tmp_path / "plain", toy_teacher.ToyTeacherSettings(family="sd15", **TINY),
                                          cache_dir=tmp_path)
    logged = toy_teacher.build_toy_teacher(tmp_path / "logged", toy_teacher.ToyTeacherSettings(family="sd15", **TINY),
                                           cache_dir=tmp_path, word_gain_every=1)
    a, b = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (plain, logged))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gains = json.loads((logged / toy_teacher.FINISHED_MARKER).read_text())["word_gain"]
    assert [g["step"] for g in gains] == [1, 2]
    assert set(gains[-1]["high"]) == {"mse", "position", "colour", "shape", "left_right", "top_bottom"}
    assert "word_gain" not in json.loads((plain / toy_teacher.FINISHED_MARKER).read_text())
    # On the saved folder (diffusers' from_pretrained) the probe gives what the build logged last.
    from sitdistill.teachers.toy_probe import word_gain
    assert word_gain(logged) == {k: v for k, v in gains[-1].items() if k != "step"}


def test_text_norm_warmup_schedule_and_settings(tmp_path):
    """The warm-up reads pre-norm states (mix 0), the ramp blends the norm in linearly, and the end
    is the pipeline's conditioning (mix 1). It is the SD1.5 family's default (a share of its steps,
    without pooled text). The earlier settings keep their cache keys; the SDXL family's caption-words
    default made a new one."""
    from dataclasses import asdict

    s = toy_teacher.ToyTeacherSettings(family="sd15", **{**TINY, "unet_steps": 10}, text_norm_warmup=4,
                                       text_norm_ramp=4)
    assert [toy_teacher._text_norm_mix(i, s) for i in range(10)] == [0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    plain = toy_teacher.ToyTeacherSettings(family="sd15", **TINY, text_norm_warmup=0, caption_words=0.0)
    assert all(toy_teacher._text_norm_mix(i, plain) == 1.0 for i in range(3))
    assert plain.key_settings() == {k: v for k, v in asdict(plain).items() if k not in toy_teacher.LATER_DEFAULTS}
    assert s.key_settings()["text_norm_warmup"] == 4
    sd15 = toy_teacher.ToyTeacherSettings(family="sd15")
    steps = toy_teacher.UNET_STEPS["sd15"]
    assert not sd15.text_pool and sd15.unet_steps == steps and sd15.caption_words == 0.1
    assert sd15.text_norm_warmup == 0  # the caption-words objective made the warm-up unnecessary
    share = toy_teacher.ToyTeacherSettings(family="sd15", unet_steps=10, text_norm_warmup=6)
    assert share.text_norm_ramp == round(10 * toy_teacher.TEXT_NORM_RAMP)
    sdxl = toy_teacher.ToyTeacherSettings(family="sdxl")
    assert sdxl.text_pool and sdxl.text_norm_warmup == 0 and sdxl.caption_words == 0.1
    # the SDXL family's caption-words default is part of its key (a new key: it builds another teacher)
    assert sdxl.key_settings()["caption_words"] == 0.1
    plain_sdxl = toy_teacher.ToyTeacherSettings(family="sdxl", caption_words=0.0)
    assert toy_teacher.toy_teacher_dir(sdxl, tmp_path) != toy_teacher.toy_teacher_dir(plain_sdxl, tmp_path)
    assert plain_sdxl.key_settings() == {k: v for k, v in asdict(plain_sdxl).items() if k not in toy_teacher.LATER_DEFAULTS}
    with pytest.raises(ValueError, match="sd15 family only"):
        toy_teacher.ToyTeacherSettings(family="sdxl", **TINY, text_norm_warmup=1, text_norm_ramp=0)
    with pytest.raises(ValueError, match="at most unet_steps"):
        toy_teacher.ToyTeacherSettings(family="sd15", **TINY, text_norm_warmup=2, text_norm_ramp=1)
    with pytest.raises(ValueError, match=">= 0"):
        toy_teacher.ToyTeacherSettings(family="sd15", **TINY, text_norm_ramp=-1)


def test_encode_text_norm_mix_reads_the_last_layer_before_and_after_the_final_norm():
    from sitdistill.teachers.frontend import final_layer_norm

    tok = toy_parts.train_tokenizer(16)
    torch.manual_seed(0)
    enc = toy_parts.build_text_encoder("tiny", tok, 16).eval()
    ids = toy_parts._tokenize(tok, ["a red circle at the top left", ""])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        pre = enc(ids, output_hidden_states=True).hidden_states[-1]
        full = toy_parts.encode_text("sd15", [enc], [ids], drop)["encoder_hidden_states"]
        none = toy_parts.encode_text("sd15", [enc], [ids], drop, norm_mix=0.0)["encoder_hidden_states"]
        half = toy_parts.encode_text("sd15", [enc], [ids], drop, norm_mix=0.5)["encoder_hidden_states"]
    torch.testing.assert_close(full, enc(ids)[0])
    torch.testing.assert_close(full, final_layer_norm(enc)(pre))
    torch.testing.assert_close(none, pre)
    torch.testing.assert_close(half, (pre + full) / 2)
    assert not torch.allclose(none, full)
    # Fitting the (untrained) norm to the states makes it close to the identity on them.
    err_before = (full - pre).square().mean()
    gain, bias = toy_teacher._fit_text_norm(enc, ids)
    with torch.no_grad():
        err_after = (final_layer_norm(enc)(pre) - pre).square().mean()
    assert gain > 0 and float(err_after) < 0.5 * float(err_before)
    assert torch.all(final_layer_norm(enc).weight == gain) and torch.all(final_layer_norm(enc).bias == bias)


def test_a_text_norm_warmup_build_ends_as_an_ordinary_sd_pipeline(tmp_path):
    """A build with the warm-up: the final layer norm is fitted at the switch (weights and EMA), and
    the saved folder's pipeline encodes prompts exactly as the build's last steps did."""
    from diffusers import StableDiffusionPipeline

    settings = {**TINY, "unet_steps": 4, "text_norm_warmup": 2, "text_norm_ramp": 1}
    folder = toy_teacher.ensure_toy_teacher("sd15", cache_dir=tmp_path, **settings)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    norm = pipe.text_encoder.final_layer_norm
    ids = toy_teacher._tokenize(pipe.tokenizer, ["a red circle at the top left", ""])
    with torch.no_grad():  # fitted near the identity on the states, unlike a norm at its init
        pre = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
        fitted_err = (norm(pre) - pre).square().mean()
        init_err = (torch.nn.functional.layer_norm(pre, pre.shape[-1:], eps=norm.eps) - pre).square().mean()
    assert float(fitted_err) < 0.5 * float(init_err)
    ours = toy_parts.encode_text("sd15", [pipe.text_encoder], [ids], torch.tensor([False, True]))
    pos, neg = pipe.encode_prompt("a red circle at the top left", "cpu", 1, True)
    torch.testing.assert_close(ours["encoder_hidden_states"], torch.cat([pos, neg]))
    assert json.loads((folder / toy_teacher.FINISHED_MARKER).read_text())["settings"]["text_norm_warmup"] == 2


def test_mirror_swaps_left_and_right_and_the_mirrored_drawing_matches(tmp_path):
    """`mirror`: the mirrored drawing is the drawing of the caption with left and right swapped (the
    grader sees it there), and a build with it is an ordinary teacher under its own key."""
    spec = toy.ToySpec("red", "triangle", "top left", "large", "plain", 64, 64)
    assert toy_teacher._mirror_caption(spec.caption) == dataclasses.replace(spec, position="top right").caption
    assert toy_teacher._mirror_caption("a red circle in the center") == "a red circle in the center"
    for shape in toy.SHAPES:
        for pos in ("top left", "bottom right", "center"):
            s = dataclasses.replace(spec, shape=shape, position=pos)
            mirrored = toy.draw(s).transpose(Image.FLIP_LEFT_RIGHT)
            assert toy.grade(mirrored, toy_teacher._mirror_caption(s.caption)) == \
                {"colour": True, "shape": True, "position": True}
    plain = toy_teacher.ToyTeacherSettings(family="sd15", **TINY)
    mirror = toy_teacher.ToyTeacherSettings(family="sd15", mirror=True, **TINY)
    assert "mirror" not in plain.key_settings() and mirror.key_settings()["mirror"] is True
    folder = toy_teacher.ensure_toy_teacher("sd15", cache_dir=tmp_path, mirror=True, **TINY)
    assert toy_teacher.is_finished(folder) and folder == toy_teacher.toy_teacher_dir(mirror, tmp_path)


def test_caption_words_objective_teaches_the_end_of_text_state_every_word(tmp_path):
    """`caption_words`: labels are the caption's factors; trained on the objective alone, a tiny text
    encoder's end-of-text state comes to tell left from right (what the jointly trained SD1.5-style
    encoder's did not); a build with it is an ordinary teacher under its own key."""
    from sitdistill.teachers.toy_parts import _tokenize, build_text_encoder, train_tokenizer

    captions = [toy.ToySpec(c, s, p, "large", "plain").caption
                for c, s, p in [("red", "circle", "top left"), ("red", "circle", "top right"),
                                ("blue", "square", "bottom left"), ("blue", "square", "bottom right"),
                                ("green", "triangle", "center"), ("yellow", "diamond", "top right")]]
    labels = toy_teacher._caption_labels(captions)
    positions = list(toy.POSITIONS)
    assert labels[:, 2].tolist() == [positions.index(p) for p in
                                     ("top left", "top right", "bottom left", "bottom right", "center", "top right")]
    assert labels[0, 0] == list(toy.COLOURS).index("red") and labels[3, 1] == list(toy.SHAPES).index("square")

    tok = train_tokenizer(16)
    torch.manual_seed(0)
    encoder = build_text_encoder("tiny", tok, 16)
    head = toy_teacher.CaptionWordsHead(16, tok.eos_token_id)
    ids = _tokenize(tok, captions)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=1e-2)

    def objective():
        return head(encoder(ids, output_hidden_states=True).hidden_states[-1], ids, labels)

    first = float(objective())
    for _ in range(150):
        loss = objective()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.1 * first
    with torch.no_grad():
        states = encoder(ids, output_hidden_states=True).hidden_states[-1]
        eos = (ids == tok.eos_token_id).int().argmax(-1)
        guess = head.heads[2](head.norm(states[torch.arange(len(captions)), eos])).argmax(-1)
    assert guess.tolist() == labels[:, 2].tolist()  # top left and top right told apart at the end of text

    plain = toy_teacher.ToyTeacherSettings(family="sd15", caption_words=0.0, **TINY)
    words = toy_teacher.ToyTeacherSettings(family="sd15", caption_words=0.5, **TINY)
    assert "caption_words" not in plain.key_settings() and words.key_settings()["caption_words"] == 0.5
    folder = toy_teacher.ensure_toy_teacher("sd15", cache_dir=tmp_path, caption_words=0.5, **TINY)
    assert toy_teacher.is_finished(folder) and folder == toy_teacher.toy_teacher_dir(words, tmp_path)
    with pytest.raises(ValueError, match="caption_words"):
        toy_teacher.ToyTeacherSettings(family="sd15", caption_words=-1.0)
