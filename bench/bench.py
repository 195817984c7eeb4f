"""`make bench`: cost of compression and speed of the result, as ratios measured side by side in one run.

    python bench/bench.py [--quick] [--out bench/RESULTS.md] [--only eval|lanes] [--eval-limit N]

Every ratio compares two things timed in the same process, interleaved (A B A B …, best of the repetitions),
so machine noise cancels as far as it can; absolute times are reported for scale only and never gated on.
Peak RSS is measured in a fresh subprocess per configuration (VmHWM from /proc/self/status), so
configurations do not contaminate each other. Results: bench/RESULTS.md (+ bench/results.json), written atomically.
Sections 7 (evaluation backend, bench/eval_backend.py) and 8 (make paper's lanes, bench/lanes.py) run in their own
processes; `--only eval` / `--only lanes` runs just that section and merges it into the existing results.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MODEL = "smollm2-135m-instruct"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def maxrss_mib() -> float:
    """Peak RSS of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child
    started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # fallback (KiB on Linux)


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def real_tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


# ------------------------------------------------------------------------------------------------ data/model
def load(dtype=torch.float32):
    from replaceme_core.io.models import load_model

    return load_model(MODEL, dtype=dtype, device="cpu")


def calib_batches(tokenizer, samples: int, max_length: int, batch_size: int = 8):
    from replaceme_core.io.data import load_texts, token_batches

    texts = load_texts("wiki", tokenizer, samples, seed=0)
    return list(token_batches(texts, tokenizer, batch_size=batch_size, max_length=max_length))


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


def our_prune(model, batches, **cfg):
    from replaceme_core.prune import PruneConfig, prune

    m = copy.deepcopy(model)
    t = time.perf_counter()
    result = prune(m, batches, PruneConfig(**cfg), progress=False)
    return time.perf_counter() - t, result


def best(xs):
    return min(xs)


# ------------------------------------------------------------------------------------------------ child processes
def child(spec: dict) -> dict:
    """Run one configuration in this (fresh) process; report seconds and peak RSS."""
    torch.manual_seed(0)
    kind = spec["kind"]
    if kind == "prune":
        model, tok = load()
        batches = calib_batches(tok, spec["samples"], spec["max_length"])
        base = rss_mib()
        secs, result = our_prune(model, batches, num_blocks=spec["num_blocks"], method=spec["method"],
                                 **spec.get("cfg", {}))
        return {"seconds": secs, "tokens": real_tokens(batches), "rss_after_load_mib": base, "peak_rss_mib": maxrss_mib(),
                "removed": result.record["removed_blocks"], "timings": result.record["timings"]}
    if kind == "generate":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
        base = rss_mib()
        ids = torch.tensor(spec["ids"])
        prefill, decode = generate_speed(model, ids, spec["new_tokens"], reps=1)
        return {"prefill_s": prefill, "decode_s": decode, "rss_after_load_mib": base, "peak_rss_mib": maxrss_mib()}
    if kind == "scale":
        return scale_point(spec)
    raise ValueError(kind)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ benchmarks
def bench_cost(model, batches, reps: int, model_path) -> dict:
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


def bench_cosine(samples: int, max_length: int) -> dict:
    """3: cosine path time ÷ LS time, and peak RSS at N and 2N calibration samples (fresh process each)."""
    rows = {}
    for mult in (1, 2):
        for method in ("ls", "cosine"):
            spec = {"kind": "prune", "method": method, "samples": samples * mult, "max_length": max_length, "num_blocks": 8}
            rows[(method, mult)] = run_child(spec)
            log(f"{method} × {mult}N: {rows[(method, mult)]['seconds']:.1f}s, peak RSS {rows[(method, mult)]['peak_rss_mib']:.0f} MiB")
    return {
        "N_tokens": rows[("ls", 1)]["tokens"], "2N_tokens": rows[("ls", 2)]["tokens"],
        "rows": {f"{m} {k}N": v for (m, k), v in rows.items()},
        "time_ratio_N": rows[("cosine", 1)]["seconds"] / rows[("ls", 1)]["seconds"],
        "time_ratio_2N": rows[("cosine", 2)]["seconds"] / rows[("ls", 2)]["seconds"],
        "rss_growth_cosine": rows[("cosine", 2)]["peak_rss_mib"] / rows[("cosine", 1)]["peak_rss_mib"],
        "rss_growth_ls": rows[("ls", 2)]["peak_rss_mib"] / rows[("ls", 1)]["peak_rss_mib"],
    }


def bench_sweep(model, batches, sweep: list[int]) -> dict:
    """4: LS solutions for every (start, n) of a compression sweep from ONE pass vs one prune() per sweep point."""
    from replaceme_core.prune import calibrate
    from replaceme_core.select import Run
    from replaceme_core.solve import solve_ls

    L = model.config.num_hidden_layers
    runs = [Run(s, n) for n in sweep for s in range(1, L - n + 1)]
    t = time.perf_counter()
    calib = calibrate(model, batches, distances=True, ls_runs=runs, progress=False)
    Ts = {run: solve_ls(calib.ls[run]) for run in runs}
    one_pass_s = time.perf_counter() - t
    log(f"sweep one pass: {len(runs)} runs in {one_pass_s:.1f}s")
    per_config, agree = [], []
    for n in sweep:
        s, res = our_prune(model, batches, num_blocks=n)
        per_config.append(s)
        rep = res.replacements[0]
        agree.append(float((Ts[rep.run] - rep.T).norm() / rep.T.norm()))
        del res
    log(f"sweep per-config: {per_config}")
    # Doing one capture per (start, n) instead: each stops after block start+n-1 → estimate from the bare forward
    frac = sum((r.start + r.n) / L for r in runs)
    return {"sweep_blocks": sweep, "runs": len(runs), "one_pass_s": one_pass_s, "one_pass_passes": 1,
            "per_config_s": sum(per_config), "per_config_passes": len(sweep), "per_config_each_s": per_config,
            "speedup": sum(per_config) / one_pass_s, "max_rel_diff_T": max(agree),
            "per_run_capture_equivalent_passes": frac, "memory_gram_mib": len(runs) * 2 * model.config.hidden_size ** 2 * 8 / 2**20}


@torch.no_grad()
def generate_speed(model, ids: torch.Tensor, new_tokens: int, reps: int = 3) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `new_tokens` greedy steps), best of `reps`."""
    pre, dec = [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        pre.append(time.perf_counter() - t)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        dec.append(time.perf_counter() - t)
    return min(pre), min(dec)


def bench_speed(model, pruned, tokenizer, workdir: Path, quick: bool) -> dict:
    """5: prefill / decode tokens/s and peak RSS, pruned vs original, against the ideal L/(L−n)."""
    from replaceme_core.io.data import load_texts
    from replaceme_core.merge import save_checkpoint

    L, Lp = model.config.num_hidden_layers, pruned.config.num_hidden_layers
    text = " ".join(load_texts("wiki", tokenizer, 64, seed=1))
    flat = tokenizer(text)["input_ids"]
    B, P, D = (2, 64, 8) if quick else (4, 256, 32)
    ids = torch.tensor(flat[: B * P]).reshape(B, P)
    times = {"orig": [], "pruned": []}
    for _ in range(1 if quick else 3):
        for name, m in (("orig", model), ("pruned", pruned)):
            times[name].append(generate_speed(m, ids, D, reps=1))
    pre = {k: min(t[0] for t in v) for k, v in times.items()}
    dec = {k: min(t[1] for t in v) for k, v in times.items()}
    ideal = L / Lp
    from replaceme_core.assets import resolve_model

    save_checkpoint(pruned, tokenizer, workdir / "pruned", {"bench": True}, overwrite=True)
    mem = {}
    for name, path in (("orig", resolve_model(MODEL)), ("pruned", str(workdir / "pruned"))):
        mem[name] = run_child({"kind": "generate", "path": str(path), "ids": ids.tolist(), "new_tokens": D})
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("orig", model), ("pruned", pruned))}
    return {
        "batch": B, "prompt": P, "new_tokens": D, "layers": [L, Lp], "ideal": ideal,
        "prefill_tok_s": {k: B * P / v for k, v in pre.items()}, "decode_tok_s": {k: B * D / v for k, v in dec.items()},
        "prefill_speedup": pre["orig"] / pre["pruned"], "decode_speedup": dec["orig"] / dec["pruned"],
        "prefill_frac_ideal": pre["orig"] / pre["pruned"] / ideal, "decode_frac_ideal": dec["orig"] / dec["pruned"] / ideal,
        "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in mem.items()}, "params": params,
    }


def scale_point(spec: dict) -> dict:
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


def bench_scaling(quick: bool) -> dict:
    """6: capture time and peak memory vs calibration tokens, d and L (fresh process per point)."""
    base = {"d": 256, "L": 8, "tokens": 4096}
    axes = {"tokens": [2048, 4096, 8192], "d": [128, 256, 512], "L": [4, 8, 16]}
    if quick:
        base = {"d": 64, "L": 4, "tokens": 1024}
        axes = {"tokens": [512, 1024, 2048], "d": [32, 64, 128], "L": [2, 4, 8]}
    cache, out = {}, {}
    for axis, values in axes.items():
        pts = []
        for v in values:
            spec = {**base, axis: v, "kind": "scale"}
            key = (spec["d"], spec["L"], spec["tokens"])
            if key not in cache:
                cache[key] = run_child(spec)
                log(f"scale d={key[0]} L={key[1]} tokens={key[2]}: {cache[key]['seconds']:.2f}s, peak {cache[key]['peak_rss_mib']:.0f} MiB")
            pts.append((v, cache[key]))
        secs = [p["seconds"] for _, p in pts]
        peak = [p["peak_rss_mib"] for _, p in pts]
        inc = [max(p["peak_rss_mib"] - p["rss_before_mib"], 1.0) for _, p in pts]
        out[axis] = {"values": values, "seconds": secs, "peak_rss_mib": peak, "capture_rss_increment_mib": inc,
                     "time_exponent": fit_exponent(values, secs), "peak_rss_exponent": fit_exponent(values, peak),
                     "increment_exponent": fit_exponent(values, inc)}
    return {"base": base, "axes": out}


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict:
    import accelerate
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "platform": platform.platform(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def bench_eval(limit: int) -> dict:
    """7: the evaluation backend (bench/eval_backend.py), in a fresh process: its own memory, threads and timings."""
    with tempfile.TemporaryDirectory(prefix="replaceme-bench-eval-") as work:
        out = Path(work) / "eval.json"
        proc = subprocess.run([sys.executable, str(HERE / "eval_backend.py"), "--limit", str(limit), "--json", str(out)],
                              stdout=subprocess.DEVNULL, check=False)  # its progress goes to our stderr; the table is rendered here
        if proc.returncode != 0:
            raise RuntimeError(f"bench/eval_backend.py --limit {limit} failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def bench_lanes(limit: int) -> dict:
    """8: make paper's lanes (bench/lanes.py), in fresh processes: two 1-thread lanes vs one 2-thread process."""
    with tempfile.TemporaryDirectory(prefix="replaceme-bench-lanes-") as work:
        out = Path(work) / "lanes.json"
        proc = subprocess.run([sys.executable, str(HERE / "lanes.py"), "--limit", str(limit), "--json", str(out)],
                              stdout=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/lanes.py --limit {limit} failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def lanes_summary_rows(R: dict) -> list[str]:
    if "lanes" not in R:
        return []
    L = R["lanes"]
    return [f"| 8 | make paper's lanes: work per wall second of two 1-thread processes ÷ one 2-thread process | "
            f"{L['ratio']:.2f}× | report (> 1: lanes win) | — |"]


def lanes_section(R: dict) -> list[str]:
    if "lanes" not in R:
        return []
    from lanes import render_section

    return render_section(R["lanes"], number=8)


def eval_summary_rows(R: dict) -> list[str]:
    if "eval_backend" not in R:
        return []
    from eval_backend import BASELINES, NAMES, TARGET

    E = R["eval_backend"]
    rows = []
    for i, base in enumerate(BASELINES):
        fr = [M["overall"]["frac_bound"][base] for M in E["models"].values()]
        rows.append(f"| 7{'b' * i} | eval requests/s, ours ÷ {NAMES[base]}, ÷ its compute bound ({'; '.join(E['models'])}) | "
                    f"{'; '.join(f'{x:.0%}' for x in fr)} | ≥ {TARGET:.0%} | {yes(E['target_met'][base])} |")
    return rows


def eval_section(R: dict) -> list[str]:
    if "eval_backend" not in R:
        return []
    from eval_backend import render_section

    return render_section(R["eval_backend"], number=7)


def render(R: dict) -> str:
    m, c, cos, sw, sp, sc = R["machine"], R["cost"], R["cosine"], R["sweep"], R["speed"], R["scaling"]
    off = c["official"]
    lines = [
        "# Benchmarks", "",
        f"Generated by `make bench` (`bench/bench.py{' --quick' if R['quick'] else ''}`) on {m['date_utc']} in {R['wall_s']:.0f} s.",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), {m['ram_gib']} GiB RAM, no GPU; "
        f"{m['platform']}. Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, accelerate {m['accelerate']}.",
        "",
        f"Load average (1 min) at start {R['loadavg_start'][0]:.2f}, at end {R['loadavg_end'][0]:.2f}: above ~0.5 other "
        f"processes shared the {m['cores']} cores and the ratios are noisier (torch's threads then oversubscribe).",
        "",
        "Ratios are of two things timed in the same process, interleaved, best of the repetitions; absolute seconds are "
        "for scale only. Peak RSS comes from a fresh subprocess per configuration. Model: SmolLM2-135M-Instruct, "
        f"float32, 30 blocks, d=576. Calibration: packaged `wiki`, {R['sizes']['samples']} samples × ≤{R['sizes']['max_length']} "
        f"tokens, batch 8 → {c['tokens']} real tokens in {c['batches']} batches.",
        "",
        "## Summary", "",
        "| # | ratio | measured | target | |", "|---|---|---|---|---|",
        f"| 1 | (capture + LS solve) ÷ bare forward, full pipeline (selection + LS, 8 blocks) | {c['ratio_limit']:.2f} | ≤ 1.25 | {yes(c['ratio_limit'] <= 1.25)} |",
        f"| 1b | same, start given (capture stops after block {c['fixed_start'] + 7}) ÷ bare forward through the same blocks | {c['fixed_ratio_limit']:.2f} | ≤ 1.25 | {yes(c['fixed_ratio_limit'] <= 1.25)} |",
        f"| 2 | official cost shape ÷ ours (same tokens) | {c['speedup_vs_official']:.2f}× | ≥ 2× | {yes(c['speedup_vs_official'] >= 2)} |",
        f"| 3 | cosine time ÷ LS time (N; 2N) | {cos['time_ratio_N']:.2f}; {cos['time_ratio_2N']:.2f} | ≤ 2 (paper: 6.6) | {yes(max(cos['time_ratio_N'], cos['time_ratio_2N']) <= 2)} |",
        f"| 3b | peak RSS at 2N ÷ at N (cosine; LS) | {cos['rss_growth_cosine']:.3f}; {cos['rss_growth_ls']:.3f} | ≤ 1.1 | {yes(max(cos['rss_growth_cosine'], cos['rss_growth_ls']) <= 1.1)} |",
        f"| 4 | sweep {sw['sweep_blocks']}: one prune() per point ÷ one pass for all {sw['runs']} (start, n) | {sw['speedup']:.2f}× ({sw['per_config_passes']} passes → 1) | report | — |",
        f"| 5 | pruned prefill speedup ÷ ideal {sp['layers'][0]}/{sp['layers'][1]} = {sp['ideal']:.3f} | {sp['prefill_frac_ideal']:.1%} | ≥ 95% | {yes(sp['prefill_frac_ideal'] >= 0.95)} |",
        f"| 5b | pruned decode speedup ÷ ideal | {sp['decode_frac_ideal']:.1%} | report | — |",
        f"| 6 | capture memory vs calibration tokens (fitted exponent of peak RSS) | {sc['axes']['tokens']['peak_rss_exponent']:.3f} | ≈ 0 | {yes(abs(sc['axes']['tokens']['peak_rss_exponent']) < 0.1)} |",
        *eval_summary_rows(R),
        *lanes_summary_rows(R),
        "",
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
        "## 3. Cosine path", "",
        "Each row is a fresh process: load, calibration batches, `prune(..., method=...)` with selection (8 blocks); the cosine "
        "solver is the paper's Adam, lr 1e-4, 1024-token batches, 10 epochs, over the disk-backed activation store.",
        "",
        "| method | calibration | tokens | time | peak RSS | RSS after load |", "|---|---|---|---|---|---|",
    ]
    for name, row in cos["rows"].items():
        lines.append(f"| {name.split()[0]} | {name.split()[1]} | {row['tokens']} | {row['seconds']:.2f} s | {row['peak_rss_mib']:.0f} MiB | {row['rss_after_load_mib']:.0f} MiB |")
    lines += [
        "",
        f"Cosine ÷ LS: {cos['time_ratio_N']:.2f} (N), {cos['time_ratio_2N']:.2f} (2N). Peak RSS 2N ÷ N: cosine "
        f"{cos['rss_growth_cosine']:.3f}, LS {cos['rss_growth_ls']:.3f}.",
        "",
        "## 4. One-pass sweeps", "",
        f"Sweep over n ∈ {sw['sweep_blocks']} (the cpu profile's compression sweep): LS sums for all {sw['runs']} (start, n) "
        f"pairs plus the distance statistics from ONE capture pass, then {sw['runs']} Cholesky solves: {sw['one_pass_s']:.2f} s "
        f"(Gram sums held: {sw['memory_gram_mib']:.0f} MiB). One `prune()` per sweep point ({sw['per_config_passes']} passes): "
        f"{sw['per_config_s']:.2f} s ({', '.join(f'{x:.2f}' for x in sw['per_config_each_s'])}). Speedup {sw['speedup']:.2f}×; the "
        f"chosen runs' T agree to {sw['max_rel_diff_T']:.1e} relative. One capture per (start, n) pair would cost about "
        f"{sw['per_run_capture_equivalent_passes']:.0f} full forward passes (each stopping after its last block).",
        "",
        "## 5. Pruned model speed", "",
        f"Batch {sp['batch']}, prompt {sp['prompt']} tokens (prefill = one forward building the KV cache, logits for the last "
        f"position only), then {sp['new_tokens']} greedy decode steps. Ideal block speedup L/(L−n) = {sp['layers'][0]}/{sp['layers'][1]} "
        f"= {sp['ideal']:.3f}; the embedding, final norm and LM head are not pruned (parameters {sp['params']['orig'] / 1e6:.1f} M → "
        f"{sp['params']['pruned'] / 1e6:.1f} M), so decode, where the 49k-vocabulary LM head is a large share, stays below it.",
        "",
        "| model | prefill tok/s | decode tok/s | peak RSS (fresh process, VmHWM) |", "|---|---|---|---|",
        f"| original ({sp['layers'][0]} blocks) | {sp['prefill_tok_s']['orig']:.0f} | {sp['decode_tok_s']['orig']:.1f} | {sp['peak_rss_mib']['orig']:.0f} MiB |",
        f"| pruned ({sp['layers'][1]} blocks) | {sp['prefill_tok_s']['pruned']:.0f} | {sp['decode_tok_s']['pruned']:.1f} | {sp['peak_rss_mib']['pruned']:.0f} MiB |",
        "",
        f"Prefill speedup {sp['prefill_speedup']:.3f} = {sp['prefill_frac_ideal']:.1%} of ideal; decode {sp['decode_speedup']:.3f} = "
        f"{sp['decode_frac_ideal']:.1%} of ideal; peak RSS pruned ÷ original {sp['peak_rss_mib']['pruned'] / sp['peak_rss_mib']['orig']:.3f}.",
        "",
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
    lines += [
        "",
        "Expected shape: time ∝ tokens (forward and Gram updates are per token), memory independent of tokens (streaming "
        "float64 sums; batches are fixed-size); time and memory ∝ d² (weights, Gram matrices) at large d; time ∝ L and memory "
        "∝ L (one more block to run, one more candidate run of Gram sums per layer).",
        "",
        *eval_section(R),
        *lanes_section(R),
        "## Beyond one device", "",
        "Data-parallel calibration (`replaceme_core/distributed.py`, `torchrun --nproc_per_node W -m replaceme_core.distributed …`) "
        "and model-parallel capture through accelerate are described in [SCALE.md](SCALE.md); both are tested on CPU "
        "(`tests/test_distributed.py`, `tests/test_sharded.py`). No GPU was available for these measurements.",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def only_section(out: Path, name: str, limit: int) -> int:
    """Section 7 (`eval`) or 8 (`lanes`) alone, merged into the last full run's results (or, without one, a file
    holding only the sections run alone)."""
    number, key, measure, section = {"eval": (7, "eval_backend", bench_eval, eval_section),
                                     "lanes": (8, "lanes", bench_lanes, lanes_section)}[name]
    previous = out.with_suffix(".json")
    R = json.loads(previous.read_text()) if previous.is_file() else {}
    R[key] = measure(limit)
    write_atomic(out.with_suffix(".json"), json.dumps(R, indent=2, default=str) + "\n")
    if "cost" in R:
        text = render(R)
    else:
        text = "\n".join(["# Benchmarks", "", "Only sections run alone (`bench/bench.py --only eval|lanes`) are here.", "",
                          *eval_section(R), *lanes_section(R)])
    write_atomic(out, text)
    log(f"wrote {out} (section {number} only, {time.perf_counter() - T0:.0f} s)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of the script, not a measurement)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["all", "eval", "lanes"], default="all",
                   help="eval / lanes: run only section 7 (evaluation backend) / 8 (make paper's lanes) and put it into "
                        "the existing RESULTS.json/.md, the other sections kept from their last run")
    p.add_argument("--eval-limit", type=int, default=None, help="documents per task for section 7 (default 100; 5 with --quick)")
    p.add_argument("--lanes-limit", type=int, default=None, help="documents per task for section 8 (default 40; 4 with --quick)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    out = Path(args.out)
    eval_limit = args.eval_limit or (5 if args.quick else 100)
    lanes_limit = args.lanes_limit or (4 if args.quick else 40)
    if args.only != "all":
        return only_section(out, args.only, eval_limit if args.only == "eval" else lanes_limit)
    from replaceme_core.assets import resolve_model

    sizes = {"samples": 8, "max_length": 160, "reps": 1, "cos_samples": 8, "sweep_samples": 8} if args.quick else \
        {"samples": 32, "max_length": 256, "reps": 2, "cos_samples": 16, "sweep_samples": 16}
    R = {"quick": args.quick, "sizes": sizes, "machine": machine(), "loadavg_start": os.getloadavg()}
    model, tok = load()
    model_path = resolve_model(MODEL)
    batches = calib_batches(tok, sizes["samples"], sizes["max_length"])
    log(f"{real_tokens(batches)} calibration tokens in {len(batches)} batches")
    R["cost"] = bench_cost(model, batches, sizes["reps"], model_path)
    _, pruned = our_prune(model, batches, num_blocks=8, start=R["cost"]["removed"][0])
    with tempfile.TemporaryDirectory(prefix="replaceme-bench-") as work:
        R["speed"] = bench_speed(model, pruned.model, tok, Path(work), args.quick)
    log(f"speed: prefill {R['speed']['prefill_frac_ideal']:.1%} of ideal, decode {R['speed']['decode_frac_ideal']:.1%}")
    del pruned
    sweep_batches = calib_batches(tok, sizes["sweep_samples"], sizes["max_length"])
    R["sweep"] = bench_sweep(model, sweep_batches, [4, 8, 11, 15])
    R["cosine"] = bench_cosine(sizes["cos_samples"], sizes["max_length"])
    R["scaling"] = bench_scaling(args.quick)
    R["eval_backend"] = bench_eval(eval_limit)
    R["lanes"] = bench_lanes(lanes_limit)
    R["wall_s"] = time.perf_counter() - T0
    R["loadavg_end"] = os.getloadavg()
    write_atomic(out.with_suffix(".json"), json.dumps(R, indent=2, default=str) + "\n")
    write_atomic(out, render(R))
    log(f"wrote {out} ({R['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
