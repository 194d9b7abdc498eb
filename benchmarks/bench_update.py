"""The weight update of one step (gradient clipping + AdamW + EMA), ours against the plain way.

    python benchmarks/bench_update.py [--presets S/2 B/2] [--repeats 20] [--threads 2]

Plain: `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW` with its default implementation, an
EMA that lerps tensor by tensor (what most training scripts write). Ours: the trainer's folded
clipping (`sitdistill.train.trainer.clip_gradients(fold=True)` + `step_optimizer`: the clip divisor applied
inside the fused AdamW kernel), fused AdamW (`sitdistill.train.build.build_optimizer`), and `sitdistill.train.ema.EMA`.
Both start from the same student and the same gradients (global norm above the clip limit, so
clipping acts), run interleaved after a warm-up, and must end with the same weights; the table
gives medians and ratio = plain / ours (> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import Accelerator  # noqa: E402

from sitdistill.train.build import build_optimizer  # noqa: E402
from sitdistill.train.ema import EMA  # noqa: E402
from sitdistill.core.recipe import load_recipe  # noqa: E402
from sitdistill.train.trainer import clip_gradients, step_optimizer  # noqa: E402
from sitdistill.students import build_student  # noqa: E402


def student(preset: str):
    torch.manual_seed(0)
    return build_student(preset, cond_dims={"encoder_hidden_states": 768})


def bench(preset: str, repeats: int) -> dict:
    acc = Accelerator(cpu=not torch.cuda.is_available())
    dev = acc.device
    cfg = load_recipe(None, ["optimizer.lr=1e-4"]).optimizer
    plain_model, ours_model = student(preset).to(dev), student(preset).to(dev)
    plain_params, ours_params = list(plain_model.parameters()), list(ours_model.parameters())
    plain_opt = torch.optim.AdamW(plain_params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    ours_opt = build_optimizer([{"params": ours_params}], cfg, dev)
    plain_ema = [p.detach().clone() for p in plain_params]
    ours_ema = EMA(ours_model, decay=0.999, warmup=False)
    g = torch.Generator(dev).manual_seed(0)
    grads = [torch.randn(p.shape, generator=g, device=dev) * 0.01 for p in plain_params]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain(step: int) -> float:
        for p, gr in zip(plain_params, grads):
            p.grad = gr.clone()
        sync()
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(plain_params, 1.0)
        plain_opt.step()
        with torch.no_grad():
            for s, p in zip(plain_ema, plain_params):
                s.lerp_(p, 1 - 0.999)
        sync()
        return time.perf_counter() - t0

    def ours(step: int) -> float:
        for p, gr in zip(ours_params, grads):
            p.grad = gr.clone()
        sync()
        t0 = time.perf_counter()
        _, divisor = clip_gradients(acc, ours_params, 1.0, fold=True)
        step_optimizer(ours_opt, divisor)
        ours_ema.update(ours_model, step)
        sync()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"plain": [], "ours": []}
    for i in range(repeats + 3):
        order = (("plain", plain), ("ours", ours)) if i % 2 else (("ours", ours), ("plain", plain))
        for name, fn in order:
            took = fn(i)
            if i >= 3:  # warm-up
                times[name].append(took)
    weights = max((a - b).abs().max().item() for a, b in zip(plain_params, ours_params))
    shadow = max((a - b).abs().max().item() for a, b in zip(plain_ema, ours_ema.model.parameters()))
    p_ms, o_ms = (statistics.median(times[k]) * 1e3 for k in ("plain", "ours"))
    return {"preset": preset, "params_M": sum(p.numel() for p in ours_params) / 1e6, "device": str(dev),
            "plain_ms": p_ms, "ours_ms": o_ms, "ratio": p_ms / o_ms, "max_weight_diff": weights,
            "max_ema_diff": shadow}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["S/2"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'preset':>6} {'params M':>9} {'plain ms':>9} {'ours ms':>8} {'ratio':>6} {'max |dw|':>9} {'max |dema|':>10}")
    for preset in args.presets:
        r = bench(preset, args.repeats)
        print(f"{r['preset']:>6} {r['params_M']:>9.1f} {r['plain_ms']:>9.1f} {r['ours_ms']:>8.1f} {r['ratio']:>6.2f} "
              f"{r['max_weight_diff']:>9.1e} {r['max_ema_diff']:>10.1e}")
        if max(r["max_weight_diff"], r["max_ema_diff"]) > 1e-5:
            raise SystemExit(f"{preset}: the two updates ended with different weights")
    print(f"device: {r['device']}; clip + AdamW + EMA per step, medians of {args.repeats} interleaved runs; "
          "ratio = plain / ours; max |dw|, |dema|: largest weight difference at the end (must be < 1e-5)")


if __name__ == "__main__":
    main()
