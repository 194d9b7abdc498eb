"""Two processes (gloo on CPU, as `accelerate launch --multi_gpu` runs them): ranks stay in step,
hold identical weights after training, and only the main process writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import make_tiny_sd15

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_keep_identical_weights(tmp_path):
    teacher = make_tiny_sd15(tmp_path / "teacher", vae_blocks=3)
    run = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", SITDISTILL_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", str(ROOT / "tests" / "mp_worker.py"), str(tmp_path),
           str(ROOT / "recipes" / "toy.yaml"), f"teacher.source={teacher}", f"output.dir={run}",
           "student.hidden_size=32", "student.depth=2", "student.num_heads=2", "data.toy.num_images=40",
           "training.batch_size=4", "training.max_steps=3", "training.checkpoint_every=2",
           "training.sample_every=0", "losses.perturb=0.5", "losses.perturbations.input_noise.enabled=true"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["batches"] == ranks[1]["batches"]  # buckets shard evenly
    # Only the main process wrote checkpoints, and each exactly once.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(run.glob(".tmp-*"))
