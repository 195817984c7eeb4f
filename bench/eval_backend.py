"""Evaluation backend: requests/s of SharedContextHFLM (`replaceme`) ÷ lm-eval's HFLM, beside the compute bound.

    python bench/eval_backend.py [--limit 100] [--models smollm2-135m-instruct,gemma-3-270m] [--tasks ...] [--json OUT.json]

Why: the shared-context backend is only worth its code if it is close to what its saved work allows. So for each
model and task (local tasks, first `--limit` documents) this script

* builds lm-eval's own requests (task objects configured as `simple_evaluate` does, `build_all_requests`);
* times `loglikelihood` on the same request list, model already loaded, after an untimed warm-up, for three
  backends per task in the order HFLM, ours, HFLM no-cache, ours, HFLM (under a linear drift of the machine each
  backend's mean time then sits at the same moment);
* counts, from HFLM's own tokenisation, the tokens each backend sends through the blocks and the positions through
  the LM head, and weights them with per-token FLOPs (blocks ≈ 2 × non-embedding parameters, head = 2 × d × vocab):
  the compute bound is a baseline's FLOPs ÷ ours (attention's quadratic term and padding ignored; both small here);
* checks the numbers agree: each backend's task metric from lm-eval's `process_results`, max |Δll| between them,
  and the requests that differ.

Two baselines, because lm-eval's HFLM has two behaviours. "HFLM" is its default (`logits_cache=True`), what
`evaluate(backend="hf")` and lm-eval's CLI run: it runs one sequence per distinct `context + continuation[:-1]`, so
choices of one token (most of SciQ's) already share their context. "HFLM no-cache" (`logits_cache=False`) runs every
request as its own sequence; it is also the reference scores, because the default's cache mis-scores a request
whose `context + continuation[:-1]` equals another's while its continuation is shorter ("colliding" requests).

bench/bench.py runs this in a fresh subprocess (`--json`) and renders its section with `render_section`.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time

import torch

from common import finish_script, yes
from replaceme_core.evaluation import shared_context

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
MAIN_TASKS = ("arc_easy", "piqa", "sciq", "hellaswag", "lambada_openai")  # the cpu profile's main suite, 0-shot
# Other request shapes (issue 22): WinoGrande (partial scoring: two differing contexts, one shared continuation; the
# paper's 5-shot), ARC-Challenge 5-shot (long few-shot prompts shared by four choices), BoolQ (long passages, two
# one-token choices).
OTHER_SHAPES = ("winogrande", "arc_challenge", "boolq")
TASKS = MAIN_TASKS + OTHER_SHAPES
FEWSHOT = {"arc_challenge": 5}  # over the suite's count (suite.TASKS): a few-shot prompt of a multiple-choice task
BATCH = 16
TOL = 1e-3  # nats: the agreement the backend promises in float32
# hflm: lm-eval's default (logits_cache=True), what `evaluate(backend="hf")` and lm-eval's CLI run; hflm_nocache:
# every request as its own sequence (HFLM's reference scores). Ours runs between and around them, so that under a
# linear drift of the machine every backend's mean time sits at the same moment.
BACKENDS = ("hflm", "hflm_nocache", "ours")
BASELINES = ("hflm", "hflm_nocache")
SCHEDULE = ("hflm", "ours", "hflm_nocache", "ours", "hflm")
TARGET = 0.90  # measured speed-up ÷ compute bound
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[eval-bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ requests
def shots(bench: str) -> int:
    from replaceme_core.evaluation.suite import TASKS as SPECS

    return FEWSHOT.get(bench, SPECS[bench].num_fewshot)


def build_requests(benches, limit: int | None, seed: int = 0) -> dict[str, tuple[object, list]]:
    """bench -> (lm-eval task, its Instances for the first `limit` documents), configured as simple_evaluate does:
    a YAML's explicit `num_fewshot: 0` is kept, a missing one gets `shots(bench)`, the sampler gets the seed."""
    from lm_eval.tasks import TaskManager

    from replaceme_core import assets
    from replaceme_core.evaluation.local_tasks import render_local_tasks

    local = render_local_tasks(assets.benchmark_files(), benches)
    tasks = TaskManager(include_path=str(local.include_path), include_defaults=False).load(
        [local.names[b] for b in benches])["tasks"]
    out = {}
    for b in benches:
        task = tasks[local.names[b]]
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=shots(b))
        task.set_fewshot_seed(seed=seed)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        out[b] = (task, list(task.instances))
    return out


# ------------------------------------------------------------------------------------------------ counts
def colliding_flags(pairs) -> list[bool]:
    """Per request: HFLM's logits cache mis-scores it (another request has the same `context + continuation[:-1]`
    and a longer continuation, and HFLM reads this one's log-probs from the front of that one's logits)."""
    longest: dict[tuple, int] = {}
    for c, x in pairs:
        k = tuple(c + x[:-1])
        longest[k] = max(longest.get(k, 0), len(x))
    return [len(x) < longest[tuple(c + x[:-1])] for c, x in pairs]


def token_counts(pairs, max_length: int) -> dict[str, int]:
    """Tokens through the blocks and positions through the head, HFLM's way and ours, from HFLM's tokens.

    HFLM feeds `(context + continuation)[-(max_length + 1):][:-1]` per request, the head at every one of those
    positions; with its logits cache (default) once per distinct `context + continuation[:-1]`. Ours runs each
    distinct (left-truncated) context but its last token once, then `[context[-1]] + continuation[:-1]` per distinct
    continuation, the head only at the continuation's positions (shared_context.group_by_context: what it runs)."""
    from replaceme_core.evaluation.shared_context import group_by_context

    per_pair = sum(min(len(c) + len(x), max_length + 1) - 1 for c, x in pairs)
    keys = {tuple(c + x[:-1]) for c, x in pairs}
    default = sum(min(len(k), max_length) for k in keys)
    groups = group_by_context([(None, c, x) for c, x in pairs], max_length)
    head = sum(len(x) for g in groups for x in g.continuations)
    shared = sum(len(g.tokens) - 1 for g in groups) + head
    return {"hflm_block": default, "hflm_head": default, "hflm_nocache_block": per_pair, "hflm_nocache_head": per_pair,
            "ours_block": shared, "ours_head": head, "contexts": len(groups), "colliding": sum(colliding_flags(pairs))}


def flops_per_token(model) -> dict[str, float]:
    """(blocks, head) FLOPs per token: 2 × non-embedding parameters, 2 × d × vocab (tied weights counted once)."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    non_embedding = total - emb.numel() - (0 if head is emb else head.numel())
    return {"block": 2.0 * non_embedding, "head": 2.0 * head.numel(), "non_embedding_params": non_embedding,
            "d": head.shape[1], "vocab": head.shape[0]}


def compute_bound(c: dict, f: dict, baseline: str) -> float:
    """FLOPs of `baseline` ("hflm" or "hflm_nocache") ÷ FLOPs of ours, for counts `c` and per-token FLOPs `f`."""
    theirs = c[f"{baseline}_block"] * f["block"] + c[f"{baseline}_head"] * f["head"]
    ours = c["ours_block"] * f["block"] + c["ours_head"] * f["head"]
    return theirs / ours


class Counter:
    """Rows × columns entering the first block and positions entering the head (padding included): what ran."""

    def __init__(self, model):
        self.block = self.head = 0
        d = model.get_output_embeddings().weight.shape[1]

        def on_block(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.block += h.shape[0] * h.shape[1]

        def on_head(_m, args):
            self.head += args[0].numel() // d

        self.handles = [model.base_model.layers[0].register_forward_pre_hook(on_block, with_kwargs=True),
                        model.get_output_embeddings().register_forward_pre_hook(on_head)]

    def take(self) -> tuple[int, int]:
        out = (self.block, self.head)
        self.block = self.head = 0
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ scoring
def metric(task, reqs, results, name: str) -> float:
    """The task's metric over its documents, from lm-eval's own process_results (filter "none" = first response)."""
    by_doc: dict[int, list] = {}
    for r, res in zip(reqs, results):
        by_doc.setdefault(r.doc_id, []).append((r.idx, r.doc, res))
    values = []
    for rows in by_doc.values():
        rows.sort(key=lambda t: t[0])
        values.append(float(task.process_results(rows[0][1], [res for _, _, res in rows])[name]))
    return sum(values) / len(values)


def timed(lm, reqs):
    gc.collect()
    t = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - t, out


def agreement(a, b, colliding) -> dict:
    """max |Δll| and the number of requests differing (> TOL or is_greedy) between two result lists."""
    dll = [abs(x - y) for (x, _), (y, _) in zip(a, b)]
    differs = [d > TOL or ga != gb for d, (_, ga), (_, gb) in zip(dll, a, b)]
    return {"max_dll": max(dll), "differ": sum(differs),
            "differ_non_colliding": sum(d and not c for d, c in zip(differs, colliding))}


def summarise(tasks: dict, flops: dict) -> dict:
    """Totals over the tasks: mean seconds summed, counts summed, the bound of the summed counts."""
    n = sum(t["requests"] for t in tasks.values())
    secs = {k: sum(sum(t["seconds"][k]) / len(t["seconds"][k]) for t in tasks.values()) for k in BACKENDS}
    counts = {k: sum(t["counts"][k] for t in tasks.values()) for k in next(iter(tasks.values()))["counts"]}
    out = {"requests": n, "mean_seconds": secs, "req_per_s": {k: n / v for k, v in secs.items()}, "counts": counts,
           "ran": {k: [sum(t["ran"][k][i] for t in tasks.values()) for i in (0, 1)] for k in BACKENDS},
           "speedup": {}, "bound": {}, "frac_bound": {}, "agreement": {}}
    for base in BASELINES:
        out["speedup"][base] = secs[base] / secs["ours"]
        out["bound"][base] = compute_bound(counts, flops, base)
        out["frac_bound"][base] = out["speedup"][base] / out["bound"][base]
    for pair in next(iter(tasks.values()))["agreement"]:
        rows = [t["agreement"][pair] for t in tasks.values()]
        out["agreement"][pair] = {"max_dll": max(r["max_dll"] for r in rows),
                                  **{k: sum(r[k] for r in rows) for k in ("differ", "differ_non_colliding")}}
    return out


def bench_model(name: str, limit: int | None, benches, batch_size: int) -> dict:
    from lm_eval.models.huggingface import HFLM

    from replaceme_core.evaluation.quiet import quiet_lm_eval
    from replaceme_core.evaluation.shared_context import SharedContextHFLM
    from replaceme_core.evaluation.suite import TASKS as SPECS
    from replaceme_core.io.models import load_model

    model, tok = load_model(name, dtype=torch.float32, device="cpu")
    kw = {"pretrained": model, "tokenizer": tok, "batch_size": batch_size, "device": "cpu"}
    with quiet_lm_eval():
        lms = {"hflm": HFLM(**kw), "hflm_nocache": HFLM(logits_cache=False, **kw), "ours": SharedContextHFLM(**kw)}
    flops, max_length = flops_per_token(model), lms["hflm"].max_length
    requests = build_requests(benches, limit)
    warm = requests[benches[0]][1][:8]
    for lm in lms.values():  # first-call costs (thread pools, allocator) stay out of the timings
        lm.loglikelihood(warm, disable_tqdm=True)
    counter = Counter(model)
    tasks = {}
    try:
        for b, (task, reqs) in requests.items():
            pairs = shared_context.hflm_token_pairs(lms["hflm"], reqs)
            counts, colliding = token_counts(pairs, max_length), colliding_flags(pairs)
            seconds = {k: [] for k in BACKENDS}
            results, ran = {}, {}
            for k in SCHEDULE:
                dt, res = timed(lms[k], reqs)
                seconds[k].append(dt)
                results.setdefault(k, res)
                ran.setdefault(k, counter.take())  # the first run of each backend: what entered block 0 and head
            mean = {k: sum(v) / len(v) for k, v in seconds.items()}
            m = SPECS[b].metric
            t = tasks[b] = {
                "docs": len({r.doc_id for r in reqs}), "requests": len(reqs), "seconds": seconds,
                "req_per_s": {k: len(reqs) / v for k, v in mean.items()}, "counts": counts, "ran": ran,
                "metric": m, "value": {k: metric(task, reqs, res, m) for k, res in results.items()},
                "speedup": {}, "bound": {}, "frac_bound": {},
                "agreement": {"ours_vs_nocache": agreement(results["hflm_nocache"], results["ours"], colliding),
                              "ours_vs_hflm": agreement(results["hflm"], results["ours"], colliding),
                              "hflm_vs_nocache": agreement(results["hflm_nocache"], results["hflm"], colliding)},
            }
            for base in BASELINES:
                t["speedup"][base] = mean[base] / mean["ours"]
                t["bound"][base] = compute_bound(counts, flops, base)
                t["frac_bound"][base] = t["speedup"][base] / t["bound"][base]
            a = t["agreement"]
            log(f"{name} {b}: {len(reqs)} requests; seconds " + ", ".join(f"{k} {v:.1f}" for k, v in mean.items())
                + "; " + "; ".join(f"vs {k} {t['speedup'][k]:.2f}× of {t['bound'][k]:.2f}× "
                                   f"({t['frac_bound'][k]:.0%})" for k in BASELINES)
                + f"; {m} " + "/".join(f"{v:.3f}" for v in t["value"].values())
                + f"; max |Δll| vs no-cache {a['ours_vs_nocache']['max_dll']:.1e}, "
                  f"HFLM default mis-scored {a['hflm_vs_nocache']['differ']} ({counts['colliding']} colliding)")
    finally:
        counter.remove()
    overall = summarise(tasks, flops)
    log(f"{name} overall: " + "; ".join(f"vs {k} {overall['speedup'][k]:.2f}× of {overall['bound'][k]:.2f}× "
                                        f"({overall['frac_bound'][k]:.0%})" for k in BASELINES))
    del lms, model
    gc.collect()
    return {"model": name, "flops": flops, "max_length": max_length, "tasks": tasks, "overall": overall}


def run(limit: int | None = 100, models=MODELS, benches=TASKS, batch_size: int = BATCH) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable(logging.WARNING)  # lm-eval's per-task config chatter
    E = {"limit": limit, "batch_size": batch_size, "tasks": list(benches), "fewshot": {b: shots(b) for b in benches},
         "torch_threads": torch.get_num_threads(),
         "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
         "models": {}}
    for name in models:
        log(f"{name}: {limit} documents per task, batch {batch_size}")
        E["models"][name] = bench_model(name, limit, list(benches), batch_size)
    E["loadavg_end"] = os.getloadavg()
    E["wall_s"] = time.perf_counter() - T0
    E["target_met"] = {b: all(m["overall"]["frac_bound"][b] >= TARGET for m in E["models"].values())
                       for b in BASELINES}
    return E


# ------------------------------------------------------------------------------------------------ report
def _k(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


NAMES = {"hflm": "HFLM", "hflm_nocache": "HFLM no-cache", "ours": "ours"}


def _shots_text(E: dict) -> str:
    """"0-shot", or which tasks ran with few-shot prompts (results before `fewshot` was recorded were all 0-shot)."""
    few = [f"{b} {k}-shot" for b, k in E.get("fewshot", {}).items() if k]
    return "0-shot" + (f" but {', '.join(few)}" if few else "")


def render_section(E: dict, number: int = 7) -> list[str]:
    """The markdown section for bench/RESULTS.md (also printed when this script runs alone)."""
    lines = [
        f"## {number}. Evaluation backend: shared contexts vs HFLM", "",
        f"`bench/eval_backend.py` (its own run: {E['date_utc']}, {E['wall_s']:.0f} s, torch threads "
        f"{E['torch_threads']}, load average {E['loadavg_start'][0]:.2f} → {E['loadavg_end'][0]:.2f}). Local tasks "
        f"{', '.join(E['tasks'])}, {_shots_text(E)}, first {E['limit']} documents each; float32 CPU, batch {E['batch_size']}; "
        "lm-eval's own request lists, the same for every backend. Only the `loglikelihood` calls are timed (model "
        "loaded, after a warm-up), per task in the order HFLM, ours, HFLM no-cache, ours, HFLM; req/s uses each "
        "backend's mean. **HFLM** is lm-eval's default (`logits_cache=True`, what `--backend hf` and lm-eval's CLI "
        "run): it runs one sequence per distinct `context + continuation[:-1]`, so choices of one token share it "
        "(most of SciQ's). **HFLM no-cache** (`logits_cache=False`) runs every request as its own sequence.",
        "",
        "Compute bound = the baseline's FLOPs ÷ ours, from the tokens of HFLM's tokenisation: blocks at 2 × "
        "non-embedding parameters per token, the head at 2 × d × vocab per position (attention's quadratic term and "
        "padding are left out; what really entered the first block and the head, padding included, is in "
        "RESULTS.json under `ran`). Block tokens: HFLM feeds `len(context + continuation) − 1` per sequence; ours "
        "feeds each distinct context but its last token once, then `[context[−1]] + continuation[:−1]` per "
        "continuation (its two-phase path: the bound the issue set). Head positions: HFLM every input position; ours "
        "only the continuation's. Where the family takes a custom mask (both models here) ours runs a group as one "
        "packed row instead (`context + continuation[:−1]` of each continuation, the first continuation token read "
        "from the context's last position): one token fewer per continuation, and one head position per context "
        "for all first tokens, so the measured speed-up can pass this bound (`ran` shows what ran). HFLM runs at the "
        "batch size given; on this CPU ours packs at most 512 tokens per forward (`CPU_PACKED_TOKENS`), since small "
        "forwards run faster here — HFLM at a smaller batch would be faster too, so part of the ratio is batching.",
        "",
    ]
    for name, M in E["models"].items():
        f = M["flops"]
        rows = list(M["tasks"].items()) + [("**all**", M["overall"])]
        lines += [
            f"**{name}**: {f['non_embedding_params'] / 1e6:.1f} M non-embedding parameters → "
            f"{f['block'] / 1e6:.0f} MFLOP per token through the blocks; head d = {f['d']} × vocab {f['vocab']} → "
            f"{f['head'] / 1e6:.0f} MFLOP per position.", "",
            "| task | requests | HFLM req/s | HFLM no-cache req/s | ours req/s | ours ÷ HFLM | bound | % of bound | "
            "ours ÷ no-cache | bound | % of bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for b, t in rows:
            r, sp, bd, fr = t["req_per_s"], t["speedup"], t["bound"], t["frac_bound"]
            lines.append(f"| {b} | {t['requests']} | {r['hflm']:.1f} | {r['hflm_nocache']:.1f} | {r['ours']:.1f} | "
                         + " | ".join(f"{sp[k]:.2f}× | {bd[k]:.2f}× | {fr[k]:.0%}" for k in BASELINES) + " |")
        lines += [
            "",
            "| task | block tokens HFLM / no-cache / ours | head positions HFLM / no-cache / ours | metric: HFLM / "
            "no-cache / ours | max \\|Δll\\| ours vs no-cache | ours vs HFLM | requests differing, ours vs no-cache | "
            "HFLM mis-scored (colliding) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b, t in rows:
            c, a = t["counts"], t["agreement"]
            value = (f"{t['metric']} " + " / ".join(f"{t['value'][k]:.3f}" for k in BACKENDS)) if "metric" in t else "—"
            lines.append(
                f"| {b} | {_k(c['hflm_block'])} / {_k(c['hflm_nocache_block'])} / {_k(c['ours_block'])} | "
                f"{_k(c['hflm_head'])} / {_k(c['hflm_nocache_head'])} / {_k(c['ours_head'])} | {value} | "
                f"{a['ours_vs_nocache']['max_dll']:.1e} | {a['ours_vs_hflm']['max_dll']:.1e} | "
                f"{a['ours_vs_nocache']['differ']} | {a['hflm_vs_nocache']['differ']} ({c['colliding']}) |")
        lines.append("")
    verdict = []
    for base in BASELINES:
        got = "; ".join(f"{n} {M['overall']['speedup'][base]:.2f}× of {M['overall']['bound'][base]:.2f}× = "
                        f"{M['overall']['frac_bound'][base]:.0%}" for n, M in E["models"].items())
        verdict.append(f"vs {NAMES[base]} {yes(E['target_met'][base])} ({got})")
    lines += [
        f"Target, measured speed-up ≥ {TARGET:.0%} of the compute bound on both models: " + "; ".join(verdict) + ".",
        "",
        "Agreement: a request differs when its log-likelihood differs by more than 1e-3 nats or its is_greedy "
        "differs. \"HFLM mis-scored\" counts requests where lm-eval's default HFLM differs from HFLM no-cache; "
        "\"colliding\" counts the requests that default's logits cache is known to mis-score (their "
        "`context + continuation[:-1]` equals another request's, whose continuation is longer). Ours scores every "
        "request as HFLM does alone.",
        "",
    ]
    return lines


KEY = "eval_backend"


def summary_rows(R: dict) -> list[str]:
    """bench/RESULTS.md's summary rows 7, 7b (one per baseline)."""
    E = R[KEY]
    rows = []
    for i, base in enumerate(BASELINES):
        fr = [M["overall"]["frac_bound"][base] for M in E["models"].values()]
        rows.append(f"| 7{'b' * i} | eval requests/s, ours ÷ {NAMES[base]}, ÷ its compute bound ({'; '.join(E['models'])}) | "
                    f"{'; '.join(f'{x:.0%}' for x in fr)} | ≥ {TARGET:.0%} | {yes(E['target_met'][base])} |")
    return rows


def section(R: dict) -> list[str]:
    return render_section(R[KEY], number=7)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=100, help="documents per task (default 100; e.g. 5 for a quick check)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--json", default=None, help="write the results here (bench/bench.py reads them)")
    args = p.parse_args()
    return finish_script(run(args.limit, args.models.split(","), args.tasks.split(","), args.batch_size), args.json,
                         render_section)


if __name__ == "__main__":
    sys.exit(main())
