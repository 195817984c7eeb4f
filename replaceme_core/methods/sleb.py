"""SLEB (Song et al., ICML 2024, arXiv 2402.09025): greedy block elimination by calibration NLL.

n phases on the current model (the original with the blocks removed so far). In each, every alive block j with
early_barrier ≤ position(j) < len(alive) − latter_barrier is switched off in turn (the network then runs the other
alive blocks) and scored by the total next-token NLL of the calibration set (SLEB's "token perplexity": minimising
the total NLL of a fixed set is minimising its perplexity); the block of lowest NLL goes (ties: the earlier block).
With the default barriers (1, 1, as its code) the first and the last alive blocks are never candidates, so at most
L − 2 blocks can go. Nothing is compensated; the blocks are deleted.

Per phase the calibration batches run through the alive blocks once: the state entering a candidate is computed once
and only the blocks after it run for that candidate (common.drop_one_nll), the same NLLs as the naive loop for
about half its block evaluations.

Calibration (baselines.md §1b): SLEB's code shuffles WikiText-2 train *rows*, joins the first nsamples=128 of them
and cuts 2048-token windows from the result, so its "128 samples" are ≈10k tokens ≈ 5 windows of 2048. The data
default here is that effective budget: 5 samples of up to 2048 tokens.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import nn

from .base import Outcome, register
from .common import PartialForward, deletion_replacements, drop_one_nll, perplexity, predicted_tokens


def max_removable(num_layers: int, early_barrier: int, latter_barrier: int) -> int:
    """Phase k has L − k alive blocks and L − k − early − latter candidates, so n phases need n ≤ L − early − latter."""
    return num_layers - early_barrier - latter_barrier


@register(
    "sleb",
    summary="SLEB: greedy, one block per phase, the block whose removal gives the lowest calibration NLL",
    paper="Song et al., SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer "
          "Blocks, ICML 2024, arXiv 2402.09025",
    defaults={"early_barrier": 1, "latter_barrier": 1},
    data={"samples": 5, "max_length": 2048, "batch_size": 1},
    needs=("calibration", "block_inputs"),
)
def sleb(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping, progress: bool) -> Outcome:
    pf = PartialForward(model)
    L = pf.num_layers
    early, latter = int(options["early_barrier"]), int(options["latter_barrier"])
    if early < 0 or latter < 0:
        raise ValueError(f"SLEB's barriers must be non-negative, got early_barrier {early}, latter_barrier {latter}")
    reach = max_removable(L, early, latter)
    if num_blocks > reach:
        raise ValueError(f"SLEB with early_barrier {early} and latter_barrier {latter} can remove at most "
                         f"{max(reach, 0)} of {L} blocks, not {num_blocks}: remove fewer or lower the barriers")
    count = predicted_tokens(batches)
    if count == 0:
        raise ValueError("SLEB needs calibration texts of at least two tokens (it scores next-token NLL)")
    was_training = model.training
    model.eval()
    alive, removed, phases, evaluations = list(range(L)), [], [], 0
    try:
        for k in range(num_blocks):
            candidates = alive[early: len(alive) - latter]
            nll = drop_one_nll(pf, batches, alive, candidates, progress=progress, desc=f"SLEB phase {k + 1}/{num_blocks}")
            evaluations += len(candidates)
            best = min(candidates, key=lambda b: (nll[b], alive.index(b)))
            phases.append({"phase": k, "removed": best, "ppl": perplexity(nll[best], count),
                           "nll": {str(b): nll[b] for b in candidates}})
            removed.append(best)
            alive.remove(best)
    finally:
        model.train(was_training)
    return Outcome(
        replacements=deletion_replacements(removed),
        record={"removal_order": removed, "phases": phases, "candidate_evaluations": evaluations,
                "predicted_tokens": count, "score": "total next-token NLL of the calibration set (nats)"},
    )
