"""Section 6: capture time and peak memory vs calibration tokens, d and L, on random Llama models (fresh process per
point)."""
from __future__ import annotations

import math
import sys
import time

import torch

from common import child_main, log, maxrss_mib, rss_mib, run_child, yes

KEY = "scaling"


def child(spec: dict) -> dict:
    """One capture (distances + LS sums for every candidate run of n = L/4 — prune()'s one pass) on a random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from replaceme_core.prune import calibrate
    from replaceme_core.select import Run

    d, L, tokens = spec["d"], spec["L"], spec["tokens"]
    cfg = LlamaConfig(vocab_size=1024, hidden_size=d, intermediate_size=int(8 * d / 3) // 8 * 8, num_hidden_layers=L,
                      num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64), max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    seq, bs = 256, 8
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(math.ceil(tokens / (seq * bs))):
        ids = torch.randint(3, 1024, (bs, seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    n = max(1, L // 4)
    runs = [Run(s, n) for s in range(1, L - n + 1)]
    calibrate(model, batches[:1], distances=True, ls_runs=runs, progress=False)  # warm-up (allocator, kernels)
    base = rss_mib()
    t = time.perf_counter()
    calibrate(model, batches, distances=True, ls_runs=runs, progress=False)
    secs = time.perf_counter() - t
    return {"seconds": secs, "peak_rss_mib": maxrss_mib(), "rss_before_mib": base, "runs": len(runs),
            "params": sum(p.numel() for p in model.parameters())}


def fit_exponent(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def measure(quick: bool) -> dict:
    base = {"d": 256, "L": 8, "tokens": 4096}
    axes = {"tokens": [2048, 4096, 8192], "d": [128, 256, 512], "L": [4, 8, 16]}
    if quick:
        base = {"d": 64, "L": 4, "tokens": 1024}
        axes = {"tokens": [512, 1024, 2048], "d": [32, 64, 128], "L": [2, 4, 8]}
    cache, out = {}, {}
    for axis, values in axes.items():
        pts = []
        for v in values:
            spec = {**base, axis: v}
            key = (spec["d"], spec["L"], spec["tokens"])
            if key not in cache:
                cache[key] = run_child("scaling.py", spec)
                log(f"scale d={key[0]} L={key[1]} tokens={key[2]}: {cache[key]['seconds']:.2f}s, peak {cache[key]['peak_rss_mib']:.0f} MiB")
            pts.append((v, cache[key]))
        secs = [p["seconds"] for _, p in pts]
        peak = [p["peak_rss_mib"] for _, p in pts]
        inc = [max(p["peak_rss_mib"] - p["rss_before_mib"], 1.0) for _, p in pts]
        out[axis] = {"values": values, "seconds": secs, "peak_rss_mib": peak, "capture_rss_increment_mib": inc,
                     "time_exponent": fit_exponent(values, secs), "peak_rss_exponent": fit_exponent(values, peak),
                     "increment_exponent": fit_exponent(values, inc)}
    return {"base": base, "axes": out}


def summary_rows(R: dict) -> list[str]:
    sc = R[KEY]
    return [f"| 6 | capture memory vs calibration tokens (fitted exponent of peak RSS) | {sc['axes']['tokens']['peak_rss_exponent']:.3f} | ≈ 0 | {yes(abs(sc['axes']['tokens']['peak_rss_exponent']) < 0.1)} |"]


def section(R: dict) -> list[str]:
    sc = R[KEY]
    lines = [
        "## 6. Scaling", "",
        f"Capture = `calibrate(distances=True, ls_runs=<every run of n = L/4>)` (prune()'s one pass) on randomly initialised "
        f"Llama models (vocab 1024, head dim 64, random tokens, 256 per sequence, batch 8), base point d={sc['base']['d']}, "
        f"L={sc['base']['L']}, {sc['base']['tokens']} tokens; one axis varied at a time, fresh process per point. Exponents are "
        "least-squares slopes in log–log.",
        "",
        "| axis | values | time (s) | peak RSS (MiB) | capture RSS increment (MiB) | time exp. | peak RSS exp. | increment exp. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for axis, a in sc["axes"].items():
        lines.append(f"| {axis} | {a['values']} | {', '.join(f'{x:.2f}' for x in a['seconds'])} | {', '.join(f'{x:.0f}' for x in a['peak_rss_mib'])} | "
                     f"{', '.join(f'{x:.0f}' for x in a['capture_rss_increment_mib'])} | {a['time_exponent']:.2f} | {a['peak_rss_exponent']:.2f} | {a['increment_exponent']:.2f} |")
    return lines + [
        "",
        "Expected shape: time ∝ tokens (forward and Gram updates are per token), memory independent of tokens (streaming "
        "float64 sums; batches are fixed-size); time and memory ∝ d² (weights, Gram matrices) at large d; time ∝ L and memory "
        "∝ L (one more block to run, one more candidate run of Gram sums per layer).",
        "",
    ]


if __name__ == "__main__":
    sys.exit(child_main(child))
