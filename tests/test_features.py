"""Feature capture by module path (hooks always removed), token resampling, the projector."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from sitdistill.train.features import FeatureProjector, capture, tokens_from_map
from sitdistill.train.losses import feature_loss


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def hook_count(module):
    return sum(len(m._forward_hooks) for m in module.modules())


def test_capture_unet_blocks_by_path_and_remove_hooks():
    unet = tiny_unet()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad(), capture(unet, ["down_blocks.0", "mid_block", "up_blocks.1.resnets.0"]) as feats:
        unet(x, t, encoder_hidden_states=text)
        assert hook_count(unet) == 3
    assert hook_count(unet) == 0
    assert feats["down_blocks.0"].shape == (2, 32, 4, 4)  # first tensor of the (hidden, residuals) tuple
    assert feats["mid_block"].shape == (2, 64, 4, 4)
    assert feats["up_blocks.1.resnets.0"].shape == (2, 32, 8, 8)


def test_capture_removes_hooks_on_exception_and_rejects_unknown_paths():
    unet = tiny_unet()
    with pytest.raises(RuntimeError, match="boom"):
        with capture(unet, ["mid_block", "up_blocks.0"]):
            raise RuntimeError("boom")
    assert hook_count(unet) == 0
    with pytest.raises(KeyError, match="mid_blok"):
        with capture(unet, ["mid_block", "mid_blok"]):
            pass
    assert hook_count(unet) == 0


def test_capture_keeps_or_cuts_the_graph():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 3))
    x = torch.randn(1, 3)
    with capture(lin, ["0"]) as live:
        lin(x)
    with capture(lin, ["0"], detach=True) as cut:
        lin(x)
    assert live["0"].requires_grad and not cut["0"].requires_grad


def test_tokens_from_map_area_golden_and_row_major():
    feat = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0..3, 4..7, ...
    tokens = tokens_from_map(feat, (2, 2))
    # Area pooling of each 2x2 patch, tokens in row-major order.
    assert torch.equal(tokens, torch.tensor([[[2.5], [4.5], [10.5], [12.5]]]))
    same = torch.randn(2, 3, 2, 4)
    assert torch.equal(tokens_from_map(same, (2, 4)), same.flatten(2).transpose(1, 2))
    assert tokens_from_map(torch.randn(2, 3, 2, 2), (4, 6)).shape == (2, 24, 3)  # bilinear upsampling


def test_projector_aligns_student_tokens_and_round_trips(tmp_path):
    torch.manual_seed(0)
    proj = FeatureProjector(student_dim=16, teacher_dim=32, hidden_dim=24)
    student_tokens = torch.randn(2, 16, 16, requires_grad=True)
    teacher_tokens = tokens_from_map(torch.randn(2, 32, 8, 8), (4, 4))  # (2, 16, 32)
    loss = feature_loss(proj(student_tokens), teacher_tokens, "cosine")
    assert loss.shape == (2,)
    loss.mean().backward()
    assert student_tokens.grad is not None and proj.net[0].weight.grad is not None
    proj.save_pretrained(tmp_path / "projector")
    again = FeatureProjector.from_pretrained(tmp_path / "projector")
    assert torch.equal(again(student_tokens), proj(student_tokens))


def test_projectors_are_one_module_for_all_aligned_blocks():
    """One forward serves every projector (what lets a DDP wrapper sync their gradients)."""
    from sitdistill.train.features import FeatureProjector, FeatureProjectors

    projs = FeatureProjectors([FeatureProjector(8, 4, 16), FeatureProjector(8, 6, 16)])
    feats = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    out = projs(feats)
    assert [o.shape for o in out] == [(2, 5, 4), (2, 5, 6)]
    torch.testing.assert_close(out[1], projs[1](feats[1]))
    with pytest.raises(ValueError, match="2 projectors"):
        projs(feats[:1])
