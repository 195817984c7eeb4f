"""LLM-Streamline (Chen et al., arXiv 2403.19135, ICLR 2025): replace the most redundant window of blocks by one
trained decoder layer.

Selection (training-free). To remove n blocks net, the window is n+1 contiguous blocks j … j+n; its score is

    s_j = mean over sequences of mean over real tokens of ½ + ½·cos(x_j, x_{j+n+1})

where x_j is the input of block j (the embeddings for j = 0) and x_{j+n+1} the output of block j+n, for
j = 0 … L−n−1; the window with the highest score is replaced (ties: the lowest j). The official code reads both from
HF `hidden_states`, whose last entry is taken after the final norm, so a window ending at the last block is scored
against a post-norm target there; our hooks see the true block output (`capture.run_capture`), pre-norm.

Replacement. One decoder layer, initialised from block j (the window's first block, as the official `init_layer`),
is trained to map the window's input onto its output: minimise the MSE over real tokens between
layer(x_j) and x_{j+n+1}, with AdamW, gradient clipping, a linear warm-up and a cosine decay to `min_lr`, keeping
the state with the best validation MSE on held-out calibration sequences (the untrained layer included). The
(input, target) pairs are captured once (one pass, stopped after block j+n) together with what the model itself hands
block j: its attention mask (causal, padding, sliding window) and its rotary embeddings and position ids. So the layer
is trained **with the causal mask** it runs under later. The official code calls the layer with position ids only and
no mask, which under eager attention trains a bidirectional layer that is then run causally; we do not reproduce
that (`causal=False` does, as a labelled ablation: keys masked for padding only).

Counting. The project's `num_blocks` is the net number of blocks removed, as in Streamline (`layer_intervals`): the
window is num_blocks+1 long; the trained weights are written into block j in place (same class, so the result is a
stock checkpoint) and blocks j+1 … j+num_blocks are deleted: `Replacement(Run(j+1, num_blocks), None)`. In the
project's notation the first removed block is j+1 and block j keeps its place (`start` option = j+1, as
`--start`). `steps=0` trains nothing: the cosine-selected window minus its first block is dropped, the
"LLM-Streamline (None)" row of LinearPatch's tables.

Defaults. Optimiser settings are the official `args.py` / `train_lightweightnetwork.py` values (lr 2e-4, min_lr 5e-5,
weight decay 1e-3, batch 8 sequences, clip 5, warm-up 1% of the schedule, 1 epoch). Ours, labelled in the record:
gradient accumulation 1 (official 16: an effective batch of 128 sequences is more than a CPU calibration set holds),
a budget of `steps`=200 optimiser steps (None: `epochs` passes over the data, the paper's rule), validation on 10%
of the calibration sequences (official: ≈3k held-out documents), and one calibration set for both selection and
training (official: 50 chunks for selection, ≈100k SlimPajama documents for training). The official schedule is
sized in micro-batches but stepped per optimiser step, so it only covers the first eighth of its cosine; ours spans the
whole budget.

Families: llama, mistral, qwen2, qwen3 (their decoder layers take the same call); attention eager or sdpa.
Memory: the captured pairs and masks stay in memory (device of block j): 2·tokens·d values, plus the B·T² mask of each
padded batch.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import UnsupportedModelError, get_adapter
from ..capture import Activations, run_capture
from ..merge import Replacement
from ..select import Run
from .base import Outcome, register

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = ("eager", "sdpa")

DEFAULTS: dict[str, Any] = {
    "lr": 2e-4,  # official args.py
    "min_lr": 5e-5,  # official args.py: cosine decay floor
    "weight_decay": 1e-3,  # official args.py
    "batch_size": 8,  # official args.py: sequences per micro-batch
    "grad_accum": 1,  # ours (official 16)
    "epochs": 1,  # official; used only when steps is None
    "steps": 200,  # ours: CPU budget of optimiser steps (None: `epochs` passes)
    "clip": 5.0,  # official max grad norm
    "warmup": 0.01,  # official: warm-up over 1% of the schedule
    "val_fraction": 0.1,  # ours: held-out calibration sequences for best-state selection
    "seed": 0,
    "start": None,  # first removed block (block start−1 receives the trained layer); None: cosine selection
    "causal": True,  # False: the official code's unmasked (bidirectional) training, as an ablation
}


def check_model(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"streamline trains a Llama-like decoder layer: model type {model_type!r} is not supported "
            f"(supported: {', '.join(FAMILIES)})")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION:
        raise UnsupportedModelError(
            f"streamline trains with the masks eager or sdpa attention takes; this model uses {impl!r}: "
            "load it with attn_implementation='sdpa'")


def check_options(opts: Mapping[str, Any]) -> None:
    for key in ("batch_size", "grad_accum", "epochs"):
        if int(opts[key]) <= 0:
            raise ValueError(f"streamline option {key} must be positive, got {opts[key]}")
    if opts["steps"] is not None and int(opts["steps"]) < 0:
        raise ValueError(f"streamline option steps must be ≥ 0 (or None for `epochs` passes), got {opts['steps']}")
    if not 0 <= float(opts["val_fraction"]) < 1:
        raise ValueError(f"streamline option val_fraction must be in [0, 1), got {opts['val_fraction']}")
    if float(opts["lr"]) <= 0:
        raise ValueError(f"streamline option lr must be positive, got {opts['lr']}")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


# --- selection ------------------------------------------------------------------------------------------------

def window_scores(model: nn.Module, batches: Sequence[dict], num_blocks: int, progress: bool = False
                  ) -> tuple[dict[int, float], int]:
    """{j: s_j} for every window j … j+num_blocks (see the module doc), and the real tokens seen. One pass."""
    adapter = get_adapter(model)
    L, n = adapter.num_layers, num_blocks
    if not 1 <= n <= L - 1:
        raise ValueError(f"cannot remove {n} blocks net from a {L}-block model with streamline: give 1..{L - 1}")
    starts = list(range(0, L - n))
    sums = torch.zeros(len(starts), dtype=torch.float64)
    count = [0]
    embedded: list[torch.Tensor] = []

    def grab_input(_module, args, kwargs):
        embedded.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def consume(acts: Activations) -> None:
        x0 = embedded.pop()
        mask = acts.mask.to(x0.device)
        keep = mask.any(dim=1)  # sequences with at least one real token
        m = mask[keep].to(torch.float64)
        # unit vectors of x_0 (embeddings) and of every block output, once: x_j = output of block j−1 for j ≥ 1
        units = [unit(x0[keep])] + [unit(acts.block_out[i].to(x0.device)[keep]) for i in range(L)]
        for k, j in enumerate(starts):
            cos = (units[j] * units[j + n + 1]).sum(-1)
            per_seq = ((0.5 + 0.5 * cos) * m).sum(1) / m.sum(1)
            sums[k] += per_seq.sum().cpu()
        count[0] += int(keep.sum())

    handle = adapter.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)
    try:
        tokens = run_capture(model, adapter, batches, consume, block_outputs=range(L), progress=progress,
                             desc="streamline selection", total=len(batches) if hasattr(batches, "__len__") else None)
    finally:
        handle.remove()
    return {j: float(sums[k] / count[0]) for k, j in enumerate(starts)}, tokens


def best_window(scores: Mapping[int, float]) -> int:
    """argmax_j s_j; ties go to the lowest j."""
    return min(scores, key=lambda j: (-scores[j], j))


# --- training data ---------------------------------------------------------------------------------------------

@dataclass
class WindowBatch:
    """One calibration batch as block j saw it: its input x, the window's output y, and the call's context."""

    x: torch.Tensor  # [B, T, d] input of block j
    y: torch.Tensor  # [B, T, d] output of block j+n
    real: torch.Tensor  # [B, T] bool, real (non-pad) tokens
    attention_mask: torch.Tensor | None  # what the model passed block j (None: sdpa's is_causal)
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def capture_window(model: nn.Module, batches: Sequence[dict], start: int, num_blocks: int, dtype: torch.dtype,
                   progress: bool = False) -> tuple[list[WindowBatch], int]:
    """One pass (stopped after block start+num_blocks): the (input, target) pairs of the window and what the model
    hands its first block — attention mask, position ids, rotary (cos, sin) — kept in `dtype`."""
    adapter = get_adapter(model)
    last = start + num_blocks
    pending: list[dict] = []

    def grab(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_embeddings")
        pending.append({
            "x": x.detach().to(dtype, copy=True),
            "attention_mask": None if mask is None else mask.detach().clone(),
            "position_ids": None if kwargs.get("position_ids") is None else kwargs["position_ids"].detach().clone(),
            "position_embeddings": None if pos is None else tuple(p.detach().to(dtype, copy=True) for p in pos),
        })

    out: list[WindowBatch] = []

    def consume(acts: Activations) -> None:
        ctx = pending.pop()
        y = acts.block_out[last].to(ctx["x"].device, dtype)
        out.append(WindowBatch(y=y, real=acts.mask.to(y.device), **ctx))

    handle = adapter.layers[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tokens = run_capture(model, adapter, batches, consume, block_outputs=[last], progress=progress,
                             desc="streamline capture", total=len(batches) if hasattr(batches, "__len__") else None)
    finally:
        handle.remove()
    return out, tokens


def _rows(t, idx: torch.Tensor, B: int):
    """Rows `idx` of a per-batch tensor; a tensor broadcast over the batch (first dim 1) is returned whole."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_rows(u, idx, B) for u in t)
    return t[idx.to(t.device)] if t.shape[0] == B and B != 1 else t


def layer_forward(layer: nn.Module, wb: WindowBatch, idx: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The layer on rows `idx` of a captured batch, called the way the model calls its decoder layers.

    causal=False replaces the model's mask by a padding-only mask (every real key visible to every query)."""
    B = wb.rows
    x = wb.x[idx.to(wb.x.device)]
    if causal:
        mask = _rows(wb.attention_mask, idx, B)
    else:
        real = wb.real[idx.to(wb.real.device)]
        mask = torch.zeros(real.shape[0], 1, real.shape[1], real.shape[1], dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~real[:, None, None, :].to(x.device), torch.finfo(x.dtype).min)
    out = layer(x, attention_mask=mask, position_ids=_rows(wb.position_ids, idx, B),
                position_embeddings=_rows(wb.position_embeddings, idx, B), use_cache=False)
    return _first(out)


def _sq_error(layer, wb: WindowBatch, idx: torch.Tensor, causal: bool) -> tuple[torch.Tensor, int]:
    """Sum of squared errors over real tokens of rows `idx`, and the number of values summed."""
    pred = layer_forward(layer, wb, idx, causal)
    real = wb.real[idx.to(wb.real.device)].to(pred.device)
    err = ((pred - wb.y[idx.to(wb.y.device)].to(pred.device)) ** 2).sum(-1)
    return (err * real).sum(), int(real.sum()) * pred.shape[-1]


def _mse(layer, data: list[WindowBatch], chunks: list[tuple[int, torch.Tensor]], causal: bool) -> float | None:
    if not chunks:
        return None
    total, count = 0.0, 0
    with torch.no_grad():
        for b, idx in chunks:
            s, c = _sq_error(layer, data[b], idx, causal)
            total, count = total + float(s), count + c
    return total / max(count, 1)


def split_sequences(data: list[WindowBatch], val_fraction: float, gen: torch.Generator
                    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per batch, the rows trained on and the rows held out (a seeded draw of round(val_fraction·N) sequences,
    at least one left to train on; none held out below two sequences)."""
    seqs = [(b, r) for b, wb in enumerate(data) for r in range(wb.rows) if bool(wb.real[r].any())]
    n_val = min(int(round(val_fraction * len(seqs))), len(seqs) - 1) if len(seqs) >= 2 else 0
    order = torch.randperm(len(seqs), generator=gen).tolist()
    val = {seqs[i] for i in order[:n_val]}
    usable = set(seqs)
    train_rows, val_rows = {}, {}
    for b, wb in enumerate(data):
        t = [r for r in range(wb.rows) if (b, r) in usable and (b, r) not in val]
        v = [r for r in range(wb.rows) if (b, r) in val]
        if t:
            train_rows[b] = torch.tensor(t)
        if v:
            val_rows[b] = torch.tensor(v)
    return train_rows, val_rows


def _epoch_chunks(train_rows: dict[int, torch.Tensor], batch_size: int, gen: torch.Generator
                  ) -> list[tuple[int, torch.Tensor]]:
    """One epoch of micro-batches: each batch's training rows shuffled and cut into ≤ batch_size rows (a micro-batch
    never mixes calibration batches, so the captured masks apply), the chunks in a shuffled order."""
    chunks = []
    for b, rows in train_rows.items():
        rows = rows[torch.randperm(len(rows), generator=gen)]
        chunks += [(b, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]


def lr_factor(step: int, total: int, warmup: float, lr: float, min_lr: float) -> float:
    """The official schedule: linear warm-up over `warmup`·total steps, then cosine from lr down to min_lr."""
    w = warmup * total
    if step < w:
        return step / max(1.0, w)
    progress = (step - w) / max(1.0, total - w)
    cos = max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
    return (min_lr + cos * (lr - min_lr)) / lr


def train_layer(layer: nn.Module, data: list[WindowBatch], opts: Mapping[str, Any], progress: bool = False) -> dict:
    """Train `layer` in place on the captured pairs; load the best validation state; return what happened."""
    check_options(opts)
    causal, batch_size, accum = bool(opts["causal"]), int(opts["batch_size"]), int(opts["grad_accum"])
    gen = torch.Generator().manual_seed(int(opts["seed"]))
    train_rows, val_rows = split_sequences(data, float(opts["val_fraction"]), gen)
    if not train_rows:
        raise ValueError("streamline has no calibration sequence to train on: give non-empty texts")
    val_chunks = [(b, rows[i:i + batch_size]) for b, rows in val_rows.items() for i in range(0, len(rows), batch_size)]
    all_train = [(b, rows[i:i + batch_size]) for b, rows in train_rows.items() for i in range(0, len(rows), batch_size)]
    micro_per_epoch = len(all_train)
    steps = int(opts["steps"]) if opts["steps"] is not None else int(opts["epochs"]) * math.ceil(micro_per_epoch / accum)

    layer.train()
    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, float(opts["warmup"]), float(opts["lr"]), float(opts["min_lr"])))

    train_before = _mse(layer, data, all_train, causal)
    best_val = val_before = _mse(layer, data, val_chunks, causal)
    best_state = copy.deepcopy(layer.state_dict()) if best_val is not None else None
    best_at, val_curve, losses = 0, [], []
    stream: list[tuple[int, torch.Tensor]] = []
    micro = 0
    t0 = time.perf_counter()

    def validate(at_step: int) -> None:
        nonlocal best_val, best_state, best_at
        v = _mse(layer, data, val_chunks, causal)
        if v is None:
            return
        val_curve.append([at_step, v])
        if v < best_val:
            best_val, best_state, best_at = v, copy.deepcopy(layer.state_dict()), at_step

    for step in tqdm(range(steps), desc="streamline training", disable=not progress, unit="step"):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(accum):
            if not stream:
                if micro:  # an epoch ended: validate, as the official code does after each epoch
                    validate(step)
                stream = _epoch_chunks(train_rows, batch_size, gen)
            b, idx = stream.pop(0)
            s, c = _sq_error(layer, data[b], idx, causal)
            loss = s / max(c, 1)
            (loss / accum).backward()
            step_loss += loss.item() / accum
            micro += 1
        torch.nn.utils.clip_grad_norm_(params, max_norm=float(opts["clip"]))
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
    if steps:
        validate(steps)
    seconds = time.perf_counter() - t0
    if best_state is not None:
        layer.load_state_dict(best_state)
    layer.eval()
    for p in params:
        p.requires_grad_(False)
    train_tokens = sum(int(data[b].real[rows].sum()) for b, rows in train_rows.items())
    return {
        "optimizer_steps": steps,
        "micro_batches": micro,
        "epochs_seen": micro / micro_per_epoch,
        "batch_size": batch_size,
        "grad_accum": accum,
        "train_sequences": sum(len(r) for r in train_rows.values()),
        "val_sequences": sum(len(r) for r in val_rows.values()),
        "train_tokens": train_tokens,
        "train_seconds": seconds,
        "train_mse_before": train_before,
        "train_mse_after": _mse(layer, data, all_train, causal),
        "held_out": [[b, int(r)] for b, rows in val_rows.items() for r in rows],  # [calibration batch, row]
        "val_mse_before": val_before,
        "val_mse_best": best_val,
        "val_curve": val_curve,
        "best_state": ("untrained (block's own weights)" if best_at == 0 else f"after step {best_at}")
        if best_state is not None else "last (no held-out sequences)",
        "train_loss_curve": losses,
    }


# --- the method ------------------------------------------------------------------------------------------------

@register(
    "streamline",
    summary="LLM-Streamline: the n+1-block window with the most similar input and output (cosine) is replaced by one "
            "decoder layer initialised from its first block and trained (MSE, causal mask) to map input to output",
    paper="arXiv 2403.19135",
    defaults=DEFAULTS,
    needs=("calibration", "block_inputs", "training"),
    standard_checkpoint=True,
)
def streamline(model: nn.Module, batches: Sequence[dict], num_blocks: int, options: Mapping[str, Any],
               progress: bool = True) -> Outcome:
    opts = {**DEFAULTS, **dict(options)}
    check_model(model)
    check_options(opts)
    adapter = get_adapter(model)
    L, n = adapter.num_layers, int(num_blocks)
    if not 1 <= n <= L - 1:
        raise ValueError(f"cannot remove {n} blocks net from a {L}-block model with streamline: give 1..{L - 1}")
    batches = list(batches)
    if not batches:
        raise ValueError("streamline needs calibration data: give --calib")
    t0 = time.perf_counter()
    scores, sel_tokens = None, 0
    if opts["start"] is None:
        scores, sel_tokens = window_scores(model, batches, n, progress)
        j = best_window(scores)
    else:
        first_removed = int(opts["start"])
        if not 1 <= first_removed <= L - n:
            raise ValueError(f"streamline start {first_removed} is out of range for removing {n} of {L} blocks: "
                             f"give 1..{L - n} (block start−1 receives the trained layer)")
        j = first_removed - 1
    t_sel = time.perf_counter() - t0

    block = adapter.layers[j]
    model_dtype = next(block.parameters()).dtype
    dtype = torch.promote_types(model_dtype, torch.float32)
    steps = opts["steps"]
    train_record: dict = {"optimizer_steps": 0}
    t_cap = 0.0
    if steps is None or int(steps) > 0:
        t1 = time.perf_counter()
        data, tokens = capture_window(model, batches, j, n, dtype, progress)
        t_cap = time.perf_counter() - t1
        layer = copy.deepcopy(block).to(dtype)
        train_record = train_layer(layer, data, opts, progress)
        train_record["capture_tokens"] = tokens
        del data
        with torch.no_grad():
            for name, p in block.state_dict().items():
                p.copy_(layer.state_dict()[name].to(p.dtype))
    else:
        train_record.update({"train_seconds": 0.0, "best_state": "untrained (steps=0: plain deletion)"})

    budget = train_record["optimizer_steps"]
    record = {
        "label": f"LLM-Streamline (MSE, {budget} steps)" if budget else "LLM-Streamline (None)",
        "window": [j, j + n],
        "replacement_layer": j,
        "replacement_init": f"block {j}",
        "removed_blocks": list(range(j + 1, j + n + 1)),
        "net_removed": n,
        "selection": "given start" if scores is None else "max mean ½+½cos(input of block j, output of block j+n)",
        "scores": None if scores is None else {str(k): v for k, v in scores.items()},
        "selection_tokens": sel_tokens,
        "causal_mask": bool(opts["causal"]),
        "attention": getattr(model.config, "_attn_implementation", None),
        "train_dtype": str(dtype).replace("torch.", ""),
        "training": train_record,
        "passes": (0 if scores is None else 1) + (1 if budget else 0),
        "seconds": {"selection": t_sel, "capture": t_cap, "training": train_record.get("train_seconds", 0.0)},
    }
    return Outcome(replacements=[Replacement(Run(j + 1, n), None)], record=record)
