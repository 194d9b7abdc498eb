"""`optimizer.name: muon`: Muon on the student blocks' 2-D weights, AdamW on the rest, as one optimizer."""

import pytest
import torch

from sitdistill.students import build_student
from sitdistill.core import precision
from sitdistill.core.muon import (MuonAdamW, _newton_schulz, gram_pays, muon_parameters, newton_schulz_dtype, orthogonalise,
                                  orthogonalise_many)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (64, 96)])
def test_newton_schulz_flattens_the_spectrum(shape, dtype):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:, :4] *= 30  # a badly conditioned gradient: a few directions dominate
    s_in = torch.linalg.svdvals(g)
    s_out = torch.linalg.svdvals(orthogonalise(g, dtype=dtype))
    assert s_in.max() / s_in.min() > 20
    assert 0.6 < s_out.min() and s_out.max() < 1.25  # every direction moves at about the same rate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_convolution_kernel_is_orthogonalised_as_its_matrix(dtype):
    k = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    as_matrix = orthogonalise(k.reshape(16, 72), dtype=dtype).reshape(16, 8, 3, 3)
    torch.testing.assert_close(orthogonalise(k, dtype=dtype), as_matrix)
    s = torch.linalg.svdvals(orthogonalise(k, dtype=dtype).reshape(16, 72))
    assert 0.6 < s.min() and s.max() < 1.25


def _train(make_optimizer, steps: int = 4):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 40))
    b = torch.nn.Parameter(torch.randn(40))
    optimizers = make_optimizer(w, b)
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = (torch.tanh(x @ w + b) - 0.5).pow(2).mean()
        w.grad = b.grad = None
        loss.backward()
        for opt in optimizers:
            opt.step()
    return w.detach(), b.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrices_of_one_shape_are_orthogonalised_as_a_batch_and_each_as_alone(dtype):
    """The step stacks same-shaped matrices (wide, tall, square, a kernel) and iterates them as one
    batch; each comes back as `orthogonalise` makes it alone, in its own shape and dtype."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 40), (40, 12), (12, 40), (16, 16), (40, 12), (8, 4, 3, 3), (16, 16), (12, 40)]
    gs = [torch.randn(*s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]
    gs[3] = gs[3].double()  # a dtype of its own: its own batch, returned in float64
    got = orthogonalise_many(gs, dtype=dtype)
    for g, out in zip(gs, got):
        assert out.shape == g.shape and out.dtype == g.dtype
        torch.testing.assert_close(out, orthogonalise(g, dtype=dtype), rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("shape", [(32, 192), (192, 32), (40, 96), (24, 40)])
def test_the_gram_form_iterates_as_the_plain_one(shape):
    """In float32 a wide or tall matrix's iterations run on its Gram matrix: the plain iterations'
    result to rounding, a batch with a dominated spectrum included, and as close to float64's."""
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(*shape, generator=gen) for _ in range(3)]
    gs[0][:, :4] *= 30
    assert gram_pays(*shape, 5, torch.float32)
    plain = torch.stack(_newton_schulz(gs, 5, 1e-7, torch.float32, gram=False))
    gram = torch.stack(_newton_schulz(gs, 5, 1e-7, torch.float32, gram=True))
    exact = torch.stack(_newton_schulz([g.double() for g in gs], 5, 1e-7, torch.float64, gram=False)).float()
    assert not torch.equal(gram, plain)  # another order of products
    torch.testing.assert_close(gram, plain, rtol=0, atol=5e-5)
    assert (gram - exact).abs().max() < 5e-5
    torch.testing.assert_close(torch.stack(orthogonalise_many(gs, dtype=torch.float32)), gram, rtol=0, atol=0)


def test_the_gram_form_is_taken_where_it_multiplies_fewer_numbers_in_float32_only():
    assert gram_pays(192, 1152, 5, torch.float32) and gram_pays(1152, 192, 5, torch.float32)
    assert gram_pays(192, 384, 5, torch.float32)  # 2.0 x: fewer products
    assert not gram_pays(192, 288, 5, torch.float32)  # 1.5 x: as many
    assert not gram_pays(192, 192, 5, torch.float32)
    assert not gram_pays(192, 1152, 1, torch.float32)  # one iteration: no saving
    assert not gram_pays(192, 1152, 5, torch.bfloat16)  # bfloat16 keeps torch.optim.Muon's iterations


def test_the_recipe_can_ask_for_the_plain_iterations():
    """`optimizer.muon_ns_form: plain` reaches the step: in float32 it steps as the Gram form to
    rounding, but not bit for bit; an unknown form is refused."""
    from sitdistill.core.recipe import load_recipe
    from sitdistill.train.build import build_optimizer

    def run(form: str):
        cfg = load_recipe(None, ["optimizer.name=muon", "optimizer.muon_ns_dtype=float32",
                                 f"optimizer.muon_ns_form={form}"]).optimizer
        return _train(lambda w, b: [build_optimizer([{"params": [w], "muon": True}, {"params": [b]}], cfg,
                                                    torch.device("cpu"))])[0]

    auto, plain = run("auto"), run("plain")
    assert not torch.equal(auto, plain)
    torch.testing.assert_close(auto, plain, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="ns_form.*gram"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.ones(2, 2))], "muon": True}], lr=1e-2, ns_form="gram")


def test_equals_torch_muon_and_adamw():
    """The Muon groups step as torch.optim.Muon (Moonshot's RMS-matched scale), the others as torch's
    AdamW, weight decay, Nesterov momentum and bias correction included (Newton-Schulz in bfloat16,
    as torch's, for the comparison)."""
    kw = dict(lr=1e-2, weight_decay=0.1)
    ref = _train(lambda w, b: [torch.optim.Muon([w], adjust_lr_fn="match_rms_adamw", **kw),
                               torch.optim.AdamW([b], **kw)])
    ours = _train(lambda w, b: [MuonAdamW([{"params": [w], "muon": True}, {"params": [b]}], ns_dtype="bfloat16",
                                          **kw)])
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=1e-6)
    assert not torch.equal(ours[0], _train(lambda w, b: [MuonAdamW([{"params": [w, b]}], **kw)])[0])
    f32 = _train(lambda w, b: [MuonAdamW([{"params": [w], "muon": True}, {"params": [b]}], ns_dtype="float32", **kw)])
    assert not torch.equal(f32[0], ours[0])  # the precision asked for is the one used


def test_newton_schulz_precision_follows_the_hardware_unless_the_recipe_names_one(monkeypatch):
    """auto: bfloat16 on a GPU that supports it, and on a CPU only where it has bfloat16 matmul units."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert newton_schulz_dtype("cuda") is torch.bfloat16
    assert newton_schulz_dtype("cuda", "float32") is torch.float32
    assert newton_schulz_dtype("cpu", "bfloat16") is torch.bfloat16
    for has_units, auto in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_units)
        assert newton_schulz_dtype("cpu") is auto
        assert newton_schulz_dtype("cpu", "float32") is torch.float32
    with pytest.raises(ValueError, match="ns_dtype.*float16"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.ones(2, 2))], "muon": True}], lr=1e-2, ns_dtype="float16")


def test_the_recipe_s_newton_schulz_precision_reaches_the_step(monkeypatch):
    """`optimizer.muon_ns_dtype` is the precision the Muon step orthogonalises in: float32 and
    bfloat16 take nearby but different steps, and auto takes the one `newton_schulz_dtype` names."""
    from sitdistill.core.recipe import load_recipe
    from sitdistill.train.build import build_optimizer

    def run(choice: str):
        cfg = load_recipe(None, ["optimizer.name=muon", f"optimizer.muon_ns_dtype={choice}"]).optimizer
        return _train(lambda w, b: [build_optimizer([{"params": [w], "muon": True}, {"params": [b]}], cfg,
                                                    torch.device("cpu"))])[0]

    f32, bf16 = run("float32"), run("bfloat16")
    assert not torch.equal(f32, bf16)
    torch.testing.assert_close(f32, bf16, rtol=0, atol=2e-3)
    for has_units, same in ((True, bf16), (False, f32)):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_units)
        assert torch.equal(run("auto"), same)


def test_a_checkpoint_from_before_the_precision_setting_loads_and_steps():
    """Optimizer state saved before `ns_dtype` existed: loaded, its groups take "auto" (torch keeps a
    saved group's keys and adds no new ones) and the next step runs; a saved choice survives loading."""
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = MuonAdamW([{"params": [w], "muon": True}], lr=1e-2, ns_dtype="float32")
    w.grad = torch.ones_like(w)
    opt.step()
    old = opt.state_dict()
    assert old["param_groups"][0]["ns_dtype"] == "float32"
    fresh = MuonAdamW([{"params": [w], "muon": True}], lr=1e-2, ns_dtype="bfloat16")
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["ns_dtype"] == "float32"
    del old["param_groups"][0]["ns_dtype"], old["param_groups"][0]["ns_form"]
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["ns_dtype"] == "auto" and fresh.param_groups[0]["ns_form"] == "auto"
    before = w.detach().clone()
    fresh.step()
    assert not torch.equal(w, before)


def test_folded_clipping_equals_clipped_gradients():
    """The trainer folds gradient clipping into a fused optimizer's step (`grad_scale`); Muon+AdamW
    honours it: the same weights as dividing the gradients first."""
    def run(fold: bool):
        torch.manual_seed(0)
        w, b = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(12))
        opt = MuonAdamW([{"params": [w], "muon": True}, {"params": [b]}], lr=1e-2)
        for _ in range(3):
            w.grad, b.grad = torch.full_like(w, 3.0) + w, torch.full_like(b, -2.0)
            divisor = torch.tensor(4.0)
            if fold:
                opt.grad_scale = divisor
            else:
                w.grad, b.grad = w.grad / divisor, b.grad / divisor
            opt.step()
            opt.__dict__.pop("grad_scale", None)
        return w.detach(), b.detach()

    for a, c in zip(run(True), run(False)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-7)


def test_muon_takes_the_block_matrices_and_nothing_else():
    student = build_student("S/2", hidden_size=32, depth=2, num_heads=2)
    muon, rest = muon_parameters(student)
    names = {id(p): n for n, p in student.named_parameters()}
    assert muon and all(p.ndim == 2 and names[id(p)].startswith("blocks.") for p in muon)
    assert all(not (p.ndim == 2 and names[id(p)].startswith("blocks.")) for p in rest)
    assert len(muon) + len(rest) == len(list(student.parameters()))
    assert any(names[id(p)].startswith(("x_embedder", "final_layer")) for p in rest)
    with pytest.raises(ValueError, match="matrices"):
        MuonAdamW([{"params": rest, "muon": True}], lr=1e-3)


def test_the_recipe_can_keep_named_block_matrices_on_adamw():
    """`optimizer.muon_exclude` moves the block matrices whose names contain a part to AdamW, and only
    those; a part that names no block matrix is a recipe error naming the key."""
    from sitdistill.core.recipe import RecipeError, load_recipe
    from sitdistill.train.build import student_param_groups

    student = build_student("S/2", hidden_size=32, depth=2, num_heads=2)
    names = {id(p): n for n, p in student.named_parameters()}
    all_muon, _ = muon_parameters(student)
    cfg = load_recipe(None, ["optimizer.name=muon", "optimizer.muon_exclude=[adaLN_modulation]"]).optimizer
    muon_group, rest_group = student_param_groups(student, cfg)
    muon = {names[id(p)] for p in muon_group["params"]}
    moved = {names[id(p)] for p in all_muon} - muon
    assert moved == {f"blocks.{i}.adaLN_modulation.1.weight" for i in range(2)}
    assert moved <= {names[id(p)] for p in rest_group["params"]}
    assert any(".attn.qkv." in n for n in muon)
    cfg = load_recipe(None, ["optimizer.name=muon", "optimizer.muon_exclude=[adaln]"]).optimizer
    with pytest.raises(RecipeError, match="'optimizer.muon_exclude'.*'adaln'"):
        student_param_groups(student, cfg)


def test_a_step_flagged_non_finite_by_a_grad_scaler_changes_nothing():
    w, b = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(12))
    opt = MuonAdamW([{"params": [w], "muon": True}, {"params": [b]}], lr=1e-2)
    before = (w.detach().clone(), b.detach().clone())
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1]) and not opt.state
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(w, before[0]) and set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
