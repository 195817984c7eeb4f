"""LinearPatch (Chen et al., "A Simple Linear Patch Revives Layer-Pruned Large Language Models", arXiv 2505.24680,
NeurIPS 2025), training-free: delete a contiguous window of blocks and multiply the residual stream at the cut by
one d×d matrix P. Per baselines.md §6; code `chenxinrui-tsinghua/LinearPatch` (`layer_select.py`, `block_scaling.py`).

Selection. For a window of n blocks starting at s (removed: s … s+n−1), the score is the cosine similarity between
the stream entering block s and the stream entering block s+n — in the project's notation L_{s−1} and L_{s+n−1} —
per token over the hidden dimension, averaged over the real calibration tokens (`prune.calibrate`'s distance
statistics, `all` tokens). The window of highest similarity goes (ties: the lowest s), s ∈ 1 … L−n−1: block 0 and
the last block are never removed, as in the code.

Patch. With H an orthogonal d×d Hadamard matrix (`_compensation.hadamard`), per calibration sequence and channel c,
r_c = mean_t |(L_{s+n−1} H)_c| / mean_t |(L_{s−1} H)_c| over the sequence's real tokens; δ = the mean of r over the
sequences; P = H diag(δ) Hᵀ (symmetric). The pruned model computes h ↦ h·P on the whole output of block s−1 (the
residual stream at the cut): the magnitudes of the rotated channels match those the removed window would have
produced. "linearpatch-diag" uses P = diag(δ) with δ from the unrotated channels (the code's `rotate=False`).
P acts on the residual stream, so it folds into no weight: the result is `Outcome(separate=…)` — an extra
`separate.SeparateTransform` layer, in memory only (`standard_checkpoint=False`).

Defaults (data): 128 sequences of 2048 tokens (the code's first 128 WikiText-2 train windows, seed 2; baselines.md
§6b) — with the project's packaged corpora, WikiText-2 itself is not shipped, so pass `--calib` (e.g. `wiki`).
Option `start` (0-based first removed block) patches a given window instead, e.g. one chosen by another method
(the paper's "ShortGPT + LinearPatch" rows).

What differs from the released code, on purpose:
* the selection cosine is per token over the hidden dimension, as the paper defines it; the code's
  `torch.cosine_similarity(act[i], act[i+n])` on [B, T, d] tensors takes dim=1, the token axis (baselines.md §6e);
* no fp16: P is computed in float64 and applied in the model's dtype (the code casts the Hadamard and the patch
  output to fp16, which breaks fp32/CPU runs);
* padded batches: the per-sequence means run over real tokens only (the code feeds unpadded 2048-token windows);
  the selection cosine is pooled over all real tokens, which for equal-length windows is the code's mean of
  per-window means;
* for d not a power of two the Hadamard matrix is Sylvester ⊗ Paley (576 = 16·36), not QuaRot's hard-coded core,
  so P is another (equally valid) member of the family; see `hadamard` for sizes with no construction here;
* the optional knowledge-distillation stage (training P against teacher logits) is not implemented.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..capture import Activations, run_capture
from ..merge import Replacement
from ..prune import calibrate
from ..select import Run, run_scores
from ._compensation import channel_mean_abs, hadamard
from .base import Outcome, register


def select_window(model: nn.Module, batches: Sequence[dict], num_blocks: int, progress: bool = False
                  ) -> tuple[Run, dict[int, float], int]:
    """(run, cosine of every allowed start, tokens): the window whose entering and leaving streams are most similar."""
    L = get_adapter(model).num_layers
    calib = calibrate(model, batches, distances=True, progress=progress, desc="LinearPatch selection")
    cosine = calib.distances.matrix("cosine", "all")
    # run_scores gives matrix[s−1, s+n−1] for every start s = 1 … L−n; LinearPatch also keeps the last block
    scores = {s: v for s, v in run_scores(cosine, num_blocks).items() if s + num_blocks <= L - 1}
    best = max(scores, key=lambda s: (scores[s], -s))
    return Run(best, num_blocks), scores, calib.tokens


def channel_ratios(model: nn.Module, batches: Sequence[dict], run: Run, rotation: torch.Tensor | None,
                   progress: bool = False) -> tuple[torch.Tensor, int]:
    """(δ [d] float64, sequences): the mean over sequences of mean|L_last R|_c / mean|L_kept R|_c, R the rotation
    (None: the identity). L_kept = L_{s−1} enters block s; L_last = L_{s+n−1} enters block s+n."""
    adapter = get_adapter(model)
    d = adapter.hidden_size
    total = torch.zeros(d, dtype=torch.float64)
    count = [0]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return x if rotation is None else x @ rotation.to(x.device)

    def consume(acts: Activations) -> None:
        num = channel_mean_abs(acts, rotate(acts.block_out[run.last]))
        den = channel_mean_abs(acts, rotate(acts.block_out[run.kept].to(acts.block_out[run.last].device)))
        total.add_((num / den.clamp_min(1e-300)).sum(dim=0).cpu())
        count[0] += num.shape[0]

    run_capture(model, adapter, batches, consume, block_outputs=(run.kept, run.last), progress=progress,
                desc="LinearPatch scales", total=len(batches) if hasattr(batches, "__len__") else None)
    return total / count[0], count[0]


def _linearpatch(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping, progress: bool,
                 rotated: bool) -> Outcome:
    adapter = get_adapter(model)
    L, d = adapter.num_layers, adapter.hidden_size
    if num_blocks > L - 2:
        raise ValueError(f"LinearPatch never removes block 0 or the last block: from a {L}-block model it can remove "
                         f"at most {L - 2} blocks, not {num_blocks}")
    record: dict = {"variant": "rotated: P = H diag(delta) H^T" if rotated else "diagonal: P = diag(delta)"}
    passes = 0
    if options.get("start") is None:
        run, scores, tokens = select_window(model, batches, num_blocks, progress)
        record.update(selection="max mean per-token cosine(input of block s, input of block s+n), s in 1..L-n-1",
                      cosine={str(s): v for s, v in sorted(scores.items())}, selection_tokens=tokens)
        passes += 1
    else:
        start = int(options["start"])
        if not 1 <= start <= L - 1 - num_blocks:
            raise ValueError(f"LinearPatch start {start} is out of range for removing {num_blocks} of {L} blocks: "
                             f"it must be in 1..{L - 1 - num_blocks} (block 0 and the last block stay)")
        run = Run(start, num_blocks)
        record["selection"] = "given (option start)"
    H, construction = hadamard(d) if rotated else (None, "none")
    delta, sequences = channel_ratios(model, batches, run, H, progress)
    passes += 1
    P = H @ torch.diag(delta) @ H.T if rotated else torch.diag(delta)
    record.update(
        rotation=construction, delta=delta.tolist(), scale_sequences=sequences, passes=passes,
        start=run.start, kept_block=run.kept, removed_blocks=run.removed,
        patch="h -> h P on the whole output of the kept block (a separate layer; not a stock checkpoint)",
    )
    return Outcome(separate=[Replacement(run, P)], record=record)


_PAPER = "Chen et al., A Simple Linear Patch Revives Layer-Pruned Large Language Models, arXiv 2505.24680 (NeurIPS 2025)"
_DATA = {"samples": 128, "max_length": 2048}  # the code's 128 WikiText-2 train windows of 2048 tokens


@register("linearpatch", summary="LinearPatch: drop the most input/output-similar window, patch the cut with "
          "P = H diag(delta) H^T (Hadamard-rotated channel magnitude ratios), training-free",
          paper=_PAPER, defaults={"start": None}, data=_DATA, needs=("calibration", "distances", "block_inputs"),
          standard_checkpoint=False)
def linearpatch(model, batches, num_blocks, options, progress) -> Outcome:
    return _linearpatch(model, batches, num_blocks, options, progress, rotated=True)


@register("linearpatch-diag", summary="LinearPatch without the rotation: P = diag(delta) of the channel magnitude "
          "ratios at the cut", paper=_PAPER, defaults={"start": None}, data=_DATA,
          needs=("calibration", "distances", "block_inputs"), standard_checkpoint=False)
def linearpatch_diag(model, batches, num_blocks, options, progress) -> Outcome:
    return _linearpatch(model, batches, num_blocks, options, progress, rotated=False)
