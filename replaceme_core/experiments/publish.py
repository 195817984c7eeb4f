"""Executed notebooks made readable on the repository page without running anything (`figures/notebooks/`).

papermill's executed copy carries what changes on every run or only helps while running: timestamps and
durations in the metadata, progress bars and logs on stderr, widget state, the same figure as PNG, PDF and SVG,
and absolute paths of the machine that ran it. `publish()` keeps what a reader needs — code, printed results,
tables, PNG figures — so that a re-run with a warm cache rewrites the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..io.cache import atomic_write_text

#: display formats kept, best first; the first one present wins (PNG over PDF/SVG; markdown/HTML over plain text).
KEEP_FORMATS = ("image/png", "text/markdown", "text/html", "text/plain")
#: a printed stream longer than this is cut (with a note) — long logs belong in build/, not on the page.
MAX_STREAM_LINES = 60
#: printed lines that only say what ran (lm-eval's progress on stdout): absent when a result came from the cache
NOISE_PREFIXES = ("bootstrapping for stddev:",)
_VOLATILE_CELL_KEYS = ("papermill", "execution", "collapsed", "scrolled")


def _one_format(data: dict) -> dict:
    for fmt in KEEP_FORMATS:
        if fmt in data:
            kept = {fmt: data[fmt]}
            if fmt == "text/html" and "text/plain" in data:
                kept["text/plain"] = data["text/plain"]  # a plain fallback where HTML is not rendered
            return kept
    return {}


def _lines(text) -> list[str]:
    return ("".join(text) if isinstance(text, list) else str(text)).splitlines(keepends=True)


def _clean_output(out: dict, replace: dict[str, str]) -> dict | None:
    kind = out.get("output_type")
    if kind == "stream":
        if out.get("name") != "stdout":
            return None  # stderr: progress bars, warnings, timings
        lines = [ln for ln in _lines(_swap("".join(_lines(out["text"])), replace)) if not ln.startswith(NOISE_PREFIXES)]
        if not lines:
            return None
        if len(lines) > MAX_STREAM_LINES:
            cut = len(lines) - MAX_STREAM_LINES
            lines = lines[:MAX_STREAM_LINES] + [f"… ({cut} more lines in the executed copy under build/notebooks/)\n"]
        return {"name": "stdout", "output_type": "stream", "text": lines}
    if kind in ("display_data", "execute_result"):
        data = _one_format(out.get("data", {}))
        if not data:
            return None  # widgets and other live-only views
        data = {k: (_lines(_swap("".join(_lines(v)), replace)) if k.startswith("text/") else v) for k, v in data.items()}
        cleaned = {"data": data, "metadata": {}, "output_type": kind}
        if kind == "execute_result":
            cleaned["execution_count"] = out.get("execution_count")
        return cleaned
    if kind == "error":
        return {k: out[k] for k in ("output_type", "ename", "evalue", "traceback") if k in out}
    return None


def _merge_streams(outputs: list[dict]) -> list[dict]:
    """stderr dropped and consecutive stdout chunks joined: how the kernel splits a cell's prints depends on timing."""
    merged: list[dict] = []
    for o in outputs:
        if o.get("output_type") == "stream" and o.get("name") != "stdout":
            continue  # stderr: progress bars, warnings, timings
        if o.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream":
            merged[-1] = {**merged[-1], "text": "".join(_lines(merged[-1]["text"])) + "".join(_lines(o["text"]))}
        else:
            merged.append(o)
    return merged


def _swap(text: str, replace: dict[str, str]) -> str:
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def publish(executed: str | Path, out: str | Path, replace: dict[str, str] | None = None) -> Path:
    """Write a lean copy of the executed notebook `executed` to `out` (atomically); `replace` maps machine-specific
    strings (absolute paths) to portable ones in code and text outputs."""
    replace = {k: v for k, v in (replace or {}).items() if k}
    nb = json.loads(Path(executed).read_text())
    for cell in nb.get("cells", []):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["id"] = "injected-parameters"  # papermill gives it a fresh random id on every run
        for key in _VOLATILE_CELL_KEYS:
            cell.get("metadata", {}).pop(key, None)
        cell["source"] = _lines(_swap("".join(_lines(cell.get("source", ""))), replace))
        if cell.get("cell_type") == "code":
            outs = (_clean_output(o, replace) for o in _merge_streams(cell.get("outputs", [])))
            cell["outputs"] = [o for o in outs if o is not None]
    meta = nb.get("metadata", {})
    for key in ("papermill", "widgets"):
        meta.pop(key, None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    return out
