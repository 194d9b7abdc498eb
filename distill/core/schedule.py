"""The one noise convention: the teacher's discrete DDPM schedule.

Everything in the project that makes an ``x_t``, converts between epsilon / v / x0, draws training
timesteps or weights a loss by SNR calls this module, so teacher and student always see the same
``x_t`` at the same integer ``t``.

Convention (DDPM, Ho et al. 2020; v from Salimans & Ho 2022), with ``a = sqrt(alphas_cumprod[t])``
and ``s = sqrt(1 - alphas_cumprod[t])``::

    x_t = a * x0 + s * eps          (diffusers' DDPMScheduler.add_noise)
    v   = a * eps - s * x0          (diffusers' DDPMScheduler.get_velocity)
    eps = s * x_t + a * v           x0 = a * x_t - s * v
    SNR = a^2 / s^2

The betas are built by diffusers' own ``DDPMScheduler`` from the teacher's scheduler config, so
every beta schedule diffusers knows (``scaled_linear``, ``linear``, ``squaredcos_cap_v2``,
``trained_betas``, ``rescale_betas_zero_snr``) gives bit-identical ``alphas_cumprod`` here — no
schedule constants are written in this file.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from diffusers import DDPMScheduler

Tensor = torch.Tensor

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Loss weightings of an eps-space MSE (``NoiseSchedule.loss_weight``), by the x0-space weight each gives.
LOSS_WEIGHTINGS = {"none": "SNR (plain eps MSE)", "min_snr": "min(SNR, gamma)", "v": "SNR + 1 (v MSE)"}
# Cap of the eps-space weight (SNR + 1) / SNR near zero SNR (zero-terminal-SNR schedules).
MAX_EPS_WEIGHT = 1000.0


def _expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against x."""
    coef = coef.flatten()
    while coef.ndim < x.ndim:
        coef = coef.unsqueeze(-1)
    return coef


class NoiseSchedule:
    """The teacher's discrete DDPM schedule (read from its scheduler config, never from literals).

    ``t`` arguments are integer tensors (N,) of training timesteps in ``[0, num_train_timesteps)``.
    The conversion helpers also accept float timesteps (as Euler-type samplers pass them): the
    noise level is then interpolated linearly in sigma = s / a, like diffusers'
    ``EulerDiscreteScheduler`` (``interpolation_type="linear"``) does, so a conversion at a float
    timestep agrees with the sampler that produced it.
    """

    def __init__(self, betas: Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
        self.betas = betas.to(torch.float32)
        self.alphas = 1.0 - self.betas
        # Same ops, same dtype as diffusers (cumprod in float32), so add_noise matches bit for bit.
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_train_timesteps = int(self.betas.shape[0])
        self.prediction_type = prediction_type

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any] | Any) -> "NoiseSchedule":
        """Build from a scheduler config: a dict, a diffusers FrozenDict, or a scheduler (its ``.config``).

        Any diffusers scheduler config of an SD-style pipeline works (PNDM, DDIM, Euler, ...): only
        the keys that define the training schedule are read.
        """
        config = getattr(scheduler_config, "config", scheduler_config)
        config = dict(config)
        # Only the keys that define the training betas: inference keys such as steps_offset do not
        # change them, and passing a foreign scheduler's keys would only warn.
        wanted = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr"}
        ddpm = DDPMScheduler(**{k: v for k, v in config.items() if k in wanted and v is not None})
        return cls(ddpm.betas, prediction_type=config.get("prediction_type", "epsilon"))

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        self.betas = self.betas.to(device)
        self.alphas = self.alphas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    # ------------------------------------------------------------------ noise levels
    def _alphas_cumprod_at(self, t: Tensor, like: Tensor) -> Tensor:
        """alphas_cumprod at t, shaped (N,), in like's dtype (diffusers casts the table first)."""
        t = torch.as_tensor(t, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        table = self.alphas_cumprod.to(device=like.device)
        if not t.is_floating_point() or bool((t == t.round()).all()):
            return table.to(dtype=like.dtype)[t.long()]
        # Fractional timesteps: interpolate sigma linearly between the two neighbouring integers.
        sigmas = ((1 - table) / table) ** 0.5  # (T,)
        lo = t.floor().long().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = (t - lo).to(torch.float32)
        sigma = sigmas[lo] * (1 - frac) + sigmas[hi] * frac
        return (1.0 / (1.0 + sigma**2)).to(like.dtype)

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(a, s) = (sqrt(abar), sqrt(1 - abar)) broadcastable against ``like``."""
        abar = self._alphas_cumprod_at(t, like)
        return _expand_like(abar**0.5, like), _expand_like((1 - abar) ** 0.5, like)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar / (1 - abar) at t, float32 (N,) — diffusers' ``compute_snr``."""
        abar = self.alphas_cumprod.to(torch.as_tensor(t).device)[torch.as_tensor(t).long()]
        return abar / (1 - abar)

    # ------------------------------------------------------------------ forward process
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = a * x0 + s * noise; identical to ``DDPMScheduler.add_noise``."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v target a * noise - s * x0; identical to ``DDPMScheduler.get_velocity``."""
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    # ------------------------------------------------------------------ conversions
    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self._coefs(t, x_t)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        a, s = self._coefs(t, x_t)
        return (x_t - a * x0) / s

    def v_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        # v = a*eps - s*x0 with x0 = (x_t - s*eps)/a, simplified using a^2 + s^2 = 1.
        a, s = self._coefs(t, x_t)
        return (eps - s * x_t) / a

    def eps_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        # No division: stays finite at a zero-terminal-SNR timestep (a = 0).
        a, s = self._coefs(t, x_t)
        return s * x_t + a * v

    def x0_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        a, s = self._coefs(t, x_t)
        return a * x_t - s * v

    def eps_from_prediction(self, x_t: Tensor, pred: Tensor, t: Tensor, prediction_type: str | None = None) -> Tensor:
        """Epsilon from a model output of ``prediction_type`` (default: this schedule's)."""
        kind = prediction_type or self.prediction_type
        if kind == "epsilon":
            return pred
        if kind == "v_prediction":
            return self.eps_from_v(x_t, pred, t)
        if kind == "sample":
            return self.eps_from_x0(x_t, pred, t)
        raise ValueError(f"unknown prediction_type {kind!r}")

    def convert(self, x_t: Tensor, pred: Tensor, t: Tensor, from_type: str, to_type: str) -> Tensor:
        """A model output of ``from_type`` as ``to_type`` at (x_t, t) ("epsilon" or "v_prediction";
        "sample" as a source). v -> v and eps -> eps are the identity, so a v teacher's target for a
        v student keeps what it says at zero SNR."""
        if from_type == to_type:
            return pred
        if to_type == "v_prediction" and from_type == "sample":
            a, s = self._coefs(t, x_t)
            return (a * x_t - pred) / s  # v = (a x_t - x0) / s
        eps = self.eps_from_prediction(x_t, pred, t, from_type)
        if to_type == "epsilon":
            return eps
        if to_type == "v_prediction":
            return self.v_from_eps(x_t, eps, t)
        raise ValueError(f"cannot convert to prediction_type {to_type!r}")

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The data term's regression target: the noise (epsilon) or the velocity (v)."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    # ------------------------------------------------------------------ training timesteps
    def sample_timesteps(self, n: int, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, mode: str = "uniform", **kw: Any) -> Tensor:
        """Draw n integer training timesteps (N,) with one of ``TIMESTEP_SAMPLERS`` (keys = modes)."""
        if mode not in TIMESTEP_SAMPLERS:
            raise ValueError(f"unknown timestep mode {mode!r}; choose from {sorted(TIMESTEP_SAMPLERS)}")
        # Draw on the generator's device (a CUDA generator cannot drive a CPU draw), then move.
        draw_device = generator.device if generator is not None else torch.device("cpu")
        t = TIMESTEP_SAMPLERS[mode](self, n, generator, draw_device, **kw)
        return t.clamp(0, self.num_train_timesteps - 1).long().to(device or draw_device)

    # ------------------------------------------------------------------ loss weights
    def min_snr_weight(self, t: Tensor, gamma: float, prediction_type: str = "epsilon") -> Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
        Weighting Strategy"), per sample (N,), for a loss measured in ``prediction_type`` space.

        The weight on the x0-space loss is min(SNR, gamma); an eps-space MSE equals SNR times the
        x0-space MSE and a v-space MSE equals (SNR + 1) times it, hence min(SNR, gamma)/SNR and
        min(SNR, gamma)/(SNR + 1) — the same as diffusers' text-to-image training script.
        """
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=gamma)
        if prediction_type == "epsilon":
            # SNR = 0 (zero-terminal-SNR schedules): the limit of min(SNR, gamma)/SNR is 1.
            return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if prediction_type == "sample":
            return clipped
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    def loss_weight(self, t: Tensor, kind: str = "none", gamma: float | None = None,
                    prediction_type: str = "epsilon") -> Tensor:
        """Per-sample weights (N,) for an MSE in ``prediction_type`` space (the student's), by ``kind``
        (keys of ``LOSS_WEIGHTINGS``). In v space: ``none`` and ``v`` are 1 (a v MSE already is the
        v weighting), ``min_snr`` is min(SNR, gamma) / (SNR + 1). In eps space, as follows.

        An eps-space MSE is SNR times the x0-space MSE, so plain eps regression barely cares how
        wrong the implied image is at high noise (SNR ~ 0.005 at t = 999 on SD's schedule), which
        is where layout and shape are decided; samplers then multiply those eps errors by
        1/sqrt(SNR) when they form x0. Each kind names its x0-space weight:

        * ``none``: SNR (plain eps MSE, weight 1);
        * ``min_snr``: min(SNR, gamma) (Hang et al. 2023): low-noise steps down-weighted;
        * ``v``: SNR + 1, i.e. the MSE of the v (or, up to a factor, of the EDM-weighted x0)
          implied by the two eps: high-noise steps weighted like any other. Capped at
          ``MAX_EPS_WEIGHT`` where SNR is (near) zero.
        """
        if kind not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {kind!r}; choose from {list(LOSS_WEIGHTINGS)}")
        if kind == "none" or (kind == "v" and prediction_type == "v_prediction"):
            return torch.ones(torch.as_tensor(t).shape, device=torch.as_tensor(t).device)
        if kind == "min_snr":
            if gamma is None:
                raise ValueError("loss weighting 'min_snr' needs gamma")
            return self.min_snr_weight(t, gamma, prediction_type)
        if kind == "v":
            snr = self.snr(t)
            return torch.clamp((snr + 1) / snr.clamp(min=1.0 / MAX_EPS_WEIGHT), max=MAX_EPS_WEIGHT)
        raise ValueError(f"unknown loss weighting {kind!r}; choose from {list(LOSS_WEIGHTINGS)}")

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, "
                f"prediction_type={self.prediction_type!r})")


# ---------------------------------------------------------------------- timestep samplers
def _uniform(schedule: NoiseSchedule, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform over the discrete timesteps, as in DDPM / SD training."""
    return torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator, device=device)


def _logit_normal(schedule: NoiseSchedule, n: int, generator: torch.Generator | None, device: torch.device,
                  mean: float = 0.0, std: float = 1.0) -> Tensor:
    """SD3-style logit-normal (Esser et al. 2024, eq. 19): u = sigmoid(N(mean, std)) in (0, 1),
    mapped to the discrete timestep floor(u * T). Concentrates training on the middle of the schedule."""
    u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    return (u * schedule.num_train_timesteps).floor()


def _edm_lognormal(schedule: NoiseSchedule, n: int, generator: torch.Generator | None, device: torch.device,
                   p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """SNR-aware: EDM's noise-level distribution (Karras et al. 2022, Table 1: ln sigma ~ N(P_mean,
    P_std), defaults from there) drawn in the teacher's own noise scale sigma = sqrt(1/SNR) and
    mapped to the discrete timestep whose log-SNR is nearest. Because it is defined on the SNR and
    not on t, the same options give the same noise-level distribution for any beta schedule."""
    log_sigma = p_mean + p_std * torch.randn(n, generator=generator, device=device)  # (N,)
    log_snr_target = -2.0 * log_sigma  # SNR = 1 / sigma^2
    abar = schedule.alphas_cumprod.to(device)
    log_snr_table = torch.log(abar) - torch.log1p(-abar)  # (T,) decreasing in t
    return (log_snr_table[None, :] - log_snr_target[:, None]).abs().argmin(dim=1)


def _uniform_and_low_noise(schedule: NoiseSchedule, n: int, generator: torch.Generator | None,
                           device: torch.device) -> Tensor:
    """Half the samples uniform, half from ``_edm_lognormal`` (mostly low noise), each sample's draw
    chosen by a fair coin: extra training where a student sharpens edges (t < 400 on SD's schedule)
    without starving the high-noise steps that place and colour the objects."""
    coin = torch.rand(n, generator=generator, device=device) < 0.5
    uniform = _uniform(schedule, n, generator, device)
    low = _edm_lognormal(schedule, n, generator, device)
    return torch.where(coin, uniform, low.to(uniform.dtype))


TIMESTEP_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "uniform": _uniform,
    "logit_normal": _logit_normal,
    "edm_lognormal": _edm_lognormal,
    "uniform+edm_lognormal": _uniform_and_low_noise,
}

__all__ = ["NoiseSchedule", "TIMESTEP_SAMPLERS"]
