"""results.json and results.md of `cli.py bench --gpu` (`sitdistill.apps.bench_gpu`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Memory of the cards the levers are for (nvidia-smi totals, MiB), and what the CUDA context and
# allocator slack take beside the allocator's peak.
CARDS_MIB = {"24 GB (RTX 4090, A10G)": 24_564, "48 GB (L40S, RTX 6000 Ada)": 46_068}
CONTEXT_MIB = 1_024
OTHER = ("data", "conditioning", "noise", "other")  # folded into the table's "other"


def _f(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _step_cells(r: dict) -> list[str]:
    s = r["sections_ms"]
    return [_f(r["step_ms"]), _f(s["teacher"]), _f(s["student_forward"]), _f(s["backward"]), _f(s["optimizer"]),
            _f(s["ema"]), _f(sum(s[k] for k in OTHER)), _f(r["samples_per_s"], 1), _f(r["overhead_ratio"], 3),
            _f(r["peak_memory_MiB"] / 1024, 1), f"{r['student_tflop_per_step']:.3g}", _f(r["mfu"], 3)]


STEP_HEAD = ["step", "teacher", "student fwd", "backward", "optimizer", "EMA", "other", "samples/s", "overhead",
             "peak GiB", "student TFLOP/step", "MFU"]


def _error_cells(r: dict, width: int) -> list[str]:
    return [r["error"]] + [""] * (width - 1)


def main_table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        cells = _step_cells(r) if "error" not in r else _error_cells(r, len(STEP_HEAD))
        ckpt = {True: "on", False: "off"}.get(r.get("gradient_checkpointing"), "")
        out.append([r["config"], r.get("student", ""), ckpt, str(r["batch"])] + cells)
    return _table(["config", "student", "grad ckpt", "batch"] + STEP_HEAD, out)


def variant_lines(variants: list[dict]) -> list[str]:
    rows, lines = [], []
    for r in variants:
        if "error" in r:
            rows.append([r["config"], str(r["batch"]), r["variant"], r["error"], "", "", "", ""])
            continue
        s = r["sections_ms"]
        rows.append([r["config"], str(r["batch"]), r["variant"], _f(r["step_ms"]), _f(s["teacher"]),
                     _f(s["student_forward"] + s["backward"]), _f(r["samples_per_s"], 1),
                     _f(r.get("compile_and_run_s"), 0)])
    for config in dict.fromkeys(r["config"] for r in variants):
        ok = [r for r in variants if r["config"] == config and "error" not in r]
        default = next((r for r in ok if r["kind"] == "default"), None)
        sdpa = [r for r in ok if r["kind"] in ("default", "sdpa")]
        if sdpa:
            best = min(sdpa, key=lambda r: r["step_ms"])
            than = f"; default {default['step_ms']:.0f} ms" if default and best is not default else ""
            lines.append(f"- {config}, attention: **{best['variant']}** is fastest ({best['step_ms']:.0f} ms per "
                         f"step{than})")
        for kind, section in (("channels_last", "teacher"), ("compile", None)):
            other = next((r for r in ok if r["kind"] == kind), None)
            if other is None or default is None:
                continue
            if section == "teacher":
                a, b = default["sections_ms"]["teacher"], other["sections_ms"]["teacher"]
                what = "teacher forward"
            else:
                a = default["sections_ms"]["student_forward"] + default["sections_ms"]["backward"]
                b = other["sections_ms"]["student_forward"] + other["sections_ms"]["backward"]
                what = "student forward + backward"
            verdict = "wins" if b < a else "loses"
            lines.append(f"- {config}, {other['variant']} {verdict}: {what} {b:.0f} ms against {a:.0f} ms by default "
                         f"(step {other['step_ms']:.0f} vs {default['step_ms']:.0f} ms)")
    head = ["config", "batch", "variant", "step", "teacher", "student fwd+bwd", "samples/s", "compile + run s"]
    return _table(head, rows) + [""] + lines


def lever_lines(levers: list[dict]) -> list[str]:
    rows = []
    for r in levers:
        on = ", ".join(r.get("levers") or []) or "none"
        if "error" in r:
            rows.append([on, r["error"], "", ""])
        else:
            rows.append([on, _f(r["peak_memory_MiB"] / 1024, 1), _f(r["step_ms"]), _f(r["samples_per_s"], 2)])
    lines = _table(["levers on", "peak GiB", "step ms", "samples/s"], rows)
    trained = [r for r in levers if "error" not in r]
    if trained:
        best = min(trained, key=lambda r: r["peak_memory_MiB"])
        need = best["peak_memory_MiB"] + CONTEXT_MIB
        lines += ["", f"Smallest peak at which it trains: **{best['peak_memory_MiB'] / 1024:.1f} GiB**, with "
                  f"{', '.join(best['levers']) or 'no lever'}. Counting ~{CONTEXT_MIB} MiB of CUDA context:"]
        lines += [f"- {card}: {'fits' if need <= mib else 'does not fit'} ({need:.0f} of {mib} MiB)"
                  for card, mib in CARDS_MIB.items()]
    return lines


def reference_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["config"], r["student"], "", str(r["batch"]), r["error"], "", "", ""])
        else:
            out.append([r["config"], r["student"], str(r["latent"]), str(r["batch"]), _f(r["ours_ms"], 1),
                        _f(r["reference_ms"], 1), _f(r["ratio"], 2), f"{r['max_abs_diff_fp32']:.1e}"])
    return _table(["config", "preset", "latent", "batch", "ours ms", "reference ms", "ratio", "max |diff| fp32"], out)


def to_markdown(res: dict[str, Any]) -> str:
    peak = (f"{res['peak_bf16_tflops']:.0f} TFLOP/s dense bf16 (table entry {res['peak_table_key']!r})"
            if res["peak_bf16_tflops"] else "none known for this device, so MFU is not reported")
    lines = [f"# GPU benchmark ({res['profile']} profile)", "",
             f"Device: {res['device']}, torch {res['torch']}. Peak used for MFU: {peak}. The run took "
             f"{res.get('elapsed_s', 0):.0f} s of a {res['budget_s']:.0f} s budget.", ""]
    if res["profile"] == "tiny":
        lines += ["Stand-in sizes (`--tiny`): the shipped UNet configs shrunk, a 2-block SiT of width 64, 64 and "
                  "128 px images. These numbers test the code path; they say nothing about real sizes.", ""]
    lines += ["Times are ms per step of the trainer's own step (`Distiller.step`), mean of the timed steps after "
              "warm-up; \"other\" is data + conditioning + noise + what no section holds. Overhead = step / (teacher "
              "+ student forward + backward). Peak = `torch.cuda.max_memory_allocated` over the steps (teacher, "
              "student, EMA and optimizer state included; the process's peak RSS on a CPU). MFU = the student's "
              "analytic forward+backward FLOPs (all its forwards in the step) / (student forward + backward time) / "
              "the peak; with gradient checkpointing the recomputed forward is not counted.", "",
              "## Step time", ""] + main_table(res["rows"])
    if res.get("largest_batch"):
        lines += ["", "## Largest batch that fits (doubling, the recipe's gradient checkpointing)", ""]
        lines += _table(["config", "largest batch", "search ended"],
                        [[r["config"], str(r["largest"]), r["ended"]] for r in res["largest_batch"]])
        if res["max_batch"]:
            lines += ["", "Search steps (one warm-up, one timed step):", ""] + main_table(res["max_batch"])
    if res["variants"]:
        lines += ["", "## Variants (one trainer per setting, timed under each)", ""] + variant_lines(res["variants"])
    if res["levers"]:
        lines += ["", "## Memory levers: SDXL -> 2b, 1024 px, batch 1", ""] + lever_lines(res["levers"])
    if res["reference"]:
        lines += ["", "## Our student against the plain reference (benchmarks/bench_student.py)", "",
                  "Class-conditional (the reference has no text path), forward + backward under bf16 autocast, "
                  "median of interleaved runs; ratio = reference / ours (> 1: ours is faster).", ""]
        lines += reference_lines(res["reference"])
    if res["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(to_markdown(results))
