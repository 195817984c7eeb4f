"""Section 9: K variants of one run scored as one group (their shared first blocks once per batch) vs one by one.

    python bench/bench.py --only grouped [--grouped-limit 24]

Why: every variant that removes the same run of blocks (LS, its ridge and diagonal forms, UIDL, cosine, another
calibration set, ...) computes the same hidden states in the blocks before the run. `evaluate_many(models, ...)`
checks that by content hash (`evaluation.prefix.block_hashes`) and, on the packed path, runs those blocks once per batch
for the whole group (`shared_context.GroupedHFLM`). This section measures what that buys:

* K = 6 variants at the cpu profile's pick (blocks 11–18 removed, T folded into block 10, so blocks 0–9 are shared),
  built once with `prune(PruneConfig(num_blocks=8, start=11, ...))` on a small calibration set and saved;
* the cpu profile's main-suite tasks, first `--grouped-limit` documents each, batch 16, as the Workbench scores them;
* `evaluate_many(models, use_cache=False, group=False)` and `group=True`, alternated (one by one, grouped, one by one,
  grouped), each in a fresh process under `REPLACEME_CACHE` pointing at a fresh directory (assets linked in, no result,
  request or task cache), models loaded and an untimed one-document warm-up before the timed call; best of 2 each;
* per-document numbers (accuracies, log-likelihoods, gold margins) compared between every run;
* the compute bound from block counts, head included: one by one costs K·((L−n)·B + h·H) block-token forwards, grouped
  (s−1)·B + K·((L−n−s+1)·B + h·H), where B = tokens entering block 0 per model (padding included, counted), H = positions
  through the head, h = the head's FLOPs in blocks (2·d·V ÷ a block's 2 × its weights, from the config);
* peak RSS (VmHWM) of each process, and the prefix states the group keeps per batch.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

from common import MODEL, calib_batches, child_main, load, log, maxrss_mib, rss_mib, run_child, yes

KEY = "grouped"
START, NUM_BLOCKS = 11, 8  # the cpu profile's pick: blocks 11-18, T folded into block 10
TASKS = ("arc_easy", "hellaswag", "piqa", "sciq", "lambada_openai")  # the cpu profile's main suite
BATCH = 16
TARGET = 0.90  # measured speed-up ÷ compute bound
TOL = 1e-4  # nats: per-document log-likelihoods and margins, grouped vs one by one
# (name, PruneConfig fields, calibration seed): the variants of one run that the notebooks compare
VARIANTS = (
    ("LS", {}, 0),
    ("LS ridge", {"ridge": 1.0}, 0),
    ("LS diagonal", {"structure": "diagonal"}, 0),
    ("UIDL", {"method": "uidl"}, 0),
    ("cosine (1 epoch)", {"method": "cosine", "epochs": 1}, 0),
    ("LS, other calibration", {}, 1),
)
# cache folders a run derives (scored afresh); every other folder of the cache (models, benchmarks, ...) is linked in
DERIVED = {"eval", "requests", "tasks", "stats", "check"}
SCHEDULE = ("one_by_one", "grouped", "one_by_one", "grouped")


# ------------------------------------------------------------------------------------------------ children
def build(spec: dict) -> dict:
    """Prune the variants and save each as a checkpoint under spec["dir"]."""
    from replaceme_core.merge import save_checkpoint
    from replaceme_core.prune import PruneConfig, calibrate, prune
    from replaceme_core.select import Run

    model, tok = load()
    calib = {seed: calib_batches(tok, spec["samples"], spec["max_length"], seed=seed) for seed in {v[2] for v in VARIANTS}}
    ls_sums = {}  # one capture of the run's LS sums per calibration set, shared by its LS variants
    out = {}
    for i, (name, cfg, seed) in enumerate(VARIANTS):
        t = time.perf_counter()
        if cfg.get("method", "ls") == "ls" and seed not in ls_sums:
            ls_sums[seed] = calibrate(model, calib[seed], ls_runs=[Run(START, NUM_BLOCKS)], progress=False)
        result = prune(copy.deepcopy(model), calib[seed], PruneConfig(num_blocks=NUM_BLOCKS, start=START, **cfg),
                       calibration=ls_sums.get(seed) if cfg.get("method", "ls") == "ls" else None, progress=False)
        seconds = time.perf_counter() - t
        path = Path(spec["dir"]) / f"variant-{i}"
        save_checkpoint(result.model, tok, path, result.record, overwrite=True)
        out[name] = {"path": str(path), "prune_s": seconds, "removed": result.record["removed_blocks"],
                     "tokens": sum(int(b["attention_mask"].sum()) for b in calib[seed])}
    return out


def score(spec: dict) -> dict:
    """Load the variants, warm up, then time one `evaluate_many` over all of them (grouped or one by one)."""
    os.environ["REPLACEME_CACHE"] = spec["cache"]
    import torch

    from eval_backend import Counter
    from replaceme_core.evaluation import runner, shared_context
    from replaceme_core.evaluation.prefix import model_groups
    from replaceme_core.io.models import load_model

    loaded = [load_model(p, dtype=torch.float32, device="cpu") for p in spec["paths"]]
    models, tok = [m for m, _ in loaded], loaded[0][1]
    for model in models:  # in memory, as the Workbench's variants are: a memory-mapped checkpoint would page in its
        for t in (*model.parameters(), *model.buffers()):  # weights during the timed call (tied weights stay tied)
            t.data = t.data.clone()
    rss_after_load = rss_mib()
    kw = dict(tokenizer=tok, tasks=list(spec["tasks"]), batch_size=BATCH, device="cpu", use_cache=False, progress=False,
              per_doc_fields=("margin",))
    runner.evaluate_many(models[:1], limit=1, group=False, **kw)  # first-call costs stay out of the timing

    member_s, prefix_bytes = [], []  # what each model's lm-eval turn took; the prefix states kept per batch
    score_turn, keep_prefix = runner._score, shared_context.prefix_output

    def timed_turn(*args, **kwargs):
        t = time.perf_counter()
        try:
            return score_turn(*args, **kwargs)
        finally:
            member_s.append(time.perf_counter() - t)

    def kept_prefix(*args, **kwargs):
        out = keep_prefix(*args, **kwargs)
        states = out[0] if isinstance(out, tuple) else out
        prefix_bytes.append([states.numel() * states.element_size(), list(states.shape)])
        return out

    runner._score, shared_context.prefix_output = timed_turn, kept_prefix
    counter = Counter(models[0])
    try:
        t = time.perf_counter()
        results = runner.evaluate_many(models, limit=spec["limit"], group=spec["grouped"], **kw)
        seconds = time.perf_counter() - t
    finally:
        runner._score, shared_context.prefix_output = score_turn, keep_prefix
        counter.remove()
    block_tokens, head_positions = counter.take()
    peak = maxrss_mib()
    from replaceme_core.evaluation import model_ref, prefix

    prefix._BLOCK_HASHES.clear()  # the call remembered every model's hashes: time the content check afresh
    model_ref._TENSOR_DIGESTS.clear()
    t = time.perf_counter()
    groups = model_groups(models, list(range(len(models))))  # the content check alone: every weight hashed
    hash_s = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mib": peak, "rss_after_load_mib": rss_after_load, "member_s": member_s,
            "block_tokens_model0": block_tokens, "head_positions_model0": head_positions, "prefix_bytes": prefix_bytes,
            "groups": groups, "hash_s": hash_s,
            "per_doc": [{b: r["tasks"][b]["per_doc"] for b in r["tasks"]} for r in results],
            "values": [{b: r["tasks"][b]["value"] for b in r["tasks"]} for r in results]}


def child(spec: dict) -> dict:
    return build(spec) if spec["do"] == "build" else score(spec)


# ------------------------------------------------------------------------------------------------ measurement
def fresh_cache(work: Path) -> Path:
    """A cache root whose asset folders link to the real cache's and whose derived folders start empty."""
    from replaceme_core.io.cache import cache_dir

    real, root = cache_dir(), work / "cache"
    root.mkdir()
    for entry in real.iterdir():
        if entry.name not in DERIVED:
            (root / entry.name).symlink_to(entry)
    return root


def block_flops(config) -> dict:
    """Per-token FLOPs of one Llama-style block and of the head, from the config (2 × the weights each multiplies)."""
    d, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    block = 2 * (d * q + 2 * d * kv + q * d + 3 * d * inter)
    return {"block": block, "head": 2 * d * vocab, "head_in_blocks": 2 * d * vocab / block, "d": d, "vocab": vocab}


def compute_bound(K: int, kept: int, shared: int, B: int, H: int, head_in_blocks: float) -> dict:
    """One by one ÷ grouped, in block-token forwards: K·(kept·B + h·H) vs shared·B + K·((kept − shared)·B + h·H)."""
    one = K * (kept * B + head_in_blocks * H)
    grouped = shared * B + K * ((kept - shared) * B + head_in_blocks * H)
    return {"one_by_one": one, "grouped": grouped, "bound": one / grouped,
            "blocks_only": K * kept / (shared + K * (kept - shared))}


def compare(a: list[dict], b: list[dict]) -> dict:
    """max |Δ| of the per-document log-likelihoods and margins; whether every other per-document field is equal."""
    dmax, same = 0.0, True
    for ma, mb in zip(a, b, strict=True):
        for task, fa in ma.items():
            fb = mb[task]
            for field, va in fa.items():
                vb = fb[field]
                if field in ("loglikelihood", "margin"):
                    dmax = max([dmax] + [abs(x - y) for x, y in zip(va, vb, strict=True)])
                else:
                    same = same and va == vb
    return {"max_abs_diff": dmax, "other_fields_equal": same}


def measure(limit: int, quick: bool) -> dict:
    from transformers import AutoConfig

    from replaceme_core.assets import resolve_model

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    sizes = {"samples": 8, "max_length": 160} if quick else {"samples": 16, "max_length": 256}
    config = AutoConfig.from_pretrained(resolve_model(MODEL))
    with tempfile.TemporaryDirectory(prefix="replaceme-bench-grouped-") as work:
        cache = fresh_cache(Path(work))
        variants = run_child("grouped.py", {"do": "build", "dir": work, **sizes})
        log(f"grouped: built {len(variants)} variants (" + ", ".join(f"{n} {v['prune_s']:.1f}s" for n, v in variants.items()) + ")")
        paths = [v["path"] for v in variants.values()]
        runs = {"one_by_one": [], "grouped": []}
        for mode in SCHEDULE:
            r = run_child("grouped.py", {"do": "score", "grouped": mode == "grouped", "paths": paths, "limit": limit,
                                         "tasks": list(TASKS), "cache": str(cache)})
            runs[mode].append(r)
            log(f"grouped: {mode} {r['seconds']:.1f}s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    reference = runs["one_by_one"][0]["per_doc"]
    agreement = [compare(reference, r["per_doc"]) for mode in runs for r in runs[mode]]
    best = {mode: min(runs[mode], key=lambda r: r["seconds"]) for mode in runs}
    K, L = len(VARIANTS), config.num_hidden_layers
    kept = L - NUM_BLOCKS
    (members, shared), = [g for g in best["grouped"]["groups"] if len(g[0]) > 1] or [([0], 0)]
    f = block_flops(config)
    ref = best["one_by_one"]
    bound = compute_bound(K, kept, shared, ref["block_tokens_model0"], ref["head_positions_model0"], f["head_in_blocks"])
    speedup = best["one_by_one"]["seconds"] / best["grouped"]["seconds"]
    prefix = [b for b, _ in best["grouped"]["prefix_bytes"]]
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "limit": limit, "tasks": list(TASKS),
        "batch_size": BATCH, "calibration": sizes, "variants": variants, "K": K, "layers": L, "kept": kept, "start": START,
        "group_members": members, "shared_blocks": shared, "flops": f, "bound": bound,
        "seconds": {mode: [r["seconds"] for r in rs] for mode, rs in runs.items()}, "speedup": speedup,
        "frac_bound": speedup / bound["bound"], "target_met": speedup / bound["bound"] >= TARGET,
        "peak_rss_mib": {mode: best[mode]["peak_rss_mib"] for mode in runs},
        "rss_after_load_mib": {mode: best[mode]["rss_after_load_mib"] for mode in runs},
        "member_s": {mode: best[mode]["member_s"] for mode in runs}, "hash_s": best["grouped"]["hash_s"],
        "block_tokens": ref["block_tokens_model0"], "head_positions": ref["head_positions_model0"],
        "prefix_batches": len(prefix), "prefix_max_bytes": max(prefix, default=0),
        "prefix_mean_bytes": sum(prefix) / len(prefix) if prefix else 0,
        "agreement": {"max_abs_diff": max(a["max_abs_diff"] for a in agreement),
                      "other_fields_equal": all(a["other_fields_equal"] for a in agreement), "runs": len(agreement)},
        "values": best["one_by_one"]["values"],
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ report
def summary_rows(R: dict) -> list[str]:
    G = R[KEY]
    return [f"| 9 | {G['K']} variants of one run: one by one ÷ grouped (shared blocks once per batch), ÷ its compute "
            f"bound {G['bound']['bound']:.2f}× | {G['frac_bound']:.0%} ({G['speedup']:.2f}×) | ≥ {TARGET:.0%} | "
            f"{yes(G['target_met'])} |"]


def section(R: dict) -> list[str]:
    G = R[KEY]
    f, b, a = G["flops"], G["bound"], G["agreement"]
    s, kept, K = G["start"], G["kept"], G["K"]
    rows = []
    for mode, label in (("one_by_one", "one by one (`group=False`)"), ("grouped", "grouped (`group=True`)")):
        secs, peak, base = G["seconds"][mode], G["peak_rss_mib"][mode], G["rss_after_load_mib"][mode]
        turns = G["member_s"][mode]
        rows.append(f"| {label} | {', '.join(f'{x:.1f}' for x in secs)} | {min(secs):.1f} | "
                    f"{', '.join(f'{x:.1f}' for x in turns)} | {peak:.0f} MiB | {peak - base:.0f} MiB |")
    return [
        "## 9. Grouped evaluation: variants that share their first blocks", "",
        f"`bench/grouped.py` (its own run: {G['date_utc']}, {G['wall_s']:.0f} s, load average {G['loadavg_start'][0]:.2f} → "
        f"{G['loadavg_end'][0]:.2f}). {K} variants of one run at the cpu profile's pick — blocks {s}–{s + 7} removed, T "
        f"folded into block {s - 1}: {', '.join(G['variants'])} — pruned once on {G['calibration']['samples']} wiki samples × "
        f"≤{G['calibration']['max_length']} tokens and saved. Each scored on {', '.join(G['tasks'])} (first {G['limit']} "
        f"documents each, batch {G['batch_size']}) by `evaluate_many(models, use_cache=False, group=...)`, one by one and "
        "grouped alternately, each run in a fresh process with a fresh `REPLACEME_CACHE` (assets linked in, nothing "
        "scored cached), models loaded and a one-document warm-up before the timed call; best of each. The content check "
        f"found one group of {len(G['group_members'])} sharing {G['shared_blocks']} blocks (hashing every weight of the "
        f"{K} models: {G['hash_s']:.1f} s, inside the grouped time).",
        "",
        "| | wall s (each run) | best | lm-eval turn per model, best run (s) | peak RSS (VmHWM) | peak − RSS after load |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Compute bound: per model B = {G['block_tokens']} tokens enter block 0 (padding included) and H = "
        f"{G['head_positions']} positions the head; the head is 2·d·V = {f['head'] / 1e6:.0f} MFLOP per position = "
        f"{f['head_in_blocks']:.2f} blocks of {f['block'] / 1e6:.1f} MFLOP per token (from the config). One by one: "
        f"K·({kept}·B + {f['head_in_blocks']:.2f}·H); grouped: {G['shared_blocks']}·B + K·({kept - G['shared_blocks']}·B + "
        f"{f['head_in_blocks']:.2f}·H) → **bound {b['bound']:.2f}×** (blocks alone: K·{kept} ÷ ({G['shared_blocks']} + "
        f"K·{kept - G['shared_blocks']}) = {b['blocks_only']:.2f}×). Measured **{G['speedup']:.2f}× = {G['frac_bound']:.0%} "
        f"of the bound** (target ≥ {TARGET:.0%}: {yes(G['target_met'])}).",
        "",
        f"Same numbers: over {a['runs']} runs, per-document log-likelihoods and gold margins differ by at most "
        f"{a['max_abs_diff']:.1e} (tolerance {TOL:g}); accuracies and every other per-document field "
        f"{'identical' if a['other_fields_equal'] else '**DIFFERENT**'}. Cached prefix states: block "
        f"{G['shared_blocks'] - 1}'s output on the batch being scored, packed tokens × d × 4 bytes = at most "
        f"{G['prefix_max_bytes'] / 2**20:.2f} MiB (mean {G['prefix_mean_bytes'] / 2**20:.2f} MiB over "
        f"{G['prefix_batches']} batches), one batch at a time.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(child_main(child))
