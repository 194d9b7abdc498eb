"""Checkpoints: exact resume (2N straight == N + save + load + N), atomicity, rotation."""
import json
import random

import numpy as np
import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from sitdistill.core import checkpoint as ckpt
from sitdistill.core.checkpoint import (COMPLETE, find_latest, list_checkpoints, load_checkpoint, read_recipe,
                                resolve_resume, save_checkpoint)
from sitdistill.train.ema import EMA

STEPS = 3  # N
WARMUP_STEPS = 4
RECIPE = "model: tiny\nlr: 0.01\n"


class Tiny(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int = 4, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class Position:
    """A stand-in for the data sampler: a position that the step advances."""

    def __init__(self):
        self.index = 0

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build():
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    ema = EMA(model, decay=0.9)
    return dict(model=model, opt=opt, sched=sched, ema=ema, gen=torch.Generator(), pos=Position())


def train_step(run, step):
    """One step that draws from every random source a trainer uses."""
    x = torch.randn(8, 4)                                                 # global torch RNG
    noise = torch.from_numpy(np.random.randn(8, 4).astype(np.float32))   # numpy RNG
    scale = random.random()                                               # python RNG
    t = torch.randint(0, 10, (8,), generator=run["gen"]).float()          # explicit generator
    loss = (run["model"](x + scale * noise) - t[:, None] / 10).square().mean()
    loss.backward()
    run["opt"].step()
    run["opt"].zero_grad()
    run["sched"].step()
    run["ema"].update(run["model"], step)
    run["pos"].index += 8


def save(run, run_dir, step, **kw):
    return save_checkpoint(run_dir, step, models={"student": run["model"], "ema": run["ema"].model},
                           optimizer=run["opt"], lr_scheduler=run["sched"], train_state={"epoch": 0},
                           recipe_yaml=RECIPE, extra={"sampler": run["pos"]}, generators={"noise": run["gen"]},
                           **kw)


def assert_same_state(a, b):
    for (name, p), q in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(a["ema"].model.state_dict().values(), b["ema"].model.state_dict().values()):
        assert torch.equal(p, q)
    sa, sb = a["opt"].state_dict()["state"], b["opt"].state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert a["sched"].get_last_lr() == b["sched"].get_last_lr()
    assert a["pos"].index == b["pos"].index


def test_resume_continues_the_same_run_exactly(tmp_path):
    seed_everything(0)
    straight = build()
    straight["gen"].manual_seed(0)
    for step in range(2 * STEPS):
        train_step(straight, step)

    seed_everything(0)
    first = build()
    first["gen"].manual_seed(0)
    for step in range(STEPS):
        train_step(first, step)
    path = save(first, tmp_path, STEPS)

    seed_everything(123)  # a new process: other initial weights, other random states
    resumed = build()
    resumed["gen"].manual_seed(123)
    state = load_checkpoint(resolve_resume(tmp_path, "latest"),
                            models={"student": resumed["model"], "ema": resumed["ema"].model},
                            optimizer=resumed["opt"], lr_scheduler=resumed["sched"],
                            extra={"sampler": resumed["pos"]}, generators={"noise": resumed["gen"]})
    assert state == {"epoch": 0, "step": STEPS}
    for step in range(state["step"], 2 * STEPS):
        train_step(resumed, step)

    assert_same_state(straight, resumed)
    # The model folders are ordinary diffusers folders, and the recipe travels with the weights.
    reloaded = Tiny.from_pretrained(path / "ema")
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), first["ema"].model.parameters()))
    assert read_recipe(path) == RECIPE
    assert json.loads((path / COMPLETE).read_text())["step"] == STEPS


class Exploding(Tiny):
    """Writes part of its folder, then fails: a crash in the middle of a save."""

    def save_pretrained(self, folder, **kw):
        super().save_pretrained(folder, **kw)
        raise RuntimeError("disk full")


def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path):
    seed_everything(0)
    run = build()
    previous = save(run, tmp_path, 1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, models={"student": run["model"], "ema": Exploding()}, optimizer=run["opt"])
    assert find_latest(tmp_path) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no half folder left


def test_kill_before_rename_is_invisible_and_cleaned_up(tmp_path, monkeypatch):
    seed_everything(0)
    run = build()
    previous = save(run, tmp_path, 1)

    # A kill between writing the marker and the rename: no cleanup runs, the folder stays behind.
    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "_remove_tree", lambda path: None)
    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save(run, tmp_path, 2)
    monkeypatch.undo()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "checkpoint-1"]
    assert len(leftovers) == 1 and (leftovers[0] / COMPLETE).is_file()  # finished inside, but hidden
    assert find_latest(tmp_path) == previous
    assert resolve_resume(tmp_path, "latest") == previous
    with pytest.raises(FileNotFoundError):
        resolve_resume(tmp_path, leftovers[0])

    (tmp_path / "checkpoint-7").mkdir()  # a folder without the marker is never "latest"
    assert find_latest(tmp_path) == previous
    save(run, tmp_path, 3)
    assert not leftovers[0].exists()  # the next save removes what the killed one left


def test_rotation_keeps_last_k_and_same_step_is_replaced(tmp_path):
    seed_everything(0)
    run = build()
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: a fresh run
    for step in (10, 20, 30, 40):
        save(run, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-40"]

    run["pos"].index = 99  # a run resumed from 30 reaches 40 again: its save wins
    save(run, tmp_path, 40, keep_last=2)
    assert (tmp_path / "checkpoint-40" / "state" / "sampler.pt").is_file()
    fresh = Position()
    load_checkpoint(tmp_path / "checkpoint-40", models={}, extra={"sampler": fresh}, restore_rng=False)
    assert fresh.index == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-30", "checkpoint-40"]


def test_only_the_main_process_writes(tmp_path):
    run = build()
    assert save(run, tmp_path / "run", 1, is_main_process=False) is None
    assert not (tmp_path / "run").exists()
