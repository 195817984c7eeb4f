"""Evaluation: lm-eval tasks (packaged local data or lm-eval's own hub tasks), perplexity, result cache.

What the paper measures (paper.md §1.9, the official `utils.eval_model`, lm-eval HF backend):
WinoGrande 5-shot; BoolQ, RACE, OpenBookQA, PIQA, SciQ, LAMBADA-OpenAI 0-shot. Per-task metric
(model-card headers): race acc, winogrande acc, piqa acc_norm, boolq acc, openbookqa acc_norm,
sciq acc_norm, lambada acc. "Avg-acc" = mean of the six accuracy tasks race, winogrande, piqa,
boolq, openbookqa, sciq; "perplexity" = LAMBADA-OpenAI perplexity. All of that lives in the
declarative `TASKS` table below.

Local tasks. `replaceme_core/tasks/<benchmark>.yaml` are lm-eval task YAMLs in the *override*
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

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .cache import atomic_write_text, cache_dir, hash_bytes, hash_file, stable_json
from .data import hub_reachable

# Bump when the layout of cached result files or the meaning of a key field changes.
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# The declarative task table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    hub: str            # lm-eval's own task (or group) name
    metric: str         # the metric reported for this task (paper's choice where the paper has one)
    num_fewshot: int    # paper default
    yaml: str | None    # local override YAML in replaceme_core/tasks (None: no offline data)


TASKS: dict[str, TaskSpec] = {
    # the paper's suite (official code: utils.eval_model)
    "race": TaskSpec("race", "acc", 0, None),
    "winogrande": TaskSpec("winogrande", "acc", 5, "winogrande.yaml"),
    "piqa": TaskSpec("piqa", "acc_norm", 0, "piqa.yaml"),
    "boolq": TaskSpec("boolq", "acc", 0, "boolq.yaml"),
    "openbookqa": TaskSpec("openbookqa", "acc_norm", 0, "openbookqa.yaml"),
    "sciq": TaskSpec("sciq", "acc_norm", 0, "sciq.yaml"),
    "lambada_openai": TaskSpec("lambada_openai", "acc", 0, "lambada_openai.yaml"),
    # outside the paper's suite: acc_norm where lm-eval reports it, else acc
    "arc_easy": TaskSpec("arc_easy", "acc_norm", 0, "arc_easy.yaml"),
    "arc_challenge": TaskSpec("arc_challenge", "acc_norm", 0, "arc_challenge.yaml"),
    "hellaswag": TaskSpec("hellaswag", "acc_norm", 0, "hellaswag.yaml"),
    "mmlu": TaskSpec("mmlu", "acc", 0, "mmlu.yaml"),
    # BIG-bench multiple-choice tasks that BBH draws from (Fig. 9 analogue), 0-shot, from the bigbench sdist
    # (assets.bigbench_files); the override YAMLs include lm-eval's bigbench/multiple_choice/<task>.yaml. The hub
    # fallback is lm-eval's bigbench_<task>_multiple_choice (for logical deduction: all three subtasks).
    **{f"bigbench_{t}": TaskSpec(f"bigbench_{h}_multiple_choice", "acc", 0, f"bigbench_{t}.yaml") for t, h in (
        ("causal_judgment", "causal_judgment"), ("date_understanding", "date_understanding"),
        ("disambiguation_qa", "disambiguation_qa"), ("hyperbaton", "hyperbaton"),
        ("logical_deduction_three_objects", "logical_deduction"), ("navigate", "navigate"), ("snarks", "snarks"),
        ("sports_understanding", "sports_understanding"))},
    # Open LLM Leaderboard v2 (paper Fig. 9; hub only), the leaderboard's few-shot counts and main metrics
    "leaderboard_bbh": TaskSpec("leaderboard_bbh", "acc_norm", 3, None),
    "leaderboard_gpqa": TaskSpec("leaderboard_gpqa", "acc_norm", 0, None),
    "leaderboard_math_hard": TaskSpec("leaderboard_math_hard", "exact_match", 4, None),
    "leaderboard_musr": TaskSpec("leaderboard_musr", "acc_norm", 0, None),
    "leaderboard_mmlu_pro": TaskSpec("leaderboard_mmlu_pro", "acc", 5, None),
}
ALIASES = {"lambada": "lambada_openai", "obqa": "openbookqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}

#: the paper's "Avg-acc": mean over these (those that ran), each with its TASKS metric
AVG_ACC_TASKS: tuple[str, ...] = ("race", "winogrande", "piqa", "boolq", "openbookqa", "sciq")
#: the paper's full lm-eval suite
PAPER_TASKS: tuple[str, ...] = AVG_ACC_TASKS + ("lambada_openai",)
#: default for evaluate() and `replaceme eval`: the paper's suite. RACE runs from the hub when it is
#: reachable and is skipped with a note when it is not (no offline data exists for it).
DEFAULT_TASKS: tuple[str, ...] = PAPER_TASKS

TASKS_DIR = Path(__file__).parent / "tasks"
MMLU_SUBJECT_TEMPLATE = "_mmlu_subject_template.yaml"


def canonical_task(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return key


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    if tasks is None:
        return list(DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in tasks:
        c = canonical_task(t)
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError("no tasks given")
    return out


def resolve_fewshot(task: str, num_fewshot: int | Mapping[str, int] | None) -> int:
    """Paper default (WinoGrande 5, others 0) unless overridden: an int applies to every task, a mapping per task."""
    if num_fewshot is None:
        return TASKS[task].num_fewshot
    if isinstance(num_fewshot, Mapping):
        over = {canonical_task(k): int(v) for k, v in num_fewshot.items()}
        return over.get(task, TASKS[task].num_fewshot)
    return int(num_fewshot)


def avg_acc(per_task_values: Mapping[str, float]) -> tuple[float | None, list[str]]:
    """The paper's Avg-acc: mean of the AVG_ACC_TASKS values present (values already in each task's metric)."""
    used = [t for t in AVG_ACC_TASKS if t in per_task_values and per_task_values[t] is not None]
    if not used:
        return None, []
    return sum(float(per_task_values[t]) for t in used) / len(used), used


# --------------------------------------------------------------------------------------------
# Rendering the local task YAMLs
# --------------------------------------------------------------------------------------------
def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _FILE_HASHES:
        _FILE_HASHES[k] = hash_file(p)
    return _FILE_HASHES[k]


def _upstream_splits(upstream_yaml: Path) -> dict[str, str | None]:
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(upstream_yaml, resolve_func=False)
    return {k: cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}


def _render_one(template_text: str, subs: Mapping[str, str], files: Mapping[str, Path]) -> tuple[dict, dict]:
    """Return (rendered config with absolute paths, path-free content for cache keys)."""
    import yaml

    text = template_text
    for k, v in subs.items():
        text = text.replace("{" + k + "}", v)
    cfg = yaml.safe_load(text)
    upstream = Path(cfg["include"])
    if not upstream.is_file():
        raise FileNotFoundError(f"lm-eval task YAML {upstream} not found (lm-eval version mismatch?)")
    splits = _upstream_splits(upstream)
    local = {str(s): Path(p) for s, p in files.items()}
    for field, name in splits.items():
        if name is not None or field == "fewshot_split":
            cfg[field] = name if (name is not None and name in local) else None
    used = sorted({v for v in (cfg.get(f) for f in splits) if v is not None})
    if not used:
        raise ValueError(f"{cfg['task']}: none of the upstream splits {splits} is in the local data {sorted(local)}")
    cfg["dataset_kwargs"] = {"data_files": {s: str(local[s].resolve()) for s in used}}
    key_content = {
        "template": template_text,
        "subs": {k: v for k, v in subs.items() if k != "LM_EVAL_TASKS"},
        "splits": {f: cfg.get(f) for f in splits},
        "data": {s: _file_hash(local[s]) for s in used},
    }
    return cfg, key_content


@dataclass
class LocalTasks:
    include_path: Path
    names: dict[str, str]         # benchmark -> lm-eval task/group name
    content_keys: dict[str, str]  # benchmark -> hash of path-free task content


def render_local_tasks(files: Mapping[str, Mapping[str, Path]] | None = None, benchmarks: Iterable[str] | None = None) -> LocalTasks:
    """Render the packaged override YAMLs for the benchmarks the local data has; return where and what."""
    import yaml

    if files is None:
        from . import assets

        files = assets.benchmark_files()
    wanted = set(benchmarks) if benchmarks is not None else set(TASKS)
    tasks_dir = str(lm_eval_tasks_dir())
    rendered: dict[str, str] = {}   # file name -> yaml text
    names: dict[str, str] = {}
    keys: dict[str, str] = {}
    for bench in sorted(wanted):
        spec = TASKS[bench]
        if spec.yaml is None:
            continue
        template = (TASKS_DIR / spec.yaml).read_text()
        if bench == "mmlu":
            subjects = sorted(k[len("mmlu_"):] for k in files if k.startswith("mmlu_"))
            if not subjects:
                continue
            sub_template = (TASKS_DIR / MMLU_SUBJECT_TEMPLATE).read_text()
            group = yaml.safe_load(template)
            parts = []
            for subj in subjects:
                cfg, kc = _render_one(sub_template, {"LM_EVAL_TASKS": tasks_dir, "SUBJECT": subj}, files[f"mmlu_{subj}"])
                rendered[f"mmlu_{subj}_local.yaml"] = yaml.safe_dump(cfg, sort_keys=False)
                parts.append(kc)
            group["task"] = [f"mmlu_{s}_local" for s in subjects]
            rendered["mmlu_local.yaml"] = yaml.safe_dump(group, sort_keys=False)
            names[bench] = group["group"]
            keys[bench] = hash_bytes(stable_json({"group": template, "subjects": parts}))
        else:
            if bench not in files:
                continue
            cfg, kc = _render_one(template, {"LM_EVAL_TASKS": tasks_dir}, files[bench])
            rendered[f"{cfg['task']}.yaml"] = yaml.safe_dump(cfg, sort_keys=False)
            names[bench] = cfg["task"]
            keys[bench] = hash_bytes(stable_json(kc))
    digest = hash_bytes(stable_json(rendered))[:16]
    out = cache_dir("tasks", digest)
    for fname, text in rendered.items():
        p = out / fname
        if not p.exists() or p.read_text() != text:
            atomic_write_text(p, text)
    return LocalTasks(out, names, keys)


# --------------------------------------------------------------------------------------------
# Content hashes of models and tokenizers
# --------------------------------------------------------------------------------------------
def _config_identity(cfg: Mapping[str, Any]) -> dict:
    # bookkeeping fields that do not change what the model computes (save_pretrained adds `architectures`)
    drop = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "name_or_path", "architectures"}
    return {k: v for k, v in cfg.items() if k not in drop and not k.startswith("_")}


def hash_state_dict(model) -> str:
    """sha256 over (name, shape, dtype, bytes) of every tensor in the state dict; tied tensors hashed once."""
    import hashlib

    import torch

    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        ident = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if ident in seen and t.device.type != "meta":
            h.update(f"=alias:{seen[ident]}".encode())
            continue
        seen[ident] = name
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).cpu().numpy()))
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(stable_json(_config_identity(cfg.to_dict())).encode())
    return h.hexdigest()


def hash_model_dir(path: str | Path) -> str | None:
    """Hash of a checkpoint directory's weight files (by content) and config, or None if it has none."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    cfg_file = path / "config.json"
    if not weights or not cfg_file.is_file():
        return None
    parts = [(p.name, _file_hash(p)) for p in weights]
    cfg = _config_identity(json.loads(cfg_file.read_text()))
    return hash_bytes(stable_json({"files": parts, "config": cfg}))


def hash_tokenizer(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # drop the transient truncation/padding state that every tokenizer call with truncation= rewrites
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        body = stable_json(spec)
    else:
        body = stable_json(sorted(tok.get_vocab().items()))
    special = {k: str(v) for k, v in (getattr(tok, "special_tokens_map", {}) or {}).items()}
    return hash_bytes(body, stable_json(special), str(getattr(tok, "add_bos_token", None)))


# --------------------------------------------------------------------------------------------
# Model handling
# --------------------------------------------------------------------------------------------
def default_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str):
    import torch

    return torch.float32 if device.startswith("cpu") else torch.bfloat16


class _ModelRef:
    """A model given by name/path (loaded lazily, hashed by file content) or as an in-memory object."""

    def __init__(self, model, tokenizer=None, device: str | None = None, dtype=None):
        from transformers import PreTrainedModel

        self.device = default_device(device)
        self._model = None
        self._hash: str | None = None
        self._tok = None
        self._tok_src = tokenizer
        if isinstance(model, PreTrainedModel) or hasattr(model, "state_dict"):
            self._model = model
            self.path = None
            self.name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
            self.dtype = str(next(model.parameters()).dtype)
        else:
            from . import assets

            self.name = str(model)
            self.path = assets.resolve_model(str(model))
            self._dtype = dtype or _default_dtype(self.device)
            self.dtype = str(self._dtype)
        if self._tok_src is None and self.path is None:
            guess = getattr(self._model, "name_or_path", None)
            if guess and Path(guess).is_dir():
                self._tok_src = guess
            else:
                raise ValueError("an in-memory model needs tokenizer= (a tokenizer object, path or name)")

    @property
    def tokenizer(self):
        if self._tok is None:
            src = self._tok_src if self._tok_src is not None else self.path
            if isinstance(src, (str, Path)):
                from transformers import AutoTokenizer

                if not Path(src).exists() and self.path is None:
                    with contextlib.suppress(Exception):
                        from . import assets

                        src = str(assets.tokenizer_path(str(src)))
                self._tok = AutoTokenizer.from_pretrained(str(src))
            else:
                self._tok = src
        return self._tok

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            h = hash_model_dir(self.path) if self.path is not None and Path(self.path).is_dir() else None
            self._hash = h if h is not None else hash_state_dict(self.model)
        return self._hash

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self._dtype)
            self._model.eval()
        if str(next(self._model.parameters()).device) != str(self.device) and not (
            self.device == "cuda" and next(self._model.parameters()).device.type == "cuda"
        ):
            self._model.to(self.device)
        return self._model

    def identity(self) -> dict:
        return {"weights": self.weights_hash, "tokenizer": hash_tokenizer(self.tokenizer), "dtype": self.dtype}


# --------------------------------------------------------------------------------------------
# Hub reachability (auto mode only)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------
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
    }


def _cache_path(key: str) -> Path:
    return cache_dir("eval") / f"{key}.json"


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
) -> dict[str, Any]:
    """Score `model` on lm-eval tasks; see the module docstring for sources, few-shot and caching.

    model: packaged name / local dir / hub id (resolved with assets.resolve_model, loaded in float32 on
    CPU, bfloat16 on CUDA) or an in-memory `PreTrainedModel` (moved to `device`; needs `tokenizer`).
    limit: documents per task (first N, lm-eval's rule), or a fraction if < 1.
    num_fewshot: None = paper defaults (WinoGrande 5, others 0); int = every task; mapping = per task.

    Returns {
      "tasks": {bench: {"task": lm-eval name, "source": "local"|"hub", "metric", "value", "stderr",
                        "n": documents scored, "num_fewshot", "metrics": every lm-eval metric (name -> value,
                        "<m>_stderr" too), "per_doc": {"doc_id": [...], "<metric>": [0/1 ...] (acc, acc_norm),
                        "loglikelihood": [...] for LAMBADA, "subtask": [...] for MMLU}, "cached": bool,
                        "cache_key"}},
      "avg_acc": paper Avg-acc over the AVG_ACC_TASKS present (None if none), "avg_acc_tasks": [...],
      "avg_acc_missing": [...], "lambada_ppl": LAMBADA perplexity (only if it ran), "lambada_acc",
      "skipped": {bench: reason}, "model": {...identity}, "config": {...}}
    """
    import lm_eval

    if source not in ("auto", "local", "hub"):
        raise ValueError("source must be auto, local or hub")
    benches = parse_tasks(tasks)
    dev = default_device(device)
    ref = _ModelRef(model, tokenizer, dev)

    # ---- where each task comes from
    files: Mapping[str, Mapping[str, Path]] = {}
    if source != "hub" and any(TASKS[b].yaml for b in benches):
        try:
            from . import assets

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
            "lm_eval": lm_eval.__version__}
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
        if use_cache and p.is_file():
            try:
                out_tasks[b] = dict(json.loads(p.read_text()), cached=True)
                continue
            except (OSError, json.JSONDecodeError):
                pass
        todo.append(b)

    # ---- run lm-eval for the misses, one call per few-shot count
    if todo:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        need_hub = any(plan[b][0] == "hub" for b in todo)
        tm = TaskManager(include_path=str(local.include_path) if local.names else None, include_defaults=need_hub)
        hf = ref.model
        hf.eval()
        lm = HFLM(pretrained=hf, tokenizer=ref.tokenizer, batch_size=batch_size, device=dev)
        for k in sorted({shots[b] for b in todo}):
            group = [b for b in todo if shots[b] == k]
            names = [plan[b][1] for b in group]
            _log(f"[eval] running {', '.join(group)} ({k}-shot, limit={limit}) on {dev}", progress)
            t0 = time.time()
            res = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=k, limit=limit, task_manager=tm, log_samples=True,
                bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, batch_size=batch_size,
            )
            dt = time.time() - t0
            for b in group:
                r = _extract(res, b, plan[b][1], k)
                r.update(source=plan[b][0], cache_key=keys[b], seconds=dt / len(group))
                atomic_write_text(_cache_path(keys[b]), json.dumps(r))
                out_tasks[b] = dict(r, cached=False)

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
        "config": {"limit": limit, "seed": seed, "device": dev, "batch_size": batch_size, "source": source,
                   "bootstrap_iters": bootstrap_iters, "lm_eval": lm_eval.__version__},
    }
    if "lambada_openai" in ordered:
        lam = ordered["lambada_openai"]
        result["lambada_ppl"] = lam["metrics"].get("perplexity")
        result["lambada_acc"] = lam["metrics"].get("acc")
    return result


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------
def perplexity(
    model,
    tokenizer=None,
    texts: Sequence[str] = (),
    max_length: int = 512,
    batch_size: int = 8,
    device: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Token-weighted perplexity over `texts`: exp(sum of next-token NLL / number of predicted tokens).

    Each text is tokenized on its own (tokenizer's special tokens, truncated to max_length); token t
    predicts t+1, so a text of L tokens contributes L-1 predictions. Batches are right-padded and
    pad positions are masked out of both attention and loss, so batching does not change the result.
    Returns {"ppl", "nll" (mean NLL per predicted token), "tokens" (predicted tokens), "texts"}.
    Cached by content (weights + tokenizer hash, texts hash, max_length).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    texts = list(texts)
    ref = _ModelRef(model, tokenizer, device)
    tok = ref.tokenizer
    key = hash_bytes(stable_json({"v": CACHE_VERSION, "kind": "ppl", "model": ref.identity(), "max_length": max_length,
                                  "texts": hash_bytes(stable_json(texts))}))
    path = cache_dir("eval") / f"ppl-{key}.json"
    if use_cache and path.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads(path.read_text())
    encoded = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    m = ref.model
    dev = next(m.parameters()).device
    total_nll = 0.0
    total_tok = 0
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = m.training
    m.eval()
    with torch.inference_mode():
        for idx in tqdm(batches, desc="perplexity", disable=not progress):
            seqs = [encoded[i] for i in idx if len(encoded[i]) >= 2]
            if not seqs:
                continue
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            logits = m(input_ids=ids, attention_mask=mask).logits.float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                  ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tok += int((labels != -100).sum())
    if was_training:
        m.train()
    if total_tok == 0:
        raise ValueError("perplexity: no text has two or more tokens")
    mean = total_nll / total_tok
    out = {"ppl": math.exp(mean), "nll": mean, "tokens": total_tok, "texts": len(texts)}
    atomic_write_text(path, json.dumps(out))
    return out


# --------------------------------------------------------------------------------------------
# Reporting and CLI
# --------------------------------------------------------------------------------------------
def _fmt(x, nd=4) -> str:
    return f"{x:.{nd}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def summary_table(results: Mapping[str, Any]) -> str:
    """Markdown table: one row per task, then Avg-acc (paper definition) and LAMBADA perplexity."""
    lines = ["| task | source | shots | metric | value | stderr | n |", "|---|---|---:|---|---:|---:|---:|"]
    for b, r in results.get("tasks", {}).items():
        lines.append(f"| {b} | {r.get('source', '')} | {r.get('num_fewshot', '')} | {r.get('metric', '')} | "
                     f"{_fmt(r.get('value'))} | {_fmt(r.get('stderr'))} | {r.get('n', '')} |")
    if results.get("avg_acc") is not None:
        used = results.get("avg_acc_tasks", [])
        note = f"{len(used)}/{len(AVG_ACC_TASKS)} tasks" + (f", missing {', '.join(results.get('avg_acc_missing', []))}"
                                                           if results.get("avg_acc_missing") else "")
        lines.append(f"| **Avg-acc** ({note}) | | | | {_fmt(results['avg_acc'])} | | |")
    if results.get("lambada_ppl") is not None:
        lines.append(f"| **LAMBADA ppl** | | | perplexity | {_fmt(results['lambada_ppl'], 3)} | | |")
    for b, why in results.get("skipped", {}).items():
        lines.append(f"| {b} | skipped | | | – | | ({why}) |")
    return "\n".join(lines)


_CLI_EPILOG = f"""\
Tasks: {', '.join(TASKS)} (aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())}).
Default: the paper's suite {','.join(DEFAULT_TASKS)}. Few-shot defaults follow the paper: winogrande 5-shot,
every other task 0-shot. Metrics: race acc, winogrande acc, piqa acc_norm, boolq acc, openbookqa acc_norm,
sciq acc_norm, lambada acc (+ perplexity); outside the paper's set acc_norm where lm-eval has it, else acc.
Avg-acc = mean over race, winogrande, piqa, boolq, openbookqa, sciq (those that ran).

Sources: 'local' runs lm-eval's own task definitions on the packaged benchmark files (no network);
'hub' runs lm-eval's tasks with data from the HF hub; 'auto' uses local data where it exists and the
hub otherwise. RACE has no offline data: in auto mode without the hub it is skipped with a note.

Results are cached under $REPLACEME_CACHE/eval (default ~/.cache/replaceme/eval), keyed by the content
of the weights, tokenizer, task definition and data, limit, few-shot count, seed and lm-eval version.

Examples:
  replaceme eval smollm2-135m-instruct --limit 200
  replaceme eval out/pruned --tasks arc_easy,piqa --output results.json
  replaceme eval meta-llama/Meta-Llama-3-8B-Instruct --source hub --device cuda
"""


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model with lm-eval (paper suite; local packaged data or HF hub)",
        description="Evaluate a model on lm-eval tasks and print a markdown summary (per-task metric, Avg-acc, LAMBADA perplexity).",
        epilog=_CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="packaged model name (e.g. smollm2-135m-instruct), local checkpoint directory, or hub id")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task list (default: %(default)s)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (first N); a value below 1 is a fraction of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default: %(default)s; not part of the cache key)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples for every task (default: paper settings, winogrande 5, others 0)")
    p.add_argument("--source", choices=("auto", "local", "hub"), default="auto",
                   help="where task data comes from (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if cached results exist (and overwrite them)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path/name if it differs from the model's")
    p.add_argument("--seed", type=int, default=0, help="seed for lm-eval's samplers and torch (default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the full result dict (incl. per-document scores) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no per-task progress lines")
    p.set_defaults(func=_cli_eval)
    return p


def _cli_eval(args: argparse.Namespace) -> int:
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        res = evaluate(args.model, tokenizer=args.tokenizer, tasks=args.tasks, limit=limit, batch_size=args.batch_size,
                       num_fewshot=args.num_fewshot, device=args.device, source=args.source,
                       use_cache=not args.no_cache, seed=args.seed, progress=not args.quiet)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"replaceme eval: error: {e}", file=sys.stderr)
        return 2
    print(summary_table(res))
    if args.output:
        atomic_write_text(args.output, json.dumps(res, indent=1))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
