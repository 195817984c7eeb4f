"""LaCo (Yang, Cao, Zhao, "LaCo: Large Language Model Pruning via Layer Collapse", arXiv 2402.11187, EMNLP 2024
Findings): collapse windows of later blocks into the block before them while the pruned model's last hidden state
stays similar to the original's. Per baselines.md §4; code `yangyifei729/LaCo` (`laco_llama-13b.ipynb`).

Merge of a window (RDSC, the paper's Eq. 1): block l absorbs blocks l+1 … l+m of the *current* model,

    θ*_l = θ_l + Σ_{k=1..m} (θ_{l+k} − θ_l)          for every parameter outside a norm,

and keeps its own norms (the code merges q, k, v, o, gate, up, down; here: every parameter of the block that does
not belong to a norm module, which for Llama is exactly that list, and for families with biases includes them).
Two variants, labelled:
* "laco" — Eq. 1 as written. Issue #4 of the repo reports that this merge (m = 6 there) collapses the similarity
  to about 0: Σθ_{l+k} − (m−1)θ_l has a much larger norm than any block.
* "laco-code" — what the released notebook computes: it adds `W[l+k] − W_copy[l]` in place into `W_copy[l]`, and
  after the first k `W_copy[l]` already equals W[l+k−1]… so the result is θ*_l = θ_{l+m}: the window's *last*
  block's weights with block l's norms (issues #4, #5; verified in the notebook: the subtrahend is the copy being
  updated, not the original θ_l).

Selection loop (the code's): l starts at H − C; while l ≥ L_low: the candidate merges the next m = min(C−1,
current_L − l − 1) blocks into l on a copy of the current model; its similarity is the mean over calibration
sequences of cos(vec H_orig, vec H_cand), H the last hidden state after the final norm (transformers'
`hidden_states[-1]`), flattened over (real tokens × d). If similarity > T the candidate becomes the current model
and l ← l − I (and l ← current_L − 1 − C when l ran past the end); otherwise l ← l − 1. The comparison is always
with the original model.

Counting. LaCo removes as many blocks as its threshold allows; the project asks for exactly `num_blocks`. Here the
loop stops as soon as `num_blocks` are gone, and the last accepted merge is cut short (m ≤ the blocks still to
remove) — we do not tune T. If the loop ends first, it is an error that says how many blocks T allowed.

Defaults. From the released Llama-2-13B notebook (40 blocks; baselines.md §4b): T = 0.45, I = 1, L_low = 0,
H = 39 = the last block, C = 7. H is the last block of any model; C (= 7 of 40 blocks) does not transfer to other
depths, so its default (None) is scaled to the model: C = max(2, round(7·L/40)) — 5 for a 30-block SmolLM2. The
resolved values and where each comes from are in the record; every one can be overridden. Data: the notebook
hard-codes 5 short English-Wikipedia sentence prefixes (the paper says 10); `data` asks for 5 sequences of at most
32 tokens (give them with `--calib`; the packaged `wiki` corpus is the nearest source).

Result: the kept blocks carry the merged weights (edited in place in the model handed in) and the collapsed blocks
are deleted — a stock checkpoint (`Replacement(run, None)` per run of deleted blocks).
Cost: one capture pass of the original (its last hidden states, kept in memory as float64) and one of each candidate
(a deep copy: peak memory ≈ 3 models, as the code).
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..capture import Activations, run_capture
from ._compensation import final_norm, norm_parameter_names
from .base import Outcome, register
from .common import deletion_replacements

VARIANTS = ("eq1", "code")


@torch.no_grad()
def merge_window(model: nn.Module, base: int, m: int, variant: str) -> nn.Module:
    """A copy of `model` in which block `base` absorbed blocks base+1 … base+m (current indices), which are deleted."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown LaCo variant {variant!r}; choose {', '.join(VARIANTS)}")
    cand = copy.deepcopy(model)
    adapter = get_adapter(cand)
    src = get_adapter(model).layers
    norms = norm_parameter_names(src[base])
    window = [dict(src[base + k].named_parameters()) for k in range(1, m + 1)]
    for name, p in adapter.layers[base].named_parameters():
        if name in norms:
            continue
        theta_l = dict(src[base].named_parameters())[name].detach().to(torch.float64)
        if variant == "eq1":
            new = theta_l + sum(w[name].detach().to(torch.float64) - theta_l for w in window)
        else:
            new = window[-1][name].detach().to(torch.float64)
        p.copy_(new.to(p.dtype))
    adapter.delete_blocks(list(range(base + 1, base + m + 1)))
    return cand


def last_hidden(model: nn.Module, batches: Sequence[dict], progress: bool = False) -> list[torch.Tensor]:
    """Per sequence, the final-normed output of the last block on its real tokens, flattened, float64 (CPU)."""
    adapter = get_adapter(model)
    norm = final_norm(adapter)
    last = adapter.num_layers - 1
    out: list[torch.Tensor] = []

    def consume(acts: Activations) -> None:
        x = acts.block_out[last]
        with torch.no_grad():
            h = norm(x)
        mask = acts.mask.to(h.device)
        for row in range(h.shape[0]):
            if mask[row].any():
                out.append(h[row][mask[row]].reshape(-1).to(torch.float64).cpu())

    run_capture(model, adapter, batches, consume, block_outputs=[last], progress=progress, desc="LaCo last hidden",
                total=len(batches) if hasattr(batches, "__len__") else None)
    return out


def similarity(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Mean over sequences of the cosine between the flattened last hidden states."""
    cos = [float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300)) for a, b in zip(reference, candidate)]
    return sum(cos) / len(cos)


def resolve(options: Mapping, num_layers: int) -> dict:
    """The loop's hyper-parameters for this model, with the source of each."""
    C = options.get("merge_layers")
    H = options.get("highest_layer")
    out = {
        "merge_layers": int(C) if C is not None else max(2, round(7 * num_layers / 40)),
        "interval": int(options["interval"]),
        "threshold": float(options["threshold"]),
        "lowest_layer": int(options["lowest_layer"]),
        "highest_layer": int(H) if H is not None else num_layers - 1,
    }
    out["sources"] = {
        "merge_layers": "given" if C is not None else "code's 7 of 40 blocks, scaled: max(2, round(7*L/40))",
        "highest_layer": "given" if H is not None else "code's 39 of 40 = the last block",
        "interval": "code (Llama-2-13B notebook)", "threshold": "code (Llama-2-13B notebook)",
        "lowest_layer": "code (Llama-2-13B notebook)",
    }
    if out["merge_layers"] < 2:
        raise ValueError(f"LaCo merge_layers must be at least 2 (it removes merge_layers-1 blocks per merge), got {C}")
    if out["interval"] < 1:
        raise ValueError(f"LaCo interval must be at least 1, got {out['interval']}")
    if not 0 <= out["lowest_layer"] <= out["highest_layer"] <= num_layers - 1:
        raise ValueError(f"LaCo needs 0 <= lowest_layer <= highest_layer <= {num_layers - 1}, got "
                         f"{out['lowest_layer']} and {out['highest_layer']}")
    return out


def _laco(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping, progress: bool,
          variant: str) -> Outcome:
    adapter = get_adapter(model)
    L = adapter.num_layers
    if not 0 < num_blocks <= L - 1:
        raise ValueError(f"cannot remove {num_blocks} blocks from a {L}-block model: give 1..{L - 1}")
    hp = resolve(options, L)
    C, I, T, low = hp["merge_layers"], hp["interval"], hp["threshold"], hp["lowest_layer"]
    final_norm(adapter)  # refuse early a family without one
    reference = last_hidden(model, batches, progress)
    current, alive = model, list(range(L))  # `current` is replaced by accepted candidates (copies) only
    targets: set[int] = set()
    evaluations = []
    removed = 0
    lay = hp["highest_layer"] - C
    while lay >= low and removed < num_blocks:
        m = min(C - 1, len(alive) - lay - 1, num_blocks - removed)
        if m <= 0:
            lay -= 1
            continue
        cand = merge_window(current, lay, m, variant)
        sim = similarity(reference, last_hidden(cand, batches, progress))
        accepted = sim > T
        evaluations.append({"layer": lay, "kept_block": alive[lay], "merged_blocks": alive[lay + 1: lay + m + 1],
                            "similarity": sim, "accepted": accepted})
        if accepted:
            current = cand
            targets.add(alive[lay])
            del alive[lay + 1: lay + m + 1]
            removed += m
            lay -= I
            if lay >= len(alive):
                lay = len(alive) - 1 - C
        else:
            del cand
            lay -= 1
    if removed < num_blocks:
        best = max((e["similarity"] for e in evaluations), default=float("nan"))
        what = "no block" if removed == 0 else f"only {removed} of the {num_blocks} blocks asked for"
        raise ValueError(f"LaCo removed {what}: {len(evaluations)} candidate merges, {sum(e['accepted'] for e in evaluations)} "
                         f"above threshold {T} (best similarity {best:.4f}); lower --option threshold or remove fewer blocks")
    # the merged weights go into the model handed in; run_method deletes the collapsed blocks
    orig_layers, cur_layers = adapter.layers, get_adapter(current).layers
    with torch.no_grad():
        for j, b in enumerate(alive):
            if b in targets:
                orig_layers[b].load_state_dict(cur_layers[j].state_dict())
    gone = sorted(set(range(L)) - set(alive))
    return Outcome(
        replacements=deletion_replacements(gone),
        record={"variant": {"eq1": "paper Eq. 1: theta_l + sum_k (theta_{l+k} - theta_l)",
                            "code": "released code: window's last block's weights, block l's norms"}[variant],
                "hyperparameters": hp, "evaluations": evaluations, "merged_into": sorted(targets & set(alive)),
                "calibration_sequences": len(reference), "passes": 1 + len(evaluations),
                "stopping": "stop once num_blocks are removed (last merge cut short); T is not tuned"},
    )


_PAPER = "Yang, Cao, Zhao, LaCo: Large Language Model Pruning via Layer Collapse, arXiv 2402.11187 (EMNLP 2024 Findings)"
_DEFAULTS = {"merge_layers": None, "interval": 1, "threshold": 0.45, "lowest_layer": 0, "highest_layer": None}
_DATA = {"samples": 5, "max_length": 32}  # the notebook's 5 short English-Wikipedia prefixes


@register("laco", summary="LaCo, paper Eq. 1: merge windows of later blocks into the block before them "
          "(theta_l + sum_k (theta_{l+k} - theta_l)) while the last hidden state's cosine to the original > T",
          paper=_PAPER, defaults=_DEFAULTS, data=_DATA, needs=("calibration",))
def laco(model, batches, num_blocks, options, progress) -> Outcome:
    return _laco(model, batches, num_blocks, options, progress, "eq1")


@register("laco-code", summary="LaCo as its released code computes it: each accepted window is replaced by its last "
          "block's weights (block l's norms), the in-place merge bug of issues #4/#5", paper=_PAPER,
          defaults=_DEFAULTS, data=_DATA, needs=("calibration",))
def laco_code(model, batches, num_blocks, options, progress) -> Outcome:
    return _laco(model, batches, num_blocks, options, progress, "code")
