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


def register_outputs(notebook: str, items: list[dict], figures: str | Path = "figures", seconds: float | None = None) -> Path:
    """Called by a notebook: `items` = [{"paper": "Table 2", "files": [...], "what": "..."}]."""
    out = Path(figures)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f".{notebook}{MANIFEST_SUFFIX}"
    atomic_write_text(path, json.dumps({"notebook": notebook, "items": items, "seconds": seconds}, indent=2))
    return path


def write_index(figures: str | Path = "figures", profile: str = "cpu", timings: dict[str, float] | None = None) -> Path:
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
    path = out / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_notebooks(profile: str = "cpu", notebooks_dir: str | Path = "notebooks", build_dir: str | Path = "build",
                  figures: str | Path = "figures", only: list[str] | None = None) -> dict[str, float]:
    import papermill as pm

    src = Path(notebooks_dir)
    names = sorted(p.stem for p in src.glob("[0-9][0-9]_*.ipynb"))
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise ValueError(f"unknown notebooks {sorted(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in only]
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
    if not args.no_index:
        write_index(args.figures, args.profile, timings)
    from .claims import write_claims_page

    print(f"[paper] {write_claims_page(args.figures)}: every claims_*.csv in {args.figures} against the claims register")
    print(f"[paper] {len(timings)} notebooks in {time.perf_counter() - t0:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
