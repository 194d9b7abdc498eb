"""`cli.py bench --gpu`: the FLOP counter, the peak table, the doubling search, 8-bit AdamW wiring,
and the whole benchmark end to end at stand-in sizes on the CPU (`--tiny`)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sitdistill import cli
from sitdistill.apps.bench_runner import double_until
from sitdistill.apps.flops import peak_tflops, sit_forward_flops, train_flops
from sitdistill.students import build_student

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cond, extra", [
    ({"encoder_hidden_states": 32, "text_embeds": 24, "time_ids": 6}, {"qk_norm": True}),  # SDXL-like
    ({"encoder_hidden_states": 32}, {"text_pool": True, "guidance_embed": True, "mlp_ratio": 3.0}),
    (None, {"num_classes": 10, "learn_sigma": True, "patch_size": 4}),  # class-conditional, official layout
])
def test_flop_count_matches_torch_flop_counter(cond, extra):
    torch.manual_seed(0)
    model = build_student("S/2", cond, hidden_size=64, depth=2, num_heads=2, **extra)
    n, h, w, text_len = 3, 16, 24, 7  # a non-square grid and a short text
    x, t = torch.randn(n, 4, h, w), torch.tensor([1, 500, 999])
    kw = {}
    if cond:
        kw["encoder_hidden_states"] = torch.randn(n, text_len, 32)
        if "text_embeds" in cond:
            kw.update(text_embeds=torch.randn(n, 24), time_ids=torch.randn(n, 6))
    if extra.get("guidance_embed"):
        kw["guidance"] = torch.full((n,), 4.0)
    if extra.get("num_classes"):
        kw["class_labels"] = torch.tensor([1, 2, 3])
    ours = sit_forward_flops(model.config, n, h, w, text_len if cond else 0)
    # The math backend runs attention as two batched matmuls, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        out = model(x, t, **kw)
    assert ours == pytest.approx(forward.get_total_flops(), rel=0.01)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as both:
        model(x, t, **kw).square().mean().backward()
    # backward = 2x forward, but for the input gradient of the first layer, which nothing needs
    assert train_flops(ours) == pytest.approx(both.get_total_flops(), rel=0.03)
    assert out.shape == x.shape


def test_flop_count_grows_with_the_attention_square():
    model = build_student("XL/2", {"encoder_hidden_states": 768})
    small, big = (sit_forward_flops(model.config, 1, s, s, 77) for s in (32, 64))
    assert 4 < big / small < 5  # 4x the tokens: linear terms 4x, the T^2 term 16x


def test_peak_table_prefers_the_specific_name():
    assert peak_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert peak_tflops("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert peak_tflops("NVIDIA H200")[0] == 989.0 and peak_tflops("NVIDIA GH200 480GB")[1] == "GH200"
    assert peak_tflops("NVIDIA L40S")[0] == 362.0 and peak_tflops("NVIDIA L4")[0] == 121.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops("cpu") == (None, None)


def test_doubling_search_stops_at_the_first_failure_or_the_cap():
    tried = []

    def fits_up_to(limit):
        def fits(batch):
            tried.append(batch)
            return batch <= limit
        return fits

    assert double_until(fits_up_to(100), 8, 512) == (64, "batch 128 did not fit") and tried == [8, 16, 32, 64, 128]
    assert double_until(fits_up_to(10_000), 8, 32) == (32, "stopped at the cap 32")
    assert double_until(fits_up_to(4), 8, 512) == (None, "batch 8 did not fit")


def test_adamw8bit_is_refused_without_a_package(monkeypatch):
    from sitdistill.train import build
    from sitdistill.core.recipe import RecipeError, load_recipe
    from sitdistill.train.validate import validate_recipe

    monkeypatch.setattr(build, "lowbit_adamw_backend", lambda: None)
    recipe = load_recipe(ROOT / "recipes" / "toy.yaml", ["optimizer.name=adamw8bit"])
    with pytest.raises(RecipeError, match=r"optimizer\.name.*adamw8bit.*sitdistill\[lowbit\]"):
        validate_recipe(recipe)
    with pytest.raises(RecipeError, match=r"adamw8bit.*torchao or bitsandbytes"):
        build.build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], recipe.optimizer,
                              torch.device("cpu"))
    monkeypatch.setattr(build, "lowbit_adamw_backend", lambda: "torchao")
    with pytest.raises(RecipeError, match=r"optimizer\.fused.*no fused kernel"):
        validate_recipe(load_recipe(ROOT / "recipes" / "toy.yaml", ["optimizer.name=adamw8bit",
                                                                    "optimizer.fused=true"]))


def test_adamw8bit_takes_the_recipe_settings(monkeypatch):
    from sitdistill.train import build
    from sitdistill.core.recipe import load_recipe

    made = {}

    class AdamW8bit(torch.optim.AdamW):  # stands in for torchao's, records what it was given
        def __init__(self, params, **kw):
            made.update(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(build, "lowbit_adamw_backend", lambda: "torchao")
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.optim", types.SimpleNamespace(AdamW8bit=AdamW8bit))
    cfg = load_recipe(ROOT / "recipes" / "toy.yaml", ["optimizer.name=adamw8bit", "optimizer.lr=3e-4",
                                                      "optimizer.weight_decay=0.01", "optimizer.betas=[0.9,0.95]"])
    opt = build.build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], cfg.optimizer, torch.device("cpu"))
    assert isinstance(opt, AdamW8bit)
    assert made == {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}


def test_gpu_bench_needs_an_output_dir_and_a_gpu(capsys):
    assert cli.main(["bench", "--gpu"]) == cli.EXIT_USAGE
    assert "--output_dir" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--gpu", "--output_dir", "x"]) == cli.EXIT_USAGE
        assert "--tiny" in capsys.readouterr().err


def test_tiny_gpu_bench_end_to_end(tmp_path):
    """The whole benchmark through the CLI at stand-in sizes: every section measured (the budget is
    lifted so that a busy machine skips nothing), both files written."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SITDISTILL_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", "--gpu", "--tiny", "--output_dir", str(out),
                        "--budget_s", "100000"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert res["profile"] == "tiny" and not any(n.startswith("skipped") for n in res["notes"])

    rows = {(r["config"], r["gradient_checkpointing"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {("sd15-xl512", True, 2), ("sd15-xl512", True, 4), ("sdxl-2b1024", True, 1),
                         ("sdxl-2b1024", True, 2), ("sdxl-2b1024", False, 1), ("sdxl-2b1024", False, 2)}
    for (config, _, batch), r in rows.items():
        s = r["sections_ms"]
        for section in ("teacher", "student_forward", "backward", "optimizer", "ema"):
            assert s[section] > 0, (config, section)
        assert r["step_ms"] >= sum(v for k, v in s.items() if k != "other") > 0
        assert r["samples_per_s"] == pytest.approx(batch / r["step_ms"] * 1000)
        assert r["overhead_ratio"] >= 1.0 and r["peak_memory_MiB"] > 0 and r["bad_steps"] == 0
        assert r["text_len"] == 77 and r["tokens"] == {"sd15-xl512": 16, "sdxl-2b1024": 64}[config]
        assert r["student_forwards_per_step"] == 2  # the data batch and the perturbation batch
        assert r["student_tflop_per_step"] > 0 and r["student_tflops"] > 0
        assert (r["mfu"] is None) == (res["peak_bf16_tflops"] is None)
    assert res["peak_bf16_tflops"] is not None or any("MFU not reported" in n for n in res["notes"])

    variants = {(r["config"], r["variant"]): r for r in res["variants"]}
    for config in ("sd15-xl512", "sdxl-2b1024"):
        for name in ("default", "SDPA flash_attention", "SDPA efficient_attention", "SDPA math",
                     "teacher channels-last"):
            assert (config, name) in variants
        assert variants[(config, "default")]["step_ms"] > 0 and variants[(config, "SDPA math")]["step_ms"] > 0
    compiled = variants[("sd15-xl512", "torch.compile (eager, per block)")]
    assert compiled["step_ms"] > 0 and compiled["compile_and_run_s"] > 0

    levers = [r["levers"] for r in res["levers"]]
    assert levers[:4] == [[], ["teacher bf16"], ["teacher bf16", "gradient checkpointing"],
                          ["teacher bf16", "gradient checkpointing", "EMA on CPU"]]
    assert len(levers) == 5 or any("8-bit AdamW not measured" in n for n in res["notes"])
    assert [r["teacher_dtype"] for r in res["levers"][:2]] == ["float32", "bfloat16"]
    assert all(r["peak_memory_MiB"] > 0 for r in res["levers"])

    for r in res["reference"]:
        assert r["ours_ms"] > 0 and r["reference_ms"] > 0 and r["max_abs_diff_fp32"] < 1e-4
    assert {r["config"] for r in res["reference"]} == {"sd15-xl512", "sdxl-2b1024"}
    assert {r["config"]: r["largest"] for r in res["largest_batch"]} == {"sd15-xl512": 8, "sdxl-2b1024": 4}

    for heading in ("## Step time", "## Largest batch", "## Variants", "## Memory levers", "plain reference"):
        assert heading in md
    assert "attention: **" in md and "Smallest peak at which it trains" in md
