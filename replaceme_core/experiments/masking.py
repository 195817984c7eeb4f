"""Random token masking of calibration batches (the paper's Table 12 augmentation; App. A.12).

The paper names "random token masking" as an augmentation of the calibration data but gives neither
the ratio nor the procedure, and the released code has none. What we do, on token batches
({"input_ids", "attention_mask"} as produced by :func:`replaceme_core.io.data.token_batches`):

* a fraction `ratio` of the *real, non-special* tokens of every sequence is chosen uniformly at
  random (exactly round(ratio · eligible) per sequence, so short and long texts are masked alike);
  pad positions (attention_mask 0) and the tokenizer's special tokens (BOS, chat-template markers)
  are never chosen, so the chat structure survives;
* ``mode="replace"`` (default): the chosen tokens are replaced by one fixed id (the tokenizer's unk
  token, else its pad token). The sequence keeps its length, positions and attention mask; the
  masked positions still contribute activations (of a token that carries no content), and every
  other token sees a context with holes — a causal LM's equivalent of BERT's [MASK];
* ``mode="random"``: the chosen tokens are replaced by tokens drawn uniformly from the batch's own
  real, non-special tokens (keeps the unigram distribution, no out-of-place special id);
* ``mode="drop"``: the chosen tokens are removed from the attention mask. The capture then treats
  them as padding: no other token attends to them, positions are renumbered over the remaining
  tokens (capture.py derives position ids from the mask), and they give no activations — i.e. the
  tokens are deleted.

Masking is in place of the original tokens (the calibration set keeps its size); it is seeded and
deterministic: the same batches, ratio, mode and seed give the same result.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

MODES = ("replace", "random", "drop")


def mask_id_for(tokenizer) -> int:
    """The id `mode="replace"` writes: the tokenizer's unk token, else its pad token, else its eos token."""
    for attr in ("unk_token_id", "pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    raise ValueError("the tokenizer has no unk, pad or eos token to mask with; pass mask_id explicitly")


def mask_tokens(
    batches: Iterable[dict],
    ratio: float,
    seed: int = 0,
    mode: str = "replace",
    mask_id: int | None = None,
    special_ids: Sequence[int] = (),
) -> list[dict]:
    """Masked copies of `batches` (the inputs are not modified); see the module doc.

    ratio: fraction in [0, 1) of each sequence's eligible tokens to mask (0 returns equal copies).
    mask_id: the replacement id for mode "replace" (required there; see :func:`mask_id_for`).
    special_ids: token ids never masked (e.g. ``tokenizer.all_special_ids``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown masking mode {mode!r}; choose one of {', '.join(MODES)}")
    if not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"masking ratio must be in [0, 1), got {ratio!r}")
    if mode == "replace" and mask_id is None:
        raise ValueError("mode 'replace' needs mask_id (e.g. masking.mask_id_for(tokenizer))")
    gen = torch.Generator().manual_seed(int(seed))
    special = torch.tensor(sorted({int(s) for s in special_ids}), dtype=torch.long)
    out = []
    for b in batches:
        ids = b["input_ids"].clone()
        mask = b["attention_mask"].clone()
        if ids.shape != mask.shape or ids.dim() != 2:
            raise ValueError(f"expected input_ids and attention_mask of the same shape [B, T], got {tuple(ids.shape)} and {tuple(mask.shape)}")
        eligible = mask.bool() & ~torch.isin(ids, special)
        chosen = torch.zeros_like(eligible)
        for r in range(ids.shape[0]):
            pos = torch.nonzero(eligible[r], as_tuple=False).flatten()
            k = int(round(float(ratio) * pos.numel()))
            if k:
                pick = pos[torch.randperm(pos.numel(), generator=gen)[:k]]
                chosen[r, pick] = True
        if mode == "replace":
            ids[chosen] = int(mask_id)
        elif mode == "random":
            pool = ids[eligible]
            if chosen.any():
                ids[chosen] = pool[torch.randint(pool.numel(), (int(chosen.sum()),), generator=gen)]
        else:  # drop
            mask[chosen] = 0
        out.append({**b, "input_ids": ids, "attention_mask": mask})
    return out


def masked_fraction(original: Sequence[dict], masked: Sequence[dict]) -> float:
    """Fraction of the original real tokens that were changed or dropped (a check for notebooks and tests)."""
    changed = total = 0
    for a, b in zip(original, masked):
        real = a["attention_mask"].bool()
        diff = (a["input_ids"] != b["input_ids"]) | (a["attention_mask"] != b["attention_mask"])
        changed += int((diff & real).sum())
        total += int(real.sum())
    return changed / total if total else 0.0
