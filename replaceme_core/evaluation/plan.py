"""Request plan: what to score for one model — which tasks, from where, on which documents, under which cache keys.

Nothing here runs a model. `plan_requests` decides each task's source (packaged data rendered as a local lm-eval task,
or lm-eval's own hub task), its few-shot count, and the content key its result is cached under (see `runner`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.cache import hash_bytes, stable_json
from ..io.data import hub_reachable
from .local_tasks import LocalTasks, render_local_tasks
from .model_ref import _ModelRef
from .results import CACHE_VERSION
from .suite import AVG_ACC_TASKS, TASKS, parse_tasks, resolve_fewshot

SOURCES = ("auto", "local", "hub")


def log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def check_documents(limit, docs) -> tuple[int | float | None, tuple[int, int] | None]:
    """`limit` (first N documents, or a fraction in (0, 1)) or `docs` (start, stop), checked before any work."""
    if limit is not None and docs is not None:
        raise ValueError("give either limit (the first N documents) or docs (a range), not both")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
            raise ValueError(f"limit must be a positive number of documents or a fraction in (0, 1), got {limit!r}")
        if limit >= 1:
            if limit != int(limit):
                raise ValueError(f"limit must be a whole number of documents (or a fraction below 1), got {limit!r}")
            limit = int(limit)
    if docs is not None:
        if len(docs) != 2 or not 0 <= int(docs[0]) < int(docs[1]):
            raise ValueError(f"docs must be (start, stop) with 0 <= start < stop, got {docs!r}")
        docs = (int(docs[0]), int(docs[1]))
    return limit, docs


@dataclass
class RequestPlan:
    """One model's evaluation: {bench: (source, lm-eval name)}, few-shot counts and cache keys, and what was skipped."""

    ref: _ModelRef
    local: LocalTasks
    tasks: dict[str, tuple[str, str]]
    shots: dict[str, int]
    keys: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> dict:
        return self.ref.identity()


def _task_sources(benches: Sequence[str], source: str, progress: bool) -> tuple[LocalTasks, dict, dict]:
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
            log(f"[eval] packaged benchmark data unavailable ({type(e).__name__}: {e}); using lm-eval's hub tasks", progress)
            files = {}
    local = render_local_tasks(files, list(benches)) if source != "hub" else LocalTasks(Path(), {}, {})
    tasks: dict[str, tuple[str, str]] = {}
    skipped: dict[str, str] = {}
    for b in benches:
        if b in local.names:
            tasks[b] = ("local", local.names[b])
        elif source == "local":
            raise ValueError(f"{b}: no packaged offline data for this task (source='local'); use source='hub' or 'auto'")
        elif source == "hub" or hub_reachable():
            tasks[b] = ("hub", TASKS[b].hub)
        else:
            skipped[b] = "no packaged offline data and the HF hub is not reachable"
    for b, why in skipped.items():
        log(f"[eval] NOTE: skipping {b}: {why}" + (" (Avg-acc will average the remaining tasks)" if b in AVG_ACC_TASKS else ""),
            progress)
    if not tasks:
        raise RuntimeError("nothing to evaluate: " + "; ".join(f"{b}: {w}" for b, w in skipped.items()))
    return local, tasks, skipped


def plan_requests(ref: _ModelRef, tasks, *, limit, docs, num_fewshot, source: str, seed: int, bootstrap_iters: int,
                  backend: str, progress: bool, sources=None) -> RequestPlan:
    """The plan for one model; `sources` (from an earlier plan of the same tasks) skips rendering them again."""
    import lm_eval

    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    benches = parse_tasks(tasks)
    local, planned, skipped = sources or _task_sources(benches, source, progress)
    settings = {"limit": limit, **({"docs": list(docs)} if docs else {}), "seed": seed,
                "bootstrap_iters": bootstrap_iters, "lm_eval": lm_eval.__version__, "backend": backend}
    base = {"v": CACHE_VERSION, "model": ref.identity(), **settings}
    shots, keys = {}, {}
    for b, (src, name) in planned.items():
        shots[b] = resolve_fewshot(b, num_fewshot)
        content = local.content_keys[b] if src == "local" else None
        keys[b] = hash_bytes(stable_json({**base, "task": b, "source": src, "lm_name": name, "content": content,
                                          "num_fewshot": shots[b]}))
    return RequestPlan(ref, local, dict(planned), shots, keys, dict(skipped), settings)
