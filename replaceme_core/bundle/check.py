"""`make bundle-check`: the whole bundle path on this CPU machine, in a fresh environment, with no index and no network.

1. a fresh virtual environment stands for the node: this machine's Python, the local CPU torch wheel as "the node's
   torch", and the node's other packages (NODE_SET, at the node's versions where they matter: transformers 5.17,
   tokenizers 0.23.2) from the package index — the last time the index is used;
2. a smoke-profile bundle is built for that environment (its `pip freeze` is the node's package set);
3. only the files of the bundle's transfers are copied into an empty folder, and run.sh runs there with pip's index and
   config switched off (PIP_NO_INDEX, PIP_CONFIG_FILE=/dev/null), a sitecustomize that refuses every non-loopback
   socket (the notebook kernel talks to papermill over 127.0.0.1) in every Python process, an unreachable proxy, and a
   fresh HOME;
4. an ordinary smoke run of the same notebooks (this project's .venv) is the reference: every table (*.md, *.csv; not
   README.md, which holds timings) must be equal: text exactly, numbers to a relative 1e-5 (the node's numpy is not
   ours; seen: a smoke perplexity of 8.4e5 differing in the 7th digit).
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .builder import ROOT, BundleError, Target, build_bundle
from .slices import get_slice, notebook_files

NODE_SET = ["numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "seaborn", "pyarrow", "peft", "tqdm", "pyyaml",
            "accelerate==1.15.0", "safetensors", "tokenizers==0.23.2", "transformers==5.17.0", "packaging"]
NODE_TORCH = "torch==2.13.0"

SITECUSTOMIZE = '''"""bundle-check: no network. Every socket connection or name lookup off this machine raises."""
import socket

_LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", None}
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _host(address):
    return address[0] if isinstance(address, tuple) else None


def _guard(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in _LOCAL:
        raise OSError(f"bundle-check: network blocked ({address!r})")


def connect(self, address):
    _guard(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _guard(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL:
        raise socket.gaierror(f"bundle-check: network blocked (lookup of {host!r})")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    print("[bundle-check] $ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, **kw)


def make_node(node: Path) -> Path:
    """The stand-in node: a fresh venv with the local CPU torch and the node's package set (index used here only)."""
    py = node / "bin" / "python"
    if (node / ".ready").exists():
        return py
    shutil.rmtree(node, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    if _run([base, "-m", "venv", str(node)]).returncode != 0:
        raise BundleError("could not create the stand-in node's virtual environment")
    for spec in ([NODE_TORCH], NODE_SET):
        if _run([str(py), "-m", "pip", "install", "--quiet", *spec]).returncode != 0:
            raise BundleError(f"could not install the stand-in node's packages {spec}")
    (node / ".ready").write_text("ok\n")
    return py


def tables(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".md", ".csv") and p.name != "README.md" and "notebooks" not in p.parts}


RTOL = 1e-5  # numbers in a table may differ at float rounding (the node's numpy is not ours); text must be equal
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _close(a: str, b: str) -> bool:
    """Equal after replacing every number by a placeholder, and every number pair within RTOL."""
    if _NUM.sub("#", a) != _NUM.sub("#", b):
        return False
    for x, y in zip(_NUM.findall(a), _NUM.findall(b)):
        fx, fy = float(x), float(y)
        if abs(fx - fy) > RTOL * max(abs(fx), abs(fy)) and abs(fx - fy) > 1e-12:
            return False
    return True


def compare(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    out = []
    for name in sorted(set(got) | set(want)):
        if name not in got:
            out.append(f"{name}: missing from the bundle run")
        elif name not in want:
            out.append(f"{name}: not in the ordinary run")
        elif got[name] != want[name] and not _close(got[name].decode(errors="replace"), want[name].decode(errors="replace")):
            diff = list(difflib.unified_diff(want[name].decode(errors="replace").splitlines(),
                                             got[name].decode(errors="replace").splitlines(), lineterm="", n=0))
            out.append(f"{name}: differs: {' | '.join(diff[2:6])}")
    return out


def bundle_check(work: Path = ROOT / "build" / "bundle-check", slice_name: str = "smoke-01", reuse_reference: bool = False) -> int:
    t0 = time.perf_counter()
    s = get_slice(slice_name)
    names = notebook_files(s)
    work.mkdir(parents=True, exist_ok=True)
    py = make_node(work / "node")
    freeze = subprocess.run([str(py), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout
    (work / "node-freeze.txt").write_text(freeze)
    t_node = time.perf_counter()
    target = Target(python_version=f"{sys.version_info.major}.{sys.version_info.minor}", node_file=str(work / "node-freeze.txt"))
    built = build_bundle(s, work / "bundle", target=target)
    print("[bundle-check] " + built.summary(), flush=True)
    t_build = time.perf_counter()
    # the transfers, and nothing else, arrive in an empty folder
    arrived = work / "arrived"
    shutil.rmtree(arrived, ignore_errors=True)
    arrived.mkdir()
    for transfer in built.manifest["transfers"]:
        for f in transfer:
            shutil.copy2(work / "bundle" / f, arrived / f)
    guard = work / "no-network"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    env = {"PATH": f"{py.parent}:/usr/bin:/bin", "HOME": str(home), "PYTHON": str(py), "PYTHONPATH": str(guard),
           "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost", "DEVICE": "cpu", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "2",
           "TMPDIR": str(work / "tmp")}
    (work / "tmp").mkdir(exist_ok=True)
    shutil.rmtree(work / "results", ignore_errors=True)
    proc = _run(["bash", str(arrived / "run.sh"), str(work / "results")], env=env, cwd=arrived)
    t_run = time.perf_counter()
    if proc.returncode != 0:
        print(f"[bundle-check] FAILED: run.sh exited {proc.returncode} (log above)")
        return 1
    got_dir = work / "got"
    shutil.rmtree(got_dir, ignore_errors=True)
    with tarfile.open(work / "results" / f"results-{s.name}.tar.gz") as tar:
        tar.extractall(got_dir, filter="data")
    ref = work / "reference"
    if not (reuse_reference and ref.exists()):
        shutil.rmtree(ref, ignore_errors=True)
        cmd = [sys.executable, "-m", "replaceme_core.experiments.paper", "--profile", s.profile, "--figures", str(ref),
               "--build", str(work / "reference-build"), "--only", *names]
        if _run(cmd, cwd=ROOT).returncode != 0:
            print("[bundle-check] FAILED: the ordinary smoke run failed (log above)")
            return 1
    got, want = tables(got_dir), tables(ref)
    problems = compare(got, want) if want else ["the ordinary run wrote no tables"]
    t_end = time.perf_counter()
    times = (f"node venv {t_node - t0:.0f}s, build {t_build - t_node:.0f}s, run.sh {t_run - t_build:.0f}s, "
             f"reference + compare {t_end - t_run:.0f}s; total {t_end - t0:.0f}s")
    if problems:
        for line in problems:
            print(f"[bundle-check] {line}")
        print(f"[bundle-check] FAILED: {len(problems)} of {len(set(got) | set(want))} tables differ ({times})")
        return 1
    print(f"[bundle-check] OK: {len(got)} tables of {', '.join(names)} from run.sh (parts only, no index, no network) equal "
          f"the ordinary smoke run's ({times})")
    return 0
