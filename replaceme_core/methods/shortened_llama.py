"""Shortened LLaMA (Kim et al., arXiv 2402.02834): one-shot block orderings by PPL or by Taylor+ saliency.

Both criteria order the blocks once and delete the first n (no retraining here; the paper then LoRA-retrains).

* `shortened-ppl`: PPL_b = exp(mean next-token NLL) of the network without block b, for every b; ascending order.
  The L networks share their prefixes: per batch the blocks run once and each candidate forks at its input
  (common.drop_one_nll), the same numbers as L full passes.
* `shortened-taylor`: one forward/backward of the LM loss per calibration batch; for every weight of block b
  (every parameter whose name contains "weight": q, k, v, o, gate, up, down and the norms), s = W ⊙ ∂ℒ/∂W summed
  over batches (signed), I_W = Σ |s|; I_b = Σ_W I_W; ascending order.

The "+" rule of the released code (`src/block_prune.py`, baselines.md §2b) removes blocks {0, 1, 2, 3, L−2, L−1} from
the ordering before the first n are taken, and the code applies it to *both* criteria unless `--no_plus_heuristic`;
here `plus_heuristic` (default True for both), with `keep_first` = 4 and `keep_last` = 2 as in that code.

Calibration (`src/dataset.py`): 10 BookCorpus samples of 128 tokens, one batch of 10.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..capture import _input_device
from .base import Outcome, register
from .common import (PartialForward, causal_lm_only, deletion_replacements, drop_one_nll, mean_next_token_loss,
                     perplexity, plus_heuristic_order, position_ids_for, predicted_tokens)

PLUS = {"plus_heuristic": True, "keep_first": 4, "keep_last": 2}
DATA = {"samples": 10, "max_length": 128, "batch_size": 10}
PAPER = ("Kim et al., Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of Retraining "
         "Methods, arXiv 2402.02834")


def _pick(scores: dict[int, float], num_blocks: int, num_layers: int, options: Mapping, name: str) -> tuple[list[int], list[int]]:
    order = sorted(scores, key=lambda b: (scores[b], b))
    candidates = order
    if options["plus_heuristic"]:
        keep_first, keep_last = int(options["keep_first"]), int(options["keep_last"])
        if keep_first < 0 or keep_last < 0:
            raise ValueError(f"keep_first and keep_last must be non-negative, got {keep_first}, {keep_last}")
        candidates = plus_heuristic_order(order, num_layers, keep_first, keep_last)
    if len(candidates) < num_blocks:
        raise ValueError(
            f"{name} with the '+' rule (keeping the first {options['keep_first']} and last {options['keep_last']} "
            f"blocks) can remove at most {len(candidates)} of {num_layers} blocks, not {num_blocks}: remove fewer, "
            "or set --option plus_heuristic=false"
        )
    return order, sorted(candidates[:num_blocks])


def _check_plus(options: Mapping, num_blocks: int, num_layers: int, name: str) -> None:
    """Fail before any pass when the '+' rule leaves too few blocks."""
    _pick({b: 0.0 for b in range(num_layers)}, num_blocks, num_layers, options, name)


def ppl_scores(model: nn.Module, batches: Sequence[dict], progress: bool = False) -> tuple[dict[int, float], int]:
    """PPL of the network without each block b (all blocks candidates), and the number of predicted tokens."""
    pf = PartialForward(model)
    count = predicted_tokens(batches)
    if count == 0:
        raise ValueError("the PPL criterion needs calibration texts of at least two tokens")
    blocks = list(range(pf.num_layers))
    was_training = model.training
    model.eval()
    try:
        nll = drop_one_nll(pf, batches, blocks, blocks, progress=progress, desc="Shortened-PPL")
    finally:
        model.train(was_training)
    return {b: perplexity(nll[b], count) for b in blocks}, count


@register("shortened-ppl", summary="Shortened LLaMA, PPL criterion: delete the n blocks whose single removal gives "
          "the lowest calibration perplexity (one shot, '+' rule on)", paper=PAPER, defaults=dict(PLUS), data=dict(DATA),
          needs=("calibration", "block_inputs"))
def shortened_ppl(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping, progress: bool) -> Outcome:
    L = get_adapter(model).num_layers
    PartialForward(model)  # unsupported families fail before the '+' check
    _check_plus(options, num_blocks, L, "shortened-ppl")
    scores, count = ppl_scores(model, batches, progress)
    order, removed = _pick(scores, num_blocks, L, options, "shortened-ppl")
    return Outcome(replacements=deletion_replacements(removed),
                   record={"ppl_without_block": {str(b): scores[b] for b in sorted(scores)}, "order": order,
                           "passes": L, "predicted_tokens": count})


def block_weights(model: nn.Module, block: int) -> list[tuple[str, nn.Parameter]]:
    """The parameters the Taylor criterion scores in one block: every one whose name contains "weight"."""
    return [(name, p) for name, p in get_adapter(model).layers[block].named_parameters() if "weight" in name]


def taylor_scores(model: nn.Module, batches: Sequence[dict], progress: bool = False) -> dict[int, float]:
    """I_b = Σ_{W ∈ block b} Σ |Σ_batches W ⊙ ∂ℒ_batch/∂W|, ℒ_batch the mean next-token loss of the batch (pads ignored)."""
    causal_lm_only(model, "shortened-taylor")
    adapter = get_adapter(model)
    L = adapter.num_layers
    scored = {b: block_weights(model, b) for b in range(L)}
    salience = {(b, n): torch.zeros(p.shape, dtype=torch.float64, device=p.device) for b in scored for n, p in scored[b]}
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    device = _input_device(model)
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for b in scored:
            for _, p in scored[b]:
                p.requires_grad_(True)
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=False).logits
            mean_next_token_loss(logits, {"input_ids": ids, "attention_mask": mask}).backward()
            with torch.no_grad():
                for b in scored:
                    for n, p in scored[b]:
                        if p.grad is not None:
                            salience[(b, n)] += (p.detach() * p.grad).to(torch.float64)
                        p.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]
        model.train(was_training)
    return {b: float(sum(salience[(b, n)].abs().sum() for n, _ in scored[b])) for b in range(L)}


@register("shortened-taylor", summary="Shortened LLaMA, Taylor+ criterion: delete the n blocks of lowest "
          "Σ|W·∂L/∂W| (one forward/backward per batch, '+' rule on)", paper=PAPER, defaults=dict(PLUS), data=dict(DATA),
          needs=("calibration", "gradients"))
def shortened_taylor(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping,
                     progress: bool) -> Outcome:
    L = get_adapter(model).num_layers
    causal_lm_only(model, "shortened-taylor")
    _check_plus(options, num_blocks, L, "shortened-taylor")
    scores = taylor_scores(model, batches, progress)
    order, removed = _pick(scores, num_blocks, L, options, "shortened-taylor")
    return Outcome(replacements=deletion_replacements(removed),
                   record={"taylor_score": {str(b): scores[b] for b in sorted(scores)}, "order": order,
                           "passes": "1 forward+backward per batch"})
