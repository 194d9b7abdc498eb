"""The toy teacher's build on two processes (sitdistill.teachers.toy_split): the worker's half of a
step's batch and this process's half add up to the whole batch's gradient, the worker computes
with the parameters as this process's optimizer leaves them, and a dead worker is an error."""
import json

import pytest
import torch

from sitdistill.data import toy as world
from sitdistill.teachers import toy as toy_teacher
from sitdistill.teachers.toy_split import HalfBatchWorker, split_rows

from test_toy import TINY


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models(family: str):
    settings = toy_teacher.ToyTeacherSettings(family=family, **TINY)
    tokenizers, encoders, unet, heads = toy_teacher.new_models(settings)
    assert heads  # both families build with the caption-words objective by default
    unet.train()
    for e in encoders:
        e.train()
    empty_ids = [toy_teacher._tokenize(t, [""]) for t in tokenizers]
    return tokenizers, {"family": family, "unet": unet, "encoders": encoders, "heads": heads,
                        "empty_ids": empty_ids, "caption_words": settings.caption_words}


def _batch(tokenizers, n: int = 6) -> dict:
    gen = torch.Generator().manual_seed(3)
    captions = world.prompts(n, seed=3)
    return {"x_t": torch.randn(n, 4, 8, 4, generator=gen), "t": torch.randint(0, 1000, (n,), generator=gen),
            "noise": torch.randn(n, 4, 8, 4, generator=gen), "weight": torch.rand(n, generator=gen) + 0.5,
            "drop": torch.tensor([False, True, False, False, True, False][:n]),
            "labels": toy_teacher._caption_labels(captions),
            "ids": [toy_teacher._tokenize(t, captions) for t in tokenizers],
            "height": 32, "width": 16, "mix": 1.0, "total": n}


def _grads(params):
    return [None if q.grad is None else q.grad.clone() for q in params]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_two_halves_add_up_to_the_whole_batch_and_the_worker_sees_each_update(family):
    tokenizers, models = _models(family)
    params = toy_teacher._model_params(models)
    batch = _batch(tokenizers)
    with HalfBatchWorker(toy_teacher._batch_loss, toy_teacher._worker_models, toy_teacher._worker_spec(models),
                         params) as worker:
        for update in range(2):
            for q in params:
                q.grad = None
            loss, words = toy_teacher._batch_loss(models, batch)
            loss.backward()
            whole = _grads(params)

            for q in params:
                q.grad = None
            worker.submit(split_rows(batch, 3, 6))
            first, first_words = toy_teacher._batch_loss(models, split_rows(batch, 0, 3))
            first.backward()
            second, second_words = worker.add_grads()
            split = _grads(params)

            assert first.item() + second == pytest.approx(loss.item(), rel=1e-5)
            assert (first_words.item() + second_words) / 2 == pytest.approx(words.item(), rel=1e-5)
            assert [g is None for g in split] == [g is None for g in whole]
            assert sum(g is not None for g in whole) > 0.9 * len(whole)
            for g_split, g_whole in zip(split, whole):
                if g_whole is not None:
                    torch.testing.assert_close(g_split, g_whole, rtol=1e-4, atol=1e-6)
            # An in-place update here (as the optimizer makes) is what the worker computes with next.
            with torch.no_grad():
                for q in params:
                    q.mul_(0.9).add_(0.01)


def test_a_dead_worker_is_an_error_not_a_hang():
    tokenizers, models = _models("sdxl")
    worker = HalfBatchWorker(toy_teacher._batch_loss, toy_teacher._worker_models, toy_teacher._worker_spec(models),
                             toy_teacher._model_params(models))
    try:
        worker.proc.kill()
        worker.proc.join(timeout=10)
        with pytest.raises(RuntimeError, match="worker"):
            worker.submit(split_rows(_batch(tokenizers), 3, 6))
            worker.add_grads()
    finally:
        worker.close()


def test_build_processes_policy(monkeypatch):
    s = toy_teacher.ToyTeacherSettings(family="sdxl")  # 4000 UNet steps
    short = toy_teacher.ToyTeacherSettings(family="sdxl", unet_steps=toy_teacher.SPLIT_MIN_STEPS - 1)
    assert toy_teacher.build_processes(s, 1) == 1 and toy_teacher.build_processes(short, 2) == 2
    with pytest.raises(ValueError, match="1 or 2 processes"):
        toy_teacher.build_processes(s, 3)
    for threads, settings, expected in [(2, s, 2), (2, short, 1), (1, s, 1), (8, s, 1)]:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        assert toy_teacher.build_processes(settings) == expected, (threads, settings.unet_steps)


def test_a_two_process_build_is_a_pipeline_and_the_same_on_every_run(tmp_path):
    from diffusers import UNet2DConditionModel

    settings = toy_teacher.ToyTeacherSettings(family="sdxl", **{**TINY, "unet_steps": 3})
    runs = [toy_teacher.build_toy_teacher(tmp_path / f"run{i}", settings, cache_dir=tmp_path / "cache", processes=2)
            for i in range(2)]
    assert torch.get_num_threads() == 1  # the thread count is restored after the split steps
    info = json.loads((runs[0] / toy_teacher.FINISHED_MARKER).read_text())
    assert info["processes"] == 2 and info["torch_threads"] == 1
    unets = [UNet2DConditionModel.from_pretrained(r / "unet") for r in runs]
    for (name, a), b in zip(unets[0].state_dict().items(), unets[1].state_dict().values()):
        assert torch.equal(a, b), name
    one = toy_teacher.build_toy_teacher(tmp_path / "one", settings, cache_dir=tmp_path / "cache", processes=1)
    assert json.loads((one / toy_teacher.FINISHED_MARKER).read_text())["processes"] == 1


def test_the_build_bench_times_both_sides(tmp_path, capsys):
    from sitdistill import cli
    from sitdistill.apps.bench import compare_build_processes

    out = compare_build_processes(steps=2, rounds=1, cache_dir=tmp_path, **{k: v for k, v in TINY.items()
                                                                            if k != "unet_steps"})
    lines = out.splitlines()
    assert "1 alternating rounds of 2 UNet steps" in lines[0]
    assert lines[1].startswith("  1 process: ") and lines[1].endswith("ratio 1.000")
    assert lines[2].startswith("  2 processes: ") and float(lines[2].rsplit(" ", 1)[1]) > 0
    assert "ms/step after a first step of" in lines[2]
    assert cli.main(["bench", "--teacher_build", "--steps", "1"]) == cli.EXIT_USAGE
    assert "--steps >= 2 (the first step is timed apart) and --rounds >= 1" in capsys.readouterr().err
