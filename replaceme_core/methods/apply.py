"""run_method(): run one registered method on a model and apply what it decided, the way prune() does for ReplaceMe."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from ..arch import get_adapter
from ..merge import apply_replacements
from ..prune import PruneResult, _versions
from ..separate import apply_separate
from .base import check_outcome, data_defaults, get_method, resolve_options, timed_call
from .common import real_tokens


def run_method(model: nn.Module, batches: Sequence[dict], name: str, num_blocks: int, *,
               options: Mapping[str, Any] | None = None, calibration_info: dict | None = None,
               progress: bool = True) -> PruneResult:
    """Prune `model` in place with method `name`, removing `num_blocks` blocks; its record says what ran."""
    method = get_method(name)
    opts = resolve_options(method, options)
    adapter = get_adapter(model)
    num_layers = adapter.num_layers
    if not 0 < num_blocks <= num_layers - 1:
        raise ValueError(f"cannot remove {num_blocks} blocks from a {num_layers}-block model: give 1..{num_layers - 1}")
    if "calibration" in method.needs and not batches:
        raise ValueError(f"method {name!r} needs calibration data: give --calib")
    outcome, seconds = timed_call(method, model, batches, num_blocks, opts, progress)
    check_outcome(outcome, num_layers, num_blocks, name)
    if outcome.separate:
        apply_separate(model, outcome.separate)
    else:
        apply_replacements(adapter, outcome.replacements)
    replacements = outcome.separate or outcome.replacements
    record = {
        "method": name,
        "paper": method.paper,
        "options": opts,
        "removed_blocks": outcome.removed,
        "blocks_receiving_T": [r.run.kept for r in replacements if r.T is not None],
        "standard_checkpoint": not outcome.separate,
        "num_layers_before": num_layers,
        "num_layers_after": get_adapter(model).num_layers,
        "model_type": model.config.model_type,
        "calibration": {**dict(calibration_info or {}), "tokens": real_tokens(batches)},
        "paper_data_defaults": data_defaults(method),
        "method_record": outcome.record,
        "versions": _versions(),
        "timings": {"method_s": seconds},
        "index_convention": "0-based indices of the original model",
    }
    return PruneResult(model=model, replacements=replacements, record=record)
