"""Workbench: what every notebook needs for one profile — model, calibration batches, cached statistics.

The calibration statistics (layer distances; LS sums per run) are content-addressed on disk by the
model's weights and the exact token batches, so every notebook that uses the same model and data
shares one capture, and a re-run with nothing changed performs no forward pass for them.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import time
import weakref
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

import torch
import yaml

from ..arch import get_adapter
from ..io.cache import atomic_torch_save, cache_dir, hash_bytes, stable_json
from ..merge import Replacement, apply_replacements
from ..prune import Calibration, PruneConfig, PruneResult, calibrate, prune, select_runs
from ..select import Run, choose_runs, ls_residual_scores
from ..stats import ActivationStore, DistanceStats, LSStats


def _timed(op: str):
    """With REPLACEME_TIMING_LOG set, append one JSON line per call (op, suite/method, seconds): where `make paper`
    spends its time, notebook by notebook (the paper runner names the notebook in REPLACEME_NOTEBOOK)."""
    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            path = os.environ.get("REPLACEME_TIMING_LOG")
            if not path:
                return fn(self, *args, **kwargs)
            t0 = time.perf_counter()
            out = fn(self, *args, **kwargs)
            detail = [a for a in args if isinstance(a, (str, int))] + [f"{k}={v}" for k, v in kwargs.items() if isinstance(v, (str, int, float))]
            with open(path, "a") as f:
                f.write(json.dumps({"notebook": os.environ.get("REPLACEME_NOTEBOOK"), "op": op, "detail": detail,
                                    "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
            return out
        return timed
    return wrap


def load_profile(name_or_path: str) -> dict:
    """A profile by name (smoke, cpu, paper) or a path to a YAML file of the same shape."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    else:
        try:
            text = resources.files("replaceme_core").joinpath(f"profiles/{name_or_path}.yaml").read_text()
        except FileNotFoundError:
            known = sorted(p.name[:-5] for p in resources.files("replaceme_core").joinpath("profiles").iterdir() if p.name.endswith(".yaml"))
            raise ValueError(f"unknown profile {name_or_path!r}; known: {', '.join(known)} (or a path to a .yaml file)") from None
    return yaml.safe_load(text)


def _batches_hash(batches: Iterable[dict]) -> str:
    chunks = []
    for b in batches:
        for key in ("input_ids", "attention_mask"):
            t = b[key].contiguous().cpu()
            chunks += [key, str(tuple(t.shape)), t.numpy().tobytes()]
    return hash_bytes(*chunks)


ITERATIVE_METHODS = ("cosine", "cosine-exact", "mse")


def _close_all(stores: dict) -> None:
    for calibration in stores.values():
        calibration.close()


def _ls_path(stats_dir: Path, run: Run, heldout: bool = False) -> Path:
    return stats_dir / f"ls-{'heldout-' if heldout else ''}{run.start}-{run.n}.pt"


def _save_ls(stats_dir: Path, run: Run, st: LSStats, heldout: bool = False) -> None:
    atomic_torch_save({"MtM": st.MtM.cpu(), "MtR": st.MtR.cpu(), "RtR": st.RtR.cpu(), "tokens": st.tokens},
                      _ls_path(stats_dir, run, heldout))


# PruneConfig fields that only decide *which* blocks go; once the runs are known they do not change the fit
_SELECTION_FIELDS = ("start", "num_transforms", "separated", "selection", "distance_tokens", "one_pass_budget_gb")


def _fit_key(cfg: PruneConfig, runs: list[Run]) -> str:
    """Cache key of a fitted transform: the runs removed and the fit settings, not how the runs were chosen, so an
    explicit start and a selection rule that picks the same run share one fit."""
    fit = {k: v for k, v in asdict(cfg).items() if k not in _SELECTION_FIELDS}
    return hash_bytes(stable_json({**fit, "runs": [(r.start, r.n) for r in runs]}))[:16]


def _on_host(st: LSStats) -> LSStats:
    """The d×d sums on the host: what notebooks compare them with (T, the identity) lives there too."""
    if st.device.type == "cpu":
        return st
    out = LSStats(st.d)
    out.MtM, out.MtR, out.RtR, out.tokens = st.MtM.cpu(), st.MtR.cpu(), st.RtR.cpu(), st.tokens
    return out


def _load_ls(stats_dir: Path, run: Run, heldout: bool = False) -> LSStats | None:
    path = _ls_path(stats_dir, run, heldout)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu")
    st = LSStats(state["MtM"].shape[0])
    st.MtM, st.MtR, st.RtR, st.tokens = state["MtM"], state["MtR"], state["RtR"], state["tokens"]
    return st


def cached_statistics(model, batches: list[dict], stats_dir: Path, runs: Iterable[Run] = (), distances: bool = True,
                      progress: bool = True, heldout: bool = False) -> Calibration:
    """Distances and LS sums of `runs` read from `stats_dir`; whatever is missing comes from ONE capture pass and is
    stored there (`Calibration.seconds` > 0 tells that a pass ran). `stats_dir` must be keyed by model and batches.
    With `heldout`, also the sums of the held-out batches alone (`ls_heldout`, for ls-residual selection)."""
    runs = list(dict.fromkeys(runs))
    dist_path = stats_dir / "distances.pt"
    out = Calibration()
    if distances and dist_path.exists():
        out.distances = DistanceStats.from_state_dict(torch.load(dist_path, map_location="cpu"))
    missing = []
    for run in runs:
        st = _load_ls(stats_dir, run)
        held = _load_ls(stats_dir, run, heldout=True) if heldout else None
        if st is not None and (held is not None or not heldout):
            out.ls[run] = st
            if held is not None:
                out.ls_heldout[run] = held
        else:
            missing.append(run)
    need_dist = distances and out.distances is None
    if missing or need_dist:
        new = calibrate(model, batches, distances=need_dist, ls_runs=missing, heldout_runs=missing if heldout else (),
                        progress=progress, desc=f"capture ({'distances, ' if need_dist else ''}{len(missing)} LS runs"
                                                f"{', with held-out sums' if heldout else ''})")
        for run, st in new.ls_heldout.items():
            out.ls_heldout[run] = _on_host(st)
            _save_ls(stats_dir, run, st, heldout=True)
        if need_dist:
            out.distances = new.distances
            atomic_torch_save(new.distances.state_dict(), dist_path)
        for run, st in new.ls.items():  # accumulated on the model's device, handed over on the host
            out.ls[run] = _on_host(st)
            _save_ls(stats_dir, run, st)
        out.seconds = new.seconds
    return out


@dataclass
class Variant:
    """A named model of an experiment: its weights (in memory) and how it was made."""

    name: str
    model: torch.nn.Module
    record: dict | None = None
    replacements: list[Replacement] = field(default_factory=list)


def _model_device(model) -> str:
    return str(next(model.parameters()).device)


class Workbench:
    """Model, tokenizer, calibration batches and cached statistics of one profile.

    Device and dtype come from the `device` argument, else the profile's `device` / `dtype` keys, else the loader's
    defaults (CUDA when available; float32 on CPU, bfloat16 on a GPU)."""

    def __init__(self, profile: str | dict = "cpu", progress: bool = True, device: str | None = None):
        from ..evaluation.model_ref import hash_state_dict
        from ..io.data import load_texts, token_batches
        from ..io.models import load_model

        self.profile = load_profile(profile) if isinstance(profile, str) else dict(profile)
        self.progress = progress
        p = self.profile
        t0 = time.perf_counter()
        device = device or p.get("device")
        self.model, self.tokenizer = load_model(p["model"], dtype=p.get("dtype"), device=device)
        c = p["calibration"]
        self.texts = load_texts(c["source"], self.tokenizer, c["samples"], seed=c.get("seed", 0), chat=c.get("chat", "auto"))
        self.batches = list(token_batches(self.texts, self.tokenizer, batch_size=c["batch_size"], max_length=c["max_length"]))
        self.calibration_info = {**c, "samples": len(self.texts)}
        self.weights_hash = hash_state_dict(self.model)
        self.key = hash_bytes(self.weights_hash, _batches_hash(self.batches))[:24]
        self.stats_dir = cache_dir("stats", self.key)
        self.num_layers = get_adapter(self.model).num_layers
        self._stores: dict[tuple[Run, ...], Calibration] = {}
        weakref.finalize(self, _close_all, self._stores)
        self.persist_stores = bool(p.get("persist_activation_stores", True))
        # temporary (not persisted) store sets alive in this workbench and its siblings: at most one at a time
        self._temporary: list[tuple[dict, tuple[Run, ...]]] = []
        self.setup_seconds = time.perf_counter() - t0

    # --- other calibration data on the same model ------------------------------------------------
    def with_batches(self, batches: list[dict], label: str, samples: int | None = None) -> "Workbench":
        """A sibling sharing model and tokenizer, calibrated on `batches` (own statistics cache, keyed by content)."""
        twin = copy.copy(self)
        twin.batches = list(batches)
        twin.texts = None
        twin.calibration_info = {**self.calibration_info, "source": label, "samples": samples if samples is not None else sum(len(b["input_ids"]) for b in batches)}
        twin.key = hash_bytes(self.weights_hash, _batches_hash(twin.batches))[:24]
        twin.stats_dir = cache_dir("stats", twin.key)
        twin._stores = {}
        weakref.finalize(twin, _close_all, twin._stores)
        return twin

    def with_texts(self, texts: list[str], label: str) -> "Workbench":
        """A sibling calibrated on `texts`, tokenised with the profile's batch size and maximum length."""
        from ..io.data import token_batches

        c = self.profile["calibration"]
        twin = self.with_batches(list(token_batches(texts, self.tokenizer, batch_size=c["batch_size"], max_length=c["max_length"])),
                                 label, samples=len(texts))
        twin.texts = list(texts)
        return twin

    # --- statistics, cached by content ----------------------------------------------------------
    @_timed("stats")
    def stats(self, runs: Iterable[Run] = (), distances: bool = True, heldout: bool = False) -> Calibration:
        """Distances and LS sums for `runs` (and with `heldout` their held-out-batch sums), from the cache where
        present, else from ONE new capture pass."""
        out = cached_statistics(self.model, self.batches, self.stats_dir, runs, distances, self.progress, heldout)
        out.tokens = sum(int(b["attention_mask"].sum()) for b in self.batches)
        return out

    def chosen_runs(self, cfg: PruneConfig) -> list[Run]:
        """The runs `cfg` would remove: its explicit starts, or the selection rule applied to the cached distances."""
        if cfg.start is not None:
            starts = [cfg.start] if isinstance(cfg.start, int) else cfg.start
            return [Run(int(s), cfg.run_length) for s in starts]
        if cfg.selection == "ls-residual":  # the same rule as prune(): held-out LS fit of every candidate run
            st = self.stats(self.candidate_runs(cfg.run_length), distances=False, heldout=True)
            scores = ls_residual_scores(st.ls, st.ls_heldout, cfg.structure, cfg.ridge)
            return choose_runs(scores, cfg.run_length, cfg.num_transforms, separated=cfg.separated)
        return select_runs(cfg, self.stats(distances=True).distances, self.num_layers)[0]

    def candidate_runs(self, n: int) -> list[Run]:
        return [Run(s, n) for s in range(1, self.num_layers - n + 1)]

    # --- variants -------------------------------------------------------------------------------
    def config(self, method: str = "ls", num_blocks: int | None = None, **overrides) -> PruneConfig:
        """A PruneConfig with the profile's defaults (number of blocks, cosine solver settings)."""
        iterative = {k: v for k, v in self.profile.get("cosine", {}).items() if k in ("epochs", "lr", "batch_tokens", "init", "tol")}
        return PruneConfig(num_blocks=num_blocks or self.profile["num_blocks"], method=method, **{**iterative, **overrides})

    @_timed("prune")
    def prune(self, method: str = "ls", num_blocks: int | None = None, name: str | None = None, **overrides) -> Variant:
        """A pruned copy of the base model.

        LS and UIDL reuse the cached statistics; iterative methods read the kept activation stores. Fitted transforms
        are cached (by the statistics key, the runs removed and the fit settings), so a re-run applies them directly.
        """
        cfg = self.config(method, num_blocks, **overrides)
        cfg.validate(self.num_layers)
        runs = self.chosen_runs(cfg)
        model = copy.deepcopy(self.model)
        cached = self.stats_dir / f"transforms-{_fit_key(cfg, runs)}.pt"
        if cached.exists():
            state = torch.load(cached)
            replacements = [Replacement(Run(s, n), T) for s, n, T in state["replacements"]]
            apply_replacements(get_adapter(model), replacements)
            return Variant(name or f"{method} n={cfg.num_blocks}", model, json.loads(state["record"]), replacements)
        # an iterative method's capture also caches the runs' LS sums, so an LS start (init 'ls') costs no pass
        stores = self.activation_stores(runs) if cfg.method in ITERATIVE_METHODS else None
        if cfg.selection == "ls-residual" and cfg.start is None:  # prune() re-scores every candidate from these sums
            precomputed = self.stats(self.candidate_runs(cfg.run_length), distances=False, heldout=True)
        else:
            with_ls = cfg.method == "ls" or (stores is not None and cfg.init == "ls")
            precomputed = self.stats(runs if with_ls else [], distances=cfg.start is None)
        if stores is not None:
            precomputed.stores = stores
        result: PruneResult = prune(model, self.batches, cfg, calibration=precomputed, calibration_info=self.calibration_info, progress=self.progress)
        atomic_torch_save({"replacements": [(r.run.start, r.run.n, r.T) for r in result.replacements], "record": stable_json(result.record)}, cached)
        return Variant(name or f"{method} n={cfg.num_blocks}", model, result.record, result.replacements)

    def activation_stores(self, runs: list[Run]) -> dict:
        """On-disk activations (M, R, Y) of `runs`, shared by every iterative variant: one capture per (model, data, run).

        With `persist_stores` (the profile's `persist_activation_stores`, default on) the rows are kept in the statistics
        cache (float32, tokens × 3d × 4 bytes per run), so later notebooks and re-runs read them instead of capturing
        again. The same pass adds the LS sums of these runs to the statistics cache when they are not there yet, so an
        LS variant made after an iterative one on the same data needs no pass of its own."""
        key = tuple(runs)
        if key not in self._stores:
            kept = {run: ActivationStore.open_persisted(self._store_path(run)) for run in runs}
            if all(kept.values()):
                self._stores[key] = Calibration(stores=kept)
            else:
                if not self.persist_stores:
                    self._release_temporary()
                missing_ls = [run for run in runs if not _ls_path(self.stats_dir, run).exists()]
                captured = calibrate(self.model, self.batches, ls_runs=missing_ls, store_runs=runs, store_columns=("M", "R", "Y"),
                                     progress=self.progress, desc=f"capture activations ({len(runs)} runs)")
                for run, st in captured.ls.items():
                    _save_ls(self.stats_dir, run, st)
                if self.persist_stores:
                    for run, store in captured.stores.items():
                        store.persist(self._store_path(run))
                else:
                    self._temporary.append((self._stores, key))
                self._stores[key] = captured
        return dict(self._stores[key].stores)

    def _release_temporary(self) -> None:
        """Delete the temporary store sets of this workbench and its siblings before a new capture.

        Without persistence a store is tokens × 3d × 4 bytes of scratch disk (22 GB for 8k samples × 1024 tokens at
        d = 576, ~140 GB at d = 4096); keeping every set a notebook touches would add them up. Consecutive variants on
        the same runs still share one capture; going back to earlier runs captures them again (one forward pass)."""
        while self._temporary:
            stores, key = self._temporary.pop()
            calibration = stores.pop(key, None)
            if calibration is not None:
                calibration.close()

    def _store_path(self, run: Run) -> Path:
        return self.stats_dir / f"store-{run.start}-{run.n}"

    @_timed("prune_separate")
    def prune_separate(self, method: str = "ls", num_blocks: int | None = None, name: str | None = None, **overrides) -> Variant:
        """Like `prune`, but T maps the kept block's whole output (Table 10; `separate.py`): in memory only."""
        from ..separate import apply_separate, fit_separate

        cfg = self.config(method, num_blocks, **overrides)
        cfg.validate(self.num_layers)
        runs = self.chosen_runs(cfg)
        cached = self.stats_dir / f"separate-{_fit_key(cfg, runs)}.pt"
        if cached.exists():
            replacements = [Replacement(Run(s, n), T) for s, n, T in torch.load(cached)["replacements"]]
        else:
            iterative = cfg.iterative() if method in ITERATIVE_METHODS else None
            replacements = fit_separate(self.model, self.batches, runs, method, iterative=iterative, ridge=cfg.ridge, progress=self.progress)
            atomic_torch_save({"replacements": [(r.run.start, r.run.n, r.T) for r in replacements]}, cached)
        model = apply_separate(copy.deepcopy(self.model), replacements)
        record = {"method": method, "variant": "separate LT (not fused; in memory only)", "config": asdict(cfg),
                  "removed_blocks": sorted(b for r in replacements for b in r.run.removed),
                  "blocks_followed_by_T": [r.run.kept for r in replacements if r.T is not None]}
        return Variant(name or f"{method} separate n={cfg.num_blocks}", model, record, replacements)

    # --- measurement ----------------------------------------------------------------------------
    def _suite_args(self, suite: str, overrides: dict) -> dict:
        from ..evaluation.runner import DEFAULT_BACKEND

        spec = {**self.profile["eval"][suite], **overrides}
        docs = spec.get("docs")
        return dict(tokenizer=self.tokenizer, tasks=spec["tasks"], limit=spec.get("limit"),
                    batch_size=spec.get("batch_size", 16), source=spec.get("source", "auto"), progress=self.progress,
                    backend=spec.get("backend", DEFAULT_BACKEND), per_doc_fields=spec.get("per_doc_fields", ("margin",)),
                    docs=tuple(docs) if docs else None)

    @_timed("evaluate")
    def evaluate(self, model, suite: str = "main", **overrides) -> dict:
        from ..evaluation.runner import evaluate

        # scored where it lives: without a device lm-eval's wrapper would move a host model to CUDA (in place)
        return evaluate(model, device=_model_device(model), **self._suite_args(suite, overrides))

    @_timed("evaluate_many")
    def evaluate_many(self, models: dict, suite: str = "main", **overrides) -> dict[str, dict]:
        """`evaluate` for several models {name: model} on one suite, {name: result}: models that share their first
        blocks bit for bit (the variants of one run, and the unpruned model) are scored as one group, the shared
        blocks once per batch (evaluation.prefix). Same numbers as one by one."""
        from ..evaluation.runner import evaluate_many

        if not models:
            return {}
        names, nets = list(models), list(models.values())
        results = evaluate_many(nets, device=_model_device(nets[0]), **self._suite_args(suite, overrides))
        return dict(zip(names, results))

    def heldout_texts(self) -> list[str]:
        from ..io.data import heldout_texts

        p = self.profile["perplexity"]
        return heldout_texts(p["source"], p["samples"], seed=0, tokenizer=self.tokenizer)

    def heldout(self, model) -> dict:
        """`evaluation.perplexity` on the profile's held-out texts: ppl, and the per-text sums that pair two models."""
        return self.heldout_many({"model": model})["model"]

    @_timed("heldout")
    def heldout_many(self, models: dict) -> dict[str, dict]:
        """`heldout` for several models {name: model}, {name: result}, grouped by shared prefix like `evaluate_many`."""
        from ..evaluation.perplexity import perplexity_many

        if not models:
            return {}
        p = self.profile["perplexity"]
        names, nets = list(models), list(models.values())
        results = perplexity_many(nets, self.tokenizer, self.heldout_texts(), max_length=p["max_length"],
                                  batch_size=p["batch_size"], device=_model_device(nets[0]), progress=self.progress)
        return dict(zip(names, results))

    def perplexity(self, model) -> float:
        return self.heldout(model)["ppl"]

    def describe(self) -> str:
        c = self.calibration_info
        tokens = sum(int(b["attention_mask"].sum()) for b in self.batches)
        return (f"profile {self.profile['name']}: model {self.profile['model']} ({self.num_layers} blocks), calibration "
                f"{c['source']} × {c['samples']} samples ({tokens} real tokens, max length {c['max_length']}); stats key {self.key}")
