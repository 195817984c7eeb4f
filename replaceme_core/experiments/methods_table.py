"""Helpers of notebook 13 (the other depth-pruning methods beside ReplaceMe, measured on one harness).

* `heldout_kl`: held-out perplexity *and* the KL divergence KL(p_unpruned ‖ p_pruned) of the next-token
  distributions, per predicted token, on the profile's held-out texts — one forward per model, the unpruned model's
  distribution computed once per batch. Per text: summed NLL, summed KL and predicted tokens, so two models pair over
  the same texts (`kl_difference`, `report.heldout_log_ratio`). Cached by content (both models, texts, max length).
* `cached_method`: a registry method (`methods.apply.run_method`) or any function that prunes a model in place, run
  on a copy of the Workbench's model and cached by content — the Workbench's weights hash, the method and its
  resolved options, the calibration batches' hash and the number of blocks. The cache holds what the pruned model
  differs by: the blocks removed, the separate layers (LinearPatch) and the kept weights the method edited (Prune&Comp's
  scales, LaCo's merges, Streamline's trained layer, folded T's), so a warm re-run rebuilds the same model bit for bit
  without running SLEB again. With it: the method's cost when it ran (calibration tokens, passes, wall and CPU seconds,
  peak memory).
* `prune_comp_at`: Prune&Comp's magnitude compensation on given blocks (the registry method picks its own), from the
  method's own functions (`prune_comp.fuse_scales`, `_compensation.capture_block_io`).
* the paper's `*` numbers: Table 1 and the repository README's table (Llama 2 7B, 25%), transcribed from the paper digest.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..io.cache import atomic_torch_save, atomic_write_text, cache_dir, hash_bytes, stable_json

KL_CACHE_VERSION = 1
METHOD_CACHE_VERSION = 1


# --- held-out perplexity and KL to the unpruned model ----------------------------------------------------------

def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) ‖ softmax(logits)) per row (nats), rows × vocab in, rows out; computed in float64."""
    lp_ref = torch.log_softmax(ref_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(dim=-1)


def _kl_key(ref_id, model_id, texts: list[str], max_length: int) -> str:
    return hash_bytes(stable_json({"v": KL_CACHE_VERSION, "kind": "heldout-kl", "model": model_id, "reference": ref_id,
                                   "max_length": max_length, "texts": hash_bytes(stable_json(texts))}))


def heldout_kl(models: Mapping[str, nn.Module], reference: nn.Module, tokenizer, texts: Sequence[str],
               max_length: int = 256, batch_size: int = 8, use_cache: bool = True, chunk_rows: int = 512,
               progress: bool = False) -> dict[str, dict]:
    """{name: result} for every model: the `evaluation.perplexity` fields ("ppl", "nll", "tokens", "texts",
    "doc_nll", "doc_tokens": the same tokenisation, truncation and padding) plus "doc_kl" (per text, the summed KL over
    its predicted positions) and "kl" (token-weighted mean KL per predicted token). The KL is the reference's
    next-token distribution against the model's at every position whose next token is real (the positions the NLL
    counts). All models must share the reference's tokenizer and vocabulary."""
    from tqdm.auto import tqdm

    from ..evaluation.model_ref import _ModelRef
    from ..evaluation.perplexity import _add_nll, _padded, text_batches

    texts = list(texts)
    ref_id = _ModelRef(reference, tokenizer, None).identity()
    ids_of = {name: _ModelRef(m, tokenizer, None).identity() for name, m in models.items()}
    paths = {name: cache_dir("eval") / f"kl-{_kl_key(ref_id, ids_of[name], texts, max_length)}.json" for name in models}
    out: dict[str, dict] = {}
    for name, path in paths.items():
        if use_cache and path.is_file():
            try:
                out[name] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                pass
    pending = [name for name in models if name not in out]
    if not pending:
        return {name: out[name] for name in models}
    encoded, batches, pad_id = text_batches(texts, tokenizer, max_length, batch_size)
    sums = {name: ([0.0] * len(texts), [0] * len(texts), [0.0] * len(texts)) for name in pending}
    nets = {name: models[name] for name in pending}
    training = {name: m.training for name, m in nets.items()}
    was_ref_training = reference.training
    reference.eval()
    for m in nets.values():
        m.eval()
    dev = next(reference.parameters()).device
    try:
        with torch.inference_mode():
            for idx in tqdm(batches, desc=f"held-out ppl + KL ({len(pending)} models)", disable=not progress):
                ids, mask = _padded([encoded[i] for i in idx], pad_id, dev)
                valid = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
                ref_rows = reference(input_ids=ids, attention_mask=mask).logits[:, :-1][valid].float()
                owner = torch.arange(len(idx), device=dev)[:, None].expand_as(valid)[valid]
                for name in pending:
                    net = nets[name]
                    logits = net(input_ids=ids.to(next(net.parameters()).device),
                                 attention_mask=mask.to(next(net.parameters()).device)).logits.float()
                    doc_nll, doc_tok, doc_kl = sums[name]
                    _add_nll(logits, ids.to(logits.device), mask.to(logits.device), idx, doc_nll, doc_tok)
                    rows = logits[:, :-1][valid.to(logits.device)]
                    kl = torch.cat([token_kl(ref_rows[lo:lo + chunk_rows].to(rows.device), rows[lo:lo + chunk_rows])
                                    for lo in range(0, rows.shape[0], chunk_rows)])
                    per_doc = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, owner.cpu(), kl.cpu())
                    for r, i in enumerate(idx):
                        doc_kl[i] = float(per_doc[r])
    finally:
        reference.train(was_ref_training)
        for name, m in nets.items():
            m.train(training[name])
    for name in pending:
        doc_nll, doc_tok, doc_kl = sums[name]
        total_tok = sum(doc_tok)
        mean = math.fsum(doc_nll) / total_tok
        out[name] = {"ppl": math.exp(mean), "nll": mean, "tokens": total_tok, "texts": len(texts), "doc_nll": doc_nll,
                     "doc_tokens": doc_tok, "doc_kl": doc_kl, "kl": math.fsum(doc_kl) / total_tok}
        atomic_write_text(paths[name], json.dumps(out[name]))
    return {name: out[name] for name in models}


def _paired_texts(a: dict, b: dict | None = None):
    tok = np.asarray(a["doc_tokens"], dtype=float)
    if b is not None and not np.array_equal(tok, np.asarray(b["doc_tokens"], dtype=float)):
        raise ValueError("held-out results of different texts (or tokenisations) cannot be paired")
    return tok


def kl_interval(a: dict, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean KL per predicted token of one model, with a 95% bootstrap interval resampling whole texts."""
    tok = _paired_texts(a)
    kl = np.asarray(a["doc_kl"], dtype=float)
    idx = np.random.default_rng(seed).integers(0, kl.size, size=(n_boot, kl.size))
    boots = kl[idx].sum(axis=1) / np.maximum(tok[idx].sum(axis=1), 1)
    return float(kl.sum() / tok.sum()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def kl_difference(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean KL per token of a − that of b (same texts), token-weighted, 95% paired bootstrap over whole texts."""
    tok = _paired_texts(a, b)
    d = np.asarray(a["doc_kl"], dtype=float) - np.asarray(b["doc_kl"], dtype=float)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].sum(axis=1) / np.maximum(tok[idx].sum(axis=1), 1)
    return float(d.sum() / tok.sum()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def ppl_interval(a: dict, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Held-out perplexity with a 95% bootstrap interval resampling whole texts (token-weighted)."""
    tok = _paired_texts(a)
    nll = np.asarray(a["doc_nll"], dtype=float)
    idx = np.random.default_rng(seed).integers(0, nll.size, size=(n_boot, nll.size))
    boots = nll[idx].sum(axis=1) / np.maximum(tok[idx].sum(axis=1), 1)
    return (math.exp(nll.sum() / tok.sum()), math.exp(float(np.percentile(boots, 2.5))),
            math.exp(float(np.percentile(boots, 97.5))))


# --- cost of a call: wall, CPU, peak memory ----------------------------------------------------------------------

def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`), so that RSS at a block's start counts live
    memory only. Without it a method that reuses pages an earlier method freed shows almost no growth (a cold run
    measured LaCo's code at 0.008 MB and LinearPatch at 0.7 MB after other methods had run in the same process).
    A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block of code above its start: resident set size sampled every `interval` s on the host
    (every allocator: torch, numpy, Python), after the heap's free pages went back to the OS, and on CUDA torch's own
    peak of allocated bytes."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_host = 0
        self.peak_device = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_host = max(self.peak_host, _rss_bytes() - self.start_host)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _return_free_heap()
        self.start_host = _rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_device = torch.cuda.memory_allocated(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_host = max(self.peak_host, _rss_bytes() - self.start_host, 0)
        if self.device.type == "cuda":
            self.peak_device = torch.cuda.max_memory_allocated(self.device) - self.start_device


# --- registry methods, cached by content ----------------------------------------------------------------------------

def batches_hash(batches: Sequence[dict]) -> str:
    """The calibration batches' content hash (the Workbench's own, so both caches key batches alike)."""
    from .workbench import _batches_hash

    return _batches_hash(batches)


def calibration_tokens(batches: Sequence[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)


def method_key(weights_hash: str, method: str, options: Mapping, batches: Sequence[dict], num_blocks: int) -> str:
    """The content key of one method result: model weights, method, resolved options, calibration batches, blocks."""
    return hash_bytes(stable_json({"v": METHOD_CACHE_VERSION, "weights": weights_hash, "method": method,
                                   "options": dict(options), "batches": batches_hash(batches),
                                   "num_blocks": int(num_blocks)}))[:24]


@dataclass
class MethodResult:
    """A pruned copy of the Workbench's model, what made it, and what it cost when it was computed."""

    name: str
    model: nn.Module
    record: dict
    cost: dict
    removed: list[int] = field(default_factory=list)
    cached: bool = False


def _kept_map(num_layers: int, removed: Sequence[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(num_layers) if i not in gone]


def _layer_prefix(model: nn.Module) -> str:
    from ..arch import get_adapter

    return get_adapter(model).layers_path + "."


def edited_weights(original: nn.Module, pruned: nn.Module, removed: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every tensor of `pruned` that differs from `original`, named as in `original` (block indices of the original
    model); the separate layers a method attached are left out (they are stored as their maps)."""
    prefix = _layer_prefix(original)
    kept = _kept_map(len(_layers(original)), removed)
    ref = original.state_dict()
    out = {}
    for name, t in pruned.state_dict().items():
        if ".separate_transform." in name:
            continue
        orig = name
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix):].partition(".")
            orig = f"{prefix}{kept[int(idx)]}.{rest}"
        base = ref.get(orig)
        if base is None or base.shape != t.shape or base.dtype != t.dtype or not torch.equal(base, t):
            out[orig] = t.detach().cpu()  # tied tensors keep sharing storage: saved once
    return out


def _layers(model: nn.Module) -> nn.ModuleList:
    from ..arch import get_adapter

    return get_adapter(model).layers


def rebuild(original: nn.Module, removed: Sequence[int], edited: Mapping[str, torch.Tensor],
            separate: Sequence[tuple[int, int, torch.Tensor]] = ()) -> nn.Module:
    """A copy of `original` with the `edited` tensors written in, then the separate layers attached and the `removed`
    blocks deleted: the model the method produced."""
    from ..arch import get_adapter
    from ..merge import Replacement
    from ..select import Run
    from ..separate import apply_separate

    model = copy.deepcopy(original)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in edited.items():
            if name not in state:
                raise KeyError(f"cached method result edits {name!r}, which the model does not have")
            state[name].copy_(t.to(state[name].device))
    if separate:
        apply_separate(model, [Replacement(Run(s, n), T) for s, n, T in separate])
        # apply_separate deleted the runs of its maps; any other removed blocks go now (original indices shift)
        rest = sorted(set(removed) - {b for s, n, _ in separate for b in range(s, s + n)})
        if rest:
            raise ValueError("a separate-layer result removes exactly its runs' blocks")
    else:
        get_adapter(model).delete_blocks(list(removed))
    return model


def cached_method(wb, name: str, num_blocks: int, *, batches: Sequence[dict] | None = None,
                  options: Mapping | None = None, label: str | None = None, data_label: str = "",
                  fn: Callable | None = None, fn_options: Mapping | None = None, use_cache: bool = True) -> MethodResult:
    """Run method `name` (registry; or `fn(model, batches, num_blocks, **fn_options)` returning a PruneResult) on a copy
    of `wb.model` with `batches` (default: the Workbench's pool), or rebuild its result from the cache.

    `cost` (measured when the result was computed; a cached result returns the cold run's numbers): calibration
    tokens, passes (the method's record, where it says), wall and CPU seconds, peak host memory above the start
    (sampled RSS; on CUDA also torch's peak allocated bytes)."""
    from ..methods import get_method, resolve_options
    from ..methods.apply import run_method

    batches = list(wb.batches if batches is None else batches)
    if fn is None:
        opts = resolve_options(get_method(name), options)
    else:
        opts = {"function": f"{fn.__module__}.{fn.__qualname__}", **dict(fn_options or {})}
    key = method_key(wb.weights_hash, name, opts, batches, num_blocks)
    path = cache_dir("methods") / f"{name}-{key}.pt"
    label = label or f"{name} n={num_blocks}"
    if use_cache and path.is_file():
        state = torch.load(path, map_location="cpu")
        model = rebuild(wb.model, state["removed"], state["edited"], state["separate"])
        return MethodResult(label, model, json.loads(state["record"]), json.loads(state["cost"]), state["removed"], True)
    model = copy.deepcopy(wb.model)
    device = next(model.parameters()).device
    wall, cpu = time.perf_counter(), time.process_time()
    with PeakMemory(device) as mem:
        if fn is None:
            result = run_method(model, batches, name, num_blocks, options=opts,
                                calibration_info={"label": data_label}, progress=wb.progress)
        else:
            result = fn(model, batches, num_blocks, **dict(fn_options or {}))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = result.record
    removed = sorted(int(b) for b in record["removed_blocks"])
    separate = [] if record.get("standard_checkpoint", True) else [
        (r.run.start, r.run.n, r.T.detach().cpu()) for r in result.replacements if r.T is not None]
    edited = edited_weights(wb.model, model, removed)
    method_record = record.get("method_record", {})
    cost = {"calibration_tokens": calibration_tokens(batches), "sequences": sum(len(b["input_ids"]) for b in batches),
            "passes": method_record.get("passes", record.get("passes")), "wall_s": wall, "cpu_s": cpu,
            "candidate_networks": method_record.get("candidate_evaluations"),
            "peak_host_mb": mem.peak_host / 2 ** 20,
            "peak_device_mb": None if mem.peak_device is None else mem.peak_device / 2 ** 20,
            "threads": torch.get_num_threads(), "data": data_label}
    atomic_torch_save({"removed": removed, "edited": edited, "separate": separate, "record": stable_json(record),
                       "cost": stable_json(cost)}, path)
    return MethodResult(label, model, record, cost, removed, False)


# --- Prune&Comp's compensation on given blocks ---------------------------------------------------------------------

def prune_comp_at(model: nn.Module, batches: Sequence[dict], num_blocks: int, *, blocks: Sequence[int]):
    """Prune&Comp restricted to `blocks` (original indices; len == num_blocks): each round, on the current model,
    the given block of lowest Block Influence goes and the magnitude ratio α (channel mean of mean|out|/mean|in| over
    sequences) is fused before the cut, as `prune_comp` does; BI and α of the candidates come from one pass per round
    (both over the same sequences). Returns a PruneResult (the blocks deleted by `merge.apply_replacements`)."""
    from ..arch import get_adapter
    from ..merge import apply_replacements
    from ..methods._compensation import capture_block_io, channel_mean_abs
    from ..methods.common import deletion_replacements
    from ..methods.prune_comp import _check_family, _is_tied, fuse_scales
    from ..prune import PruneResult

    blocks = sorted(int(b) for b in blocks)
    if len(blocks) != num_blocks or len(set(blocks)) != len(blocks):
        raise ValueError(f"prune_comp_at: give {num_blocks} distinct blocks, got {blocks}")
    adapter = _check_family(model)
    L = adapter.num_layers
    work = copy.deepcopy(model)
    alive = list(range(L))
    embed_factor, block_factor = 1.0, {i: 1.0 for i in range(L)}
    rounds = []
    for r in range(num_blocks):
        cand = [alive.index(b) for b in blocks if b in alive]
        bi = {c: 0.0 for c in cand}
        ratio = {c: torch.zeros(adapter.hidden_size, dtype=torch.float64) for c in cand}
        rows, seqs = [0], [0]

        def consume(acts, inputs):
            for c in cand:
                x, y = inputs[c], acts.block_out[c]
                xr, yr = acts.real(x).double(), acts.real(y.to(x.device)).double()
                bi[c] += float((1 - nn.functional.cosine_similarity(xr, yr, dim=-1, eps=1e-12)).sum())
                num, den = channel_mean_abs(acts, y), channel_mean_abs(acts, x.to(y.device))
                ratio[c] += (num / den.clamp_min(1e-300)).sum(dim=0).cpu()
            rows[0] += int(acts.real(inputs[cand[0]]).shape[0])
            seqs[0] += int(channel_mean_abs(acts, inputs[cand[0]]).shape[0])

        capture_block_io(work, get_adapter(work), batches, cand, consume, progress=False, desc="Prune&Comp at given blocks")
        cut = min(cand, key=lambda c: (bi[c], c))
        alpha = float((ratio[cut] / seqs[0]).mean())
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"prune_comp_at round {r + 1}: magnitude ratio {alpha} of block {alive[cut]}")
        get_adapter(work).delete_blocks([cut])
        fuse_scales(work, alpha, {j: alpha for j in range(cut)})
        embed_factor *= alpha
        for j in range(cut):
            block_factor[alive[j]] *= alpha
        rounds.append({"round": r + 1, "removed_block": alive[cut], "alpha": alpha,
                       "block_influence": {str(alive[c]): bi[c] / rows[0] for c in cand}})
        del alive[cut]
    del work
    fuse_scales(model, embed_factor, {i: block_factor[i] for i in alive})
    replacements = deletion_replacements(blocks)
    apply_replacements(get_adapter(model), replacements)
    record = {"method": "prune-comp (given blocks)", "removed_blocks": blocks, "standard_checkpoint": True,
              "method_record": {"rounds": rounds, "embed_factor": embed_factor, "passes": num_blocks,
                                "tied_embeddings": _is_tied(model),
                                "rule": "per round: argmin BI among the given blocks, alpha fused before the cut"}}
    return PruneResult(model=model, replacements=replacements, record=record)


# --- the paper's `*` numbers (paper digest §3.1 and §3.19): Llama 2 7B, 25% (8 of 32 blocks) -----------------------

#: arXiv 2505.02819 Table 1 (accuracy %, the LLM-Streamline paper's 10 tasks; `*` rows healed, from that paper)
PAPER_TABLE1 = pd.DataFrame(
    [["Llama 2 7B (baseline)", "", 71.3, 78.1, 45.3, 100.0],
     ["LLM-Streamline*", "healed", 61.1, 71.5, 41.6, 92.0],
     ["LLMPruner*", "healed", 54.6, 72.0, 35.4, 78.2],
     ["SliceGPT*", "healed", 47.5, 68.3, 35.1, 77.5],
     ["LaCo*", "healed", 55.7, 69.8, 37.4, 82.7],
     ["UIDL*", "healed", 59.7, 69.0, 40.9, 90.3],
     ["ReplaceMe cosine", "training-free", 59.4, 71.1, 41.9, 92.5],
     ["ReplaceMe LS", "training-free", 58.5, 70.5, 40.7, 89.9]],
    columns=["paper method", "paper: training", "paper T1: hellaswag %", "paper T1: piqa %", "paper T1: avg %",
             "paper T1: RP %"])

#: the repository README's "Performance Highlights" (BoolQ, HellaSwag, PIQA, MMLU; `*` from the LLM-Streamline paper)
PAPER_README = pd.DataFrame(
    [["Llama 2 7B (baseline)", 0.708, 0.713, 0.781, 0.492, 0.674, 100.0],
     ["LLM-Streamline*", 0.675, 0.611, 0.715, 0.455, 0.614, 91.2],
     ["LLMPruner*", 0.587, 0.546, 0.720, 0.253, 0.527, 78.2],
     ["SliceGPT*", 0.599, 0.475, 0.683, 0.288, 0.511, 75.9],
     ["LaCo*", 0.641, 0.557, 0.698, 0.265, 0.540, 80.2],
     ["UIDL*", 0.673, 0.597, 0.690, 0.446, 0.602, 89.3],
     ["ReplaceMe LS", 0.715, 0.613, 0.698, 0.451, 0.619, 91.9],
     ["ReplaceMe cosine", 0.728, 0.622, 0.705, 0.453, 0.627, 93.1]],
    columns=["paper method", "paper README: boolq", "paper README: hellaswag", "paper README: piqa",
             "paper README: mmlu", "paper README: avg", "paper README: %"])

#: our method → the paper's row it corresponds to (None: the paper has no such row)
PAPER_ROW = {"baseline": "Llama 2 7B (baseline)", "streamline": "LLM-Streamline*", "laco": "LaCo*", "laco-code": "LaCo*",
             "uidl": "UIDL*", "ls": "ReplaceMe LS", "cosine": "ReplaceMe cosine"}


def paper_columns(method_keys: Sequence[str]) -> pd.DataFrame:
    """For each of our method keys, the paper's Table 1 and README numbers of its row (NaN where the paper has none);
    every such number is for Llama 2 7B at 25% (8/32 blocks), the `*` rows healed (copied from the LLM-Streamline paper)."""
    both = PAPER_TABLE1.merge(PAPER_README, on="paper method", how="outer")
    rows = []
    for key in method_keys:
        paper = PAPER_ROW.get(key)
        hit = both[both["paper method"] == paper]
        rows.append({"key": key, **(hit.iloc[0].to_dict() if len(hit) else {"paper method": None})})
    return pd.DataFrame(rows)


def delete_given(model: nn.Module, batches: Sequence[dict], num_blocks: int, *, blocks: Sequence[int], source: str):
    """Plain deletion of `blocks` (a prefix of a prefix-consistent method's order, `source` says whose): a PruneResult."""
    from ..arch import get_adapter
    from ..merge import apply_replacements
    from ..methods.common import deletion_replacements
    from ..prune import PruneResult

    blocks = sorted(int(b) for b in blocks)
    if len(blocks) != num_blocks:
        raise ValueError(f"delete_given: {len(blocks)} blocks given for {num_blocks}")
    replacements = deletion_replacements(blocks)
    apply_replacements(get_adapter(model), replacements)
    record = {"method": f"first {num_blocks} of {source}", "removed_blocks": blocks, "standard_checkpoint": True,
              "method_record": {"passes": 0, "derived_from": source}}
    return PruneResult(model=model, replacements=replacements, record=record)


def ls_on_blocks(wb, blocks: Sequence[int]):
    """ReplaceMe's LS transform on the blocks another method chose: one T per contiguous run (fitted from the
    Workbench's cached LS sums of that run, one capture pass for the runs not cached yet); a run starting at block 0
    has no kept block before it and is deleted. Returns (model, replacements)."""
    from ..arch import get_adapter
    from ..merge import Replacement, apply_replacements
    from ..select import Run, merge_touching
    from ..solve import solve_ls

    runs = merge_touching([Run(int(b), 1) for b in sorted(set(blocks))])
    fit = [r for r in runs if r.start > 0]
    st = wb.stats(fit, distances=False) if fit else None
    reps = [Replacement(r, solve_ls(st.ls[r]) if r.start > 0 else None) for r in runs]
    model = copy.deepcopy(wb.model)
    apply_replacements(get_adapter(model), reps)
    return model, reps
