"""Run the experiment notebooks with papermill and index what they regenerated (`make paper`).

Sources in notebooks/ stay output-free: executed copies go to build/notebooks/<profile>/, and a lean copy
of each (code, printed results, tables, PNG figures; no logs, timings or machine paths) to
<figures>/notebooks/, where the repository page renders it. Each notebook declares what it regenerated
by calling `register_outputs()` at its end; the index figures/README.md (paper item → file → notebook)
is assembled from those declarations.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..io.cache import atomic_write_text, cache_dir
from .publish import publish

MANIFEST_SUFFIX = ".outputs.json"
#: passed to every notebook's kernel: its start-up log (ipykernel warns, once per kernel and on stderr, that it "is running
#: over TCP without encryption" — a local kernel papermill starts and stops) stays out of `make paper`'s log; errors still show
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


def register_outputs(notebook: str, items: list[dict], figures: str | Path = "figures", seconds: float | None = None) -> Path:
    """Called by a notebook: `items` = [{"paper": "Table 2", "files": [...], "what": "..."}]."""
    out = Path(figures)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f".{notebook}{MANIFEST_SUFFIX}"
    atomic_write_text(path, json.dumps({"notebook": notebook, "items": items, "seconds": seconds}, indent=2))
    return path


def write_index(figures: str | Path = "figures", profile: str = "cpu", timings: dict[str, float] | None = None,
                wall_seconds: float | None = None) -> Path:
    out = Path(figures)
    manifests = sorted(out.glob(f".*{MANIFEST_SUFFIX}"))
    lines = [
        "# Regenerated tables and figures",
        "",
        f"Written by `make paper` (profile `{profile}`). Each row: the paper's item, the file(s) here, the notebook that made them "
        "(linked: its executed copy with outputs, in `notebooks/`; the sources are in the repository's `notebooks/`).",
        "",
        "| paper | what | files | notebook |",
        "|---|---|---|---|",
    ]
    for m in manifests:
        data = json.loads(m.read_text())
        for item in data["items"]:
            files = ", ".join(f"[{Path(f).name}]({Path(f).name})" for f in item["files"])
            nb = data["notebook"]
            lines.append(f"| {item['paper']} | {item.get('what', '')} | {files} | [`{nb}`](notebooks/{nb}.ipynb) |")
    if timings:
        lines += ["", "| notebook | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]
        if wall_seconds is not None:
            lines += ["", f"`make paper` wall time: {wall_seconds:.0f} s ({wall_seconds / 60:.1f} min; where the profile sets "
                          "`lanes`, notebooks run side by side and their seconds add up to more)."]
    path = out / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def notebook_names(notebooks_dir: str | Path = "notebooks") -> list[str]:
    return sorted(p.stem for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))


def plan_lanes(lanes: list[list[str]] | None, names: list[str]) -> list[list[str]]:
    """The profile's `lanes` checked against the notebooks: every notebook in exactly one lane (one lane when unset)."""
    if not lanes:
        return [list(names)]
    listed = [n for lane in lanes for n in lane]
    unknown = sorted(set(listed) - set(names))
    missing = [n for n in names if n not in listed]
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if unknown or missing or twice:
        raise ValueError("profile `lanes` must list every notebook once: "
                         + "; ".join(f"{what} {items}" for what, items in
                                     (("unknown", unknown), ("missing", missing), ("listed twice", twice)) if items))
    return [list(lane) for lane in lanes]


def run_notebooks(profile: str = "cpu", notebooks_dir: str | Path = "notebooks", build_dir: str | Path = "build",
                  figures: str | Path = "figures", only: list[str] | None = None) -> dict[str, float]:
    """Execute the notebooks. With `only`, those (in name order) here; otherwise by the profile's `lanes`: the first
    lane here, then every further lane as its own single-threaded process, side by side (measured on 2 cores: ~1.1x
    the throughput of one 2-thread process on forward passes, more on the per-notebook overheads)."""
    names = notebook_names(notebooks_dir)
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise ValueError(f"unknown notebooks {sorted(unknown)}; available: {', '.join(names)}")
        return _run_serial(profile, [n for n in names if n in only], notebooks_dir, build_dir, figures)
    from .workbench import load_profile

    first, *parallel = plan_lanes(load_profile(profile).get("lanes"), names)
    timings = _run_serial(profile, first, notebooks_dir, build_dir, figures)
    if parallel:
        timings.update(_run_lanes(profile, parallel, build_dir, figures))
    return {n: timings[n] for n in names if n in timings}


def _run_lanes(profile: str, lanes: list[list[str]], build_dir: str | Path, figures: str | Path) -> dict[str, float]:
    """One `--only` process per lane, one thread each (two on two cores would spin against each other)."""
    import subprocess
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="replaceme-lanes-") as tmp:
        procs = []
        for i, lane in enumerate(lanes):
            out = Path(tmp) / f"lane{i}.json"
            cmd = [sys.executable, "-m", "replaceme_core.experiments.paper", "--profile", str(profile), "--figures", str(figures),
                   "--build", str(build_dir), "--no-index", "--no-claims", "--timings-json", str(out), "--only", *lane]
            print(f"[paper] lane {i + 1}/{len(lanes)} (one thread): {', '.join(lane)}", flush=True)
            procs.append((lane, out, subprocess.Popen(cmd, env=env)))
        failed = [lane for lane, _, proc in procs if proc.wait() != 0]
        if failed:
            raise RuntimeError(f"make paper: a lane failed ({'; '.join(', '.join(lane) for lane in failed)}); its log is above")
        for _, out, _ in procs:
            timings.update(json.loads(out.read_text()))
    return timings


def _run_serial(profile: str, names: list[str], notebooks_dir: str | Path, build_dir: str | Path,
                figures: str | Path) -> dict[str, float]:
    import papermill as pm

    src = Path(notebooks_dir)
    out_dir = Path(build_dir) / "notebooks" / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = Path(figures).resolve()
    portable = {str(figures): "../figures", str(Path.cwd().resolve()): "..", str(cache_dir()): "$REPLACEME_CACHE"}
    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"[paper] {name} (profile {profile}) …", flush=True)
        os.environ["REPLACEME_NOTEBOOK"] = name  # the kernel inherits it: labels the optional timing log
        pm.execute_notebook(
            str(src / f"{name}.ipynb"), str(out_dir / f"{name}.ipynb"),
            parameters={"profile": profile, "figures_dir": str(figures)},
            cwd=str(src.resolve()), kernel_name="python3", progress_bar=False, log_output=False,
            extra_arguments=KERNEL_ARGUMENTS,
        )
        timings[name] = time.perf_counter() - t0
        publish(out_dir / f"{name}.ipynb", figures / "notebooks" / f"{name}.ipynb", portable)
        print(f"[paper] {name} done in {timings[name]:.0f}s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replaceme_core.experiments.paper", description=__doc__)
    parser.add_argument("--profile", default="cpu", help="smoke | cpu | gpu | paper, or a .yaml path (default cpu)")
    parser.add_argument("--figures", default="figures", help="where tables and figures go (default figures/)")
    parser.add_argument("--build", default="build", help="where executed notebooks go (default build/)")
    parser.add_argument("--only", nargs="*", help="run only these notebooks (names without .ipynb)")
    parser.add_argument("--no-index", action="store_true", help="do not rewrite figures/README.md")
    parser.add_argument("--no-claims", action="store_true", help="do not rewrite figures/CLAIMS.md")
    parser.add_argument("--timings-json", help="also write the seconds per notebook to this JSON file (lanes use it)")
    parser.add_argument("--check", action="store_true",
                        help="run no notebook: check the profile offline in seconds (keys the notebooks read, lm-eval task "
                             "names, dataset fields, model families) and print what it would download and a GPU-time "
                             "estimate; exit 1 with one line per problem (experiments/check/)")
    args = parser.parse_args(argv)
    if args.check:
        from .check import run_check

        return run_check(args.profile)
    t0 = time.perf_counter()
    timings = run_notebooks(args.profile, build_dir=args.build, figures=args.figures, only=args.only)
    wall = time.perf_counter() - t0
    if args.timings_json:
        atomic_write_text(Path(args.timings_json), json.dumps(timings))
    if not args.no_index:
        write_index(args.figures, args.profile, timings, wall_seconds=wall)
    if not args.no_claims:
        from .claims import write_claims_page

        print(f"[paper] {write_claims_page(args.figures)}: every claims_*.csv in {args.figures} against the claims register")
    print(f"[paper] {len(timings)} notebooks in {wall:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
