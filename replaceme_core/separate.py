"""A separate (un-fused) linear map after the kept block — the paper's Table 10 variant.

The fused method maps only the MLP output M of the kept block; the separate variant instead maps the
whole output L_kept of that block onto L_last, the output of the last removed block:

    L_kept · T ≈ L_last        (LS, or the cosine objectives with Y = 0)

It cannot be folded into any existing weight (it acts on the residual stream itself), so it lives as an
extra `SeparateTransform` submodule of the kept block, applied by a forward hook. That makes it a real
parameter — visible in `state_dict()`, so content hashes (evaluation cache) tell it apart from plain
deletion — but the model is no longer a stock checkpoint: `transformers` would drop the extra weight on
reload. Use it in memory (evaluation, comparison); `save_checkpoint` refuses such a model.

It also gives a general T for architectures whose MLP output cannot absorb one (Gemma 3's
post-feedforward norm admits only a diagonal fold).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arch import get_adapter
from .capture import Activations, _input_device, run_capture
from .merge import SEPARATE_MARK, Replacement
from .select import Run, merge_touching, validate_run
from .solve import IterativeConfig, solve_iterative, solve_ls
from .stats import ActivationStore, LSStats

class SeparateTransform(nn.Module):
    """h ↦ h·T on the block's output hidden state (T stored as weight = Tᵀ, like nn.Linear)."""

    def __init__(self, T: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(T.detach().T.contiguous().to(dtype or T.dtype), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.weight.to(h.dtype))


def _hook(_module, _inputs, output):
    transform = _module.separate_transform
    if isinstance(output, tuple):
        return (transform(output[0]), *output[1:])
    return transform(output)


def capture_separate(model: nn.Module, batches: Sequence[dict], runs: Sequence[Run], *, ls: bool = True,
                     store: bool = False, stats_device=None, progress: bool = True
                     ) -> tuple[dict[Run, LSStats], dict[Run, ActivationStore], int]:
    """One pass: Gram sums (float64) and/or an on-disk store of (M = L_kept, R = L_last) per run.

    The sums live on `stats_device` (default: the model's input device, as in `prune.calibrate`), so on a GPU the
    float64 Gram products run there instead of on the host."""
    adapter = get_adapter(model)
    for run in runs:
        validate_run(run, adapter.num_layers)
    d = adapter.hidden_size
    device = torch.device(stats_device) if stats_device is not None else _input_device(model)
    sums = {run: LSStats(d, device) for run in runs} if ls else {}
    stores = {run: ActivationStore(("M", "R"), d) for run in runs} if store else {}

    def consume(acts: Activations) -> None:
        for run in runs:
            M = acts.real(acts.block_out[run.kept]).to(device, torch.float64)
            R = acts.real(acts.block_out[run.last]).to(device, torch.float64)
            if ls:
                sums[run].update(M, R)
            if store:
                stores[run].append(M=M, R=R)

    blocks = {b for run in runs for b in (run.kept, run.last)}
    try:
        tokens = run_capture(model, adapter, batches, consume, block_outputs=blocks, progress=progress,
                             desc="capture (separate LT)", total=len(batches) if hasattr(batches, "__len__") else None)
    except BaseException:
        for s in stores.values():
            s.close()
        raise
    for s in stores.values():
        s.finish()
    return sums, stores, tokens


def fit_separate(model: nn.Module, batches: Sequence[dict], runs: Sequence[Run], method: str = "ls", *,
                 iterative: IterativeConfig | None = None, ridge: float = 0.0, stats_device=None,
                 progress: bool = True) -> list[Replacement]:
    """T per run mapping L_kept → L_last. For the cosine objectives Y = 0 here, so Eq. 7 and Eq. 8 coincide.

    Sums and solvers run on `stats_device` (default: the model's input device); every T comes back on the host."""
    runs = list(runs)
    if len(merge_touching(runs)) != len(runs):
        raise ValueError(f"runs {runs} overlap or touch: give non-touching runs")
    if method == "uidl":
        return [Replacement(run, None) for run in runs]
    if method == "ls":
        sums, _, _ = capture_separate(model, batches, runs, ls=True, stats_device=stats_device, progress=progress)
        return [Replacement(run, solve_ls(sums[run], ridge).cpu()) for run in runs]
    if method not in ("cosine", "cosine-exact", "mse"):
        raise ValueError(f"unknown method {method!r} for a separate transform; choose ls, cosine, cosine-exact, mse or uidl")
    cfg = iterative or IterativeConfig()
    objective = "cosine" if method == "cosine-exact" else method  # with Y = 0, Eq. 7 is Eq. 8
    cfg = IterativeConfig(**{**cfg.__dict__, "objective": objective})
    _, stores, _ = capture_separate(model, batches, runs, ls=False, store=True, progress=progress)
    device = torch.device(stats_device) if stats_device is not None else _input_device(model)
    try:
        return [Replacement(run, solve_iterative(stores[run], cfg, device=device, progress=progress)[0]) for run in runs]
    finally:
        for s in stores.values():
            s.close()


def apply_separate(model: nn.Module, replacements: Sequence[Replacement]) -> nn.Module:
    """Attach each T after its kept block (in the model's dtype), then delete the runs. In place; returns `model`."""
    adapter = get_adapter(model)
    runs = [r.run for r in replacements]
    if len(merge_touching(runs)) != len(runs):
        raise ValueError(f"runs {runs} overlap or touch: each T needs its own kept block before its run")
    dtype = next(model.parameters()).dtype
    for rep in replacements:
        if rep.T is None:
            continue
        layer = adapter.layers[rep.run.kept]
        if hasattr(layer, "separate_transform"):
            raise ValueError(f"block {rep.run.kept} already carries a separate transform")
        layer.add_module("separate_transform", SeparateTransform(rep.T, dtype).to(next(layer.parameters()).device))
        layer.register_forward_hook(_hook)
    adapter.delete_blocks([b for run in runs for b in run.removed])
    setattr(model, SEPARATE_MARK, True)
    return model
