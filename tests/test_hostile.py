"""Hostile inputs, table-driven: bad recipes, bad files, damaged checkpoints, pickles, a full disk.

Each case asserts what a user sees (the exit code, one line naming the key or file) and that
nothing was lost (no output written for a bad recipe; the last good checkpoint kept and used).
The corpus is written by tests/hostile_corpus.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sitdistill import cli
import hostile_corpus as corpus
from sitdistill.data.folder import scan_folder
from sitdistill.core import checkpoint as ckpt
from sitdistill.core.recipe import load_recipe
from sitdistill.train.trainer import Distiller

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "toy.yaml")
TINY = ("student.hidden_size=32", "student.depth=2", "student.num_heads=2", "data.toy.num_images=24",
        "training.batch_size=4", "training.max_steps=2", "training.sample_every=0", "training.log_every=1",
        "optimizer.warmup_steps=0", "losses.feature=0", "evaluation.at_end=0", "optimizer.name=adamw")

pytestmark = pytest.mark.usefixtures("private_cache")


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------- bad recipes

def _bad_recipe_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(case, overrides, what the one line must name)."""
    single = tmp / "model.safetensors"
    single.write_bytes(b"")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    unnamed = tmp / "weights.pt"  # an official checkpoint whose name says neither SiT nor DiT
    unnamed.write_bytes(b"")
    return [
        ("data root missing", [f"data.root={tmp / 'no-such-data'}"], "data.root"),
        ("data root is a file", [f"data.root={a_file}"], "data.root"),
        ("teacher path missing", [f"teacher.source={tmp / 'no-such-teacher'}"], "teacher.source"),
        ("teacher relative path missing", ["teacher.source=./models/teacher"], "teacher.source"),
        ("toy family unknown", ["teacher.source=toy:sd3"], "teacher.source"),
        ("single file that is no checkpoint", [f"teacher.source={single}"], "teacher.source"),
        ("teacher config missing", [f"teacher.config={tmp / 'cfg'}"], "teacher.config"),
        ("vae override missing", ["teacher.vae=./no/vae"], "teacher.vae"),
        ("batch size 0", ["training.batch_size=0"], "training.batch_size"),
        ("batch size negative", ["training.batch_size=-4"], "training.batch_size"),
        ("lr negative", ["optimizer.lr=-1e-4"], "optimizer.lr"),
        ("lr zero", ["optimizer.lr=0"], "optimizer.lr"),
        ("weight decay negative", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
        ("betas one value", ["optimizer.betas=[0.9]"], "optimizer.betas"),
        ("beta 1", ["optimizer.betas=[0.9,1.0]"], "optimizer.betas"),
        ("heads do not divide", ["student.hidden_size=30", "student.num_heads=4"], "student.hidden_size"),
        ("bucket step off the grid", ["data.bucket_step=12"], "data.bucket_step"),
        ("bucket step zero", ["data.bucket_step=0"], "data.bucket_step"),
        ("bucket sides reversed", ["data.bucket_min_side=128", "data.bucket_max_side=64"], "data.bucket_min_side"),
        ("resume path missing", [f"training.resume={tmp / 'checkpoint-9'}"], "training.resume"),
        ("resume path not a checkpoint", [f"training.resume={tmp}"], "training.resume"),
        ("init_from missing", [f"training.init_from={tmp / 'old-run'}"], "training.init_from"),
        ("init_from holds no checkpoint", [f"training.init_from={tmp}"], "training.init_from"),
        ("student init missing", [f"student.init={tmp / 'SiT-XL-2-256.pt'}"], "student.init"),
        ("prompt file part without path", ["losses.perturb=1", "losses.perturbations.prompt_file.enabled=true"],
         "losses.perturbations.prompt_file.path"),
        ("prompt file missing", ["losses.perturb=1", "losses.perturbations.prompt_file.enabled=true",
                                 f"losses.perturbations.prompt_file.path={tmp / 'prompts.txt'}"],
         "losses.perturbations.prompt_file.path"),
        ("checkpoint_every 0", ["training.checkpoint_every=0"], "training.checkpoint_every"),
        ("log_every 0", ["training.log_every=0"], "training.log_every"),
        ("accumulation 0", ["training.gradient_accumulation_steps=0"], "training.gradient_accumulation_steps"),
        ("keep_checkpoints 0", ["training.keep_checkpoints=0"], "training.keep_checkpoints"),
        ("max_steps negative", ["training.max_steps=-1"], "training.max_steps"),
        ("no length at all", ["training.max_steps=null"], "training.max_steps"),
        ("caption dropout 2", ["data.caption_dropout=2"], "data.caption_dropout"),
        ("trajectory prompt swap 1.5", ["losses.perturbations.trajectory.swap_prompts=1.5"],
         "losses.perturbations.trajectory.swap_prompts"),
        ("trajectory states unknown", ["losses.perturbations.trajectory.states=final"],
         "losses.perturbations.trajectory.states"),
        ("ema decay 1.5", ["training.ema_decay=1.5"], "training.ema_decay"),
        ("max_pixels 0", ["data.max_pixels=0"], "data.max_pixels"),
        ("grad norm 0", ["training.max_grad_norm=0"], "training.max_grad_norm"),
        ("guidance range reversed", ["losses.guidance_range=[7,1]"], "losses.guidance_range"),
        ("every loss weight 0", ["losses.eps=0", "losses.teacher=0"], "losses"),
        ("feature block out of range", ["losses.feature=1", "losses.features.student_blocks=[7]",
                                        "losses.features.teacher_modules=[mid_block]"], "losses.features.student_blocks"),
        ("exclude combo malformed", ["data.toy.exclude_combos=[red]"], "data.toy.exclude_combos"),
        ("sampling steps 0", ["sampling.num_inference_steps=0"], "sampling.num_inference_steps"),
        ("eval prompts file missing", [f"evaluation.prompts_file={tmp / 'p.txt'}"], "evaluation.prompts_file"),
        ("output dir is a file", [f"output.dir={a_file}"], "output.dir"),
        ("min-SNR weighting without gamma", ["losses.teacher_weighting=min_snr"], "losses.teacher_weighting"),
        ("unknown preset", ["student.preset=XXL/2"], "student.preset"),
        ("guidance input without a guided teacher", ["student.guidance_embed=true"], "student.guidance_embed"),
        ("guidance input with a data term", ["student.guidance_embed=true", "losses.guided_teacher=true",
                                             "losses.eps=1"], "losses.eps"),
        ("official init of unknown kind", [f"student.init={unnamed}"], "student.init_kind"),
    ]


def test_every_bad_recipe_is_exit_2_one_line_naming_the_key_and_nothing_written(tiny_teachers, tmp_path, capsys):
    """Before any weight is loaded: 45 bad recipes, each one line, exit 2, no output folder."""
    cases = _bad_recipe_cases(tmp_path)
    failures = []
    for name, overrides, key in cases:
        out = tmp_path / "out" / name.replace(" ", "_")
        argv = ["run", RECIPE, f"teacher.source={tiny_teachers['sd15']}", f"output.dir={out}", *TINY, *overrides]
        code, err = run_cli(capsys, *argv)
        if code != 2 or len(err) != 1 or key not in err[0] or out.exists() or "Traceback" in "\n".join(err):
            failures.append((name, code, err[:3]))
        elif any(word in err[0].lower() for word in ("internet", "connect", "huggingface.co")):
            failures.append((name, "blames the network", err[0]))
    assert not failures, failures
    assert len(cases) >= 40


def test_a_data_root_without_a_usable_image_is_exit_2_after_the_scan(tiny_teachers, tmp_path, capsys):
    data = tmp_path / "data"
    corpus.write_bad_files(data / "bad")
    for p in data.rglob("*"):  # leave only files the scan skips
        if p.name in ("black.png", "bad_data.png"):
            p.unlink()
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", RECIPE, f"teacher.source={tiny_teachers['sd15']}", f"output.dir={out}",
                        f"data.root={data}", *TINY)
    assert code == 2 and len(err) == 1 and "data.root" in err[0] and "no usable images" in err[0]
    assert not out.exists()


def test_a_teacher_named_like_a_hub_id_is_left_to_the_hub_client(tmp_path):
    from sitdistill.train.validate import validate_recipe

    # Not a local path and shaped org/name: validation passes it on (only loading can tell).
    validate_recipe(load_recipe(RECIPE, [f"output.dir={tmp_path / 'run'}", "teacher.source=someone/some-model",
                                         *TINY]))


# --------------------------------------------------------------------------- bad files

def test_the_scan_survives_every_bad_file_and_names_its_reason(tmp_path):
    data = tmp_path / "data"
    bad = corpus.write_bad_files(data)
    scan = scan_folder(data, min_size=16, size_cache=False)
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    for reason, path in bad.items():
        if reason in ("constant", "undecodable"):
            assert path.name not in reasons  # usable as far as a scan can tell
        elif reason == "link_loop":
            assert reasons[path.name] == "broken_link"
        else:
            assert reasons[path.name] == reason, (path.name, reasons.get(path.name))
    assert sorted(Path(r.path).name for r in scan.records) == ["bad_data.png", "black.png"]


def test_an_image_above_the_pixel_budget_is_never_decoded(tmp_path, monkeypatch):
    from PIL import Image

    data = tmp_path / "d"
    data.mkdir()
    path = corpus.huge_header_png(data / "huge.png")
    path.with_suffix(".txt").write_text("x")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    scan = scan_folder(data, size_cache=False)
    assert [s.reason for s in scan.skipped] == ["too_large"] and "144 MP" in scan.skipped[0].detail
    assert decoded == []
    scan = scan_folder(data, size_cache=False, max_pixels=None)  # no budget: the (cheap) check decodes it
    assert scan.skipped == [] or scan.skipped[0].reason != "too_large"


def test_data_report_lists_skipped_and_flags_constant_and_undecodable_images(tmp_path, capsys):
    data = tmp_path / "data"
    corpus.write_bad_files(data)
    code = cli.main(["data-report", str(data), "data.min_size=16", "data.bucket_min_side=32",
                     "data.bucket_max_side=128", "data.resolution=64", "data.bucket_step=16"])
    out = capsys.readouterr().out
    assert code == 0
    for word in ("broken_link", "too_large", "float_pixels", "truncated", "empty", "unreadable"):
        assert word in out
    flagged = out.split("flagged files")[1]
    assert "constant" in flagged and "black.png" in flagged
    assert "undecodable" in flagged and "bad_data.png" in flagged


def test_data_report_of_a_missing_folder_is_one_line(capsys, tmp_path):
    code, err = run_cli(capsys, "data-report", str(tmp_path / "nope"))
    assert code == 2 and len(err) == 1 and "nope" in err[0]


def _folder_with_a_lone_undecodable_image(root: Path) -> Path:
    """4 good 64x64 toy images and one 64x48 image that passes the scan but does not decode: it is
    alone in its bucket, so no substitute exists."""
    from sitdistill.data.toy import ToyWorld

    ToyWorld(resolutions=((64, 64),)).write_folder(root, 4, seed=3, metadata=False)
    bad = corpus.undecodable_png(root / "lone.png", 64, 48)
    bad.with_suffix(".txt").write_text("a red circle at the top left\n")
    return bad


def test_a_bucket_whose_only_image_fails_to_decode_never_stops_a_run_or_its_resume(tiny_teachers, tmp_path,
                                                                                    capsys):
    data = tmp_path / "data"
    bad = _folder_with_a_lone_undecodable_image(data)
    out = tmp_path / "run"
    common = [f"teacher.source={tiny_teachers['sd15']}", f"output.dir={out}", f"data.root={data}", *TINY,
              "training.batch_size=2", "data.resolution=64", "data.bucket_min_side=32", "data.bucket_max_side=128",
              "data.bucket_step=16", "data.min_size=16", "training.checkpoint_every=2"]
    # 3 batches per epoch (2 of 64x64, 1 of 64x48): 4 steps meet the dead bucket at least once.
    assert run_cli(capsys, "run", RECIPE, *common, "training.max_steps=4")[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    assert str(bad) in summary["load_failures"]["errors"]
    assert summary["load_failures"]["dropped_buckets"] == [[64, 48]]
    # ... and every resume after it goes on.
    assert run_cli(capsys, "run", RECIPE, *common, "training.max_steps=8", "training.resume=latest")[0] == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


# --------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def two_checkpoints(tiny_teachers, tmp_path_factory):
    """A finished tiny run with checkpoint-1 and checkpoint-2 (copied by each test)."""
    import os as _os

    base = tmp_path_factory.mktemp("hostile_run")
    old = _os.environ.get("SITDISTILL_CACHE")
    _os.environ["SITDISTILL_CACHE"] = str(base / "cache")
    try:
        r = load_recipe(RECIPE, [f"teacher.source={tiny_teachers['sd15']}", f"output.dir={base / 'run'}", *TINY,
                                 "training.checkpoint_every=1"])
        Distiller(r).fit()
    finally:
        if old is None:
            _os.environ.pop("SITDISTILL_CACHE")
        else:
            _os.environ["SITDISTILL_CACHE"] = old
    return base / "run"


@pytest.mark.parametrize("kind", corpus.DAMAGE_KINDS)
def test_resume_latest_moves_a_damaged_checkpoint_aside_and_falls_back(kind, two_checkpoints, tiny_teachers,
                                                                      tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    corpus.damage_checkpoint(run / "checkpoint-2", kind)
    code, err = run_cli(capsys, "run", RECIPE, f"teacher.source={tiny_teachers['sd15']}", f"output.dir={run}", *TINY,
                        "training.checkpoint_every=1", "training.max_steps=3", "training.resume=latest")
    out = capsys.readouterr()
    assert code == 0, err
    assert (run / "damaged-checkpoint-2").is_dir()  # moved aside, never deleted
    assert ckpt.find_latest(run).name == "checkpoint-3"
    state = json.loads((run / "checkpoint-3" / "train_state.json").read_text())
    assert state["step"] == 3


def test_when_no_checkpoint_loads_resume_is_exit_2_with_the_reasons(two_checkpoints, tiny_teachers, tmp_path,
                                                                   capsys):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    corpus.damage_checkpoint(run / "checkpoint-2", "student_truncated")
    corpus.damage_checkpoint(run / "checkpoint-1", "optimizer_cut")
    code, err = run_cli(capsys, "run", RECIPE, f"teacher.source={tiny_teachers['sd15']}", f"output.dir={run}", *TINY,
                        "training.max_steps=3", "training.resume=latest")
    assert code == 2 and len(err) == 1
    assert "no checkpoint" in err[0] and "checkpoint-2" in err[0] and "checkpoint-1" in err[0]
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["damaged-checkpoint-1",
                                                                              "damaged-checkpoint-2"]


def test_every_checkpoint_file_has_a_checksum_and_a_changed_byte_is_caught(two_checkpoints):
    latest = two_checkpoints / "checkpoint-2"
    files = corpus.manifest(latest)["files"]
    on_disk = {p.relative_to(latest).as_posix() for p in latest.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(files) == on_disk and len(files) >= 8
    ckpt.verify_checkpoint(latest)


def test_a_resume_may_change_the_optimizer_and_says_so(two_checkpoints, tiny_teachers, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    r = load_recipe(RECIPE, [f"teacher.source={tiny_teachers['sd15']}", f"output.dir={run}", *TINY,
                             "training.resume=latest", "training.max_steps=3", "optimizer.lr=5e-5",
                             "optimizer.weight_decay=0.02", "optimizer.betas=[0.8,0.95]"])
    d = Distiller(r)
    assert d.maybe_resume()
    group = d.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(5e-5) and group["initial_lr"] == pytest.approx(5e-5)
    assert group["weight_decay"] == 0.02 and tuple(group["betas"]) == (0.8, 0.95)
    assert d.lr_scheduler.get_last_lr()[0] == pytest.approx(5e-5)
    out = capsys.readouterr().out
    assert "lr 0.001 -> 5e-05" in out and "weight_decay 0.0 -> 0.02" in out and "betas (0.9, 0.999) -> (0.8, 0.95)" in out
    d.fit()  # and the step taken uses them
    saved = torch.load(run / "checkpoint-3" / "optimizer.pt", weights_only=True)["param_groups"][0]
    assert saved["weight_decay"] == 0.02 and tuple(saved["betas"]) == (0.8, 0.95)


@pytest.mark.parametrize("override,key", [("student.depth=3", "student.depth"), ("training.batch_size=2",
                                          "training.batch_size"), ("losses.feature=0.5", "losses.feature"),
                                          ("optimizer.name=muon", "optimizer.name")])
def test_a_resume_refuses_what_a_checkpoint_fixes(override, key, two_checkpoints, tiny_teachers, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    extra = ["losses.features.student_blocks=[0]", "losses.features.teacher_modules=[mid_block]"] \
        if key == "losses.feature" else []
    code, err = run_cli(capsys, "run", RECIPE, f"teacher.source={tiny_teachers['sd15']}", f"output.dir={run}", *TINY,
                        "training.resume=latest", override, *extra)
    assert code == 2 and len(err) == 1 and key in err[0] and "checkpoint-2" in err[0]


def test_an_intact_checkpoint_that_does_not_fit_the_run_is_refused_and_never_moved(two_checkpoints, tiny_teachers,
                                                                                     tmp_path, capsys):
    """Another teacher (other text widths) on resume: exit 2 naming the student's config key; an
    intact checkpoint is never renamed 'damaged'."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    code, err = run_cli(capsys, "run", RECIPE, f"teacher.source={tiny_teachers['sdxl']}", f"output.dir={run}", *TINY,
                        "training.resume=latest", "training.max_steps=3")
    assert code == 2 and len(err) == 1 and "training.resume" in err[0] and "text_dim" in err[0]
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]


def test_summary_keeps_its_before_figure_after_a_resume(two_checkpoints, tiny_teachers, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    before = json.loads((two_checkpoints / "summary.json").read_text())["agreement_before"]
    r = load_recipe(RECIPE, [f"teacher.source={tiny_teachers['sd15']}", f"output.dir={run}", *TINY,
                             "training.resume=latest", "training.max_steps=3"])
    summary = Distiller(r).fit()
    assert summary["agreement_before"] == before and "closer_to_teacher_x" in summary


def test_checkpoint_folders_follow_the_umask(two_checkpoints):
    mask = os.umask(0o022)
    os.umask(mask)
    assert (two_checkpoints / "checkpoint-2").stat().st_mode & 0o777 == 0o777 & ~mask


# --------------------------------------------------------------------------- clear words

def test_a_pickle_that_would_run_code_is_refused_by_name_without_running(tmp_path):
    marker = tmp_path / "ran"
    bad = corpus.malicious_pickle(tmp_path / "SiT-XL-2-256.pt", marker)
    with pytest.raises(ckpt.UnsafeFileError) as e:
        ckpt.load_weights_only(bad)
    text = str(e.value)
    assert str(bad) in text and "can run code" in text and "weights_only=False" not in text
    assert not marker.exists()


def test_a_pickled_student_init_is_exit_2_one_line(tiny_teachers, tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = corpus.malicious_pickle(tmp_path / "SiT-XL-2-256.pt", marker)
    code, err = run_cli(capsys, "run", RECIPE, f"teacher.source={tiny_teachers['sd15']}",
                        f"output.dir={tmp_path / 'run'}", *TINY, f"student.init={bad}")
    assert code == 2 and len(err) == 1 and str(bad) in err[0] and "weights_only=False" not in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter "
                                                "failed writing file data/3: file write failed")])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(error, two_checkpoints, tmp_path,
                                                                         monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt.torch, "save", fail)
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.save_checkpoint(run, 3, models={}, optimizer=opt)
    text = e.value.strerror
    assert f"no space left on {run}" in text and "checkpoint-2 is still the latest" in text and "MB" in text
    assert ckpt.find_latest(run).name == "checkpoint-2"
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_the_intact_message_appears_only_when_a_checkpoint_exists(tiny_teachers, tmp_path):
    from sitdistill.train.trainer import TrainingStopped

    d = Distiller(load_recipe(RECIPE, [f"teacher.source={tiny_teachers['sd15']}", f"output.dir={tmp_path / 'run'}",
                                       *TINY, "training.max_bad_steps=1"]))
    batch = next(iter(d.data.epoch_batches(0)))
    poisoned = dict(batch, latent_mean=torch.full_like(batch["latent_mean"], float("nan")))
    with pytest.raises(TrainingStopped) as e:
        d.step(poisoned)
    assert "no checkpoint was written yet" in str(e.value) and "intact" not in str(e.value)


def test_an_uncached_hub_id_offline_is_exit_2_one_line_that_does_not_blame_the_network(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", RECIPE, "teacher.source=someone/not-cached-model", f"output.dir={out}", *TINY)
    assert code == 2 and len(err) == 1 and "teacher.source" in err[0]
    assert "not in the local hugging-face cache" in err[0] and "offline mode" in err[0]
    assert not out.exists()
