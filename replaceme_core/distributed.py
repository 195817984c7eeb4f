"""Data-parallel calibration with `torch.distributed`: each rank captures its shard, the sums are all-reduced.

The statistics ReplaceMe needs are sums over tokens (Gram matrices MᵀM, MᵀR, ‖R‖², distance sums and
token counts), so data parallelism is exact up to float64 summation order: rank r runs the ordinary
one-pass :func:`~replaceme_core.prune.calibrate` over batches ``r, r+W, r+2W, …`` and then every
accumulator is ``all_reduce``-d (``LSStats.all_reduce_`` / ``DistanceStats.all_reduce_``), so every rank
holds the global sums. Selection is then deterministic and identical on every rank; rank 0 solves,
folds and saves.

Launch (gloo on CPU, NCCL when CUDA is available; one process per GPU, rank r uses ``cuda:LOCAL_RANK``)::

    torchrun --nproc_per_node 2 -m replaceme_core.distributed MODEL --calib SOURCE --num-blocks 8 --out DIR [prune options]

The options are exactly those of ``replaceme prune`` (``replaceme prune --help``); only the closed-form
methods (``--method ls`` with any ``--structure``, and ``uidl``) are supported, because the iterative
solvers need the activations themselves, not sums. Every rank reads the same calibration texts (the
sampling is seeded) and takes its strided share of the batches. ``--device-map auto`` composes with this
when each rank sees its own set of GPUs (e.g. ``CUDA_VISIBLE_DEVICES`` per node); the accumulators live on
the device of the input embeddings.

From Python, under an initialised process group::

    calib = calibrate_distributed(model, batches, distances=True, ls_runs=runs)   # global sums on every rank
    result = prune_distributed(model, batches, PruneConfig(num_blocks=8))        # PruneResult on rank 0, None elsewhere
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .arch import get_adapter
from .prune import Calibration, PruneConfig, PruneResult, _explicit_runs, _stats_device, calibrate, prune, select_runs
from .select import Run, validate_run
from .stats import DistanceStats, LSStats


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: Sequence[dict], rank: int | None = None, world_size: int | None = None) -> list[dict]:
    """This rank's batches: every `world_size`-th batch starting at `rank` (balanced to within one batch)."""
    r, w = world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    return list(batches)[rank::world_size]


def calibrate_distributed(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    distances: bool = False,
    ls_runs: Iterable[Run] = (),
    stats_device=None,
    progress: bool = True,
    desc: str = "calibration pass",
) -> Calibration:
    """`calibrate()` on this rank's shard of `batches`, then all-reduce: every rank returns the global sums.

    `batches` is the FULL list (identical on every rank); sharding happens here. Without a process group this
    is plain `calibrate()`. A rank whose shard is empty contributes zeros. `Calibration.seconds` is the
    slowest rank's capture time.
    """
    rank, world_size = world()
    ls_runs = list(dict.fromkeys(ls_runs))
    if world_size == 1:
        return calibrate(model, batches, distances=distances, ls_runs=ls_runs, stats_device=stats_device,
                         progress=progress, desc=desc)
    local = shard(batches, rank, world_size)
    if local:
        calib = calibrate(model, local, distances=distances, ls_runs=ls_runs, stats_device=stats_device,
                          progress=progress and rank == 0, desc=f"{desc} (rank {rank}/{world_size})")
    else:
        adapter = get_adapter(model)
        for run in ls_runs:
            validate_run(run, adapter.num_layers)
        device = _stats_device(model, stats_device)
        calib = Calibration(distances=DistanceStats(adapter.num_layers, device) if distances else None,
                            ls={run: LSStats(adapter.hidden_size, device) for run in ls_runs})
    # One fixed order on every rank (collectives must match): distances first, then runs as given.
    if calib.distances is not None:
        calib.distances.all_reduce_()
    for run in ls_runs:
        calib.ls[run].all_reduce_()
    device = _stats_device(model, stats_device)
    meta = torch.tensor([float(calib.tokens), calib.seconds], dtype=torch.float64, device=device)
    counts = meta[:1].clone()
    dist.all_reduce(counts)
    slowest = meta[1:].clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    calib.tokens, calib.seconds = int(counts.item()), float(slowest.item())
    return calib


def prune_distributed(
    model: nn.Module,
    batches: Sequence[dict],
    config: PruneConfig,
    *,
    calibration_info: dict | None = None,
    stats_device=None,
    progress: bool = True,
) -> PruneResult | None:
    """`prune()` with data-parallel calibration. Collective: call it on every rank with the same arguments.

    The pass structure is prune()'s: one pass for distances plus the LS sums of every candidate run when they
    fit in `config.one_pass_budget_gb`, otherwise a distance pass and then a pass for the chosen runs only.
    Rank 0 solves, folds and returns the PruneResult; the other ranks return None (their model is untouched).
    """
    if config.method not in ("ls", "uidl"):
        raise ValueError(f"data-parallel calibration supports the closed-form methods (ls, uidl), not {config.method!r}: "
                         "the iterative solvers need the activations themselves; run them in one process")
    if config.selection == "ls-residual" and config.start is None:
        raise ValueError("ls-residual selection holds out every other batch of one process's order; under torchrun the "
                         "held-out set would depend on the number of ranks: select in one process, then pass --start")
    rank, _ = world()
    adapter = get_adapter(model)
    num_layers, d = adapter.num_layers, adapter.hidden_size
    config.validate(num_layers)
    needs_ls = config.method == "ls"
    timings: dict[str, float] = {}
    calib = Calibration()
    if config.start is not None:
        runs = _explicit_runs(config, num_layers)
    else:
        candidates = [Run(s, config.run_length) for s in range(1, num_layers - config.run_length + 1)]
        one_pass = needs_ls and config.selection == "angular" and \
            len(candidates) * 2 * d * d * 8 <= config.one_pass_budget_gb * 2**30
        calib = calibrate_distributed(model, batches, distances=True, ls_runs=candidates if one_pass else (),
                                      stats_device=stats_device, progress=progress,
                                      desc="distances" + (" + LS sums" if one_pass else ""))
        timings["selection_pass_s"] = calib.seconds
        runs, _scores = select_runs(config, calib.distances, num_layers)
    missing = [r for r in runs if needs_ls and r not in calib.ls]
    if missing:
        second = calibrate_distributed(model, batches, ls_runs=missing, stats_device=stats_device, progress=progress,
                                       desc="capture")
        calib.ls.update(second.ls)
        calib.tokens = calib.tokens or second.tokens
        timings["capture_pass_s"] = second.seconds
    if rank != 0:
        return None
    t0 = time.perf_counter()
    result = prune(model, batches, config, calibration=calib, calibration_info=calibration_info,
                   stats_device=stats_device, progress=progress)
    result.record["timings"] = {**timings, **result.record["timings"], "post_calibration_s": time.perf_counter() - t0}
    result.record["data_parallel"] = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                                      "backend": dist.get_backend() if dist.is_initialized() else None}
    return result


def _init_from_env() -> tuple[str | None, int]:
    """Initialise the default group from torchrun's environment; returns (device for this rank, local rank)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "WORLD_SIZE" not in os.environ:
        return None, local_rank
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return (f"cuda:{local_rank}" if cuda else "cpu"), local_rank


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc_per_node W -m replaceme_core.distributed MODEL --calib … --num-blocks N --out DIR`."""
    from .cli import build_parser
    from .merge import save_checkpoint

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(["prune", *argv])
    device, _ = _init_from_env()
    rank, world_size = world()
    try:
        if args.device is None and args.device_map is None and device is not None:
            args.device = device
        from .cli import _load, prune_config_from_args

        config = prune_config_from_args(args)
        model, tokenizer, batches, info, load_s = _load(args)
        info.update(model=args.model, world_size=world_size)
        result = prune_distributed(model, batches, config, calibration_info=info, progress=not args.quiet)
        if rank == 0:
            result.record["timings"]["load_s"] = load_s
            save_checkpoint(model, tokenizer, args.out, result.record, overwrite=args.overwrite)
            rec = result.record
            print(f"[{world_size} ranks] removed blocks {rec['removed_blocks']} ({rec['num_layers_before']} → "
                  f"{rec['num_layers_after']} blocks), calibration tokens {rec['calibration']['tokens']}; saved {args.out}")
        if world_size > 1:
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
