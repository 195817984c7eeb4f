"""The official ReplaceMe code's COST SHAPE, re-implemented for benchmarking (our own code, not a copy).

What makes the official pipeline cost what it costs (paper.md §0/§1.2, the official `distance.py` + `lstsq.py`):

(a) distance pass: a full forward of the causal LM (LM head included) with ``output_hidden_states=True``, so every
    layer's hidden states for every token are materialised; angular distances arccos(cos)/π between the last
    non-pad token's hidden states for every (layer, n) pair, averaged per batch, then over batches;
(b) a second full forward pass (again all hidden states, again to the end of the model), with a hook on the
    kept block's MLP, accumulating MᵀM and Mᵀ(L_{i+n} − Y_i) in float64 over ALL positions (pad tokens
    included, as the official code does); T = inv(MᵀM) · MᵀR with an explicit inverse;
(c) the model is reloaded from disk, T is folded into the kept block's down projection and the run is deleted.

It is used only to time that structure against `replaceme_core.prune.prune` on the same tokens.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn


def _last_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    idx = torch.where(mask.bool(), positions, -1).max(dim=1).values
    rows = torch.arange(mask.shape[0])[idx >= 0]
    return rows, idx[idx >= 0]


def _angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1, 1)
    return torch.arccos(cos) / math.pi


@torch.no_grad()
def distance_pass(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """[L, L] mean angular distance between block outputs (last real token), hidden_states[1:] as the official code."""
    L = model.config.num_hidden_layers
    per_batch = []
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        hs = out.hidden_states[1:]
        rows, idx = _last_rows(b["attention_mask"])
        last = [h[rows, idx] for h in hs]
        dist = torch.zeros(L, L, dtype=torch.float64)
        for i in range(L):
            for n in range(1, L - i):
                dist[i, i + n] = float(_angular(last[i], last[i + n]).mean())
        per_batch.append(dist)
    return torch.stack(per_batch).mean(0)


@torch.no_grad()
def ls_pass(model: nn.Module, batches: list[dict], kept: int, n: int) -> torch.Tensor:
    """T for the run after block `kept` (n blocks), all positions (pads too), explicit inverse."""
    d = model.config.hidden_size
    MtM = torch.zeros(d, d, dtype=torch.float64)
    MtR = torch.zeros(d, d, dtype=torch.float64)
    captured = {}
    handle = model.model.layers[kept].mlp.register_forward_hook(lambda _m, _i, out: captured.__setitem__("M", out))
    try:
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            hs = out.hidden_states
            M = captured["M"].reshape(-1, d).to(torch.float64)
            Y = hs[kept + 1].reshape(-1, d).to(torch.float64) - M
            R = hs[kept + 1 + n].reshape(-1, d).to(torch.float64) - Y
            MtM += M.T @ M
            MtR += M.T @ R
    finally:
        handle.remove()
    return torch.linalg.inv(MtM) @ MtR


def reload_fold_delete(model_path, kept: int, n: int, T: torch.Tensor, dtype=torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    down = model.model.layers[kept].mlp.down_proj
    with torch.no_grad():
        down.weight.copy_((T.T @ down.weight.to(torch.float64)).to(down.weight.dtype))
    keep = [layer for i, layer in enumerate(model.model.layers) if not kept < i <= kept + n]
    model.model.layers = nn.ModuleList(keep)
    for i, layer in enumerate(keep):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: len(keep)]
    return model


def official_shape_prune(model: nn.Module, model_path, batches: list[dict], n: int) -> dict:
    """Run (a), (b), (c); return timings and the chosen run (0-based first removed block = kept + 1)."""
    t0 = time.perf_counter()
    dist = distance_pass(model, batches)
    t1 = time.perf_counter()
    L = dist.shape[0]
    scores = {i: float(dist[i, i + n]) for i in range(L - n)}
    kept = min(scores, key=scores.get)
    T = ls_pass(model, batches, kept, n)
    t2 = time.perf_counter()
    pruned = reload_fold_delete(model_path, kept, n, T)
    t3 = time.perf_counter()
    return {"distance_pass_s": t1 - t0, "ls_pass_s": t2 - t1, "reload_fold_s": t3 - t2, "total_s": t3 - t0,
            "start": kept + 1, "removed": list(range(kept + 1, kept + 1 + n)), "model": pruned}
