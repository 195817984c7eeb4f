"""ShortGPT's Block Influence (Men et al., arXiv 2403.03853): delete the n blocks that change their input least.

BI_l = E_t[1 − cos(x_{l,t}, y_{l,t})], x_l the residual stream entering block l and y_l its output, over real tokens.
The n blocks of *lowest* BI go at once (one-shot, no compensation). ShortGPT's code reads x_l, y_l from transformers'
`hidden_states`, whose last entry is taken after the final norm, so its last block compares a pre-norm input with a
post-norm output (baselines.md §0, §3e); here hooks see every block's true input and output, the last block's too.
ShortGPT sums BI over tokens; the mean ranks the blocks the same way on the same data.

Two uses:
* the registered method `block-influence`: ShortGPT itself, every block a candidate (block 0 included), deletion only;
* `choose_by_block_influence`: ReplaceMe's `--selection bi` (prune.py), which ranks blocks 1 … L−1 from the distance
  statistics of its selection pass and fits a T for each contiguous group (block 0 has no kept block before it).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..capture import Activations, run_capture
from ..select import Run, merge_touching, validate_run
from .base import Outcome, register
from .common import deletion_replacements


def block_influence(cosine: torch.Tensor) -> dict[int, float]:
    """ShortGPT's Block Influence of block i from a matrix of mean cosines between block outputs:
    1 − E[cos(input_i, output_i)] = 1 − cos(L_{i−1}, L_i), for i ≥ 1 (block 0's input is not a block output)."""
    return {i: 1.0 - float(cosine[i - 1, i]) for i in range(1, cosine.shape[0])}


def choose_by_block_influence(cosine: torch.Tensor, num_blocks: int) -> list[Run]:
    """The `num_blocks` blocks of lowest Block Influence (ties: the lower index), grouped into contiguous runs (one T
    each) — ReplaceMe's `selection="bi"`."""
    bi = block_influence(cosine)
    validate_run(Run(1, num_blocks), cosine.shape[0])
    picked = sorted(sorted(bi, key=lambda i: (bi[i], i))[:num_blocks])
    return merge_touching([Run(i, 1) for i in picked])


def block_influence_scores(model: nn.Module, batches: Sequence[dict], tokens: str = "all",
                           progress: bool = False) -> tuple[dict[int, float], int]:
    """BI of every block 0 … L−1 from one capture pass: (mean over the chosen tokens of 1 − cos(input, output), rows).

    `tokens`: "all" real tokens (ShortGPT) or each sequence's "last" real token."""
    if tokens not in ("all", "last"):
        raise ValueError(f"tokens must be 'all' or 'last', got {tokens!r}")
    adapter = get_adapter(model)
    L = adapter.num_layers
    sums = torch.zeros(L, dtype=torch.float64)
    rows = [0]
    block0_input: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):  # the embeddings entering block 0 (capture hooks see block outputs only)
        x = args[0] if args else kwargs["hidden_states"]
        block0_input.append(x.detach().clone())

    def consume(acts: Activations) -> None:
        pick = acts.real if tokens == "all" else acts.last
        prev = pick(block0_input.pop())
        for i in range(L):
            out = pick(acts.block_out[i])
            cos = nn.functional.cosine_similarity(prev.double(), out.to(prev.device).double(), dim=-1, eps=1e-12)
            sums[i] += float((1.0 - cos).sum())
            prev = out
        rows[0] += prev.shape[0]

    handle = adapter.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        run_capture(model, adapter, batches, consume, block_outputs=range(L), progress=progress, desc="block influence",
                    total=len(batches) if hasattr(batches, "__len__") else None)
    finally:
        handle.remove()
    return {i: float(sums[i]) / rows[0] for i in range(L)}, rows[0]


@register(
    "block-influence",
    summary="ShortGPT: delete the n blocks of lowest Block Influence 1 − cos(block input, block output), one shot",
    paper="Men et al., ShortGPT: Layers in Large Language Models are More Redundant Than You Expect, arXiv 2403.03853",
    defaults={"tokens": "all"},
    data={"max_length": 256},  # ShortGPT feeds PG19 in independent 256-token strides (baselines.md §3b)
    needs=("calibration", "block_inputs"),
)
def shortgpt_block_influence(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping,
                             progress: bool) -> Outcome:
    bi, rows = block_influence_scores(model, batches, tokens=str(options["tokens"]), progress=progress)
    order = sorted(bi, key=lambda i: (bi[i], i))
    removed = sorted(order[:num_blocks])
    return Outcome(
        replacements=deletion_replacements(removed),
        record={"block_influence": {str(i): bi[i] for i in sorted(bi)}, "order": order, "rows": rows,
                "passes": 1, "rule": "remove the n blocks of lowest BI (hook-measured block input/output)"},
    )
