"""Offline pre-flight check of a profile: `python -m replaceme_core.experiments.paper --profile NAME --check`.

Why: `make paper PROFILE=paper` needs a GPU host, the Hugging Face hub and ~16 GB of weights before its first
notebook says anything, so a wrong key, task name, dataset field or model id would surface hours in. This check
runs in seconds on any machine, opens no network connection (it enforces that) and loads no weights. It validates
what can be validated without the hub, prints what a run would download and roughly how long it would take on one
GPU, and exits non-zero with one line per problem.

The facts it checks against are data in facts.py, each with its source: the dataset cards (`DATASET_CARDS`),
the models' published configs (`HUB_MODELS`), benchmark sizes (`TASK_COST`) and the GPU assumptions (`GPU`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .estimate import _fmt_n, _fmt_s, estimate
from .facts import DATASET_CARDS, GPU
from .models import ModelFacts, check_model, check_vision
from .notebook_scan import NOTEBOOKS_DIR, _missing, check_parameters_cell, scan_notebook
from .report import NetworkUsed, Report, no_network
from .schema import _is_int, check_schema
from .sources import check_loaders, check_sources
from .tasks import _task_closure, check_task_dependencies, check_tasks, lm_eval_index


def _profile_and_label(name_or_path: str | dict) -> tuple[dict, str, Path | None]:
    from ..workbench import load_profile

    if isinstance(name_or_path, dict):
        return dict(name_or_path), str(name_or_path.get("name", "<dict>")), None
    prof = load_profile(name_or_path)
    path = Path(name_or_path)
    named = not (path.suffix in (".yaml", ".yml") and path.exists())
    label = name_or_path if named else str(prof.get("name", path.stem) if isinstance(prof, dict) else path.stem)
    return prof, label, (None if named else path)


def check_profile(name_or_path: str | dict, notebooks_dir: str | Path = NOTEBOOKS_DIR) -> Report:
    """Every offline check of one profile; the Report holds the problems, what would be downloaded and the estimate."""
    profile, label, _ = _profile_and_label(name_or_path)
    rep = Report(label)
    if not isinstance(profile, dict):
        rep.error("the profile is not a YAML mapping")
        return rep
    if isinstance(name_or_path, str) and not Path(name_or_path).suffix and profile.get("name") != name_or_path:
        rep.error(f"its `name` is {profile.get('name')!r}, not {name_or_path!r} (figures/README.md and the cache label use it)")
    with no_network():
        check_schema(profile, rep)

        # notebooks: parameters cell, and every key they read
        nbdir = Path(notebooks_dir)
        notebooks = sorted(nbdir.glob("[0-9][0-9]_*.ipynb"))
        if not notebooks:
            rep.error(f"no notebooks found in {nbdir}")
        for nb in notebooks:
            why = check_parameters_cell(nb)
            rep.count("notebooks")
            if why:
                rep.error(f"notebook {nb.stem[:2]} cannot take the profile's parameters: {why}")
            for steps in scan_notebook(nb):
                rep.count("notebook reads")
                gone = _missing(profile, steps)
                if gone:
                    rep.error(f"notebook {nb.stem[:2]} reads {gone}, which the profile lacks")

        # models
        facts: dict[str, ModelFacts] = {}
        n = profile.get("num_blocks")
        blocks = [b for b in [n, *(profile.get("sweep_blocks") or [])] if _is_int(b)]
        if isinstance(profile.get("model"), str):
            f = check_model(profile["model"], "model", rep, blocks=blocks, needs_general_fold=True)
            if f:
                facts[profile["model"]] = f
        for i, entry in enumerate((profile.get("10_models_and_scale") or {}).get("models") or []):
            if isinstance(entry, dict) and isinstance(entry.get("model"), str):
                ks = [b for b in (entry.get("sweep_blocks") or []) + (entry.get("table_blocks") or []) if _is_int(b)]
                f = check_model(entry["model"], f"10_models_and_scale.models[{i}]", rep, blocks=ks)
                if f:
                    facts[entry["model"]] = f
        vision = check_vision(profile, rep)

        # evaluation tasks
        index = lm_eval_index()
        used_hub: dict[str, set[str]] = {}
        check_tasks(profile, rep, index, used_hub)
        check_task_dependencies(rep, index, used_hub)

        # text sources and the hub loaders' fields
        downloads: dict[str, dict] = {}
        check_sources(profile, rep, downloads)
        check_loaders(rep)

        # suites named by the profile itself exist
        for where in ("selection_sweep.suite", "objectives_and_solvers.suite", "structure_and_multi_lt.suite",
                      "10_models_and_scale.suite", "healing.suite"):
            sec, key = where.split(".")
            value = (profile.get(sec) or {}).get(key)
            if isinstance(value, str) and value not in (profile.get("eval") or {}):
                rep.error(f"{where} is {value!r}, which is not a suite in `eval` ({', '.join(profile.get('eval') or {})})")

        _set_dtype(profile, list(facts.values()) + ([vision] if vision else []))
        h200 = GPU["memory_gb"][1]
        for name, f in facts.items():  # the Workbench keeps a model and a pruned copy on ONE device: weights alone must fit
            if f.weight_gb * 2 > h200:
                rep.error(f"{name}: its weights ({f.weight_gb:.0f} GB) and the pruned copy a Workbench makes do not fit one "
                          f"{h200:.0f} GB GPU (the Workbench has no device_map): prune it with `replaceme prune --device-map "
                          "auto` instead (bench/SCALE.md)")
        _downloads(rep, facts, vision, downloads, index, used_hub)
        if not rep.errors:  # the estimate assumes a well-formed profile
            _estimates(rep, profile, facts, vision)
    return rep


def _set_dtype(profile: dict, facts: list[ModelFacts]) -> None:
    """Bytes per parameter from the profile's dtype (bfloat16 when it names none: what a GPU run loads)."""
    import torch

    from ...io.models import DTYPES

    dtype = DTYPES.get(str(profile.get("dtype")), torch.bfloat16)
    for f in facts:
        f.bytes_per_param = torch.empty((), dtype=dtype).element_size()


def _downloads(rep: Report, facts: dict[str, ModelFacts], vision: ModelFacts | None, downloads: dict,
               index: dict, used_hub: dict[str, set[str]]) -> None:
    total = 0.0
    for f in list(facts.values()) + ([vision] if vision else []):
        if f.where != "hub":
            continue
        total += f.download_gb
        gated = {True: "gated: accept the licence on the hub and set HF_TOKEN", False: "not gated",
                 None: "gating not known here: look at the model card"}[f.gated]
        rep.downloads.append(f"model   {f.name}: {f.model_type}, {f.layers} blocks, d={f.hidden}, {f.params / 1e9:.2f}B "
                             f"parameters, ≈{f.download_gb:.1f} GB; {gated}" + (f" ({f.note})" if f.note else ""))
    for ds, info in sorted(downloads.items()):
        card = DATASET_CARDS.get(ds)
        rep.downloads.append(f"dataset {ds}: up to {info['rows']} rows for {', '.join(sorted(info['uses']))}; "
                             f"{card.size if card else 'size unknown'}")
    lm_sets: dict[str, set[str]] = {}
    for hub_name in used_hub:
        for member in _task_closure(index, hub_name):
            ds = index[member].get("dataset")
            if ds:
                lm_sets.setdefault(ds, set()).add(hub_name)
    for ds, tasks in sorted(lm_sets.items()):
        rep.downloads.append(f"dataset {ds}: lm-eval data of {', '.join(sorted(tasks))} (evaluation sets: MB, not GB)")
    if rep.downloads:
        rep.downloads.append(f"total model weights ≈ {total:.1f} GB (plus the datasets above)")


def _estimates(rep: Report, profile: dict, facts: dict[str, ModelFacts], vision: ModelFacts | None) -> None:
    work = estimate(profile, facts, vision)
    if not work:
        return
    h100, h200 = GPU["memory_gb"]
    total = 0.0
    rep.estimate.append(f"{'notebook':8s} {'fwd tokens':>10s} {'train tok':>10s} {'GPU time':>9s} {'GPU mem':>8s} {'store disk':>10s}")
    for nb, w in work.items():
        total += w.seconds
        rep.seconds[nb] = w.seconds
        rep.estimate.append(f"{nb:8s} {_fmt_n(w.forward_tokens):>10s} {_fmt_n(w.train_tokens):>10s} {_fmt_s(w.seconds):>9s} "
                            f"{w.peak_gb:>6.1f}GB {w.store_gb:>8.1f}GB")
        for note in w.notes:
            rep.estimate.append(f"         note: {note}")
        if w.peak_gb > h200:
            rep.warn(f"notebook {nb} needs ≈{w.peak_gb:.0f} GB of GPU memory (estimate), more than one {h200:.0f} GB H200")
        elif w.peak_gb > h100:
            rep.warn(f"notebook {nb} needs ≈{w.peak_gb:.0f} GB of GPU memory (estimate): an H200, not an {h100:.0f} GB H100")
    rep.estimate.append(f"total    ≈ {_fmt_s(total)} of GPU time on one {GPU['name']}")
    biggest = max(work.values(), key=lambda w: w.store_gb)
    if biggest.store_gb > 100:
        how = "kept in $REPLACEME_CACHE across notebooks" if profile.get("persist_activation_stores", True) else "scratch, one set at a time"
        rep.warn(f"activation stores need ≈{biggest.store_gb:.0f} GB of disk in one notebook ({how}; "
                 "tokens × 3d × 4 bytes per run)")


GPU_RULE = (f"GPU time = forward tokens × 2 × parameters (training tokens × 6, × 8 with gradient checkpointing) ÷ effective "
            f"throughput; effective = {GPU['mfu_large']:.0%} of {GPU['peak_bf16_tflops']:.0f} TFLOP/s ({GPU['name']}, dense "
            f"bf16) for models ≥ 1B parameters, {GPU['mfu_small']:.0%} below (small kernels); decoding ≥ weights ÷ "
            f"{GPU['hbm_tb_s']} TB/s per step; an Adam step of the cosine solver 6·1024·d² FLOPs + "
            f"{GPU['adam_step_overhead_s'] * 1e3:.1f} ms. Evaluation tokens = documents × tokens per document (check/facts.py "
            "TASK_COST, ±50%). GPU memory: the weights a notebook holds at once (+ training state), not activations. "
            "Not counted: downloads, model loading, lm-eval's CPU-side preprocessing, host work "
            "(probes, SciPy). Treat as ±2×.")


def run_check(profile: str | dict, notebooks_dir: str | Path = NOTEBOOKS_DIR, out=None) -> int:
    """Print the check of `profile`; 0 when nothing is wrong, 1 with one line per problem otherwise."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    try:
        rep = check_profile(profile, notebooks_dir)
    except NetworkUsed as e:
        print(f"profile {profile}: {e}", file=out)
        return 1
    for line in rep.warnings:
        print(f"warning: {line}", file=out)
    if rep.errors:
        for line in rep.errors:
            print(line, file=out)
        print(f"[check] profile {rep.label}: {len(rep.errors)} problem(s) ({time.perf_counter() - t0:.1f}s, offline)", file=out)
        return 1
    checked = ", ".join(f"{v} {k}" for k, v in rep.checked.items())
    print(f"[check] profile {rep.label}: OK ({checked}; {len(rep.warnings)} warning(s); "
          f"{time.perf_counter() - t0:.1f}s, no network)", file=out)
    if rep.downloads:
        print("would download from the Hugging Face hub:", file=out)
        for line in rep.downloads:
            print(f"  {line}", file=out)
    else:
        print("would download from the Hugging Face hub: nothing (packaged models, corpora and benchmarks only)", file=out)
    if rep.estimate:
        print("GPU estimate per notebook:", file=out)
        for line in rep.estimate:
            print(f"  {line}", file=out)
        import textwrap

        print(textwrap.fill("rule: " + GPU_RULE, width=118, initial_indent="  ", subsequent_indent="    "), file=out)
    return 0
