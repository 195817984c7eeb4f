"""Prune&Comp (Chen et al., "Prune&Comp: Free Lunch for Layer-Pruned LLMs via Iterative Pruning with Magnitude
Compensation", arXiv 2507.18212, AAAI 2026): delete one block per round and compensate the magnitude drop at the cut
with one scalar fused into the weights — a stock checkpoint. Per baselines.md §8; code
`chenxinrui-tsinghua/PruneAndComp` (`CosSim_BI.py`, `magcomp.py`).

Round r = 1 … n, always on the *current* (already pruned and compensated) model:
1. Block Influence of every block, hook-measured: BI_l = mean over real tokens of 1 − cos(x_l, y_l), x_l the stream
   entering block l (the embeddings for l = 0) and y_l its output (`block_influence.block_influence_scores`); on the
   first `bi_samples` calibration sequences (code: 128 windows). l* = argmin BI (ties: the lower index).
2. α = mean over channels c of [mean over sequences of mean_t |y_{l*,c}| / mean_t |x_{l*,c}|], on the first
   `scale_samples` sequences (code: 256 windows): how much block l* grows the stream, channel by channel.
3. Delete l*, then fuse α: multiply the token embeddings and the attention output projection (`o_proj`) and MLP
   output projection (`down_proj`), weights and biases, of every block before the cut by α. Each of them adds to the
   residual stream and every block reads the stream through a norm, so this scales the stream at the cut by α
   (exactly up to the norms' ε: RMSNorm(αx) = RMSNorm(x) only as ε → 0) at no runtime cost.

Tied embeddings (SmolLM2): `embed_tokens` is also the LM head, so scaling it would make every logit α× sharper — a
bug of the released `fuse_scale` for such models (baselines.md §8). Here the final norm's weight (and bias) is divided
by the same factor, which restores the logits exactly and keeps the checkpoint tied.

Families: the Llama-like decoders (llama, mistral, qwen2, qwen3, phi3), where the writers of the residual stream
are exactly the embeddings, `self_attn.o_proj` and `mlp.down_proj`; others are refused (one line), e.g. Gemma 3,
whose post-attention/post-feedforward norms make `o_proj`/`down_proj` scale-invariant.

Differences from the released code, on purpose: fp32/any dtype (the code casts to fp16); BI is the mean over real
tokens instead of the sum (same ranking on the same data; padded batches allowed); the last block's "output" is its
true output (the code hooks the *input* of block l*+1, which does not exist for the last block, and then divides by
an all-zero placeholder's mean — α = 0); the tied-embedding compensation above. The Taylor+/PPL/Mag+ importance
variants of the repo are not implemented (BI only, the paper's main "CosSim(BI)" row).
Computation: a deep copy of the model carries the rounds (2 passes each: BI, then α); the original then receives the
product of the round factors once per weight, in float64, and `run_method` deletes the removed blocks.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from ..arch import LlamaLikeAdapter, UnsupportedModelError, get_adapter
from ..capture import Activations
from ._compensation import capture_block_io, channel_mean_abs, final_norm, first_sequences
from .base import Outcome, register
from .block_influence import block_influence_scores
from .common import deletion_replacements


def _check_family(model: nn.Module) -> LlamaLikeAdapter:
    adapter = get_adapter(model)
    ok = isinstance(adapter, LlamaLikeAdapter) and isinstance(model.get_input_embeddings(), nn.Embedding) and all(
        isinstance(getattr(getattr(b, "self_attn", None), "o_proj", None), nn.Linear)
        and isinstance(getattr(getattr(b, "mlp", None), "down_proj", None), nn.Linear) for b in adapter.layers)
    if not ok:
        raise UnsupportedModelError(
            f"Prune&Comp fuses its scale into the embeddings, self_attn.o_proj and mlp.down_proj of Llama-like blocks "
            f"(llama, mistral, qwen2, qwen3, phi3); it cannot fold into a {model.config.model_type!r} model")
    final_norm(adapter)  # raises if there is none
    return adapter


def _is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


@torch.no_grad()
def _scale(module: nn.Module, factor: float) -> None:
    """Multiply a module's weight and bias (if any) by `factor`, computed in float64."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is not None:
            p.copy_((p.detach().to(torch.float64) * factor).to(p.dtype))


def fuse_scales(model: nn.Module, embed_factor: float, block_factors: Mapping[int, float]) -> None:
    """Scale the embeddings by `embed_factor` and o_proj/down_proj of block i (current index) by `block_factors[i]`;
    with tied embeddings the final norm is divided by `embed_factor` so the LM head is unchanged."""
    adapter = get_adapter(model)
    _scale(model.get_input_embeddings(), embed_factor)
    if _is_tied(model):
        _scale(final_norm(adapter), 1.0 / embed_factor)
    for i, f in block_factors.items():
        if f != 1.0:
            _scale(adapter.layers[i].self_attn.o_proj, f)
            _scale(adapter.layers[i].mlp.down_proj, f)


def magnitude_ratio(model: nn.Module, batches: Sequence[dict], block: int, progress: bool = False
                    ) -> tuple[float, int]:
    """(α, sequences): mean over channels of the mean over sequences of mean|output_c| / mean|input_c| of `block`."""
    adapter = get_adapter(model)
    total = torch.zeros(adapter.hidden_size, dtype=torch.float64)
    count = [0]

    def consume(acts: Activations, inputs: dict[int, torch.Tensor]) -> None:
        out = channel_mean_abs(acts, acts.block_out[block])
        inp = channel_mean_abs(acts, inputs[block].to(acts.block_out[block].device))
        total.add_((out / inp.clamp_min(1e-300)).sum(dim=0).cpu())
        count[0] += out.shape[0]

    capture_block_io(model, adapter, batches, [block], consume, progress=progress, desc="Prune&Comp magnitude")
    return float((total / count[0]).mean()), count[0]


@register(
    "prune-comp",
    summary="Prune&Comp: iteratively delete the block of lowest Block Influence and fuse the magnitude ratio alpha "
            "into the embeddings and every earlier o_proj/down_proj (tied heads compensated in the final norm)",
    paper="Chen et al., Prune&Comp: Free Lunch for Layer-Pruned LLMs via Iterative Pruning with Magnitude "
          "Compensation, arXiv 2507.18212 (AAAI 2026)",
    defaults={"bi_samples": 128, "scale_samples": 256},  # CosSim_BI.py: BI on 128 windows, get_scale_params on 256
    data={"samples": 256, "max_length": 2048},  # the code's WikiText-2 train windows (train_size=256, seqlen=2048)
    needs=("calibration", "block_inputs"),
)
def prune_comp(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping, progress: bool) -> Outcome:
    adapter = _check_family(model)
    L = adapter.num_layers
    if not 0 < num_blocks <= L - 1:
        raise ValueError(f"cannot remove {num_blocks} blocks from a {L}-block model: give 1..{L - 1}")
    bi_batches = first_sequences(batches, options.get("bi_samples"))
    scale_batches = first_sequences(batches, options.get("scale_samples"))
    work = copy.deepcopy(model)
    wad = get_adapter(work)
    alive = list(range(L))  # original index of each current block
    embed_factor, block_factor = 1.0, {i: 1.0 for i in range(L)}
    rounds = []
    for r in range(num_blocks):
        bi, rows = block_influence_scores(work, bi_batches, tokens="all", progress=progress)
        cut = min(bi, key=lambda i: (bi[i], i))
        alpha, sequences = magnitude_ratio(work, scale_batches, cut, progress)
        if not torch.isfinite(torch.tensor(alpha)) or alpha <= 0:
            raise ValueError(f"Prune&Comp round {r + 1}: the magnitude ratio of block {alive[cut]} is {alpha}; "
                             "the calibration data cannot compensate this cut")
        wad.delete_blocks([cut])
        fuse_scales(work, alpha, {j: alpha for j in range(cut)})
        embed_factor *= alpha
        for j in range(cut):
            block_factor[alive[j]] *= alpha
        rounds.append({"round": r + 1, "removed_block": alive[cut], "current_index": cut, "alpha": alpha,
                       "block_influence": {str(alive[i]): v for i, v in sorted(bi.items())}, "bi_rows": rows,
                       "scale_sequences": sequences})
        del alive[cut]
    del work
    removed = sorted(set(range(L)) - set(alive))
    fuse_scales(model, embed_factor, {i: block_factor[i] for i in alive})
    return Outcome(
        replacements=deletion_replacements(removed),
        record={"rounds": rounds, "embed_factor": embed_factor,
                "block_factors": {str(i): block_factor[i] for i in alive}, "tied_embeddings": _is_tied(model),
                "tied_compensation": "final norm divided by the embedding factor" if _is_tied(model) else None,
                "passes": 2 * num_blocks,
                "rule": "per round: argmin hook-measured BI, alpha = channel-mean magnitude ratio, fused before the cut"},
    )
