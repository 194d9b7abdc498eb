"""The command line: help, recipe errors as one line with exit code 2, seed flags, dry runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sitdistill import cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("run", "train", "sample", "eval", "export", "bench", "show-recipe", "data-report", "toy-teacher", "presets"):
        assert name in out


def test_bad_override_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "run"
    p = run_cli("run", str(ROOT / "recipes/toy.yaml"), f"output.dir={out_dir}", "training.batchsize=2", cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.batchsize" in lines[0] and "training.batch_size" in lines[0]
    assert "Traceback" not in p.stderr
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_bad_recipe_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  preset: S/2\n  hiden_size: 3\n")
    assert cli.main(["show-recipe", str(bad)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(bad) in err and "student.hidden_size" in err


def test_show_recipe_prints_resolved_yaml(capsys):
    assert cli.main(["show-recipe", str(ROOT / "recipes/toy_sd15.yaml"), "training.max_steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["teacher"]["source"] == "toy:sd15"  # from the child
    assert shown["student"]["preset"] == "S/2"  # from the parent
    assert shown["training"]["max_steps"] == 7  # from the command line


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(ROOT / "recipes/toy.yaml"), "output.dir=out", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "toy:sdxl" in out and "dry run" in out
    assert list(tmp_path.iterdir()) == []


def test_seed_training_flags_map_to_recipe_keys():
    args = cli.build_parser().parse_args([
        "train", "--data_root", "/data", "--output_dir", "/out", "--model_size", "3b", "--batch_size", "2",
        "--learning_rate", "2e-5", "--num_epochs", "10", "--use_aspect_ratio_bucket", "--train_vae",
        "--train_text_encoder", "--mixed_precision", "--use_ema",
    ])
    ov = cli.seed_flags_to_overrides(args)
    from sitdistill.core.recipe import load_recipe

    r = load_recipe(args.recipe, ov)
    assert r.data.root == "/data" and r.output.dir == "/out" and r.student.preset == "3b"
    assert r.training.batch_size == 2 and r.optimizer.lr == pytest.approx(2e-5)
    assert r.training.num_epochs == 10 and r.training.max_steps is None
    assert r.data.bucket and r.training.train_vae and r.training.train_text_encoder and r.training.use_ema
    assert r.training.mixed_precision == "bf16"


def test_absent_seed_flags_keep_the_recipe():
    args = cli.build_parser().parse_args(["train"])
    assert cli.seed_flags_to_overrides(args) == []


@pytest.mark.parametrize("argv", [["eval", "nowhere"], ["export", "nowhere", "--out", "x"], ["sample", "--checkpoint", "nowhere"]])
def test_missing_checkpoint_is_a_one_line_usage_error(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_toy_teacher_options_are_the_builders(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["toy-teacher", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--family" in out and "--eval" in out


def test_toy_teacher_options_reach_the_builder(monkeypatch, tmp_path):
    from sitdistill.teachers import toy_cli

    seen = {}
    monkeypatch.setattr(toy_cli, "run", lambda args: seen.update(vars(args)))
    assert cli.main(["toy-teacher", "--family", "sdxl", "--out", str(tmp_path), "--eval", "4"]) == 0
    assert seen["family"] == "sdxl" and str(seen["out"]) == str(tmp_path) and seen["eval"] == 4


def test_every_flag_has_one_convention_and_both_spellings():
    """The seed's underscores everywhere, the hyphen spelling as an alias, `--output_dir` for every
    output folder (`--out` kept): checked on every subcommand, the toy builder's included."""
    import argparse

    from sitdistill import cli
    from sitdistill.teachers import toy_cli as toy

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)

    root = cli.build_parser()
    seen_out = set()
    for p in list(parsers(root)) + [cli.both_spellings(toy.build_parser())]:
        for a in p._actions:
            longs = [o for o in a.option_strings if o.startswith("--")]
            for o in longs:
                body = o[2:]
                assert p._option_string_actions.get("--" + body.replace("-", "_")) is a, (p.prog, o)
                assert p._option_string_actions.get("--" + body.replace("_", "-")) is a, (p.prog, o)
            if longs and "_" in longs[0][2:] + "_":  # the first (help) spelling has no hyphen
                assert "-" not in longs[0][2:], (p.prog, longs)
            if "--out" in longs:
                assert p._option_string_actions["--output_dir"] is a
                seen_out.add(p.prog.split()[-1])
    assert {"study", "eval", "export", "toy-teacher"} <= seen_out
    args = root.parse_args(["study", "--output-dir", "x", "--eval-every", "3", "--eval_prompts", "2"])
    assert (args.out, args.eval_every, args.eval_prompts) == ("x", 3, 2)


@pytest.mark.usefixtures("private_cache")
def test_bench_compare_times_both_sides_and_refuses_a_misspelt_key(tiny_teachers, capsys):
    tiny = [f"teacher.source={tiny_teachers['sd15']}", "student.hidden_size=32", "student.depth=2",
            "student.num_heads=2", "data.toy.num_images=8", "training.batch_size=2", "losses.feature=0"]
    code = cli.main(["bench", *tiny, "--compare", "optimizer.name=muon", "--rounds", "1", "--steps", "1"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    table = out[out.index("toy step, 1 alternating rounds of 1 steps:"):]
    assert table[1].startswith("  as it is:") and table[1].endswith("ratio 1.000")
    assert table[2].startswith("  optimizer.name=muon:") and "ms/step" in table[2]
    assert cli.main(["bench", *tiny, "--compare", "optimizer.nmae=muon"]) == 2
    assert "optimizer.nmae" in capsys.readouterr().err
    assert cli.main(["bench", "training.seed=1"]) == 2  # overrides are for the toy configuration, not mid
    assert "--configs toy" in capsys.readouterr().err
    assert cli.main(["bench", *tiny, "--compare", "training.mixed_precision=bf16"]) == 2  # accelerate's is process-wide
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.mixed_precision" in err[0]


@pytest.mark.usefixtures("private_cache")
def test_bench_times_the_toy_configuration_with_overrides(tiny_teachers, capsys):
    """`bench key=value ... --configs toy` times the overridden recipe (the row's batch is the
    override's); a misspelt key exits 2 naming it."""
    tiny = [f"teacher.source={tiny_teachers['sd15']}", "student.hidden_size=32", "student.depth=2",
            "student.num_heads=2", "data.toy.num_images=8", "training.batch_size=3", "losses.feature=0"]
    assert cli.main(["bench", "--configs", "toy", "--steps", "1", "--warmup", "1", "--json", *tiny]) == 0
    out = capsys.readouterr().out
    row = json.loads(out[out.index("["):])[0]
    assert row["config"] == "toy" and row["batch_size"] == 3 and row["step_ms"] > 0
    assert cli.main(["bench", "training.batch_sise=3", "--configs", "toy"]) == 2
    assert "training.batch_sise" in capsys.readouterr().err
