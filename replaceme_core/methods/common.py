"""Helpers several methods share: run a decoder's blocks from a cached hidden state, calibration NLL, deletion outcomes.

`PartialForward` runs blocks j … L−1 (or any subset, in order) of a Llama-like decoder starting from a hidden state
already computed, the way the family's own `*Model.forward` calls its layers: the same causal (or sliding-window)
masks per layer type, the same rotary position embeddings, the same position ids. A method that scores "the network
without block b" for many b (SLEB, Shortened-PPL) walks the blocks once per batch and forks at every candidate: the
input of b is computed once and only the blocks after b run for that candidate. With no block skipped it reproduces
the model's logits (tests/test_methods_selection.py checks it against the full forward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import UnsupportedModelError, get_adapter
from ..capture import _first, _input_device
from ..merge import Replacement
from ..select import Run, merge_touching

#: model types whose decoder layers PartialForward can call directly (masks and rotary embeddings as their forward)
PARTIAL_FORWARD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def position_ids_for(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (as `capture.run_capture` and generate() use): left padding changes nothing."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def next_token_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [B, T−1] bool, targets [B, T−1]): position t predicts token t+1 where both are real tokens."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return mask[:, :-1] & mask[:, 1:], ids[:, 1:]


def predicted_tokens(batches: Iterable[dict]) -> int:
    """How many next-token predictions the calibration NLL sums over."""
    return sum(int(next_token_targets(b)[0].sum()) for b in batches)


def real_tokens(batches: Iterable[dict]) -> int:
    total = 0
    for b in batches:
        mask = b.get("attention_mask")
        total += int(b["input_ids"].numel() if mask is None else mask.sum())
    return total


@dataclass
class BatchState:
    """One calibration batch prepared for the decoder layers: what every layer call needs besides the hidden state."""

    hidden: torch.Tensor  # the embeddings: input of block 0, [B, T, d]
    masks: list  # per block (current index): the attention mask its layer type gets (may be None: plain causal)
    position_embeddings: tuple
    position_ids: torch.Tensor
    valid: torch.Tensor  # [B, T−1]: next-token predictions that count
    targets: torch.Tensor  # [B, T−1]


class PartialForward:
    """Call a Llama-like model's decoder layers from cached hidden states (see the module docstring)."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PARTIAL_FORWARD_TYPES:
            raise UnsupportedModelError(
                f"this method runs decoder blocks from cached hidden states, which is implemented for model types "
                f"{', '.join(PARTIAL_FORWARD_TYPES)}; this model is {model_type!r}"
            )
        self.model = model
        self.model_type = model_type
        self.adapter = get_adapter(model)
        self.base = model.model  # every type above keeps embeddings, layers, rotary_emb and norm in `.model`
        self.device = _input_device(model)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers

    def _masks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> list:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = self.base.config
        kw = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids)
        L = self.num_layers
        if self.model_type in ("qwen2", "qwen3"):  # one mask per layer type, as Qwen2Model/Qwen3Model.forward
            types = list(config.layer_types)[:L]
            mapping = {"full_attention": create_causal_mask(**kw)}
            if "sliding_attention" in types:
                mapping["sliding_attention"] = create_sliding_window_causal_mask(**kw)
            return [mapping[t] for t in types]
        if self.model_type in ("mistral", "phi3") and getattr(config, "sliding_window", None) is not None:
            return [create_sliding_window_causal_mask(**kw)] * L
        return [create_causal_mask(**kw)] * L

    @torch.no_grad()
    def start(self, batch: dict) -> BatchState:
        ids = batch["input_ids"].to(self.device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        position_ids = position_ids_for(mask)
        hidden = self.base.embed_tokens(ids)
        valid, targets = next_token_targets({"input_ids": ids, "attention_mask": mask})
        return BatchState(hidden=hidden, masks=self._masks(hidden, mask, position_ids),
                          position_embeddings=self.base.rotary_emb(hidden, position_ids), position_ids=position_ids,
                          valid=valid, targets=targets)

    @torch.no_grad()
    def run(self, state: BatchState, hidden: torch.Tensor, blocks: Iterable[int]) -> torch.Tensor:
        """The hidden state after running `blocks` (current indices, in the order given) on `hidden`."""
        for i in blocks:
            hidden = _first(self.layers[i](hidden, attention_mask=state.masks[i], position_ids=state.position_ids,
                                           position_embeddings=state.position_embeddings, use_cache=False))
        return hidden

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the last block's output (what `*ForCausalLM.forward` returns as logits)."""
        return self.model.lm_head(self.base.norm(hidden))

    @torch.no_grad()
    def nll(self, state: BatchState, hidden: torch.Tensor, chunk_rows: int = 2048) -> float:
        """Total next-token NLL (nats, summed over the batch's valid predictions) from the last block's output.

        Only the predicted positions reach the head, in chunks, so the full [B, T, vocab] logits are never held."""
        rows = hidden[:, :-1][state.valid]
        targets = state.targets[state.valid].to(rows.device)
        total = 0.0
        for lo in range(0, rows.shape[0], chunk_rows):
            logits = self.logits(rows[lo:lo + chunk_rows])
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            total += float(nn.functional.cross_entropy(logits, targets[lo:lo + chunk_rows].to(logits.device),
                                                       reduction="sum").double())
        return total


def drop_one_nll(pf: PartialForward, batches: Sequence[dict], alive: Sequence[int], candidates: Sequence[int],
                 progress: bool = False, desc: str = "drop-one NLL") -> dict[int, float]:
    """For each candidate block c of `alive` (current indices, in order), the total calibration NLL of the network
    that runs `alive` without c. Per batch the blocks run once in order; at each candidate the state entering it is
    forked and only the blocks after it run (plus norm and head): the same numbers as one full pass per candidate."""
    alive = list(alive)
    cand = set(candidates)
    if not cand <= set(alive):
        raise ValueError(f"candidates {sorted(cand - set(alive))} are not among the blocks that run")
    totals = {c: 0.0 for c in alive if c in cand}
    last_pos = max(alive.index(c) for c in cand) if cand else -1
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        state = pf.start(batch)
        h = state.hidden
        for pos, block in enumerate(alive[: last_pos + 1]):
            if block in cand:
                totals[block] += pf.nll(state, pf.run(state, h, alive[pos + 1:]))
            if pos < last_pos:
                h = pf.run(state, h, [block])
    return totals


def mean_next_token_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The batch's mean next-token cross-entropy over valid predictions (pads ignored), differentiable, in the logits'
    precision (half precision upcast to float32; transformers' own loss would cast a float64 model's logits down)."""
    valid, targets = next_token_targets(batch)
    rows = logits[:, :-1][valid.to(logits.device)]
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    return nn.functional.cross_entropy(rows, targets.to(logits.device)[valid.to(logits.device)], reduction="mean")


def perplexity(total_nll: float, count: int) -> float:
    return math.exp(total_nll / count) if count else float("nan")


def deletion_replacements(blocks: Iterable[int]) -> list[Replacement]:
    """Plain deletion of `blocks` (any set): contiguous blocks grouped into runs, no map (T None)."""
    return [Replacement(run, None) for run in merge_touching([Run(int(b), 1) for b in sorted(set(blocks))])]


def plus_heuristic_order(order: Sequence[int], num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    """Shortened LLaMA's "+" rule: drop the first `keep_first` and last `keep_last` blocks from a removal order."""
    keep = set(range(min(keep_first, num_layers))) | set(range(max(num_layers - keep_last, 0), num_layers))
    return [b for b in order if b not in keep]


def causal_lm_only(model: nn.Module, method: str) -> None:
    """Methods that score a language-model loss need an LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedModelError(f"method {method!r} scores a next-token loss: it needs a causal language model "
                                    f"with an LM head, not {type(model).__name__}")
