"""On the node, last step of run.sh: what the slice's figures/ folder gained, packed into at most 8 files ≤ 16 MiB.

    results-<slice>.tar.gz (or .tar.gz.00, .01 … when over 16 MiB)   every new or changed file under figures/
    run-<slice>.json                                                  device, measured seconds against the estimate
    run-<slice>.log                                                   the last 1 MiB of the notebooks' log
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import time
from pathlib import Path

MAX_FILES, MAX_BYTES = 8, 16 << 20


def gained(figures: Path, before: Path | None) -> list[Path]:
    old: dict[str, str] = {}
    if before and before.exists():
        for line in before.read_text().splitlines():
            digest, _, path = line.partition("  ")
            old[path] = digest
    out = []
    for p in sorted(figures.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if old.get(str(p)) != digest:
                out.append(p)
    return out


def _device_record(device: str) -> dict:
    try:
        import torch

        rec = {"torch": torch.__version__, "cuda": torch.version.cuda, "asked": device}
        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            rec |= {"gpu": torch.cuda.get_device_name(i), "gpu_count": torch.cuda.device_count(),
                    "gpu_memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
        else:
            rec["gpu"] = None
        return rec
    except Exception as e:  # noqa: BLE001
        return {"asked": device, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}


def pack(work: Path, results: Path, manifest: dict, rc: int, seconds: float, device: str) -> list[Path]:
    results.mkdir(parents=True, exist_ok=True)
    s = manifest["slice"]
    files = gained(work / "figures", work / "figures.before")
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}
    est = manifest.get("estimate_seconds", {})
    rows = {nb: {"measured_s": round(v, 1), "estimated_s": round(est.get(nb[:2], 0.0), 1),
                 "ratio": round(v / est[nb[:2]], 2) if est.get(nb[:2]) else None} for nb, v in timings.items()}
    record = {"slice": s, "profile": manifest["profile"], "reduced": manifest.get("reduced", False),
              "exit_code": rc, "device": _device_record(device), "notebooks": rows,
              "run_sh_seconds": seconds, "estimate_minutes": manifest.get("estimate_minutes"),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": len(files), "git": manifest.get("git")}
    tgz = results / f"results-{s}.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(work / "figures")))
    out = [tgz]
    if tgz.stat().st_size > MAX_BYTES:
        data, out = tgz.read_bytes(), []
        for i in range(0, len(data), MAX_BYTES):
            piece = results / f"{tgz.name}.{i // MAX_BYTES:02d}"
            piece.write_bytes(data[i:i + MAX_BYTES])
            out.append(piece)
        tgz.unlink()
    if len(out) > MAX_FILES - 2:
        record["error"] = f"figures gained {sum(p.stat().st_size for p in out) / 2**20:.0f} MiB: over {MAX_FILES - 2} files of 16 MiB"
        for p in out[MAX_FILES - 2:]:
            p.unlink()
        out = out[:MAX_FILES - 2]
    log = work / "run.log"
    if log.exists():
        data = log.read_bytes()[-(1 << 20):]
        (results / f"run-{s}.log").write_bytes(data)
        out.append(results / f"run-{s}.log")
    (results / f"run-{s}.json").write_text(json.dumps(record, indent=1) + "\n")
    out.append(results / f"run-{s}.json")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--rc", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    out = pack(Path(a.work), Path(a.results), json.loads(Path(a.manifest).read_text()), a.rc, a.seconds, a.device)
    print(f"[pack] {len(out)} file(s) in {a.results}: " + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
