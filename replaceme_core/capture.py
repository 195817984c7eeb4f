"""Forward hooks that collect block outputs and MLP outputs of chosen blocks, real tokens only.

One pass = one forward per batch with hooks on exactly the blocks a computation needs; the forward is
cut off (by an exception raised in the deepest needed hook) so no compute is spent on later blocks,
the final norm or the LM head. The hooks see the raw block output, never transformers' final-normed
`hidden_states[-1]`. Activations stay on whatever device their block lives on (accelerate's
`device_map="auto"` included); consumers move what they keep to their own device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter


class CalibrationError(ValueError):
    """The calibration data cannot produce the statistics asked for."""


class _StopForward(Exception):
    pass


@dataclass
class Activations:
    """What one batch produced. Tensors are [batch, seq, d]; `mask` marks real (non-pad) tokens."""

    mask: torch.Tensor | None  # None only until the first hook of a pixel batch sets it
    block_out: dict[int, torch.Tensor] = field(default_factory=dict)  # L_i, raw output of block i
    mlp_out: dict[int, torch.Tensor] = field(default_factory=dict)  # M_i, the MLP's additive contribution

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """[N_real, d]: the rows of real tokens, pad positions dropped."""
        return x[self.mask.to(x.device)]

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """[sequences, d]: each sequence's last real token (works for left and right padding).

        Rows without any real token (an empty text padded to the batch width) are left out.
        """
        mask = self.mask.to(x.device)
        positions = torch.arange(mask.shape[1], device=x.device).expand_as(mask)
        idx = torch.where(mask, positions, -1).max(dim=1).values
        rows = torch.arange(x.shape[0], device=x.device)[idx >= 0]
        return x[rows, idx[idx >= 0]]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _input_device(model: nn.Module) -> torch.device:
    """Where the input ids must go: the embedding's device, or, when accelerate offloaded its weight (meta
    device, loaded on the fly), the execution device of its accelerate hook."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is None:  # vision encoders: the "input embedding" is a patch-embedding module (a conv inside)
        weight = next(embeddings.parameters(), None)
    if weight is None:
        return next(model.parameters()).device
    device = weight.device
    if device.type == "meta":
        hook = getattr(embeddings, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            if getattr(h, "execution_device", None) is not None:
                return torch.device(h.execution_device)
    return device


def run_capture(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[dict],
    consume: Callable[[Activations], None],
    *,
    block_outputs: Iterable[int] = (),
    mlp_outputs: Iterable[int] = (),
    progress: bool = True,
    desc: str = "capture",
    total: int | None = None,
) -> int:
    """Run the model over `batches`, calling `consume` with each batch's activations. Returns real tokens seen."""
    block_outputs, mlp_outputs = sorted(set(block_outputs)), sorted(set(mlp_outputs))
    needed = block_outputs + mlp_outputs
    if not needed:
        raise ValueError("nothing to capture: give block_outputs and/or mlp_outputs")
    if min(needed) < 0 or max(needed) >= adapter.num_layers:
        raise ValueError(f"block indices must be in 0..{adapter.num_layers - 1}, got {needed}")
    deepest = max(needed)
    current: Activations | None = None

    # Captured tensors are cloned: some forwards modify them in place after the hook has run
    # (Falcon's parallel block does `mlp_output += attention_output`).
    def ensure_mask(x: torch.Tensor) -> None:
        # pixel inputs: every position (CLS, patches, registers) is a real token; the sequence length is
        # known only once the first hooked module has produced its [batch, seq, d] output
        if current.mask is None:
            current.mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def block_hook(i):
        def hook(_module, _inputs, output):
            ensure_mask(_first(output))
            if i in block_outputs:
                current.block_out[i] = _first(output).detach().clone()
            if i == deepest:
                raise _StopForward

        return hook

    def mlp_hook(i):
        def hook(_module, _inputs, output):
            x = _first(output).detach().clone()
            ensure_mask(x)
            # OPT's fc2 sees flattened [batch·seq, d] rows; restore [batch, seq, d] so the pad mask applies
            current.mlp_out[i] = x.reshape(*current.mask.shape, x.shape[-1])

        return hook

    handles = [adapter.layers[i].register_forward_hook(block_hook(i)) for i in sorted(set(block_outputs) | {deepest})]
    handles += [adapter.mlp_output_module(i).register_forward_hook(mlp_hook(i)) for i in mlp_outputs]
    device = _input_device(model)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, total=total, unit="batch"):
                if "pixel_values" in batch:  # vision encoder: no padding, no attention mask
                    dtype = next(model.parameters()).dtype
                    current = Activations(mask=None)
                    try:
                        model(pixel_values=batch["pixel_values"].to(device, dtype))
                    except _StopForward:
                        pass
                else:
                    input_ids = batch["input_ids"].to(device)
                    mask = batch.get("attention_mask")
                    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                    current = Activations(mask=mask.bool())
                    # Positions count real tokens only (as generate() does), so a left-padded text sees the same
                    # positions as unpadded: models with absolute position embeddings (GPT-2) depend on it.
                    position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
                    try:
                        model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
                    except _StopForward:
                        pass
                missing = [i for i in block_outputs if i not in current.block_out]
                missing += [i for i in mlp_outputs if i not in current.mlp_out]
                if missing:
                    raise RuntimeError(f"hooks on blocks {missing} did not fire; is the model's forward standard?")
                for name, store in (("block", current.block_out), ("MLP", current.mlp_out)):
                    for i, x in store.items():
                        # one reduction per row instead of a copy of the real rows: inf/nan propagate into the sum
                        row_sums = x.sum(dim=-1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
                        if not torch.isfinite(row_sums[current.mask.to(x.device)]).all():
                            raise CalibrationError(
                                f"non-finite values in the {name} output of block {i}: the model overflows in "
                                f"{x.dtype}; load it in bfloat16 or float32 instead"
                            )
                tokens += int(current.mask.sum())
                consume(current)
                current = None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise CalibrationError("the calibration data produced no tokens: give non-empty texts")
    return tokens


def collect_block_outputs(model: nn.Module, batches: Iterable[dict], blocks: Iterable[int], max_tokens: int = 4096,
                          progress: bool = False, tokens: str = "all") -> dict[int, torch.Tensor]:
    """Outputs of `blocks` (float32, CPU) — for statistics that need the activations themselves.

    `tokens="all"`: real-token rows, up to `max_tokens` (e.g. CKA, where a bounded sample is enough).
    `tokens="last"`: each sequence's last real token, one row per sequence of every batch (`max_tokens` unused) —
    the per-sequence terms of the paper's last-token distance, for resampling the calibration set."""
    from .arch import get_adapter

    if tokens not in ("all", "last"):
        raise ValueError(f"tokens must be 'all' or 'last', got {tokens!r}")
    adapter = get_adapter(model)
    blocks = sorted(set(blocks))
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    seen = 0

    def consume(acts: Activations) -> None:
        nonlocal seen
        if tokens == "last":
            for i in blocks:
                rows[i].append(acts.last(acts.block_out[i]).float().cpu())
            return
        take = max_tokens - seen
        if take <= 0:
            return
        for i in blocks:
            rows[i].append(acts.real(acts.block_out[i])[:take].float().cpu())
        seen += min(take, int(acts.mask.sum()))

    chosen = []
    for b in batches:  # all-token rows: stop reading batches once enough tokens are in
        chosen.append(b)
        if tokens == "all" and sum(int(x["attention_mask"].sum()) for x in chosen) >= max_tokens:
            break
    run_capture(model, adapter, chosen, consume, block_outputs=blocks, progress=progress, desc="collect outputs")
    return {i: torch.cat(r) for i, r in rows.items()}
