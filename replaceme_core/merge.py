"""Fold each T into the block before its run, delete the runs, save a standard checkpoint atomically."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Adapter, FoldError
from .io.cache import atomic_dir, stable_json
from .select import Run, merge_touching


@dataclass
class Replacement:
    """A run of removed blocks and the map folded into the block before it (None: plain deletion, UIDL)."""

    run: Run
    T: torch.Tensor | None = None


def _is_diagonal(T: torch.Tensor) -> bool:
    return bool(torch.count_nonzero(T - torch.diag(torch.diagonal(T))) == 0)


def apply_replacements(adapter: Adapter, replacements: list[Replacement]) -> None:
    """Fold every T (before any deletion, so original indices stay valid), then delete every run at once."""
    runs = [r.run for r in replacements]
    if len(merge_touching(runs)) != len(runs):
        raise ValueError(f"runs {runs} overlap or touch: each T needs its own kept block before its run")
    for rep in replacements:
        if rep.T is None:
            continue
        if adapter.can_fold_general:
            adapter.fold(rep.run.kept, rep.T)
        elif _is_diagonal(rep.T):
            adapter.fold_diagonal(rep.run.kept, torch.diagonal(rep.T))
        else:
            raise FoldError(adapter.why_not_foldable)
    adapter.delete_blocks([b for run in runs for b in run.removed])


#: Set on a model by separate.apply_separate: it carries un-fused transforms that a stock checkpoint cannot hold.
SEPARATE_MARK = "_replaceme_separate_transforms"


def has_separate_transforms(model) -> bool:
    return bool(getattr(model, SEPARATE_MARK, False))


def save_checkpoint(model, tokenizer, out_dir: str | Path, record: dict, overwrite: bool = False) -> Path:
    """Write safetensors + config + tokenizer + replaceme.json into `out_dir`, all or nothing."""
    if has_separate_transforms(model):
        raise ValueError("this model carries separate (un-fused) transforms, which a stock checkpoint cannot hold: "
                         "save a fused variant instead (prune without the separate-LT option)")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "replaceme.json").write_text(json.dumps(json.loads(stable_json(record)), indent=2) + "\n")
    return out_dir
