"""Result store: what lm-eval returned for one (model, task), extracted, cached by content, with its sample logs.

One JSON file per (model, task) under `cache_dir("eval")`, keyed by `plan.RequestPlan` (weights, tokenizer, task
content, documents, few-shot count, seed, bootstrap iterations, dtype, backend, lm-eval version); beside it, when asked,
lm-eval's own per-sample records. A corrupted entry reads as a miss and is scored again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..io.cache import atomic_write_text, cache_dir
from .suite import TASKS

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


def task_result(res: Mapping[str, Any], bench: str, lm_name: str, num_fewshot: int) -> dict[str, Any]:
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


def task_samples(res: Mapping[str, Any], lm_name: str) -> dict[str, list]:
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


class ResultStore:
    """Task results and sample records by cache key (`RequestPlan.keys`)."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or cache_dir("eval")

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def samples_path(self, key: str) -> Path:
        return self.directory / f"{key}.samples.json"

    def load(self, key: str, per_doc_fields: Sequence[str] = (), need_samples: bool = False) -> dict | None:
        """The cached result, or None when absent, corrupted, lacking a needed per-document field, or lacking the
        sample records a `log_samples` call needs."""
        if need_samples and not self.samples_path(key).is_file():
            return None
        try:
            entry = json.loads(self.path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not all(f in entry.get("per_doc", {}) or f in entry.get("derived_fields", ()) for f in per_doc_fields):
            return None
        return entry

    def save(self, key: str, result: Mapping[str, Any], samples: Mapping[str, list] | None = None) -> None:
        if samples is not None:
            from lm_eval.utils import handle_non_serializable

            atomic_write_text(self.samples_path(key), json.dumps(samples, default=handle_non_serializable, ensure_ascii=False))
        atomic_write_text(self.path(key), json.dumps(result))

    def write_sample_logs(self, key: str, out_dir: Path) -> None:
        """One `samples_<lm-eval task>.jsonl` per task, each line one record, serialised the way lm-eval's CLI does."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for task, records in json.loads(self.samples_path(key).read_text()).items():
            lines = [json.dumps(r, ensure_ascii=False) for r in records]
            atomic_write_text(out_dir / f"samples_{task}.jsonl", "".join(line + "\n" for line in lines))
