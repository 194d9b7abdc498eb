"""The project's sampler with a teacher reproduces the diffusers pipelines' latents."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sitdistill.infer.sampling import SCHEDULERS, make_scheduler, sample, sample_teacher
from sitdistill.teachers import load_teacher
from tiny_models import make_tiny_sd15, make_tiny_sdxl, make_zsnr_v
from tiny_models import one_thread  # noqa: F401  (autouse: one intra-op thread for this module)

TOLERANCE = 1e-4
PROMPTS = ["a red circle at the top left", "the blue square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(teacher, pipeline) per (family, prediction type), loaded from saved folders."""
    root = tmp_path_factory.mktemp("sampling")
    out = {}
    for family, make, cls in (("sd15", make_tiny_sd15, StableDiffusionPipeline),
                              ("sdxl", make_tiny_sdxl, StableDiffusionXLPipeline)):
        for pred in ("epsilon", "v_prediction"):
            folder = make(root / f"{family}_{pred}", prediction_type=pred)
            pipe = cls.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            out[family, pred] = load_teacher(folder), pipe
    return out


CASES = [  # (family, prediction type, scheduler, (height, width), guidance)
    ("sd15", "epsilon", "ddim", (16, 16), 5.0),
    ("sd15", "epsilon", "euler", (16, 24), 5.0),
    ("sd15", "v_prediction", "ddim", (24, 16), 4.0),
    ("sd15", "v_prediction", "euler", (16, 24), 1.0),
    ("sd15", "v_prediction", "heun", (16, 16), 3.0),  # fractional timesteps at the Heun midpoints
    ("sd15", "epsilon", "euler_a", (16, 16), 3.0),  # ancestral: the generator drives step noise
    ("sdxl", "epsilon", "ddim", (16, 24), 5.0),
    ("sdxl", "epsilon", "euler", (24, 16), 5.0),
    ("sdxl", "v_prediction", "ddim", (16, 16), 5.0),
    ("sdxl", "v_prediction", "euler", (16, 24), 5.0),
    ("sdxl", "v_prediction", "dpm", (16, 24), 5.0),
]


@pytest.mark.parametrize("family,pred,scheduler,size,guidance", CASES)
def test_teacher_sampling_reproduces_pipeline(tiny, family, pred, scheduler, size, guidance):
    teacher, pipe = tiny[family, pred]
    cls, options = SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)  # keeps the source's prediction type
    height, width = size
    kw = dict(num_inference_steps=3, guidance_scale=guidance, height=height, width=width)
    ref = pipe(PROMPTS, negative_prompt=["dark", ""], output_type="latent",
               generator=torch.Generator().manual_seed(11), **kw).images
    ours = sample_teacher(teacher, PROMPTS, negative_prompts=["dark", ""], scheduler=scheduler,
                          generator=torch.Generator().manual_seed(11), **kw)
    assert ours.shape == (2, 4, height // 2, width // 2)
    assert ref.abs().max() > 0.5  # a real result, not an all-zero artefact
    torch.testing.assert_close(ours, ref, atol=TOLERANCE, rtol=0)


def test_make_scheduler_takes_the_teacher_schedule_and_the_models_prediction_type(tiny):
    teacher, _ = tiny["sd15", "v_prediction"]
    for name, (cls, _) in SCHEDULERS.items():
        sched = make_scheduler(name, teacher.scheduler_config)
        assert isinstance(sched, cls) and sched.config.prediction_type == "epsilon"  # a student's default
        assert sched.config.beta_schedule == teacher.scheduler_config["beta_schedule"]
        assert make_scheduler(name, teacher.scheduler_config, "v_prediction").config.prediction_type == "v_prediction"
    assert make_scheduler("dpm", teacher.scheduler_config).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="ddim"):
        make_scheduler("dpm++", teacher.scheduler_config)


def test_per_sample_guidance_and_batched_cfg(tiny):
    teacher, _ = tiny["sd15", "epsilon"]
    cond, uncond = teacher.encode_prompt(PROMPTS, do_cfg=True)
    batches = []

    def model_fn(x, t, c):
        batches.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        return teacher.predict_eps(x, t, c)

    def run(g, fn=model_fn, u=uncond):
        return sample(fn, make_scheduler("ddim", teacher.scheduler_config), cond=cond, uncond=u, shape=(2, 4, 8, 8),
                      guidance_scale=g, num_inference_steps=2, generator=torch.Generator().manual_seed(0))

    mixed = run(torch.tensor([2.0, 6.0]))
    assert batches == [4, 4]  # one forward per step over [uncond, cond]
    torch.testing.assert_close(mixed[0], run(2.0)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], run(6.0)[1], atol=1e-5, rtol=0)
    batches.clear()
    plain = run(1.0)
    assert batches == [2, 2]  # guidance 1: no unconditional pass, like the pipelines
    torch.testing.assert_close(plain, run(7.0, u=None))  # no uncond: plain conditional sampling
    with pytest.raises(ValueError, match="shape"):
        sample(model_fn, make_scheduler("ddim", teacher.scheduler_config), cond=cond)


ZSNR_SCHEDULERS = ("ddim", "ddpm", "euler", "euler_a", "dpm", "unipc")


@pytest.fixture(scope="module")
def zsnr(tmp_path_factory):
    folder = make_zsnr_v(tmp_path_factory.mktemp("zsnr") / "sd15_zsnr_v")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return load_teacher(folder), pipe


@pytest.mark.parametrize("scheduler", ZSNR_SCHEDULERS)
def test_zero_terminal_snr_v_teacher_sampling_reproduces_pipeline_with_guidance_rescale(zsnr, scheduler):
    teacher, pipe = zsnr
    assert float(teacher.schedule.alphas_cumprod[-1]) == 0.0  # SNR 0 at t = T
    cls, options = SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=16, width=16, guidance_rescale=0.7)
    ref = pipe(PROMPTS, negative_prompt=["dark", ""], output_type="latent",
               generator=torch.Generator().manual_seed(11), **kw).images
    ours = sample_teacher(teacher, PROMPTS, negative_prompts=["dark", ""], scheduler=scheduler,
                          generator=torch.Generator().manual_seed(11), **kw)
    assert torch.isfinite(ours).all() and ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=TOLERANCE, rtol=0)
    # Without rescale the result differs: the rescale is applied, not ignored.
    plain = sample_teacher(teacher, PROMPTS, negative_prompts=["dark", ""], scheduler=scheduler,
                           generator=torch.Generator().manual_seed(11), **{**kw, "guidance_rescale": 0.0})
    assert not torch.allclose(plain, ours, atol=1e-4)


def test_a_scheduler_that_cannot_follow_zero_terminal_snr_is_refused(zsnr):
    teacher, _ = zsnr
    for name in set(SCHEDULERS) - set(ZSNR_SCHEDULERS):
        with pytest.raises(ValueError, match="zero-terminal-SNR"):
            make_scheduler(name, teacher.scheduler_config, teacher.prediction_type)


def test_trajectory_states_of_a_zero_terminal_snr_teacher_stay_finite(zsnr):
    from sitdistill.train.perturb import teacher_trajectory_states

    teacher, _ = zsnr
    cond, uncond = teacher.encode_prompt(PROMPTS, do_cfg=True)
    states, t = teacher_trajectory_states(teacher.predict, make_scheduler("ddim", teacher.scheduler_config,
                                                                          teacher.prediction_type),
                                          cond, uncond, (2, 4, 8, 8), 5, guidance_scale=5.0,
                                          generator=torch.Generator().manual_seed(0), stop_at="all")
    assert int(t[0]) == 999 and torch.isfinite(states).all()
    # In epsilon (the old way) the same trajectory breaks down after its first step.
    eps_states, _ = teacher_trajectory_states(teacher.predict_eps, make_scheduler("ddim", teacher.scheduler_config),
                                              cond, uncond, (2, 4, 8, 8), 5, guidance_scale=5.0,
                                              generator=torch.Generator().manual_seed(0), stop_at="all")
    assert not torch.isfinite(eps_states[1:]).all()
