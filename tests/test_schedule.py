"""The noise convention against diffusers (golden values where a formula is easy to get wrong)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.training_utils import compute_snr

from sitdistill.core.schedule import TIMESTEP_SAMPLERS, NoiseSchedule

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, skip_prk_steps=True, prediction_type="epsilon")
OTHER_CONFIGS = [
    dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
         rescale_betas_zero_snr=True),
]


@pytest.fixture(scope="module")
def sd():
    return NoiseSchedule.from_config(PNDMScheduler.from_config(SD_CONFIG).config)


@pytest.mark.parametrize("config", [SD_CONFIG, *OTHER_CONFIGS])
def test_schedule_read_from_config_matches_ddpm(config):
    ours = NoiseSchedule.from_config(config)
    ref = DDPMScheduler.from_config(config)
    assert ours.num_train_timesteps == config["num_train_timesteps"]
    assert ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_sd_schedule_golden_values(sd):
    # scaled_linear: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    assert sd.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert sd.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert sd.alphas_cumprod[-1].item() == pytest.approx(0.0046600, rel=1e-3)  # SD's terminal abar
    assert sd.prediction_type == "epsilon"
    assert NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": "v_prediction"}).prediction_type == "v_prediction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_and_velocity_identical_to_diffusers(sd, dtype):
    ref = DDPMScheduler.from_config(SD_CONFIG)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 5, 3, generator=g).to(dtype)
    noise = torch.randn(6, 4, 5, 3, generator=g).to(dtype)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.equal(sd.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(sd.velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


def test_conversions_golden_and_round_trip(sd):
    t = torch.tensor([10, 400, 990])
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    x_t = sd.add_noise(x0, eps, t)
    a = sd.alphas_cumprod[t].sqrt().view(3, 1, 1, 1)
    s = (1 - sd.alphas_cumprod[t]).sqrt().view(3, 1, 1, 1)
    v = a * eps - s * x0  # Salimans & Ho 2022
    torch.testing.assert_close(sd.v_from_eps(x_t, eps, t), v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sd.eps_from_v(x_t, v, t), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sd.x0_from_v(x_t, v, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sd.x0_from_eps(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sd.eps_from_x0(x_t, x0, t), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sd.eps_from_prediction(x_t, v, t, "v_prediction"), eps, atol=1e-5, rtol=1e-5)
    assert sd.eps_from_prediction(x_t, eps, t) is eps  # the schedule's own type: epsilon
    # A scalar t applies to the whole batch.
    torch.testing.assert_close(sd.eps_from_v(x_t, v, torch.tensor(400)), sd.eps_from_v(x_t, v, torch.full((3,), 400)))


def test_float_timesteps_follow_euler_sigma_interpolation(sd):
    """Euler with linspace spacing gives fractional timesteps; the conversion must use its sigma."""
    euler = EulerDiscreteScheduler.from_config({**SD_CONFIG, "timestep_spacing": "linspace"})
    euler.set_timesteps(7)
    t, sigma = euler.timesteps, euler.sigmas[:-1]
    assert not bool((t == t.round()).all())  # really fractional
    x, v = torch.randn(7, 4, 2, 2), torch.randn(7, 4, 2, 2)
    a = (1 / (1 + sigma**2)).sqrt().view(7, 1, 1, 1)
    s = (sigma**2 / (1 + sigma**2)).sqrt().view(7, 1, 1, 1)
    torch.testing.assert_close(sd.eps_from_v(x, v, t), s * x + a * v, atol=2e-5, rtol=2e-5)


def test_snr_matches_diffusers_compute_snr(sd):
    t = torch.tensor([0, 3, 100, 500, 999])
    ref = compute_snr(DDPMScheduler.from_config(SD_CONFIG), t)
    torch.testing.assert_close(sd.snr(t), ref)


def test_min_snr_weights_golden(sd):
    gamma = 5.0
    t = torch.tensor([0, 100, 500, 999])
    snr = sd.snr(t)
    # Hand values: low-noise timesteps (SNR > gamma) are down-weighted to gamma/SNR; noisy ones keep 1.
    expected_eps = torch.tensor([gamma / snr[0].item(), gamma / snr[1].item(), 1.0, 1.0])
    assert snr[0] > gamma and snr[1] > gamma and snr[2] < gamma
    torch.testing.assert_close(sd.min_snr_weight(t, gamma), expected_eps)
    torch.testing.assert_close(sd.min_snr_weight(t, gamma, "v_prediction"), torch.clamp(snr, max=gamma) / (snr + 1))
    torch.testing.assert_close(sd.min_snr_weight(t, gamma, "sample"), torch.clamp(snr, max=gamma))
    # Independent float64 golden: abar_500 = prod(1 - beta_i) with SD's scaled_linear betas; for
    # SNR < gamma the v weight SNR/(SNR+1) equals abar itself.
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    abar_500 = float(np.prod(1 - betas[:501]))
    assert abar_500 == pytest.approx(0.27633, abs=1e-5)
    assert sd.min_snr_weight(torch.tensor([500]), gamma, "v_prediction").item() == pytest.approx(abar_500, rel=1e-5)
    with pytest.raises(ValueError):
        sd.min_snr_weight(t, gamma, "x0")


def test_v_loss_weight_turns_an_eps_mse_into_the_v_mse(sd):
    """weighting 'v': eps-space MSE x weight == MSE of the v implied by the two eps, at every t;
    'none' is 1, 'min_snr' is min_snr_weight; the weight is capped where SNR is zero."""
    t = torch.tensor([0, 100, 500, 900, 999])
    g = torch.Generator().manual_seed(0)
    x_t, eps_a, eps_b = (torch.randn(5, 4, 3, 3, generator=g) for _ in range(3))
    eps_mse = (eps_a - eps_b).square().flatten(1).mean(1)
    v_mse = (sd.v_from_eps(x_t, eps_a, t) - sd.v_from_eps(x_t, eps_b, t)).square().flatten(1).mean(1)
    torch.testing.assert_close(eps_mse * sd.loss_weight(t, "v"), v_mse, rtol=1e-4, atol=0)
    assert sd.loss_weight(t, "v")[-1].item() == pytest.approx(214.6, rel=1e-3)  # 1 / abar_999 on SD's schedule
    torch.testing.assert_close(sd.loss_weight(t, "none"), torch.ones(5))
    torch.testing.assert_close(sd.loss_weight(t, "min_snr", 5.0), sd.min_snr_weight(t, 5.0))
    with pytest.raises(ValueError, match="gamma"):
        sd.loss_weight(t, "min_snr")
    with pytest.raises(ValueError, match="unknown loss weighting"):
        sd.loss_weight(t, "x0")
    zsnr = NoiseSchedule.from_config(OTHER_CONFIGS[2])
    assert zsnr.loss_weight(torch.tensor([999]), "v").item() == pytest.approx(1000.0)


def test_min_snr_weight_finite_at_zero_terminal_snr():
    zsnr = NoiseSchedule.from_config(OTHER_CONFIGS[2])
    t = torch.tensor([999])
    assert zsnr.snr(t).item() == 0.0
    assert zsnr.min_snr_weight(t, 5.0).item() == 1.0
    assert zsnr.min_snr_weight(t, 5.0, "v_prediction").item() == 0.0
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(zsnr.eps_from_v(x, v, t), x)  # pure noise: eps = x_T


@pytest.mark.parametrize("mode", sorted(TIMESTEP_SAMPLERS))
def test_timestep_sampling_seeded_in_range(sd, mode):
    a = sd.sample_timesteps(4096, generator=torch.Generator().manual_seed(3), mode=mode)
    b = sd.sample_timesteps(4096, generator=torch.Generator().manual_seed(3), mode=mode)
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4096,)
    assert a.min() >= 0 and a.max() < sd.num_train_timesteps
    assert len(a.unique()) > 100


def test_timestep_sampling_distributions(sd):
    g = torch.Generator().manual_seed(0)
    n = 20000
    uniform = sd.sample_timesteps(n, generator=g).float()
    assert abs(uniform.mean().item() - 499.5) < 10
    logit = sd.sample_timesteps(n, generator=g, mode="logit_normal").float()
    middle = ((logit >= 250) & (logit < 750)).float().mean().item()
    # sigmoid(N(0,1)) in (0.25, 0.75) has probability 2*Phi(log 3) - 1 = 0.727; uniform gives 0.5.
    assert middle == pytest.approx(2 * 0.5 * (1 + math.erf(math.log(3) / math.sqrt(2))) - 1, abs=0.02)
    # EDM lognormal: ln sigma ~ N(P_mean, P_std), sigma = 1/sqrt(SNR); the median sigma is exp(P_mean).
    p_mean = -0.5
    edm = sd.sample_timesteps(n, generator=g, mode="edm_lognormal", p_mean=p_mean, p_std=1.0)
    log_sigma = -0.5 * torch.log(sd.snr(edm))
    assert log_sigma.median().item() == pytest.approx(p_mean, abs=0.05)
    # The mixture: a fair coin between uniform and EDM lognormal (its defaults) per sample.
    low = sd.sample_timesteps(n, generator=g, mode="edm_lognormal")
    mix = sd.sample_timesteps(n, generator=g, mode="uniform+edm_lognormal")
    below = lambda t: (t < 400).float().mean().item()  # noqa: E731
    assert below(mix) == pytest.approx(0.5 * 0.4 + 0.5 * below(low), abs=0.02)
    assert (mix >= 800).float().mean().item() == pytest.approx(0.5 * 0.2 + 0.5 * (low >= 800).float().mean().item(),
                                                                abs=0.02)
    with pytest.raises(ValueError, match="uniform"):
        sd.sample_timesteps(3, mode="nope")


def test_schedule_accepts_dict_frozendict_and_scheduler():
    sched = PNDMScheduler.from_config(SD_CONFIG)
    for source in (SD_CONFIG, sched.config, sched):
        assert np.allclose(NoiseSchedule.from_config(source).alphas_cumprod.numpy(), sched.alphas_cumprod.numpy())
