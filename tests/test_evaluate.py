"""The evaluation report: metrics checked on hand-computable cases, and a full toy-world report."""

import argparse
import json
import math

import pytest
import torch

from sitdistill.evaluation.evaluate import evaluation_prompts
from sitdistill.evaluation.metrics import (PSNR_MSE_FLOOR, SSIM_K1, frechet_distance, gaussian_window, line_plot, noise_prediction_mse,
                             psnr, ssim)
from sitdistill.apps.export import load_teacher_for, resolve_checkpoint
from sitdistill.apps.sample_cli import add_eval_arguments, eval_command
from test_export import write_checkpoint
from tiny_models import make_tiny_sd15


# ----------------------------------------------------------------------------- metrics

def test_gaussian_window_is_wang_et_al():
    w = gaussian_window()
    assert w.shape == (11, 11) and math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
    assert torch.equal(w, w.T) and w[5, 5] == w.max()
    # Ratio centre / one step away = exp(1 / (2 sigma^2)) with sigma = 1.5.
    assert math.isclose(float(w[5, 5] / w[5, 6]), math.exp(1 / (2 * 1.5 ** 2)), rel_tol=1e-9)


def test_ssim_on_hand_computable_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # Constant images a and b: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.7, SSIM_K1 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    z = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert (ssim(x, z) < ssim(x, y)).all() and (ssim(x, y) < 1).all()
    # Smaller than the window: the window shrinks to the image.
    assert ssim(x[..., :6, :6], x[..., :6, :6]).allclose(torch.ones(2))


def test_psnr():
    x = torch.full((1, 3, 8, 8), 0.5)
    assert math.isclose(float(psnr(x, x + 0.1)), 20.0, rel_tol=1e-5)  # MSE 0.01 -> 20 dB
    assert math.isclose(float(psnr(x, x)), -10 * math.log10(PSNR_MSE_FLOOR), rel_tol=1e-6)


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0])
    assert math.isclose(frechet_distance(a, a + shift), 5.0, rel_tol=1e-6)  # same covariance: ||mu||^2
    # b = 2a: Tr(S + 4S - 2 (4 S^2)^1/2) = Tr(S), plus ||mu - 2 mu||^2.
    expected = float(torch.cov(a.double().T).trace() + a.double().mean(0).pow(2).sum())
    assert math.isclose(frechet_distance(a, 2 * a), expected, rel_tol=1e-6)


def test_line_plot_draws_each_series():
    img = line_plot([0, 1, 2], {"student": [1.0, 2.0, 3.0], "baseline": [3.0, 2.0, 1.0]},
                    title="t", xlabel="x", ylabel="y", size=(300, 200))
    colours = {c for _, c in img.getcolors(maxcolors=10_000)}
    assert img.size == (300, 200) and (31, 119, 180) in colours and (214, 39, 40) in colours


# ----------------------------------------------------------------------------- the report

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate")
    teacher = make_tiny_sd15(base / "teacher", vae_blocks=3)
    return {"student": write_checkpoint(teacher, base / "run", 2, 0),
            "baseline": write_checkpoint(teacher, base / "baseline", 2, 1, "losses.teacher=0")}


def test_noise_prediction_mse_is_zero_for_the_teacher_itself(runs):
    teacher = load_teacher_for(resolve_checkpoint(runs["student"]))
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompt(["a", "b"])
    out = noise_prediction_mse(teacher, {"same": teacher.predict_eps}, x0, cond, bins=4)
    assert out["bin_edges"] == [0, 250, 500, 750, 1000]
    assert out["same"] == [0.0] * 4 and all(v > 0 for v in out["teacher_vs_true_noise"])
    # Batching does not change the inputs: same numbers with one sample per forward.
    halved = noise_prediction_mse(teacher, {"same": teacher.predict_eps}, x0, cond, bins=4, batch_size=1)
    assert halved["teacher_vs_true_noise"] == pytest.approx(out["teacher_vs_true_noise"], rel=1e-5)


def test_prompt_sets(runs, tmp_path):
    recipe = resolve_checkpoint(runs["student"]).recipe
    toy, origin = evaluation_prompts(recipe, num_prompts=5)
    assert len(toy) == 5 and origin.startswith("toy") and toy == evaluation_prompts(recipe, num_prompts=5)[0]
    assert evaluation_prompts(recipe, source="recipe")[0] == list(recipe.sampling.prompts)
    f = tmp_path / "p.txt"
    f.write_text("one\n# skipped\n\ntwo\n")
    assert evaluation_prompts(recipe, str(f))[0] == ["one", "two"]


def test_toy_world_report_has_all_its_files_and_figures(runs, tmp_path):
    out = tmp_path / "report"
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    args = p.parse_args([str(runs["student"].parent), "--baseline", str(runs["baseline"]), "--out", str(out),
                         "--num_prompts", "2", "--seeds", "0", "5", "--num_inference_steps", "2",
                         "--height", "32", "--width", "32", "--timestep_bins", "4"])
    assert eval_command(args) == 0
    for name in ("report.md", "metrics.json", "grid_seed0.png", "grid_seed5.png", "noise_mse.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "images" / "baseline").glob("*.png"))) == 4
    assert list((out / "tb").glob("events.out.tfevents.*"))

    m = json.loads((out / "metrics.json").read_text())
    assert list(m["models"]) == ["teacher", "student", "baseline"]
    for k in ("student", "baseline"):
        assert set(m["paired"][k]) == {"latent_mse", "psnr", "ssim"} and m["paired"][k]["ssim"]["n"] == 4
        assert 0 < m["paired"][k]["ssim"]["mean"] < 1 and m["paired"][k]["latent_mse"]["mean"] > 0
        assert len(m["noise_mse"][k]) == 4 and all(v > 0 for v in m["noise_mse"][k])
    assert set(m["fidelity"]) == {"teacher", "student", "baseline"} and m["fidelity"]["student"]["n"] == 4
    assert m["clip_score"] == "not computed (no local weights given)"
    # Every model samples with the teacher's VAE here: one reconstruction figure, shared.
    assert set(m["recon_psnr"]) == {"teacher", "student", "baseline"} and len(set(m["recon_psnr"].values())) == 1
    assert m["recon_psnr"]["teacher"] > 0 and "VAE recon PSNR" in (out / "report.md").read_text()
    # Teacher and student share the noise of each (prompt, seed): the grid has 3 columns x 2 rows.
    from PIL import Image

    assert Image.open(out / "grid_seed0.png").size == (3 * 130 + 2, 12 + 2 * 130 + 2)  # 32-px samples enlarged x4
    report = (out / "report.md").read_text()
    assert "| student |" in report and "| baseline |" in report and "![" in report and "[750, 1000)" in report


def test_clip_score_and_features_from_a_local_tiny_clip(tmp_path):
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sitdistill.evaluation.metrics import clip_score, image_features
    from tiny_models import make_tiny_tokenizer

    tok = make_tiny_tokenizer(max_length=16)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    model.save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(tmp_path / "clip")

    images = [Image.new("RGB", (48, 40), c) for c in ("red", "blue", "green", "white")]
    prompts = ["a red", "a blue", "green thing", "white"]
    got = clip_score(images, prompts, str(tmp_path / "clip"))
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt).clamp_min(0)).mean()
    assert got["n"] == 4 and math.isclose(got["mean"], float(expected), abs_tol=1e-4)
    torch.testing.assert_close(image_features(images, str(tmp_path / "clip")), img)
