"""prune(): the whole method — and the UIDL baseline — behind one call that the CLI and notebooks share.

calibrate() is the single capture mechanism: in one forward pass per batch it can accumulate the
layer-distance statistics, the least-squares sums for any number of candidate runs, and the on-disk
activations for the iterative solvers. When no start block is given and the LS sums for every
candidate run fit in memory, selection and estimation share that one pass.
"""
from __future__ import annotations

import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .arch import Adapter, FoldError, get_adapter
from .capture import Activations, _input_device, run_capture
from .merge import Replacement, apply_replacements
from .methods.block_influence import choose_by_block_influence
from .select import Run, choose_runs, ls_residual_scores, merge_touching, run_scores, validate_run
from .solve import STRUCTURES, IterativeConfig, check_choice, columns_for, solve_closed_form, solve_iterative
from .stats import ActivationStore, DistanceStats, LSStats

METHODS = ("ls", "cosine", "cosine-exact", "mse", "uidl")
SELECTIONS = ("angular", "bi", "ls-residual")
#: ls-residual selection: every HOLDOUT_EVERY-th calibration batch is held out to score each candidate's LS fit
HOLDOUT_EVERY = 2


@dataclass
class Calibration:
    """Statistics from one capture pass over the calibration batches."""

    distances: DistanceStats | None = None
    ls: dict[Run, LSStats] = field(default_factory=dict)
    ls_heldout: dict[Run, LSStats] = field(default_factory=dict)  # sums over the held-out batches only (ls-residual)
    stores: dict[Run, ActivationStore] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def _stats_device(model: nn.Module, requested) -> torch.device:
    if requested is not None:
        return torch.device(requested)
    return _input_device(model)


def calibrate(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    distances: bool = False,
    ls_runs: Iterable[Run] = (),
    store_runs: Iterable[Run] = (),
    store_columns: tuple[str, ...] = ("M", "R"),
    stats_device=None,
    store_dir=None,
    heldout_runs: Iterable[Run] = (),
    progress: bool = True,
    desc: str = "calibration pass",
) -> Calibration:
    """One forward pass over `batches` collecting everything asked for (real tokens only).

    For the `heldout_runs` (a subset of `ls_runs`), `ls_heldout` also gets the sums of every HOLDOUT_EVERY-th batch
    alone; `ls` always covers every batch."""
    adapter = get_adapter(model)
    ls_runs, store_runs = list(dict.fromkeys(ls_runs)), list(dict.fromkeys(store_runs))
    heldout_runs = list(dict.fromkeys(heldout_runs))
    if set(heldout_runs) - set(ls_runs):
        raise ValueError("calibrate(): every held-out run must also be among ls_runs")
    for run in ls_runs + store_runs:
        validate_run(run, adapter.num_layers)
    device = _stats_device(model, stats_device)
    d = adapter.hidden_size
    block_outputs = set(range(adapter.num_layers)) if distances else set()
    mlp_outputs = set()
    for run in ls_runs + store_runs:
        block_outputs |= {run.kept, run.last}
        mlp_outputs.add(run.kept)
    if not block_outputs:
        raise ValueError("calibrate() was asked for nothing: set distances=True or give runs")

    result = Calibration(
        distances=DistanceStats(adapter.num_layers, device) if distances else None,
        ls={run: LSStats(d, device) for run in ls_runs},
        ls_heldout={run: LSStats(d, device) for run in heldout_runs},
        stores={run: ActivationStore(store_columns, d, directory=store_dir) for run in store_runs},
    )
    runs_by_kept: dict[int, list[Run]] = defaultdict(list)
    for run in ls_runs:
        runs_by_kept[run.kept].append(run)

    # float64 copies only of the blocks the LS sums and stores use; distances work in float32
    f64_blocks = {b for run in ls_runs + store_runs for b in (run.kept, run.last)}

    batch_index = [0]

    def consume(acts: Activations) -> None:
        held_out = batch_index[0] % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        batch_index[0] += 1
        if result.distances is not None:
            order = range(adapter.num_layers)
            result.distances.update([acts.real(acts.block_out[i]) for i in order], "all")
            result.distances.update([acts.last(acts.block_out[i]) for i in order], "last")
        real = {i: acts.real(acts.block_out[i]).to(device, torch.float64) for i in f64_blocks}
        mlp = {i: acts.real(x).to(device, torch.float64) for i, x in acts.mlp_out.items()}
        for kept, runs in runs_by_kept.items():
            M = mlp[kept]
            MtM = M.T @ M
            for run in runs:
                sums = result.ls_heldout[run] if held_out and run in result.ls_heldout else result.ls[run]
                sums.update(M, real[run.last] - real[kept] + M, MtM=MtM)
        for run, store in result.stores.items():
            M = mlp[run.kept]
            Y = real[run.kept] - M
            cols = {"M": M, "R": real[run.last] - Y, "Y": Y}
            store.append(**{c: cols[c] for c in store.columns})

    start = time.perf_counter()
    try:
        result.tokens = run_capture(
            model, adapter, batches, consume, block_outputs=block_outputs, mlp_outputs=mlp_outputs,
            progress=progress, desc=desc, total=len(batches) if hasattr(batches, "__len__") else None,
        )
    except BaseException:
        result.close()
        raise
    for store in result.stores.values():
        store.finish()
    for run, held in result.ls_heldout.items():  # `ls` covers every token: add the held-out part back
        result.ls[run].merge_(held)
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class PruneConfig:
    """Everything that decides the pruned model. Defaults follow the paper (LS, angular distance, last token)."""

    num_blocks: int
    method: str = "ls"  # ls | cosine (Eq. 8) | cosine-exact (Eq. 7) | mse | uidl
    structure: str = "full"  # ls only: full | diagonal | orthonormal
    start: int | list[int] | None = None  # 0-based first removed block(s); None: choose by `selection`
    num_transforms: int = 1
    separated: bool = False  # multi-transform runs must not touch (the paper's Multi_LT_NC)
    selection: str = "angular"  # angular (paper, UIDL) | bi (ShortGPT Block Influence) | ls-residual (held-out LS fit)
    distance_tokens: str = "last"  # last (the official code) | all
    ridge: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-4
    epochs: int = 10
    batch_tokens: int = 1024
    l1: float = 0.0
    l2: float = 0.0
    max_iter: int = 100  # optimizer cg / trust-ncg: SciPy iterations on the full batch
    full_batch_rows: int = 32768  # optimizer cg / trust-ncg: at most this many rows (a fixed seeded subsample beyond)
    lbfgs_iters: int = 5  # optimizer lbfgs: iterations per mini-batch (the official code: 1)
    init: str = "identity"  # iterative methods: T₀ = I (paper) | ls (start from the LS closed form: our variant)
    tol: float = 0.0  # adam / lbfgs: stop at the plateau, once an epoch lowers the mean loss by < tol (0: all epochs)
    seed: int = 0
    one_pass_budget_gb: float = 4.0  # LS sums for every candidate run from the selection pass, if they fit

    def iterative(self) -> IterativeConfig:
        objective = {"cosine": "cosine", "cosine-exact": "cosine-exact", "mse": "mse"}[self.method]
        structure = "diagonal" if self.structure == "diagonal" else "full"
        return IterativeConfig(
            objective=objective, optimizer=self.optimizer, lr=self.lr, batch_tokens=self.batch_tokens,
            epochs=self.epochs, l1=self.l1, l2=self.l2, structure=structure, seed=self.seed, max_iter=self.max_iter,
            full_batch_rows=self.full_batch_rows, lbfgs_iters=self.lbfgs_iters, init=self.init, tol=self.tol,
        )

    def validate(self, num_layers: int) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("structure", self.structure, STRUCTURES)
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("distance_tokens", self.distance_tokens, ("last", "all"))
        if self.num_blocks <= 0:
            raise ValueError(f"--num-blocks must be positive, got {self.num_blocks}")
        if self.num_blocks > num_layers - 1:
            raise ValueError(f"cannot remove {self.num_blocks} blocks from a {num_layers}-block model: at most {num_layers - 1}")
        if self.num_transforms <= 0 or self.num_blocks % self.num_transforms:
            raise ValueError(
                f"--num-blocks ({self.num_blocks}) must be a positive multiple of --num-transforms ({self.num_transforms}): "
                "each transform replaces the same number of blocks"
            )
        if self.selection == "ls-residual" and self.method == "uidl":
            raise ValueError("ls-residual selection scores a fitted T; UIDL fits none: use selection 'angular'")
        if self.method in ("cosine", "cosine-exact", "mse"):
            if self.structure == "orthonormal":
                raise ValueError("orthonormal T is a closed form: use method 'ls' with structure 'orthonormal'")
            self.iterative().validate()

    @property
    def run_length(self) -> int:
        return self.num_blocks // self.num_transforms


@dataclass
class PruneResult:
    model: nn.Module
    replacements: list[Replacement]
    record: dict
    distances: DistanceStats | None = None

    @property
    def runs(self) -> list[Run]:
        return [r.run for r in self.replacements]


def _explicit_runs(cfg: PruneConfig, num_layers: int) -> list[Run]:
    starts = [cfg.start] if isinstance(cfg.start, int) else list(cfg.start)
    if len(starts) != cfg.num_transforms:
        raise ValueError(f"give one start block per transform: {len(starts)} starts for {cfg.num_transforms} transforms")
    runs = [Run(int(s), cfg.run_length) for s in starts]
    for run in runs:
        validate_run(run, num_layers)
    overlapping = [(a.start, b.start) for i, a in enumerate(runs) for b in runs[i + 1 :] if a.overlaps(b)]
    if overlapping:
        raise ValueError(
            f"the runs starting at {starts} overlap ({cfg.run_length} blocks each), so fewer than {cfg.num_blocks} "
            "blocks would be removed: give starts at least --num-blocks/--num-transforms apart"
        )
    merged = merge_touching(runs)
    if len(merged) != len(runs) and cfg.separated:
        raise ValueError(f"the runs starting at {starts} touch, but separated runs were asked for")
    return merged


def select_runs(cfg: PruneConfig, dist: DistanceStats, num_layers: int) -> tuple[list[Run], dict[int, float]]:
    """The runs `cfg` removes when chosen from `dist` (angular argmin or Block Influence), with each start's score."""
    if cfg.selection == "bi":
        if cfg.num_transforms != 1:
            raise ValueError("Block Influence selection picks single blocks; it decides the runs itself (use num_transforms=1)")
        cosine = dist.matrix("cosine", cfg.distance_tokens)
        runs = choose_by_block_influence(cosine, cfg.num_blocks)
        return runs, {r.start: float(dist.matrix("angular", cfg.distance_tokens)[r.kept, r.last]) for r in runs}
    scores = run_scores(dist.matrix("angular", cfg.distance_tokens), cfg.run_length)
    return choose_runs(scores, cfg.run_length, cfg.num_transforms, separated=cfg.separated), scores


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"replaceme": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def prune(
    model: nn.Module,
    batches: Sequence[dict],
    config: PruneConfig,
    *,
    calibration: Calibration | None = None,
    calibration_info: dict | None = None,
    stats_device=None,
    progress: bool = True,
) -> PruneResult:
    """Prune `model` in place: choose runs, estimate T for each, fold, delete. Returns the model and its record.

    `batches` must be re-iterable (a list) because a second pass may be needed. `calibration` may carry
    distances and LS sums already captured on this model and these batches (e.g. from a cache); only
    what it lacks is captured.
    """
    timings: dict[str, float] = {}
    adapter: Adapter = get_adapter(model)
    num_layers = adapter.num_layers
    config.validate(num_layers)
    if config.method != "uidl" and not adapter.can_fold_general and config.structure != "diagonal":
        raise FoldError(adapter.why_not_foldable)
    d = adapter.hidden_size
    needs_ls = config.method == "ls"
    needs_store = config.method in ("cosine", "cosine-exact", "mse")

    scores: dict[int, float] = {}
    calib = Calibration()
    borrowed: dict[Run, ActivationStore] = {}  # the caller's stores: used, never closed here
    if calibration is not None:
        calib = Calibration(distances=calibration.distances, ls=dict(calibration.ls), ls_heldout=dict(calibration.ls_heldout),
                            tokens=calibration.tokens)
        borrowed = dict(calibration.stores)
    dist = calib.distances
    if config.start is not None:
        runs = _explicit_runs(config, num_layers)
    elif config.selection == "ls-residual":
        candidates = [Run(s, config.run_length) for s in range(1, num_layers - config.run_length + 1)]
        if not all(r in calib.ls_heldout and r in calib.ls for r in candidates):
            need_gb = len(candidates) * 4 * d * d * 8 / 2**30  # all-token and held-out sums, two d×d each
            if need_gb > config.one_pass_budget_gb:
                raise ValueError(f"ls-residual selection keeps the LS sums of all {len(candidates)} candidate runs twice "
                                 f"({need_gb:.1f} GB > one_pass_budget_gb {config.one_pass_budget_gb}): raise the budget "
                                 "or give --start")
            calib = calibrate(model, batches, distances=True, ls_runs=candidates, heldout_runs=candidates,
                              stats_device=stats_device, progress=progress, desc="distances + LS sums (with held-out)")
            timings["selection_pass_s"] = calib.seconds
        dist = calib.distances
        scores = ls_residual_scores(calib.ls, {r: calib.ls_heldout[r] for r in candidates}, config.structure, config.ridge)
        runs = choose_runs(scores, config.run_length, config.num_transforms, separated=config.separated)
    elif dist is not None:
        runs, scores = select_runs(config, dist, num_layers)
    else:
        candidates = [Run(s, config.run_length) for s in range(1, num_layers - config.run_length + 1)]
        one_pass = needs_ls and config.selection == "angular" and len(candidates) * 2 * d * d * 8 <= config.one_pass_budget_gb * 2**30
        calib = calibrate(
            model, batches, distances=True, ls_runs=candidates if one_pass else (),
            stats_device=stats_device, progress=progress, desc="distances" + (" + LS sums" if one_pass else ""),
        )
        timings["selection_pass_s"] = calib.seconds
        dist = calib.distances
        runs, scores = select_runs(config, dist, num_layers)

    ls_init = needs_store and config.init == "ls"  # the iterative solver starts from the LS closed form
    missing_ls = [r for r in runs if (needs_ls or ls_init) and r not in calib.ls]
    if needs_store:
        wanted = set(columns_for(config.iterative().objective))
        if all(r in borrowed and wanted <= set(borrowed[r].columns) for r in runs):
            calib.stores = {r: borrowed[r] for r in runs}
            needs_store = False
    if missing_ls or needs_store:
        second = calibrate(
            model, batches, ls_runs=missing_ls, store_runs=runs if needs_store else (),
            store_columns=columns_for(config.iterative().objective) if needs_store else ("M", "R"),
            stats_device=stats_device, progress=progress, desc="capture",
        )
        calib.ls.update(second.ls)
        calib.stores = second.stores
        calib.tokens = calib.tokens or second.tokens
        timings["capture_pass_s"] = second.seconds

    run_info = []
    replacements = []
    t0 = time.perf_counter()
    try:
        for run in runs:
            info = {"start": run.start, "n": run.n, "kept_block": run.kept, "removed_blocks": run.removed}
            if run.start in scores and run.n == config.run_length:
                info["heldout_relative_residual" if config.selection == "ls-residual" else "distance"] = scores[run.start]
            T = None
            if needs_ls:
                T = solve_closed_form(calib.ls[run], config.structure, config.ridge)
                info["relative_residual"] = calib.ls[run].relative_residual(T)
                info["identity_relative_residual"] = calib.ls[run].relative_residual(torch.eye(d, dtype=torch.float64))
                T = T.cpu()  # d×d: kept on the host like every T, so cached fits load on any machine
            elif run in calib.stores:
                # the solver runs where the statistics live (the model's device unless told otherwise), not on the host
                T0 = None
                if ls_init:
                    T0 = solve_closed_form(calib.ls[run], "diagonal" if config.structure == "diagonal" else "full", config.ridge)
                    info["ls_init_relative_residual"] = calib.ls[run].relative_residual(T0)
                T, history = solve_iterative(calib.stores[run], config.iterative(), device=_stats_device(model, stats_device),
                                             progress=progress, T0=T0)
                info["loss_per_epoch"] = history
            replacements.append(Replacement(run, T))
            run_info.append(info)
    finally:
        for run, store in calib.stores.items():
            if borrowed.get(run) is not store:
                store.close()
    timings["solve_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    apply_replacements(adapter, replacements)
    timings["fold_and_delete_s"] = time.perf_counter() - t0

    record = {
        "method": config.method,
        "config": asdict(config),
        "removed_blocks": sorted(b for r in runs for b in r.removed),
        "blocks_receiving_T": [r.kept for r in runs] if config.method != "uidl" else [],
        "runs": run_info,
        "num_layers_before": num_layers,
        "num_layers_after": adapter.num_layers,
        "model_type": model.config.model_type,
        "calibration": {**(calibration_info or {}), "tokens": calib.tokens},
        "seed": config.seed,
        "versions": _versions(),
        "timings": timings,
        "index_convention": "0-based indices of the original model; block start-1 keeps its place and receives T",
    }
    return PruneResult(model=model, replacements=replacements, record=record, distances=dist)

