"""Golden values for the loss terms on hand-computable tensors."""
import pytest
import torch

from sitdistill.train import losses
from sitdistill.train.losses import (LOSSES, combine, eps_loss, feature_loss, mse_per_sample,
                            sample_guidance_scale, teacher_loss)


def test_mse_per_sample_golden():
    a = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (2, 1, 2)
    assert torch.equal(mse_per_sample(a, torch.zeros_like(a)), torch.tensor([2.5, 12.5]))
    with pytest.raises(ValueError, match="shape"):
        mse_per_sample(a, torch.zeros(2, 2))


def test_eps_loss_with_min_snr_weight_golden():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert torch.equal(eps_loss(pred, noise), torch.tensor([2.5, 6.5]))
    assert torch.equal(eps_loss(pred, noise, weight=torch.tensor([2.0, 0.5])), torch.tensor([5.0, 3.25]))


def test_losses_are_float32_under_bf16_autocast():
    # 1 + 2^-8 is not representable in bf16 but the difference must not vanish in the loss.
    pred = torch.full((1, 4), 1.0 + 2.0**-7, dtype=torch.bfloat16)
    target = torch.ones(1, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = eps_loss(pred, target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(2.0**-14)


def test_teacher_loss_golden_and_teacher_gets_no_gradient():
    pred = torch.tensor([[0.5, -0.5]], requires_grad=True)
    teacher = torch.tensor([[1.5, 0.5]], requires_grad=True)
    out = teacher_loss(pred, teacher)
    assert torch.equal(out, torch.tensor([1.0]))
    out.sum().backward()
    assert teacher.grad is None
    assert torch.equal(pred.grad, torch.tensor([[-1.0, -1.0]]))  # d/dp mean((p - t)^2) = (p - t)


def test_feature_loss_cosine_and_mse_golden():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],    # sample 0: aligned token, orthogonal token
                            [[-2.0, 0.0], [3.0, 0.0]]])  # sample 1: opposite token, aligned token
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]],
                            [[1.0, 0.0], [1.0, 0.0]]])
    assert torch.allclose(feature_loss(student, teacher, "cosine"), torch.tensor([0.5, 1.0]))
    assert torch.allclose(feature_loss(student, teacher, "mse"), torch.tensor([0.5, 3.25]))  # (9 + 4) / 4
    # Several block pairs: per-sample mean over pairs.
    both = feature_loss([student, student], [teacher, student], "cosine")
    assert torch.allclose(both, torch.tensor([0.25, 0.5]))
    with pytest.raises(ValueError, match="kind"):
        feature_loss(student, teacher, "l1")


def test_guidance_per_sample_scale_golden():
    from sitdistill.core.guidance import cfg_batch, guide

    u = torch.zeros(2, 1, 2, 2)
    c = torch.ones(2, 1, 2, 2)
    out = guide(u, c, torch.tensor([1.0, 7.5]))
    assert torch.equal(out[0], torch.ones(1, 2, 2)) and torch.equal(out[1], torch.full((1, 2, 2), 7.5))
    assert torch.equal(guide(u + 1, c * 3, 2.0), torch.full_like(u, 5.0))  # 1 + 2 * (3 - 1)
    both = cfg_batch({"e": torch.zeros(1, 3)}, {"e": torch.ones(1, 3)})
    assert torch.equal(both["e"], torch.tensor([[0.0] * 3, [1.0] * 3]))  # [uncond, cond], the pipelines' order


def test_sample_guidance_scale_range_and_reproducible():
    w = sample_guidance_scale(1000, 3.0, 15.0, torch.Generator().manual_seed(0))
    assert w.shape == (1000,) and w.min() >= 3.0 and w.max() <= 15.0
    assert 8.0 < w.mean() < 10.0
    assert torch.equal(w, sample_guidance_scale(1000, 3.0, 15.0, torch.Generator().manual_seed(0)))
    assert torch.equal(sample_guidance_scale(3, 4.0, 4.0), torch.full((3,), 4.0))


def test_combine_weights_reduces_and_logs_each_term():
    pred = torch.tensor([1.0, 3.0], requires_grad=True)
    terms = {"eps": pred * 1.0, "teacher": torch.tensor([2.0, 2.0, 2.0]), "feature": torch.tensor([9.0])}
    total, logs = combine(terms, {"eps": 1.0, "teacher": 0.5, "feature": 0.0})
    assert total.item() == pytest.approx(2.0 + 1.0)  # feature has weight 0: logged, not added
    assert {k: v.item() for k, v in logs.items()} == {"loss/eps": 2.0, "loss/teacher": 2.0,
                                                      "loss/feature": 9.0, "loss/total": 3.0}
    total.backward()
    assert torch.equal(pred.grad, torch.tensor([0.5, 0.5]))
    with pytest.raises(KeyError, match="teacher"):
        combine(terms, {"eps": 1.0, "feature": 1.0})


def test_loss_table_names_the_terms():
    assert set(LOSSES) == {"eps", "teacher", "perturb", "feature"}
    assert LOSSES["perturb"] is losses.teacher_loss
