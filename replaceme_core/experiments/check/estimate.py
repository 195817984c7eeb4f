"""Estimates: GPU time, GPU memory and scratch disk per notebook, and their formatting."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .facts import BIGBENCH_TOKENS_PER_DOC, GPU, HUB_TOKENS_PER_SAMPLE, TASK_COST
from .models import ModelFacts, _adapter_for
from .schema import _is_int
from .sources import _packaged_mean_tokens
from .tasks import Evaluation, _benchmark_manifests


def _throughput(params: float) -> float:
    return GPU["peak_bf16_tflops"] * 1e12 * (GPU["mfu_large"] if params >= 1e9 else GPU["mfu_small"])


@dataclass
class Work:
    """GPU work of one notebook, accumulated as FLOPs, with the memory and scratch disk it needs."""

    seconds: float = 0.0
    forward_tokens: float = 0.0
    train_tokens: float = 0.0
    peak_gb: float = 0.0
    store_gb: float = 0.0
    notes: list[str] = field(default_factory=list)

    def forward(self, m: ModelFacts, tokens: float) -> None:
        self.forward_tokens += tokens
        self.seconds += 2 * (m.params or 0) * tokens / _throughput(m.params or 0)

    def train(self, m: ModelFacts, tokens: float, checkpointing: bool = False) -> None:
        self.train_tokens += tokens
        self.seconds += (8 if checkpointing else 6) * (m.params or 0) * tokens / _throughput(m.params or 0)

    def decode(self, m: ModelFacts, steps: float, batch: int) -> None:
        per_step = max(2 * (m.params or 0) * batch / _throughput(m.params or 0), m.weight_gb * 1e9 / (GPU["hbm_tb_s"] * 1e12))
        self.forward_tokens += steps * batch
        self.seconds += steps * per_step

    def adam(self, d: int, steps: float, batch_tokens: int) -> None:
        self.seconds += steps * (6 * batch_tokens * d * d / _throughput(1e9) + GPU["adam_step_overhead_s"])

    def memory(self, gb: float) -> None:
        self.peak_gb = max(self.peak_gb, gb)


def _eval_tokens(e: Evaluation | dict, packaged: dict) -> tuple[float, float]:
    """(forward tokens, generated tokens) of one evaluation of one model."""
    from ...evaluation.suite import TASKS, canonical_task

    tasks = e.tasks if isinstance(e, Evaluation) else e.get("tasks", [])
    limit = e.limit if isinstance(e, Evaluation) else e.get("limit")
    source = e.source if isinstance(e, Evaluation) else e.get("source", "auto")
    fwd = gen = 0.0
    for t in tasks:
        try:
            t = canonical_task(t)
        except ValueError:
            continue
        local = TASKS[t].yaml is not None and source != "hub"
        task_limit = limit
        if t.startswith("bigbench_"):
            rows = sum(packaged.get(t, {}).values()) or 250
            docs, per, g = rows, BIGBENCH_TOKENS_PER_DOC, 0
        else:
            docs, per, g = TASK_COST.get(t, (1000, 300, 0))
            if local and packaged:
                if t == "mmlu":
                    subjects = [s for k, s in packaged.items() if k.startswith("mmlu_")]
                    docs = sum(s.get("test", 0) for s in subjects) or docs
                    if task_limit is not None and _is_int(task_limit):  # the limit applies per subject task
                        docs = min(docs, task_limit * max(1, len(subjects)))
                        task_limit = None
                elif t in packaged:
                    splits = packaged[t]
                    docs = splits.get("test") or splits.get("validation") or max(splits.values())
        if task_limit is not None:
            docs = min(docs, task_limit) if _is_int(task_limit) else docs * float(task_limit)
        fwd += docs * per
        gen += docs * g
    return fwd, gen


def _calib_tokens(profile: dict, source: str, samples: int, max_length: int) -> float:
    from ...io.data import PACKAGED_SOURCES

    if source in PACKAGED_SOURCES:
        means = [_packaged_mean_tokens(p) for p in PACKAGED_SOURCES[source]]
        mean = sum(m or 400 for m in means) / len(means)
    else:
        from ...io.data import _HUB_ALIASES

        mean = HUB_TOKENS_PER_SAMPLE.get(_HUB_ALIASES.get(source.lower(), source), 500)
    return samples * min(mean, max_length)


def estimate(profile: dict, facts: dict[str, ModelFacts], vision: ModelFacts | None) -> dict[str, Work]:
    """Per notebook: GPU seconds, tokens, peak GPU memory and activation-store disk. The counts follow the notebooks'
    loops (how many models each evaluates, how many capture passes and solver fits it runs), not a profile of them."""
    p = profile
    m = facts.get(p.get("model"))
    if m is None or not m.params:
        return {}
    packaged = _benchmark_manifests()
    ev = p.get("eval") or {}
    c = p.get("calibration") or {}
    C = _calib_tokens(p, c.get("source", "wiki"), c.get("samples", 1), c.get("max_length", 1024))
    pp = p.get("perplexity") or {}
    ppl_tokens = _calib_tokens(p, pp.get("source", "wiki"), pp.get("samples", 1), pp.get("max_length", 1024))
    cos = p.get("cosine") or {}
    bt, epochs = cos.get("batch_tokens", 1024), cos.get("epochs", 10)
    d, L, n = m.hidden or 1, m.layers or 1, p.get("num_blocks", 1)
    steps = math.ceil(C / bt) * epochs
    store_gb = C * 3 * d * 4 / 1e9  # M, R, Y float32 per token and run
    persist = p.get("persist_activation_stores", True)

    def suite(name_or_spec, over=None) -> dict:
        base = ev.get(name_or_spec, {}) if isinstance(name_or_spec, str) else name_or_spec
        return {**base, **(over or {})}

    def evals(w: Work, model: ModelFacts, spec: dict, count: int) -> None:
        fwd, gen = _eval_tokens(spec, packaged)
        w.forward(model, fwd * count)
        if gen:
            w.decode(model, count * gen / max(1, spec.get("batch_size", 16)), spec.get("batch_size", 16))

    def ppl(w: Work, model: ModelFacts, count: int) -> None:
        w.forward(model, ppl_tokens * count)

    def stores(w: Work, runs_alive: int, runs_total: int) -> None:
        w.store_gb = store_gb * (runs_total if persist else runs_alive)

    W: dict[str, Work] = {k: Work() for k in ("00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "12",
                                               "13", "14")}
    two = 2 * m.weight_gb  # the base model and one pruned deep copy
    w = W["00"]; w.forward(m, 2 * C); evals(w, m, suite("sweep"), 3); ppl(w, m, 3); w.memory(two)
    w = W["01"]; w.forward(m, 3 * C); evals(w, m, suite("main"), 5); ppl(w, m, 5); w.adam(d, 3 * steps, bt); w.memory(two)
    stores(w, 2, 3)
    sweep = p.get("sweep_blocks") or []
    w = W["02"]; w.forward(m, (1 + len(sweep)) * C); evals(w, m, suite("sweep"), 1 + 3 * len(sweep)); ppl(w, m, 1 + 3 * len(sweep))
    w.adam(d, len(sweep) * steps, bt); w.memory(two); stores(w, 1, len(sweep))
    sel = p.get("selection_sweep") or {"stride": 1, "suite": "sweep"}
    windows = math.ceil(max(1, L - n) / sel.get("stride", 1))
    w = W["03"]; w.forward(m, C); evals(w, m, suite(sel.get("suite", "sweep")), 2 * windows); w.memory(two)
    cand_gb = (L - n) * 2 * d * d * 8 / 1e9
    w.memory(two + cand_gb)
    cd = p.get("calibration_data") or {}
    if cd:
        w = W["04"]
        S = cd.get("samples", 1)
        methods = cd.get("methods", [])
        def it(ms) -> int:  # iterative methods: one activation store and one solver fit each
            return sum(1 for x in ms if x not in ("ls", "uidl"))

        variants, fits, passes = 1, 0, 0.0
        kinds = dict(cd.get("sources") or {})
        for kind, src in kinds.items():
            ms = (cd.get("source_methods") or {}).get(kind, methods)
            variants += len(ms); fits += it(ms)
            passes += _calib_tokens(p, src, S, c.get("max_length", 1024))
        sg = cd.get("self_generated") or {}
        variants += len(methods); fits += it(methods); passes += C
        w.decode(m, math.ceil(S / sg.get("batch_size", 8)) * sg.get("max_new_tokens", 32), sg.get("batch_size", 8))
        for size in cd.get("sizes") or []:
            if size == S and c.get("source") in kinds.values():
                continue
            variants += len(methods); fits += it(methods)
            passes += _calib_tokens(p, c.get("source", "wiki"), size, c.get("max_length", 1024))
        mk = cd.get("masking") or {}
        for size in mk.get("sizes") or []:
            ratios = mk.get("ratios")
            k = len(ratios.get(size, [])) if isinstance(ratios, dict) else len(ratios or [])
            variants += k * len(mk.get("methods", [])); fits += k * it(mk.get("methods", []))
            passes += k * _calib_tokens(p, c.get("source", "wiki"), size, c.get("max_length", 1024))
        w.forward(m, passes)
        evals(w, m, suite("main", cd.get("eval")), variants); ppl(w, m, variants)
        ts = cd.get("task_specific") or {}
        if ts:
            evals(w, m, suite("main", {"tasks": [ts.get("task", "sciq")], "limit": ts.get("limit")}), 4)
            w.forward(m, ts.get("samples", 0) * 150)
        w.adam(d, fits * steps, bt)  # the sets differ in size; the default set's step count stands for all (rough)
        w.memory(two); stores(w, 1, fits)
    P5 = p.get("objectives_and_solvers") or {}
    if P5:
        w = W["05"]
        spec = suite(P5.get("suite", "window"), P5.get("eval_overrides"))
        n_var = 1 + len(P5.get("ridge_relative", [])) + 11 + (1 if P5.get("adam_fast_lr") else 0)
        evals(w, m, spec, n_var); ppl(w, m, n_var); w.forward(m, 3 * C)
        adam_fits = 3 + (1 if P5.get("adam_fast_lr") else 0) + 1 + 1 + 4 + 1  # cosine, l2, l1, (fast), mse, exact, 2×2 separated, separate LT
        w.adam(d, adam_fits * steps + steps * P5.get("lbfgs_iters", 1) * 3, bt)
        rows = min(P5.get("full_batch_rows", 32768), C)
        w.seconds += (P5.get("cg_max_iter", 100) * 3 + P5.get("trust_ncg_max_iter", 30) * 6) * 6 * rows * d * d / _throughput(1e9)
        w.memory(two); stores(w, 2, 3)
        # the MSE reference: CG on the d×d Gram sums, float64 products on the model's device (notebook 05 passes it),
        # ≈3 products of 2d³ per iteration at an assumed 30 TFLOP/s of FP64 on an H100/H200
        w.seconds += P5.get("mse_reference", {}).get("max_iter", 0) * 6 * d ** 3 / 3e13
    P6 = p.get("structure_and_multi_lt") or {}
    if P6:
        w = W["06"]
        k = 5 + sum(1 for t in P6.get("num_transforms", []) if t > 1)
        evals(w, m, suite(P6.get("suite", "window"), P6.get("eval_overrides")), k); ppl(w, m, k); w.forward(m, C); w.memory(two)
    rp = p.get("repeatability") or {}
    if rp:
        w = W["07"]
        seeds = len(rp.get("seeds", []))
        evals(w, m, suite("main", rp.get("eval")), 3 + seeds); ppl(w, m, 3 + seeds); w.forward(m, 2 * C)
        w.adam(d, seeds * steps, bt); w.memory(two); stores(w, 1, 1)
    hp, cp = p.get("healing") or {}, p.get("cost") or {}

    def heal_tokens(cfg: dict) -> float:
        return cfg.get("steps", 0) * cfg.get("batch_size", 1) * cfg.get("seq_len", 128)

    if hp:
        lt, full = hp.get("lt", {}), hp.get("full", {})
        lora = cp.get("lora", {})
        w = W["08"]; w.forward(m, 3 * C); w.adam(d, steps, bt)
        w.train(m, heal_tokens(lt), lt.get("gradient_checkpointing", False))
        w.train(m, heal_tokens(lora), lora.get("gradient_checkpointing", False))
        w.memory(m.weight_gb * (1 + 4 * (L - n) / L))  # base, two pruned variants, two healed copies
        w = W["09"]  # its LT-only run is 08's (heal_cached: same model, texts and settings)
        w.train(m, heal_tokens(full), full.get("gradient_checkpointing", False))
        evals(w, m, suite(hp.get("suite", "window")), 4); ppl(w, m, 4)
        # base + pruned + two healed copies; full healing adds bf16 gradients, float32 master weights and Adam state
        # (2 + 4 + 8 bytes per parameter of the pruned model)
        w.memory(m.weight_gb * (1 + 3 * (L - n) / L) + 14 * (m.params or 0) * (L - n) / L / 1e9)
    P10 = p.get("10_models_and_scale") or {}
    if P10:
        w = W["10"]
        spec0 = suite(P10.get("suite", "window"))
        for entry in P10.get("models") or []:
            mm = facts.get(entry.get("model"))
            if mm is None or not mm.params:
                continue
            ks = sorted(set(entry.get("sweep_blocks", [])) | set(entry.get("table_blocks", [])))
            foldable = getattr(_adapter_for(mm.model_type), "fold_path", None) is not None
            count = 1 + 2 * len(ks) + (0 if foldable else len(entry.get("table_blocks", [])))
            spec = {**spec0, **({"batch_size": entry["batch_size"]} if "batch_size" in entry else {}),
                    **({"limit": entry["limit"]} if "limit" in entry else {})}
            evals(w, mm, spec, count)
            Cm = _calib_tokens(p, c.get("source", "wiki"), entry.get("calibration_samples", c.get("samples", 1)), c.get("max_length", 1024))
            w.forward(mm, 2 * Cm)
            if P10.get("method", "ls") != "ls":
                w.adam(mm.hidden or 1, len(ks) * math.ceil(Cm / bt) * epochs, bt)
            w.memory(m.weight_gb + 2 * mm.weight_gb)
    if vision is not None and vision.params:
        v = p["vision"]
        tpi = (v.get("image_size", 224) // 14) ** 2 + 1
        w = W["11"]
        images = v.get("probe_images", 0) + v.get("test_images", 0) + v.get("calibration_images", 0) \
            + 2 * len(v.get("blocks", [])) * v.get("test_images", 0)
        w.forward(vision, images * tpi); w.memory(2 * vision.weight_gb)
    P12 = p.get("12_other_benchmarks") or {}
    if P12:
        w = W["12"]
        k = 1 + len(P12.get("variants", []))
        for spec in (P12.get("suites") or {}).values():
            evals(w, m, suite("main", spec), k)
        w.memory(two)
    P13 = p.get("13_depth_pruning_methods") or {}
    if P13:
        w = W["13"]
        methods = P13.get("methods", [])
        data = P13.get("data") or {}

        def tokens(name: str) -> float:
            dd = data.get(name) or {}
            return dd["samples"] * dd.get("max_length", c.get("max_length", 1024)) if "samples" in dd else C

        # forward passes over each method's own data, as its loop runs them (block-forwards counted as whole-model ones)
        passes = {"block-influence": 1, "sleb": n * max(1, L - 2) / 2, "shortened-ppl": L / 2, "shortened-taylor": 3,
                  "laco": 2 * n, "laco-code": 2 * n, "linearpatch": 2, "linearpatch-diag": 2, "prune-comp": 2 * n,
                  "streamline": 2}
        for name in methods:
            w.forward(m, passes.get(name, 2) * tokens(name))
        steps_sl = ((P13.get("options") or {}).get("streamline") or {}).get("steps", 200)
        w.train(m, steps_sl * 8 * c.get("max_length", 1024) / max(1, L))  # one layer of L, 8 sequences per step
        fixed, swap = len(P13.get("fixed_blocks", [])), len(P13.get("swap", []))
        count = 1 + 3 + len(methods) + fixed + swap + len(P13.get("regime_methods", []))  # + baseline, UIDL, LS, cosine
        evals(w, m, suite(P13.get("suite", "main")), count); ppl(w, m, 2 * count)  # held-out ppl and KL
        w.memory(3 * m.weight_gb)
    cf = p.get("confirmatory") or {}
    if cf.get("suite"):
        w = W["14"]
        count = 1 + 2 * cf.get("max_picks", 2) + 2 + 2  # baseline; UIDL, LS per pick; cosine ×2; the regime pair
        evals(w, m, suite(cf["suite"]), count); w.memory(two)
    return W


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _fmt_n(x: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= f:
            return f"{x / f:.1f}{unit}"
    return f"{x:.0f}"
