"""Calibration sources and the dataset loaders' fields."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from .facts import CHARS_PER_TOKEN, DATASET_CARDS, DatasetCard
from .report import Report
from .schema import _is_int
from .tasks import _benchmark_manifests


class _FieldLog:
    def __init__(self) -> None:
        self.read: set[str] = set()
        self.compared: dict[str, set] = {}
        self.calls: list[tuple] = []


def _wrap(value, path: str, log: _FieldLog):
    if isinstance(value, dict):
        return _RecDict(value, path, log)
    if isinstance(value, list):
        return _RecList([_wrap(v, f"{path}[]", log) for v in value])
    if isinstance(value, str):
        return _RecStr(value, path, log)
    return value


class _RecDict(dict):
    """A dataset row that logs which fields the loader reads."""

    def __init__(self, data: dict, path: str, log: _FieldLog):
        super().__init__({k: _wrap(v, f"{path}.{k}".lstrip("."), log) for k, v in data.items()})
        self._path, self._log = path, log

    def _note(self, key) -> None:
        self._log.read.add(f"{self._path}.{key}".lstrip("."))

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)


class _RecList(list):
    pass


class _RecStr(str):
    """A field value that logs what the loader compares it with (e.g. a turn's `from` with "human")."""

    def __new__(cls, value: str, path: str, log: _FieldLog):
        obj = super().__new__(cls, value)
        obj._path, obj._log = path, log
        return obj

    def __eq__(self, other):
        if isinstance(other, str):
            self._log.compared.setdefault(self._path, set()).add(str(other))
        return str.__eq__(self, other)

    def __ne__(self, other):
        if isinstance(other, str):
            self._log.compared.setdefault(self._path, set()).add(str(other))
        return str.__ne__(self, other)

    __hash__ = str.__hash__


def _card_for(path: str) -> tuple[str, DatasetCard] | None:
    for key, card in DATASET_CARDS.items():
        if path == key or path in card.aliases:
            return key, card
    return None


def check_loaders(rep: Report) -> None:
    """Run io/data.py's hub loaders (through `load_texts`, the public entry) on rows shaped like each dataset card's
    sample row, with `datasets.load_dataset` replaced by a stand-in that also records which dataset, config and split
    is asked for. A loader that reads a field the card does not document, compares a field with a value the card
    does not list, or asks for an unknown config or split is reported."""
    from unittest import mock

    import datasets

    from ...io import data

    for canon, (kind, path, _config) in data.HUB_SOURCES.items():
        rep.count("hub sources")
        if kind != "mix" and _card_for(path) is None:
            rep.error(f"io/data.py HUB_SOURCES[{canon!r}] names {path}, which has no dataset card in experiments/check/facts.py")
        splits = ("train", "heldout") if kind == "wikitext" else ("train",)
        for split in splits:
            log = _FieldLog()
            problems: list[str] = []

            def fake_load_dataset(ds_path, name=None, split=None, streaming=False, *, log=log, problems=problems, **kw):
                log.calls.append((ds_path, name, split))
                found = _card_for(ds_path)
                if found is None:
                    problems.append(f"loads hub dataset {ds_path}, which has no dataset card in experiments/check/facts.py")
                    return []
                key, card = found
                if name not in card.configs:
                    problems.append(f"loads {key} with config {name!r}, which its card does not list "
                                    f"({', '.join(str(c) for c in card.configs)})")
                elif split not in card.configs[name]:
                    problems.append(f"loads split {split!r} of {key} ({name}), which its card does not list "
                                    f"({', '.join(card.configs[name])})")
                rows = [card.example, {k: ("" if isinstance(v, str) else v) for k, v in card.example.items()}] \
                    if key == "wikitext" else [card.example]
                return [_wrap(json.loads(json.dumps(r)), "", log) for r in rows * 32]

            with mock.patch.object(datasets, "load_dataset", fake_load_dataset):
                try:
                    texts = data.load_texts(canon, None, 4, split=split, chat="never")
                    if len(texts) != 4:
                        problems.append(f"gave {len(texts)} texts for 4 requested")
                except Exception as e:  # noqa: BLE001 - any failure on a documented row is the finding
                    problems.append(f"fails on a row shaped like its dataset card's: {type(e).__name__}: {str(e)[:160]}")
            documented = {}
            for ds_path, _, _ in log.calls:
                found = _card_for(ds_path)
                if found:
                    documented.update(found[1].fields)
            for f in sorted(log.read):
                if documented and f not in documented:
                    problems.append(f"reads field {f!r}, which the dataset card does not document "
                                    f"(documented: {', '.join(documented)})")
            for f, values in sorted(log.compared.items()):
                allowed = documented.get(f)
                if isinstance(allowed, tuple):
                    for v in sorted(values - set(allowed)):
                        problems.append(f"compares field {f!r} with {v!r}, a value the dataset card does not list "
                                        f"({', '.join(allowed)})")
            what = f"{canon}" + (f" ({split} split)" if len(splits) > 1 else "")
            for p in problems:
                rep.error(f"io/data.py loader for {what} {p}")


@functools.lru_cache(maxsize=None)
def _packaged_counts(name: str) -> dict[str, int] | None:
    """Records per split of a packaged corpus, read through `assets.corpus` only when it is already built."""
    from ... import assets
    from ...assets.cli import _status

    ready, _ = _status(name)
    if not ready:
        return None
    return {split: len(assets.corpus(name, split)) for split in ("train", "heldout")}


@functools.lru_cache(maxsize=None)
def _packaged_mean_tokens(name: str) -> float | None:
    from ... import assets
    from ...assets.cli import _status

    if not _status(name)[0]:
        return None
    recs = assets.corpus(name, "train")
    chars = [sum(len(str(r.get(k, ""))) for k in ("text", "prompt", "response")) for r in recs]
    return (sum(chars) / max(1, len(chars))) / CHARS_PER_TOKEN + (20 if "prompt" in recs[0] else 0)


def check_source(profile: dict, source: str, samples: int, split: str, where: str, rep: Report,
                 downloads: dict[str, dict]) -> None:
    """A text source has at least `samples` records in `split` (packaged), exists (local file), or is a hub source
    the loaders know (listed for download)."""
    from ...io.data import _HUB_ALIASES, HUB_SOURCES, PACKAGED_SOURCES

    rep.count("sources")
    if source in PACKAGED_SOURCES:
        parts = PACKAGED_SOURCES[source]
        sizes = [samples] if len(parts) == 1 else [samples // 2, samples - samples // 2]
        for part, k in zip(parts, sizes):
            counts = _packaged_counts(part)
            if counts is None:
                rep.warn(f"{where}: packaged corpus {part} is not built yet, so its size is unchecked (`replaceme assets fetch`)")
            elif k > counts[split]:
                rep.error(f"{where} asks for {k} samples of {part} ({split} split), which holds {counts[split]}")
        return
    if source.endswith((".txt", ".jsonl")) or Path(source).expanduser().is_file():
        if not Path(source).expanduser().is_file():
            rep.error(f"{where}: local file {source} does not exist")
        return
    canon = _HUB_ALIASES.get(source.lower(), source)
    if canon in HUB_SOURCES:
        kind, path, _ = HUB_SOURCES[canon]
        if split == "heldout" and kind != "wikitext":
            rep.error(f"{where}: hub source {source} has no held-out split in io/data.py (only wikitext does)")
            return
        for ds in (("Open-Orca/SlimOrca", "HuggingFaceFW/fineweb") if kind == "mix" else (path,)):
            entry = downloads.setdefault(ds, {"rows": 0, "uses": set()})
            entry["rows"] = max(entry["rows"], samples if kind != "mix" else samples - samples // 2)
            entry["uses"].add(where)
        return
    if "/" in source and source.count("/") == 1:
        rep.error(f"{where}: {source} is read as a hub dataset with a `text` column, but experiments/check/facts.py has no "
                  "dataset card for it (add one to DATASET_CARDS, or use a known source)")
        return
    rep.error(f"{where}: unknown source {source!r} (not packaged, not a file, not a known hub dataset)")


def check_sources(profile: dict, rep: Report, downloads: dict[str, dict]) -> None:
    c = profile.get("calibration") or {}
    if isinstance(c.get("source"), str) and _is_int(c.get("samples")):
        check_source(profile, c["source"], c["samples"], "train", "calibration", rep, downloads)
    p = profile.get("perplexity") or {}
    if isinstance(p.get("source"), str) and _is_int(p.get("samples")):
        check_source(profile, p["source"], p["samples"], "heldout", "perplexity", rep, downloads)
    h = profile.get("healing") or {}
    if isinstance(h.get("source"), str) and _is_int(h.get("samples")):
        check_source(profile, h["source"], h["samples"], "train", "healing", rep, downloads)
    cd = profile.get("calibration_data") or {}
    S = cd.get("samples")
    for kind, src in (cd.get("sources") or {}).items():
        if isinstance(src, str) and _is_int(S):
            check_source(profile, src, S, "train", f"calibration_data.sources[{kind!r}]", rep, downloads)
    default = c.get("source")
    for k in set((cd.get("sizes") or []) + ((cd.get("masking") or {}).get("sizes") or [])):
        if isinstance(default, str) and _is_int(k):
            check_source(profile, default, k, "train", f"calibration_data sizes ({k})", rep, downloads)
    sg = cd.get("self_generated") or {}
    if isinstance(sg.get("source"), str):
        from ...io.data import PACKAGED_SOURCES

        if sg["source"] not in PACKAGED_SOURCES or len(PACKAGED_SOURCES[sg["source"]]) != 1:
            rep.error(f"calibration_data.self_generated.source {sg['source']!r}: self-generation needs a packaged "
                      "instruction corpus (experiments/self_generated.py), e.g. olmo-instructions")
        elif _is_int(S):
            check_source(profile, sg["source"], S, "train", "calibration_data.self_generated", rep, downloads)
    ts = cd.get("task_specific") or {}
    if isinstance(ts.get("task"), str):
        from ..task_calibration import RENDERERS

        if ts["task"] not in RENDERERS:
            rep.error(f"calibration_data.task_specific.task {ts['task']!r} has no renderer (experiments/task_calibration.py: "
                      f"{', '.join(RENDERERS)})")
        else:
            rows = _benchmark_manifests().get(ts["task"], {}).get(RENDERERS[ts["task"]][0])
            if rows and _is_int(ts.get("samples")) and ts["samples"] > rows - rows // 2:
                rep.error(f"calibration_data.task_specific asks for {ts['samples']} {ts['task']} documents; its calibration "
                          f"half holds {rows - rows // 2}")
    for i, m in enumerate((profile.get("10_models_and_scale") or {}).get("models") or []):
        if isinstance(m, dict) and _is_int(m.get("calibration_samples")) and isinstance(default, str):
            check_source(profile, default, m["calibration_samples"], "train", f"10_models_and_scale.models[{i}]", rep, downloads)
