"""`training.mixed_precision: auto` and the student's attention under bf16 autocast on a CPU."""

import pytest
import torch
import torch.nn.functional as F

from sitdistill.core import precision
from sitdistill.core.precision import resolve_mixed_precision
from sitdistill.core.recipe import RecipeError, load_recipe
from sitdistill.students.layers import attention
from sitdistill.train.plan import describe_plan
from test_student import randomize_, sdxl_cond, tiny_student


@pytest.mark.parametrize("cpu_units, cuda_bf16, on_cpu, on_cuda", [
    (True, True, "bf16", "bf16"),
    (False, True, "no", "bf16"),
    (True, False, "bf16", "no"),
    (False, False, "no", "no"),
])
def test_auto_is_bf16_only_where_the_hardware_multiplies_it(monkeypatch, cpu_units, cuda_bf16, on_cpu, on_cuda):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: cpu_units)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert resolve_mixed_precision("auto", "cpu") == on_cpu
    assert resolve_mixed_precision("auto", torch.device("cuda", 0)) == on_cuda
    for choice in ("no", "fp16", "bf16"):  # a named precision is taken as named
        assert resolve_mixed_precision(choice, "cpu") == choice


def test_the_recipe_takes_auto_and_the_plan_says_what_it_becomes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = load_recipe(None, ["training.mixed_precision=auto"])
    assert r.training.mixed_precision == "auto"
    for units, shown in ((True, "precision auto (bf16 here)"), (False, "precision auto (no here)")):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: units)
        assert shown in describe_plan(r)
    with pytest.raises(RecipeError, match=r"training\.mixed_precision.*auto"):
        load_recipe(None, ["training.mixed_precision=fp8"])


def test_low_precision_heads_are_attended_in_float32_on_a_cpu():
    """The CPU path: the float32 SDPA of the bf16 heads, rounded back to bf16, autocast or not
    (autocast would otherwise cast SDPA's inputs back to bf16); float32 heads are unchanged."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g).bfloat16() for _ in range(3))
    mask = torch.tensor([True] * 4 + [False] * 2).view(1, 1, 1, 6).expand(2, 1, 1, 6)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, mask)
    assert got.dtype is torch.bfloat16 and torch.equal(got, want)
    qf, kf, vf = q.float(), k.float(), v.float()
    assert torch.equal(attention(qf, kf, vf), F.scaled_dot_product_attention(qf, kf, vf))


def test_the_student_trains_under_bf16_autocast_close_to_float32():
    """Forward and backward of the SiT under CPU bf16 autocast: close to float32, gradients finite."""
    m = randomize_(tiny_student(), skip=("pos_embed",))
    x, t, cond = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 400, 900]), sdxl_cond(3)

    def run(autocast: bool):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(x, t, **cond)
        out.float().square().mean().backward()
        return out.float(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    (out32, grad32), (out16, grad16) = run(False), run(True)
    assert torch.isfinite(grad16).all()
    assert (out16 - out32).abs().max() < 0.05 * out32.abs().max()
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99


def test_one_process_may_train_recipes_of_different_precision_one_after_the_other():
    """A study, a curve or a test session builds several trainers in one process; accelerate's
    process-wide state refuses a second precision unless the trainer frees it first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sitdistill.train import trainer
    from sitdistill.train.trainer import _free_accelerator_state

    # Earlier tests' trainers left the state at their precision (float32 on a CPU without bfloat16
    # units): freed first, as the trainer frees it, so the test starts from any state.
    _free_accelerator_state("bf16")
    live = Accelerator(mixed_precision="bf16", cpu=True)
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(mixed_precision="no", cpu=True)  # what the trainer met before it freed the state
    _free_accelerator_state("bf16")  # the same precision: the state is kept
    assert AcceleratorState._shared_state.get("_mixed_precision") == "bf16"
    # An earlier trainer's Accelerator still alive: all share the state, so it is kept (and the
    # new precision refused) rather than switched under the live one.
    trainer._ACCELERATORS.add(live)
    _free_accelerator_state("no")
    assert live.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(mixed_precision="no", cpu=True)
    del live  # the trainer finished and let go: the precision may change
    _free_accelerator_state("no")
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"
