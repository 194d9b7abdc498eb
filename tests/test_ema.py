"""EMA: the decay schedule, the update rule, fp32 shadow, frozen parts and buffers."""
import pytest
import torch
from torch import nn

from sitdistill.train.ema import EMA


def const_model(value: float, dtype=torch.float32) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_decay_schedule_warms_up_like_diffusers():
    ema = EMA(nn.Linear(1, 1), decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)      # (1 + 0) / (10 + 0)
    assert ema.decay_at(90) == pytest.approx(0.91)    # 91 / 100
    assert ema.decay_at(10**6) == 0.999               # capped at decay
    assert EMA(nn.Linear(1, 1), decay=0.999, warmup=False).decay_at(0) == 0.999


def test_update_golden_and_shadow_is_an_independent_fp32_copy():
    model = const_model(1.0, torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=False, device="cpu")
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    assert all(torch.all(p == 1.0) for p in ema.model.parameters())  # untouched until update
    ema.update(model, step=0)
    assert all(torch.all(p == 2.0) for p in ema.model.parameters())  # 0.5 * 1 + 0.5 * 3
    ema.update(model, step=1)
    assert all(torch.all(p == 2.5) for p in ema.model.parameters())

    target = const_model(0.0, torch.bfloat16)
    ema.copy_to(target)
    assert all(p.dtype == torch.bfloat16 and torch.all(p == 2.5) for p in target.parameters())


def test_frozen_parameters_and_buffers_follow_the_model():
    model = const_model(1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    model[0].bias.requires_grad_(False)
    model.train()(torch.randn(8, 2))  # moves the BatchNorm running statistics
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    ema.update(model, step=5)
    assert torch.all(ema.model[0].bias == 2.0)                                 # copied
    assert torch.allclose(ema.model[0].weight, torch.full((2, 2), 1.1))        # averaged
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)       # copied
    assert ema.model[1].num_batches_tracked.item() == 1


def test_state_dict_round_trip():
    model = const_model(1.0)
    ema = EMA(model, decay=0.75, warmup=False)
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    ema.update(model, step=0)
    other = EMA(const_model(0.0), decay=0.1, warmup=True)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.75 and other.warmup is False
    assert torch.equal(other.model[0].weight, torch.full((2, 2), 2.0))  # 0.75 * 1 + 0.25 * 5
