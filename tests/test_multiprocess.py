"""Two processes (gloo on CPU, as `accelerate launch --multi_gpu` runs them): ranks stay in step,
hold identical weights after training, and only the main process writes. With `training.fsdp`
the student and its EMA are sharded (FSDP2): the run gives the DDP run's weights, its checkpoints
hold full weights, and it resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS
from safetensors.torch import load_file

from tiny_models import make_tiny_sd15

ROOT = Path(__file__).resolve().parent.parent


def launch(tmp: Path, teacher: Path, run: Path, port: int, *extra: str, worker_args=()) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", SITDISTILL_CACHE=str(tmp / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(ROOT / "tests" / "mp_worker.py"), *worker_args, str(tmp),
           str(ROOT / "recipes" / "toy.yaml"), f"teacher.source={teacher}", f"output.dir={run}",
           "student.hidden_size=32", "student.depth=2", "student.num_heads=2", "data.toy.num_images=40",
           "losses.features.student_blocks=[1]",
           "training.batch_size=4", "training.max_steps=4", "training.checkpoint_every=2",
           "training.sample_every=0", "losses.perturb=0.5", "losses.perturbations.input_noise.enabled=true",
           # weights that move, and clipping that acts (the sharded grad norm is a gathered one); AdamW,
           # which FSDP takes (Muon needs whole matrices)
           "training.mixed_precision=no",  # float32 on every CPU (the toy recipe's auto is bf16 on some)
           "optimizer.name=adamw", "optimizer.lr=3e-3", "optimizer.warmup_steps=0", "training.max_grad_norm=0.05",
           "training.gradient_accumulation_steps=2", "evaluation.at_end=0", *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def ranks(tmp: Path) -> list[dict]:
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


def weights(checkpoint: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / part / WEIGHTS)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    teacher = make_tiny_sd15(tmp / "teacher", vae_blocks=3)
    launch(tmp, teacher, tmp / "run", 29517)
    return tmp, teacher


def test_two_processes_keep_identical_weights(ddp_run):
    tmp, _ = ddp_run
    r0, r1 = ranks(tmp)
    assert [r0["world"], r1["world"]] == [2, 2]
    assert r0["digest"] == r1["digest"]
    assert r0["step"] == r1["step"] == 4
    assert r0["batches"] == r1["batches"]  # buckets shard evenly
    # Only the main process wrote checkpoints, and each exactly once.
    run = tmp / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(run.glob(".tmp-*"))


def test_fsdp_trains_like_ddp_saves_full_weights_and_resumes_exactly(ddp_run, tmp_path):
    from sitdistill.students import SiT

    ddp_tmp, teacher = ddp_run
    run = tmp_path / "run"
    launch(tmp_path, teacher, run, 29518, "training.fsdp=true", worker_args=("--resume-from", "2"))
    r0, r1 = ranks(tmp_path)
    assert r0["fsdp"] and r1["fsdp"] and r0["step"] == r1["step"] == 4
    assert r0["digest"] != r1["digest"]  # each rank holds its own shard
    ddp = ddp_tmp / "run" / "checkpoint-4"
    for part in ("student", "ema"):
        full, ref = weights(run / "checkpoint-4", part), weights(ddp, part)
        start = weights(ddp_tmp / "run" / "checkpoint-2", part)
        assert full.keys() == ref.keys()
        # The same training as DDP (same data, noise, clipping and AdamW), up to summation order.
        for k in ref:
            assert full[k].shape == ref[k].shape
            torch.testing.assert_close(full[k], ref[k], rtol=1e-5, atol=1e-6)
        assert max((ref[k] - start[k]).abs().max() for k in ref) > 1e-3  # the weights did move
        # Resumed from checkpoint-2 (sharded again from full weights and a full optimizer state):
        # the same weights as the straight run.
        resumed = weights(tmp_path / "run-resumed" / "checkpoint-4", part)
        for k in full:
            assert torch.equal(resumed[k], full[k]), (part, k)
    # The folder is an ordinary model folder; the optimizer state is keyed by parameter name.
    model = SiT.from_pretrained(run / "checkpoint-4" / "student")
    assert torch.equal(model.state_dict()["final_layer.linear.weight"],
                       weights(run / "checkpoint-4", "student")["final_layer.linear.weight"])
    opt = torch.load(run / "checkpoint-4" / "optimizer.pt", weights_only=True)
    # (the shipped toy recipe aligns features: its projector's state is keyed by name too)
    assert all(k.startswith(("student.", "projector_0.")) for k in opt["state"])
    assert any(k.startswith("student.") for k in opt["state"]) and any(k.startswith("projector_0.") for k in opt["state"])
    assert json.loads((run / "checkpoint-4" / "train_state.json").read_text())["fsdp"] is True
    for part in ("student", "ema"):  # the model's own class, not FSDP's wrapper class
        assert json.loads((run / "checkpoint-4" / part / "config.json").read_text())["_class_name"] == "SiT"
    assert all(json.loads((tmp_path / f"rank{r}-missing.json").read_text())["refused"] for r in (0, 1))
