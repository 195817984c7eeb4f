"""Sections 1 and 2: the cost of compression against the bare forward (the physical limit) and against the official
algorithm's cost shape (bench/official_shape.py), on the same calibration tokens, interleaved."""
from __future__ import annotations

import time

import torch

from common import best, log, our_prune, real_tokens, yes

KEY = "cost"


def positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class _Stop(Exception):
    pass


@torch.no_grad()
def bare_forward(model, batches, through: int | None = None) -> float:
    """The physical limit: a plain no_grad forward over the same tokens through blocks 0..`through` (all if None);
    no LM head, no hooks except one that stops after block `through`."""
    layers = model.model.layers
    handle = None
    if through is not None and through < len(layers) - 1:
        def stop(*_):
            raise _Stop
        handle = layers[through].register_forward_hook(stop)
    t = time.perf_counter()
    try:
        for b in batches:
            try:
                model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            position_ids=positions(b["attention_mask"]), use_cache=False)
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()
    return time.perf_counter() - t


def measure(model, batches, reps: int, model_path) -> dict:
    """1: capture + LS solve vs the bare forward; 2: vs the official algorithm's cost shape."""
    from official_shape import official_shape_prune

    out = {"tokens": real_tokens(batches), "batches": len(batches)}
    bare, ours, fixed_bare, fixed_ours, official = [], [], [], [], []
    record = fixed_record = off = None
    for r in range(reps):
        bare.append(bare_forward(model, batches))
        s, res = our_prune(model, batches, num_blocks=8)
        if not ours or s < min(ours):
            record = res.record  # phases of the best repetition
        ours.append(s)
        del res
        start = record["removed_blocks"][0]
        fixed_bare.append(bare_forward(model, batches, through=start + 7))
        s, res = our_prune(model, batches, num_blocks=8, start=start)
        fixed_ours.append(s)
        fixed_record = res.record
        del res
        off = official_shape_prune(model, model_path, batches, 8)
        off.pop("model")
        official.append(off)
        log(f"cost rep {r}: bare {bare[-1]:.1f}s ours {ours[-1]:.1f}s | fixed: bare {fixed_bare[-1]:.1f}s ours {fixed_ours[-1]:.1f}s"
            f" | official shape {off['total_s']:.1f}s")
    off_best = min(official, key=lambda o: o["total_s"])
    out.update(
        bare_s=best(bare), ours_s=best(ours), ratio_limit=best(ours) / best(bare),
        ours_timings=record["timings"], removed=record["removed_blocks"],
        fixed_start=fixed_record["removed_blocks"][0], fixed_bare_s=best(fixed_bare), fixed_ours_s=best(fixed_ours),
        fixed_ratio_limit=best(fixed_ours) / best(fixed_bare), fixed_timings=fixed_record["timings"],
        official=off_best, official_removed=off_best["removed"],
        speedup_vs_official=off_best["total_s"] / best(ours),
        all={"bare": bare, "ours": ours, "fixed_bare": fixed_bare, "fixed_ours": fixed_ours,
             "official": [o["total_s"] for o in official]},
    )
    return out


def summary_rows(R: dict) -> list[str]:
    c = R[KEY]
    return [
        f"| 1 | (capture + LS solve) ÷ bare forward, full pipeline (selection + LS, 8 blocks) | {c['ratio_limit']:.2f} | ≤ 1.25 | {yes(c['ratio_limit'] <= 1.25)} |",
        f"| 1b | same, start given (capture stops after block {c['fixed_start'] + 7}) ÷ bare forward through the same blocks | {c['fixed_ratio_limit']:.2f} | ≤ 1.25 | {yes(c['fixed_ratio_limit'] <= 1.25)} |",
        f"| 2 | official cost shape ÷ ours (same tokens) | {c['speedup_vs_official']:.2f}× | ≥ 2× | {yes(c['speedup_vs_official'] >= 2)} |",
    ]


def section(R: dict) -> list[str]:
    c = R[KEY]
    off = c["official"]
    return [
        "## 1. Compression cost vs the physical limit", "",
        f"Bare forward = `model.model(...)` under `torch.no_grad()` over the same batches (all 30 blocks, no LM head): "
        f"{c['bare_s']:.2f} s. Our `prune(model, batches, PruneConfig(num_blocks=8))` — one pass collecting the distance "
        f"statistics and the LS sums of all 22 candidate runs, then selection, solve, fold: {c['ours_s']:.2f} s "
        f"(phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in c["ours_timings"].items()) + f"). Removed {c['removed']}.",
        "",
        f"With the start given (`start={c['fixed_start']}`), the capture stops after block {c['fixed_start'] + 7}: "
        f"{c['fixed_ours_s']:.2f} s vs {c['fixed_bare_s']:.2f} s for the bare forward through blocks 0–{c['fixed_start'] + 7}.",
        "",
        "## 2. Against the official algorithm's cost shape", "",
        "`bench/official_shape.py` re-implements the official pipeline's structure: (a) a full forward with "
        "`output_hidden_states=True` (LM head included) and last-token angular distances for every (layer, n); (b) a second "
        "full forward with a hook on the kept MLP, float64 MᵀM / MᵀR over all positions (pads included), `torch.linalg.inv`; "
        "(c) reload from disk, fold, delete.",
        "",
        "| pipeline | distance pass | LS pass | reload + fold | total | removed (0-based) |", "|---|---|---|---|---|---|",
        f"| official shape | {off['distance_pass_s']:.2f} s | {off['ls_pass_s']:.2f} s | {off['reload_fold_s']:.2f} s | {off['total_s']:.2f} s | {off['removed']} |",
        f"| ours (one pass) | — | — | — | {c['ours_s']:.2f} s | {c['removed']} |",
        "",
        f"Speedup {c['speedup_vs_official']:.2f}×. For scale, the official code itself (2-core CPU, float32, 64 samples × 256 "
        "tokens, 8 blocks) took 82 s (distance pass 42 s, LS pass 40 s; peak RSS 2.8 GB) and removed layers 2–9.",
        "",
    ]
