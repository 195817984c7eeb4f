"""Slices: which notebooks one short GPU slot runs, under which profile settings, and what the offline estimator says.

A slot on the target node is ≈12 minutes of GPU time, start included, and one command runs at most 10 minutes; the
bundle's own work (verify, join, install, convert the GGUF) takes about a minute. A slice may therefore hold at most
`SLOT_MINUTES` (8) of *estimated* GPU time (`experiments/check`, the estimator of `make paper PROFILE=gpu CHECK=1`,
treated there as ±2×). Every slot is self-contained: its bundle carries what its notebooks need, nothing travels from
one slot to the next, and its results come back as their own folder (figures/gpu/<slice>/).

Where a notebook's estimate alone is over the slot at the gpu profile's full settings (04, 05, 10), its slice names
the smallest change of settings that brings it under, and says so in `about`: those slices are *reduced*, not the
paper's scale, and their outputs must be labelled that way.

Not covered (2026-12-04): notebook 13 (every depth-pruning method; ≈ 25 min estimated at the gpu settings, ≈ 16 min
even at the paper's ratio alone — evaluation of ~20 models on the full benchmarks dominates) needs results that travel
between slots, which this bundle does not carry; notebook 14 has no confirmatory stage on the gpu profile (its suites
score every document, so no fresh ones remain; `confirmatory.suite: null` there says so).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLOT_MINUTES = 8.0

_GPU_10_SMOL = {"model": "smollm2-135m-instruct", "sweep_blocks": [4, 8, 11, 15], "table_blocks": [8]}
_GPU_10_GEMMA = {"model": "gemma-3-270m", "sweep_blocks": [3, 5, 7, 9], "table_blocks": [5], "batch_size": 16}


@dataclass(frozen=True)
class Slice:
    name: str
    profile: str
    notebooks: tuple[str, ...]          # two-digit prefixes, run in this order
    about: str
    overrides: dict[str, Any] = field(default_factory=dict)   # merged one level deep into the profile's sections
    reduced: bool = False               # True: settings below the profile's (say so beside every result)
    slot_minutes: float = SLOT_MINUTES


SLICES: dict[str, Slice] = {s.name: s for s in [
    Slice("gpu-01", "gpu", ("01",), "the headline claims (Table 2, regime, LS vs UIDL vs cosine) at full benchmark size"),
    Slice("gpu-02", "gpu", ("02", "06", "11"), "compression sweep, structure/multi-LT, vision"),
    Slice("gpu-03", "gpu", ("03", "07"), "block selection, repeatability"),
    Slice("gpu-08", "gpu", ("00", "08", "09"), "tutorial, cost, healing"),
    Slice("gpu-12", "gpu", ("12",), "MMLU and BIG-bench"),
    Slice("gpu-04", "gpu", ("04",), "calibration data; REDUCED: Fig. 8 sizes 1k/4k/8k (12k, 16k dropped)",
          overrides={"calibration_data": {"sizes": [1000, 4000, 8000]}}, reduced=True),
    Slice("gpu-05", "gpu", ("05",), "objectives and solvers; REDUCED: cosine 25 epochs (76,950 Adam steps, not 80,418)",
          overrides={"cosine": {"epochs": 25}}, reduced=True),
    Slice("gpu-10a", "gpu", ("10",), "models and scale: SmolLM2 part, full settings",
          overrides={"10_models_and_scale": {"models": [_GPU_10_SMOL]}}),
    Slice("gpu-10b", "gpu", ("10",), "models and scale: Gemma-3-270m part; REDUCED: sweep 5/9 blocks, half the documents",
          overrides={"10_models_and_scale": {"models": [{**_GPU_10_GEMMA, "sweep_blocks": [5, 9], "limit": 0.5}]}},
          reduced=True),
    # the CPU proof (make bundle-check): the same two notebooks as a GPU headline run, on the smoke profile
    Slice("smoke-01", "smoke", ("01", "02"), "smoke profile: what `make bundle-check` builds and runs on CPU",
          slot_minutes=60.0),
]}

DEFAULT_SLICE = {"gpu": "gpu-01", "smoke": "smoke-01"}


class SliceError(ValueError):
    """A slice that cannot be bundled (unknown, over its slot, or its profile fails the offline check): one line."""


def get_slice(name: str | None, profile: str | None = None) -> Slice:
    if name is None:
        if profile not in DEFAULT_SLICE:
            raise SliceError(f"no slice for profile {profile!r}; slices: {', '.join(SLICES)}")
        name = DEFAULT_SLICE[profile]
    if name not in SLICES:
        raise SliceError(f"unknown slice {name!r}; slices: {', '.join(SLICES)}")
    s = SLICES[name]
    if profile is not None and profile != s.profile:
        raise SliceError(f"slice {name} runs profile {s.profile}, not {profile} (PROFILE={s.profile} SLICE={name})")
    return s


def merged_profile(s: Slice) -> dict:
    """The profile the slice runs: its profile with `overrides` merged into each section (one level deep)."""
    from ..experiments.workbench import load_profile

    prof = copy.deepcopy(load_profile(s.profile))
    for key, value in s.overrides.items():
        if isinstance(value, dict) and isinstance(prof.get(key), dict):
            prof[key] = {**prof[key], **copy.deepcopy(value)}
        else:
            prof[key] = copy.deepcopy(value)
    if s.overrides:
        prof["name"] = f"{s.profile}-{s.name}"
    return prof


def notebook_files(s: Slice, notebooks_dir: str | Path | None = None) -> list[str]:
    """The slice's notebooks as names (`01_main_results`), checked against notebooks/."""
    from ..experiments.paper import notebook_names

    nbdir = Path(notebooks_dir) if notebooks_dir else Path(__file__).resolve().parents[2] / "notebooks"
    names = notebook_names(nbdir)
    out = []
    for prefix in s.notebooks:
        hit = [n for n in names if n.startswith(prefix + "_")]
        if len(hit) != 1:
            raise SliceError(f"slice {s.name}: notebook {prefix} not found in {nbdir}")
        out.append(hit[0])
    return out


def slice_estimate(s: Slice) -> dict[str, float]:
    """Estimated GPU seconds of each notebook of the slice (the offline check's estimator; it also validates)."""
    from ..experiments.check import check_profile

    rep = check_profile(merged_profile(s))
    if rep.errors:
        more = f" (+{len(rep.errors) - 1} more)" if len(rep.errors) > 1 else ""
        raise SliceError(f"slice {s.name}: {rep.errors[0]}{more}")
    return {nb: rep.seconds.get(nb, 0.0) for nb in s.notebooks}


def check_slot(s: Slice, seconds: dict[str, float]) -> float:
    """Total estimated minutes; SliceError (one line) when over the slot."""
    total = sum(seconds.values()) / 60
    if total > s.slot_minutes:
        parts = ", ".join(f"{nb} {v / 60:.1f}" for nb, v in seconds.items())
        raise SliceError(f"slice {s.name}: estimated {total:.1f} min of GPU time exceeds its {s.slot_minutes:g}-minute slot "
                         f"({parts} min)")
    return total


def plan_table(slices: list[Slice] | None = None) -> list[str]:
    """Markdown rows: every gpu slice with its estimate, and which notebooks the plan covers."""
    slices = slices or [s for s in SLICES.values() if s.profile == "gpu"]
    rows = ["| slice | notebooks | estimated GPU min | settings |", "|---|---|---|---|"]
    covered: set[str] = set()
    for s in slices:
        sec = slice_estimate(s)
        covered.update(s.notebooks)
        rows.append(f"| {s.name} | {', '.join(s.notebooks)} | {sum(sec.values()) / 60:.1f} | {s.about} |")
    rows.append(f"\nnotebooks covered: {', '.join(sorted(covered))}")
    return rows
