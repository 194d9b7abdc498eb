"""The SiT student: any grid, identity at init, CFG pathway, meta counts, save/load, official weights."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sitdistill.students import PRESETS, SiT, build_student, count_parameters
from sitdistill.students.layers import sincos_pos_embed_2d


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a CPU shared with other jobs, a 2-thread pool waits ~15 ms per op
    for a descheduled thread (measured: 1.0 s vs 0.02 s per tiny forward), so run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SDXL_DIMS = {"encoder_hidden_states": 24, "text_embeds": 12, "time_ids": 6}   # toy widths, SDXL keys
TINY = dict(hidden_size=32, depth=2, num_heads=4)


def tiny_student(cond_dims=SDXL_DIMS, **overrides) -> SiT:
    torch.manual_seed(0)
    return build_student("S/2", cond_dims, **{**TINY, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 1, skip: tuple = ()) -> torch.nn.Module:
    """Non-zero random weights everywhere (zero-init layers would hide bugs), except names in skip."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def sdxl_cond(n: int, seed: int = 2, length: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(n, length, 24, generator=g),
        "text_embeds": torch.randn(n, 12, generator=g),
        "time_ids": torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]).repeat(n, 1),
    }


# ---- any aspect ratio ----------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(8, 8), (8, 16), (16, 8), (6, 10), (4, 20)])
def test_non_square_grids_forward(height, width):
    model = randomize_(tiny_student()).eval()
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([10, 900]), **sdxl_cond(2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (height // 2, width // 2, "cpu") in model._pos_cache


def test_odd_grid_is_rejected():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny_student()(torch.randn(1, 4, 8, 7), torch.tensor([1]), **sdxl_cond(1))


def test_positions_depend_only_on_row_and_col():
    d = 32
    wide, square = sincos_pos_embed_2d(d, 4, 6), sincos_pos_embed_2d(d, 6, 6)
    for r in range(4):
        for c in range(6):
            assert torch.equal(wide[r * 6 + c], square[r * 6 + c])
    # tall vs wide: token 3 is (row 1, col 0) on 2x3 but (row 1, col 1) on 3x2 -- row-major, no transpose
    tall, wide = sincos_pos_embed_2d(d, 3, 2), sincos_pos_embed_2d(d, 2, 3)
    assert torch.equal(tall[2], wide[3]) and not torch.allclose(tall[3], wide[3])


def test_positions_match_mae_table_on_square_grid():
    d, side = 32, 5
    np.testing.assert_allclose(sincos_pos_embed_2d(d, side, side).numpy(), mae_pos_table(d, side), atol=1e-6)


def test_patches_stay_in_place_on_non_square_grid():
    """Patchify -> (no blocks) -> unpatchify puts every pixel back where it came from on a 6x10 latent.

    Patch embed and final linear are set to unit maps between pixel (c, p, q) and token channel
    (c, p, q); positions are zeroed, adaLN of the final layer is zero, so the model is
    unpatchify(layer_norm(patchify(x))) and any row/column mix-up shows.
    """
    model = build_student("S/2", None, hidden_size=16, depth=0, num_heads=2).eval()
    with torch.no_grad():
        model.x_embedder.proj.weight.zero_()
        model.final_layer.linear.weight.zero_()
        for ch in range(4):
            for p in range(2):
                for q in range(2):
                    model.x_embedder.proj.weight[ch * 4 + p * 2 + q, ch, p, q] = 1.0
                    model.final_layer.linear.weight[(p * 2 + q) * 4 + ch, ch * 4 + p * 2 + q] = 1.0
        model._pos_cache[(3, 5, "cpu")] = torch.zeros(1, 15, 16)
        x = torch.randn(1, 4, 6, 10)
        out = model(x, torch.tensor([0]))
    tokens = x.reshape(1, 4, 3, 2, 5, 2).permute(0, 2, 4, 1, 3, 5).reshape(15, 16)   # (h*w, c*p*q)
    expect = F.layer_norm(tokens, (16,), eps=1e-6)
    expect = expect.reshape(3, 5, 4, 2, 2).permute(2, 0, 3, 1, 4).reshape(1, 4, 6, 10)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


# ---- init, CFG, features ----------------------------------------------------------------------

def test_fresh_blocks_are_identity():
    model = tiny_student()
    x, c, ctx = torch.randn(2, 16, 32), torch.randn(2, 32), torch.randn(2, 5, 32)
    for block in model.blocks:
        assert torch.equal(block(x, c, ctx), x)


def test_cross_attention_starts_as_identity_on_trained_weights():
    """Blocks with trained (random) weights but fresh cross-attention/added-cond outputs ignore text."""
    model = randomize_(tiny_student(), skip=("cross_attn.proj", "add_embedder.mlp.2")).eval()
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([5, 500])
    with torch.no_grad():
        a = model(x, t, **sdxl_cond(2, seed=3))
        b = model(x, t, **sdxl_cond(2, seed=4, length=9))
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_every_conditioning_input_changes_the_output():
    model = randomize_(tiny_student()).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 500])
    cond = sdxl_cond(2)
    with torch.no_grad():
        base = model(x, t, **cond)
        for key in cond:
            changed = dict(cond, **{key: cond[key] + 1.0})
            assert not torch.allclose(model(x, t, **changed), base), key
        assert not torch.allclose(model(x, t + 100, **cond), base)


def test_cfg_pathway():
    model = randomize_(tiny_student()).eval()
    x, t, scale = torch.randn(2, 4, 8, 8), torch.tensor([300, 301]), 7.5
    cond = sdxl_cond(2)
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}   # SDXL force_zeros_for_empty_prompt
    uncond["time_ids"] = cond["time_ids"]
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, cond, uncond, scale)
        e_c, e_u = model(x, t, **cond), model(x, t, **uncond)
        # batched vs separate forwards differ by float rounding, which the guidance scale amplifies
        torch.testing.assert_close(guided, e_u + scale * (e_c - e_u), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(model.forward_with_cfg(x, t, cond, uncond, 1.0), e_c, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(e_c, e_u)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, text_embeds=cond["text_embeds"], time_ids=cond["time_ids"])


def test_padding_mask_hides_tokens():
    model = randomize_(tiny_student(cond_dims={"encoder_hidden_states": 24})).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([50])
    ehs = torch.randn(1, 6, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    garbage = ehs.clone()
    garbage[:, 3:] = 100.0
    with torch.no_grad():
        a = model(x, t, encoder_hidden_states=ehs, encoder_attention_mask=mask)
        b = model(x, t, encoder_hidden_states=garbage, encoder_attention_mask=mask)
        c = model(x, t, encoder_hidden_states=ehs[:, :3])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_text_pool_starts_at_zero_then_gives_every_block_the_text():
    """text_pool: a fresh pooler adds nothing; trained, the pooled text reaches the adaLN input, so
    the output depends on the text even with cross-attention silenced; masked tokens stay out."""
    sd15 = {"encoder_hidden_states": 24}
    plain = randomize_(tiny_student(sd15)).eval()
    pooled = tiny_student(sd15, text_pool=True).eval()
    missing, unexpected = pooled.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("text_pooler.") for k in missing)
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.randn(2, 6, 24)
    with torch.no_grad():
        torch.testing.assert_close(pooled(x, t, encoder_hidden_states=ehs), plain(x, t, encoder_hidden_states=ehs),
                                   atol=0, rtol=0)
        randomize_(pooled.text_pooler, seed=5)
        for block in pooled.blocks:
            block.cross_attn.proj.weight.zero_()
            block.cross_attn.proj.bias.zero_()
        a = pooled(x, t, encoder_hidden_states=ehs)
        assert not torch.allclose(a, pooled(x, t, encoder_hidden_states=ehs + 1.0))
        mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2)
        garbage = ehs.clone()
        garbage[:, 3:] = 100.0
        torch.testing.assert_close(pooled(x, t, encoder_hidden_states=ehs, encoder_attention_mask=mask),
                                   pooled(x, t, encoder_hidden_states=garbage, encoder_attention_mask=mask))


def test_class_conditional_null_label_is_the_unconditional_branch():
    model = randomize_(build_student("S/2", None, num_classes=10, **TINY)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        cond = model(x, t, class_labels=torch.tensor([3, 3]))
        null = model(x, t, class_labels=torch.tensor([10, 10]))
    assert model.y_embedder.embedding_table.num_embeddings == 11 and not torch.allclose(cond, null)


def test_return_features():
    model = randomize_(tiny_student()).eval()
    x = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        out, feats, grid = model(x, torch.tensor([1, 2]), **sdxl_cond(2), return_features=[1, 0])
        plain = model(x, torch.tensor([1, 2]), **sdxl_cond(2))
    assert grid == (4, 6) and [f.shape for f in feats] == [(2, 24, 32)] * 2
    assert not torch.equal(feats[0], feats[1])
    torch.testing.assert_close(out, plain)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 700])
    grads = []
    for checkpointing in (False, True):
        model = randomize_(tiny_student(qk_norm=True))
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, **sdxl_cond(2)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_is_finite_and_close():
    model = randomize_(tiny_student(qk_norm=True)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 3])
    with torch.no_grad():
        ref = model(x, t, **sdxl_cond(2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, **sdxl_cond(2))
        pure = model.to(torch.bfloat16)(x.bfloat16(), t, **{k: v.bfloat16() for k, v in sdxl_cond(2).items()})
    for o in (out, pure):
        assert torch.isfinite(o).all()
        assert (o.float() - ref).norm() / ref.norm() < 0.05


# ---- presets and counts -------------------------------------------------------------------------

def test_presets_names():
    expected = {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (1, 2, 4, 8)} | {"2b", "3b"}
    assert set(PRESETS) == expected
    with pytest.raises(ValueError, match="unknown student preset"):
        build_student("SiT-XL/2")
    with pytest.raises(ValueError, match="unknown conditioning key"):
        build_student("S/8", {"pooled": 3})


def test_meta_parameter_counts():
    # Official SiT-XL/2 (= DiT-XL/2) as its train.py prints it: sum(p.numel() for p in model.parameters())
    # = 675,129,632, which counts the frozen pos_embed Parameter (1, 256, 1152). Ours recomputes the
    # table per grid, so it holds exactly that many fewer parameters.
    official_xl2 = 675_129_632
    ours = count_parameters("XL/2", num_classes=1000, learn_sigma=True)
    assert ours + 256 * 1152 == official_xl2
    sdxl = {"encoder_hidden_states": 2048, "text_embeds": 1280, "time_ids": 6}
    assert 1.5e9 <= count_parameters("2b", sdxl) < 2.5e9
    assert 2.5e9 <= count_parameters("3b", sdxl) < 3.5e9
    assert 1.5e9 <= count_parameters("2b", {"encoder_hidden_states": 768}) < 2.5e9


# ---- save / load --------------------------------------------------------------------------------

def test_save_pretrained_round_trip(tmp_path):
    model = randomize_(tiny_student(qk_norm=True, in_channels=16, prediction_type="v_prediction")).eval()
    model.save_pretrained(tmp_path / "student")
    loaded = SiT.from_pretrained(tmp_path / "student").eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)
    assert loaded.config.in_channels == 16 and loaded.config.prediction_type == "v_prediction"
    x, t = torch.randn(1, 16, 8, 6), torch.tensor([42])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, **sdxl_cond(1)), model(x, t, **sdxl_cond(1)), atol=0, rtol=0)


# ---- official checkpoints -----------------------------------------------------------------------
# A reference SiT forward written from the paper's definition (Peebles & Xie 2023, sec. 3.2; Ma et al.
# 2024), on the official tensor names, with a plain softmax attention.

def mae_pos_table(dim: int, side: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table: first half encodes the column (x), second half the row (y)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    def enc(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([enc(xs), enc(ys)], axis=1).astype(np.float32)


def reference_sit_forward(sd: dict, x, t, y, heads: int, learn_sigma: bool = True):
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
    ln = lambda v: F.layer_norm(v, v.shape[-1:], eps=1e-6)
    n, c_in, H, W = x.shape
    d, _, p, _ = sd["x_embedder.proj.weight"].shape
    h, w = H // p, W // p
    # patchify as a linear map on (c, p, q)-ordered patches
    patches = x.reshape(n, c_in, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c_in * p * p)
    tok = patches @ sd["x_embedder.proj.weight"].reshape(d, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    cvec = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        m = lin(F.silu(cvec), b + "adaLN_modulation.1")[:, None]
        s1, sc1, g1, s2, sc2, g2 = m.chunk(6, dim=-1)
        a = ln(tok) * (1 + sc1) + s1
        q, k, v = lin(a, b + "attn.qkv").reshape(n, h * w, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        tok = tok + g1 * lin(att.transpose(1, 2).reshape(n, h * w, d), b + "attn.proj")
        a = ln(tok) * (1 + sc2) + s2
        tok = tok + g2 * lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(cvec), "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    out = lin(ln(tok) * (1 + scale) + shift, "final_layer.linear")       # (N, T, p*p*C_out)
    c_out = out.shape[-1] // (p * p)
    img = out.reshape(n, h, w, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(n, c_out, H, W)
    return img[:, : img.shape[1] // 2] if learn_sigma else img    # SiT's forward drops the sigma half


def write_fake_official(path, hidden=384, depth=2, patch=2, channels=4, classes=10, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    d = hidden
    sd = {
        "pos_embed": torch.from_numpy(mae_pos_table(d, grid))[None],
        "x_embedder.proj.weight": r(d, channels, patch, patch), "x_embedder.proj.bias": r(d),
        "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
        "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
        "y_embedder.embedding_table.weight": r(classes + 1, d),
        "final_layer.linear.weight": r(patch * patch * 2 * channels, d),
        "final_layer.linear.bias": r(patch * patch * 2 * channels),
        "final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        for name, (rows, cols) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d),
                                   "mlp.fc2": (d, 4 * d), "adaLN_modulation.1": (6 * d, d)}.items():
            sd[b + name + ".weight"], sd[b + name + ".bias"] = r(rows, cols), r(rows)
    torch.save(sd, path)
    return sd


def test_official_checkpoint_reproduces_official_forward(tmp_path):
    sd = write_fake_official(tmp_path / "SiT-S-2-8.pt")
    model, report = SiT.from_official_checkpoint(tmp_path / "SiT-S-2-8.pt", return_report=True)
    cfg = model.config
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.num_classes, cfg.learn_sigma,
            cfg.input_size, cfg.text_dim) == (384, 2, 6, 2, 10, True, 8, 0)
    assert not report.new and set(report.loaded) == set(sd) - {"pos_embed"}
    assert "recomputed" in report.skipped["pos_embed"] and "differs" not in report.skipped["pos_embed"]
    model.eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.9]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, class_labels=y), reference_sit_forward(sd, x, t, y, heads=6),
                                   atol=1e-4, rtol=1e-4)
    # a learnt (not sin-cos) position table cannot be honoured on other grids: it is flagged
    assert "differs" in model.load_official_state_dict(dict(sd, pos_embed=sd["pos_embed"] + 1)).skipped["pos_embed"]


def test_official_checkpoint_with_text_overrides(tmp_path):
    sd = write_fake_official(tmp_path / "ckpt.pt")
    # keep classes, add text: zero-initialised new paths => still the official forward
    model, report = SiT.from_official_checkpoint(tmp_path / "ckpt.pt", return_report=True, **{
        "text_dim": 24, "pooled_dim": 12, "time_ids_dim": 6})
    assert any(k.startswith("blocks.0.cross_attn.") for k in report.new)
    assert any(k.startswith("text_embedder.") for k in report.new)
    assert not any(k.startswith("blocks.") and "cross" not in k for k in report.new)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, class_labels=y, **sdxl_cond(2)),
                                   reference_sit_forward(sd, x, t, y, heads=6), atol=1e-4, rtol=1e-4)
    # distillation shape: no classes, eps-only output, 8-token non-square grids
    model, report = SiT.from_official_checkpoint(tmp_path / "ckpt.pt", return_report=True,
                                                 text_dim=24, num_classes=0, learn_sigma=False)
    assert "y_embedder.embedding_table.weight" in report.skipped
    assert "final_layer.linear.weight" in report.loaded
    w_off = sd["final_layer.linear.weight"].reshape(4, 8, 384)[:, :4].reshape(16, 384)
    torch.testing.assert_close(model.final_layer.linear.weight, w_off)
    with torch.no_grad():
        assert model(torch.randn(1, 4, 8, 12), torch.tensor([5]), encoder_hidden_states=torch.randn(1, 3, 24)).shape == (1, 4, 8, 12)
    # a changed patch size cannot reuse the patch embedding: reported, not crashed
    _, report = SiT.from_official_checkpoint(tmp_path / "ckpt.pt", return_report=True, patch_size=4)
    assert "shape differs" in report.skipped["x_embedder.proj.weight"]
    assert "x_embedder.proj.weight" in report.new
    # heads are not in the tensors: a non-official width needs them spelled out
    write_fake_official(tmp_path / "odd.pt", hidden=64)
    with pytest.raises(ValueError, match="num_heads"):
        SiT.from_official_checkpoint(tmp_path / "odd.pt")
    assert SiT.from_official_checkpoint(tmp_path / "odd.pt", num_heads=4).config.num_heads == 4


def test_the_guidance_input_starts_as_nothing_and_is_saved_in_the_config(tmp_path):
    from sitdistill.students import SiT

    torch.manual_seed(0)
    m = SiT(input_size=4, hidden_size=32, depth=1, num_heads=2, text_dim=8, guidance_embed=True)
    with torch.no_grad():  # a trained-looking student, except the guidance input's zero-initialised last layer
        for name, p in m.named_parameters():
            if not name.startswith("g_embedder.mlp.2"):
                p.normal_(0, 0.1)
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    ref = m(x, t, encoder_hidden_states=ctx)
    assert ref.abs().max() > 0
    assert torch.equal(m(x, t, encoder_hidden_states=ctx, guidance=torch.tensor([1.0, 7.5])), ref)  # zero init
    with torch.no_grad():
        m.g_embedder.mlp[2].weight.normal_(0, 0.1)
    a = m(x, t, encoder_hidden_states=ctx, guidance=torch.tensor([2.0, 2.0]))
    b = m(x, t, encoder_hidden_states=ctx, guidance=torch.tensor([6.0, 6.0]))
    assert not torch.allclose(a, b)
    m.save_pretrained(tmp_path / "s")
    back = SiT.from_pretrained(tmp_path / "s")
    assert back.config.guidance_embed and torch.equal(back(x, t, encoder_hidden_states=ctx, guidance=6.0), b)
    plain = SiT(input_size=4, hidden_size=32, depth=1, num_heads=2, text_dim=8)
    with pytest.raises(ValueError, match="no guidance input"):
        plain(x, t, encoder_hidden_states=ctx, guidance=2.0)


def test_an_official_sit_predicts_the_noise_of_ddpm_states_better_after_the_equal_snr_mapping(tmp_path):
    """A tiny SiT trained the official way (x_s = s x_data + (1 - s) noise, s in [0, 1], velocity
    target), saved in the official layout, then read as a student: fed the teacher's DDPM states,
    its noise prediction is far better with the mapping than with the raw DDPM step."""
    from sitdistill.core.schedule import NoiseSchedule

    sched_cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012}
    torch.manual_seed(0)
    data = torch.randn(4, 4, 8, 8)  # four fixed "images": a velocity the network can learn quickly
    official = SiT(input_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=4, class_dropout_prob=0.0,
                   learn_sigma=True)
    opt = torch.optim.AdamW(official.parameters(), lr=2e-3)
    for _ in range(300):
        y = torch.randint(4, (32,))
        x1, x0, s = data[y], torch.randn(32, 4, 8, 8), torch.rand(32)
        xs = s.view(-1, 1, 1, 1) * x1 + (1 - s.view(-1, 1, 1, 1)) * x0
        loss = (official(xs, s, class_labels=y) - (x1 - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": official.state_dict()}, tmp_path / "SiT-tiny.pt")

    def eps_error(**time) -> float:
        student = SiT.from_official_checkpoint(tmp_path / "SiT-tiny.pt", num_classes=4, class_dropout_prob=0.0,
                                               learn_sigma=True, num_heads=2, **time).eval()
        ddpm = NoiseSchedule.from_config(sched_cfg)
        g = torch.Generator().manual_seed(1)
        errors = []
        for step in (100, 400, 700, 950):
            y = torch.arange(4)
            noise = torch.randn(4, 4, 8, 8, generator=g)
            t = torch.full((4,), step)
            x_t = ddpm.add_noise(data[y], noise, t)
            with torch.no_grad():
                errors.append(float((student(x_t, t, class_labels=y) - noise).pow(2).mean()))
        return sum(errors) / len(errors)

    mapped = eps_error(time_input="sit", noise_schedule=sched_cfg)
    raw = eps_error()  # the DDPM step fed as is, the velocity read as eps
    print(f"eps MSE: mapped {mapped:.4f}, raw DDPM step {raw:.4f}")
    assert mapped < 0.3 and mapped < raw / 3, (mapped, raw)


def test_the_sit_time_mapping_converts_velocity_to_eps_and_v_exactly():
    """With the exact velocity of a known x0, the mapped student returns the exact eps (and DDPM v)."""
    from sitdistill.core.schedule import NoiseSchedule

    sched_cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012}
    ddpm = NoiseSchedule.from_config(sched_cfg)
    for kind in ("epsilon", "v_prediction"):
        m = SiT(input_size=4, hidden_size=32, depth=1, num_heads=2, time_input="sit", noise_schedule=sched_cfg,
                prediction_type=kind)
        x0, noise, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([5, 500, 999])
        x_t = ddpm.add_noise(x0, noise, t)
        x_s, s, a, sigma = m._to_sit(x_t, t)
        # On SiT's interpolant at s, the state is s x0 + (1 - s) noise: the same x0 and noise.
        torch.testing.assert_close(x_s, s.view(-1, 1, 1, 1) * x0 + (1 - s.view(-1, 1, 1, 1)) * noise)
        out = m._from_sit(x0 - noise, x_s, s, a, sigma)  # the exact velocity
        want = noise if kind == "epsilon" else ddpm.velocity(x0, noise, t)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
