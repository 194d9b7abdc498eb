"""The perturbation family: strengths, reproducibility, and the teacher-trajectory states checked
against the closed form of DDIM with an analytic teacher."""
from collections import Counter

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from sitdistill.train.perturb import (PERTURBATIONS, draw_prompts, jitter_timesteps, load_prompt_file,
                             perturb_embeddings, perturb_input, recombine_captions, split_tags,
                             teacher_trajectory_states)

# The SD1.5 scheduler config (as the teacher's scheduler folder holds it).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                   beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_perturb_input_strength_and_reproducibility():
    x = torch.zeros(4, 4, 32, 32)
    out = perturb_input(x, 0.5, gen())
    assert out.std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.equal(out, perturb_input(x, 0.5, gen()))
    assert not torch.equal(out, perturb_input(x, 0.5, gen(1)))
    per_sample = perturb_input(x, torch.tensor([0.0, 1.0, 0.0, 2.0]), gen())
    assert torch.equal(per_sample[0], x[0]) and per_sample[3].std().item() == pytest.approx(2.0, rel=0.05)


def test_recombine_captions_keeps_tags_counts_and_kept_tokens():
    captions = ["toy, red circle, top left", "toy, blue square, bottom", "toy, green star, small, centre"]
    outs = [recombine_captions(captions, gen(seed), keep_tokens=1) for seed in range(5)]
    for out in outs:
        tags = [split_tags(c) for c in out]
        assert [len(t) for t in tags] == [3, 3, 4]
        assert all(t[0] == "toy" for t in tags)
        assert Counter(sum(tags, [])) == Counter(sum((split_tags(c) for c in captions), []))
    assert outs[0] == recombine_captions(captions, gen(0), keep_tokens=1)
    assert any(out != captions for out in outs)  # not the identity
    assert sorted(recombine_captions(["a", "b", "c"], gen())) == ["a", "b", "c"]  # one phrase: permuted


def test_perturb_embeddings_touches_text_states_only():
    cond = {"encoder_hidden_states": torch.zeros(2, 77, 64), "text_embeds": torch.zeros(2, 32),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    out = perturb_embeddings(cond, 0.1, gen())
    assert out["time_ids"] is cond["time_ids"]
    assert torch.equal(cond["encoder_hidden_states"], torch.zeros(2, 77, 64))  # input not mutated
    assert out["encoder_hidden_states"].std().item() == pytest.approx(0.1, rel=0.05)
    assert out["text_embeds"].abs().sum() > 0


def test_prompt_file_and_draws(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# toy prompts\na red circle\n\n  a blue square  \n#skip\na green star\n")
    prompts = load_prompt_file(path)
    assert prompts == ["a red circle", "a blue square", "a green star"]
    drawn = draw_prompts(prompts, 30, gen())
    assert len(drawn) == 30 and set(drawn) == set(prompts)
    assert drawn == draw_prompts(prompts, 30, gen())
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(tmp_path / "empty.txt")


def test_jitter_timesteps_bounded_and_clamped():
    t = torch.tensor([0, 1, 500, 998, 999] * 200)
    out = jitter_timesteps(t, 3, 1000, gen())
    assert out.dtype == torch.long
    assert (out - t).abs().max() == 3 and out.min() == 0 and out.max() == 999
    assert (out != t).any()
    assert torch.equal(jitter_timesteps(t, 0, 1000, gen()), t)


def _analytic_teacher(alphas_cumprod, calls):
    """The exact eps of a data distribution that is one point c(cond) per sample, where c is the
    mean of the prompt embedding: eps = (x - sqrt(a) c) / sqrt(1 - a)."""
    def eps_fn(x, t, cond):
        calls.append(t.clone())
        c = cond["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()
    return eps_fn


def test_teacher_trajectory_states_match_ddim_closed_form():
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    ac = scheduler.alphas_cumprod
    calls = []
    n, shape = 4, (4, 2, 3, 3)
    cond = {"encoder_hidden_states": torch.tensor([0.5, -0.2, 0.1, 0.3]).view(n, 1, 1).expand(n, 5, 8)}
    uncond = {"encoder_hidden_states": torch.tensor([0.1, 0.0, -0.1, 0.2]).view(n, 1, 1).expand(n, 5, 8)}
    w = torch.tensor([1.0, 2.0, 3.0, 7.5])
    stop_at = torch.tensor([0, 1, 3, 3])
    states, t = teacher_trajectory_states(_analytic_teacher(ac, calls), scheduler, cond, uncond, shape,
                                          num_steps=10, guidance_scale=w, generator=gen(3), stop_at=stop_at)
    assert scheduler.num_inference_steps is None  # the caller's scheduler was not touched

    grid = torch.arange(901, 0, -100)  # DDIM's 10 steps with steps_offset=1: 901, 801, ..., 1
    assert torch.equal(t, grid[stop_at]) and t.dtype == torch.long
    assert len(calls) == 3 and all(c.shape == (2 * n,) for c in calls)  # stops after the last needed step

    # With the exact eps, DDIM (eta=0) keeps x0_pred = c_g (guided point) and eps_pred = eta0, so the
    # state at step k >= 1 is sqrt(a_k) c_g + sqrt(1 - a_k) eta0, and at step 0 the pure noise itself.
    noise = torch.randn(shape, generator=gen(3))
    c_u, c_c = uncond["encoder_hidden_states"][:, 0, 0], cond["encoder_hidden_states"][:, 0, 0]
    c_g = (c_u + w * (c_c - c_u)).view(-1, 1, 1, 1)
    a0 = ac[grid[0]]
    eta0 = (noise - a0.sqrt() * c_g) / (1 - a0).sqrt()
    a = ac[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * c_g + (1 - a).sqrt() * eta0
    expected[0] = noise[0]
    assert torch.allclose(states, expected, atol=1e-5)


def test_teacher_trajectory_end_is_the_guided_ddim_sample():
    """stop_at="end" runs every step (one guided call each) and returns the sample: with the exact
    eps, sqrt(a_final) c_g + sqrt(1 - a_final) eta0, the closed form one step past the last state."""
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    ac, calls = scheduler.alphas_cumprod, []
    n, shape, w = 3, (3, 2, 3, 3), 4.0
    cond = {"encoder_hidden_states": torch.tensor([0.5, -0.2, 0.3]).view(n, 1, 1).expand(n, 5, 8)}
    uncond = {"encoder_hidden_states": torch.tensor([0.1, 0.0, -0.1]).view(n, 1, 1).expand(n, 5, 8)}
    x0, t = teacher_trajectory_states(_analytic_teacher(ac, calls), scheduler, cond, uncond, shape, num_steps=5,
                                      guidance_scale=w, generator=gen(4), stop_at="end")
    assert x0.shape == shape and torch.equal(t, torch.tensor([801, 601, 401, 201, 1]))
    assert len(calls) == 5  # one more teacher call than the last state of "all" needs
    noise = torch.randn(shape, generator=gen(4))
    c_u, c_c = uncond["encoder_hidden_states"][:, 0, 0], cond["encoder_hidden_states"][:, 0, 0]
    c_g = (c_u + w * (c_c - c_u)).view(-1, 1, 1, 1)
    a0, a_end = ac[801], scheduler.final_alpha_cumprod  # set_alpha_to_one=False: alphas_cumprod[0]
    eta0 = (noise - a0.sqrt() * c_g) / (1 - a0).sqrt()
    assert torch.allclose(x0, a_end.sqrt() * c_g + (1 - a_end).sqrt() * eta0, atol=1e-5)
    with pytest.raises(ValueError, match="'end'"):
        teacher_trajectory_states(_analytic_teacher(ac, []), scheduler, cond, uncond, shape, 5, stop_at="last")


def test_teacher_trajectory_unguided_draws_stops_and_refuses_sigma_schedulers():
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    calls = []
    cond = {"encoder_hidden_states": torch.zeros(8, 2, 4)}
    states, t = teacher_trajectory_states(_analytic_teacher(scheduler.alphas_cumprod, calls), scheduler, cond,
                                          None, (8, 1, 2, 2), num_steps=5, generator=gen(0))
    assert states.shape == (8, 1, 2, 2) and t.shape == (8,)
    assert set(t.tolist()) <= {801, 601, 401, 201, 1} and len(set(t.tolist())) > 1
    assert all(c.shape == (8,) for c in calls)
    again, t2 = teacher_trajectory_states(_analytic_teacher(scheduler.alphas_cumprod, []), scheduler, cond,
                                          None, (8, 1, 2, 2), num_steps=5, generator=gen(0))
    assert torch.equal(states, again) and torch.equal(t, t2)
    with pytest.raises(ValueError, match="sigma"):
        teacher_trajectory_states(_analytic_teacher(scheduler.alphas_cumprod, []),
                                  EulerDiscreteScheduler.from_config(scheduler.config), cond, None, (8, 1, 2, 2), 5)


def test_perturbation_table_is_keyed_by_the_recipes_names():
    """Every batch part of the recipe has its entry, under the recipe's own name; the trajectory
    part has a batch of its own (sitdistill.train.trajectory)."""
    from dataclasses import fields

    from sitdistill.core.schema import PerturbConfig

    assert set(PERTURBATIONS) | {"trajectory"} == {f.name for f in fields(PerturbConfig)}


def test_input_noise_is_ddpm_ip_the_noise_perturbed():
    """x_t + scale * xi equals the state built from the perturbed noise eps + gamma * xi, at every t."""
    from sitdistill.train.perturb import input_noise_scale
    from sitdistill.core.schedule import NoiseSchedule

    sched = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                       "beta_start": 0.00085, "beta_end": 0.012})
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    gamma = 0.1
    xi = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = perturb_input(sched.add_noise(x0, eps, t), input_noise_scale(sched.alphas_cumprod, t, gamma),
                         torch.Generator().manual_seed(3))
    assert torch.allclose(ours, sched.add_noise(x0, eps + gamma * xi, t), atol=1e-5)
    # The kick relative to the noise level is gamma at every t (not gamma / sqrt(1 - abar) at small t).
    scale = input_noise_scale(sched.alphas_cumprod, t, gamma)
    assert torch.allclose(scale / (1 - sched.alphas_cumprod[t]).sqrt(), torch.full((4,), gamma))
