"""Which blocks to remove: the paper's argmin-distance rule, several runs, and the run whose least-squares fit is best
on held-out calibration tokens. (ShortGPT's Block Influence lives with the other methods, in
`methods/block_influence.py`; `block_influence` and `choose_by_block_influence` are still importable from here.)

Indices are 0-based and refer to the original model. A `Run(start, n)` removes blocks
start … start+n−1; block start−1 stays and receives T. Hence start ≥ 1: block 0 has no kept block
before it to absorb the transform. The score of a run is the distance between the output of the
kept block (L_{start−1}) and the output of the last removed block (L_{start+n−1}).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .solve import solve_closed_form
from .stats import LSStats, angular_distance


@dataclass(frozen=True, order=True)
class Run:
    start: int  # first removed block
    n: int  # number of removed blocks

    @property
    def kept(self) -> int:
        """The block that keeps its place and receives T."""
        return self.start - 1

    @property
    def last(self) -> int:
        """The last removed block; its output is the regression target."""
        return self.start + self.n - 1

    @property
    def removed(self) -> list[int]:
        return list(range(self.start, self.start + self.n))

    def touches(self, other: "Run") -> bool:
        """Overlapping or adjacent: the two cannot each keep the block before them."""
        return self.start <= other.last + 1 and other.start <= self.last + 1

    def overlaps(self, other: "Run") -> bool:
        return self.start <= other.last and other.start <= self.last


def validate_run(run: Run, num_layers: int) -> None:
    if run.n <= 0:
        raise ValueError(f"the number of blocks to remove must be positive, got {run.n}")
    if run.n > num_layers - 1:
        raise ValueError(f"cannot remove {run.n} blocks from a {num_layers}-block model: at most {num_layers - 1} (block 0 must stay to receive T)")
    if not 1 <= run.start <= num_layers - run.n:
        raise ValueError(
            f"start block {run.start} is out of range for removing {run.n} of {num_layers} blocks: "
            f"it must be in 1..{num_layers - run.n} (0-based; block start−1 stays and receives T)"
        )


def run_scores(distance: torch.Tensor, n: int) -> dict[int, float]:
    """score[start] = distance(L_{start−1}, L_{start+n−1}) for every valid start."""
    L = distance.shape[0]
    validate_run(Run(1, n), L)
    return {s: float(distance[s - 1, s + n - 1]) for s in range(1, L - n + 1)}


def run_score_samples(outputs: dict[int, torch.Tensor], n: int) -> dict[int, torch.Tensor]:
    """Per-sequence terms of the last-token run score: for every valid start, the angular distance arccos(cos)/π
    between L_{start−1} and L_{start+n−1} of each sequence, [sequences].

    `outputs[i]` is block i's last-token output [sequences, d] for every block i (capture.collect_block_outputs with
    tokens="last"). The mean over sequences is `run_scores` of the last-token angular distance matrix."""
    L = len(outputs)
    if sorted(outputs) != list(range(L)):
        raise ValueError(f"outputs must hold every block 0..{L - 1}, got blocks {sorted(outputs)}")
    validate_run(Run(1, n), L)
    unit = {i: (x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)) for i, x in outputs.items()}
    return {s: angular_distance((unit[s - 1] * unit[s + n - 1]).sum(-1)) for s in range(1, L - n + 1)}


@dataclass(frozen=True)
class PickBootstrap:
    """Run scores recomputed on `reps` bootstrap resamples of the calibration sequences."""

    starts: list[int]
    means: torch.Tensor  # [reps, len(starts)]: mean score of each start on each resample

    def support(self) -> dict[int, float]:
        """Fraction of resamples in which each start has the lowest score (ties: the lowest start, as `choose_runs`)."""
        best = self.means.argmin(dim=1)  # first minimum = lowest start: `starts` is sorted
        counts = torch.bincount(best, minlength=len(self.starts)).double() / self.means.shape[0]
        return {s: float(c) for s, c in zip(self.starts, counts)}

    def interval(self, level: float = 0.95) -> dict[int, tuple[float, float]]:
        """Percentile interval of each start's score over the resamples."""
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=self.means.dtype)
        bounds = torch.quantile(self.means, q, dim=0)
        return {s: (float(bounds[0, j]), float(bounds[1, j])) for j, s in enumerate(self.starts)}


def bootstrap_picks(samples: dict[int, torch.Tensor], reps: int = 2000, seed: int = 0) -> PickBootstrap:
    """Resample the sequences with replacement `reps` times and recompute every run's mean score: how often the
    argmin rule would pick each run had the calibration set been another draw of the same size. A pick with low
    support is a property of the sample more than of the model."""
    if reps <= 0:
        raise ValueError(f"reps must be positive, got {reps}")
    starts = sorted(samples)
    A = torch.stack([samples[s].double() for s in starts], dim=1)  # [N, starts]
    N = A.shape[0]
    if N == 0:
        raise ValueError("no sequences to resample")
    g = torch.Generator().manual_seed(seed)
    means = []
    for lo in range(0, reps, 256):  # bounded memory: 256 resamples × N weights at a time
        idx = torch.randint(0, N, (min(256, reps - lo), N), generator=g)
        weights = torch.zeros(idx.shape, dtype=torch.float64).scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))
        means.append(weights @ A / N)
    return PickBootstrap(starts, torch.cat(means))


def merge_touching(runs: list[Run]) -> list[Run]:
    """Merge overlapping or adjacent runs into one run each (one T for the merged run)."""
    merged: list[Run] = []
    for r in sorted(runs):
        if merged and merged[-1].touches(r):
            prev = merged.pop()
            start, last = min(prev.start, r.start), max(prev.last, r.last)
            r = Run(start, last - start + 1)
        merged.append(r)
    return merged


def choose_runs(scores: dict[int, float], n: int, num_runs: int = 1, separated: bool = False) -> list[Run]:
    """Greedy selection of `num_runs` non-overlapping runs of n blocks with the lowest scores.

    Touching runs are merged into one (one transform). With `separated=True` a candidate that touches
    an already chosen run is skipped instead, so every run keeps its own transform (the paper's
    Multi_LT_NC). Raises if not enough runs fit.
    """
    if num_runs <= 0:
        raise ValueError(f"num_transforms must be positive, got {num_runs}")
    chosen: list[Run] = []
    for start in sorted(scores, key=lambda s: (scores[s], s)):
        cand = Run(start, n)
        if any(cand.overlaps(c) or (separated and cand.touches(c)) for c in chosen):
            continue
        chosen.append(cand)
        if len(chosen) == num_runs:
            return merge_touching(chosen)
    raise ValueError(
        f"only {len(chosen)} {'separated ' if separated else ''}runs of {n} blocks fit, {num_runs} were asked for; "
        "remove fewer blocks or use fewer transforms"
    )


def ls_residual_scores(ls: dict[Run, LSStats], heldout: dict[Run, LSStats], structure: str = "full",
                       ridge: float = 0.0) -> dict[int, float]:
    """score[start] = relative residual ‖M T − R‖² / ‖R‖² on held-out calibration tokens of the T fitted (closed form)
    on the other tokens: how well one linear map would replace the run, measured where it was not fitted.

    `ls[run]` holds the sums of all calibration tokens, `heldout[run]` those of the held-out subset."""
    scores = {}
    for run, held in heldout.items():
        T = solve_closed_form(ls[run].minus(held), structure, ridge)
        scores[run.start] = held.relative_residual(T)
    return scores


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA between two sets of token representations [N, d] (Kornblith et al., 2019); 1 = same up to rotation/scale."""
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    cross = (X.T @ Y).norm() ** 2
    return float(cross / ((X.T @ X).norm() * (Y.T @ Y).norm()))


def __getattr__(name: str):
    """Block Influence moved to `methods/block_influence.py`; the old names still resolve here."""
    if name in ("block_influence", "choose_by_block_influence"):
        from .methods import block_influence as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
