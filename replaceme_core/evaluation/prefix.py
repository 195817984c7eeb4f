"""Shared prefixes: models whose embedding and first k blocks are equal bit for bit compute those k blocks once.

Every variant that removes the same run of blocks (LS, cosine, UIDL, ridge values, seeds, ...) and the unpruned model
itself run exactly the same computation up to the block before the run. Scoring them one by one recomputes it for
every model on every document. Here the sameness is *checked*, never assumed: each model is summarised by a list of
content hashes (the embedding and everything that is not a block, then one hash per block, in order), and models share
k blocks only when those lists agree on their first k + 1 entries.

The mechanism is family-agnostic: `prefix_output` runs one model's own forward and stops it right after block k-1,
keeping that block's output; `replayed` temporarily puts stand-ins for blocks 0..k-1 into another model's block list,
which return that kept output, so its own forward (embedding, masks, positions: all cheap) continues at block k with
exactly the states it would have computed itself. The numbers are therefore identical to an ungrouped forward of the
same batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree

from ..arch import get_adapter
from ..io.cache import stable_json

# config keys that differ between a model and its pruned variants without changing the computation of the first blocks
_DEPTH_KEYS = {"num_hidden_layers", "n_layer", "num_layers", "layer_types", "_name_or_path", "torch_dtype", "dtype",
               "max_window_layers", "architectures", "transformers_version"}


def _tensor_hash(h, name: str, by_id: dict, t: torch.Tensor) -> None:
    """Add (name, content digest) of tensor `t` to `h`: its digest from the model's table of per-tensor digests
    (`model_ref.tensor_digests`, re-keyed by id() of the state dict's tensors, which the caller holds alive), or, for
    a tensor that is not in it, computed now. Only the digest enters `h`, never the id."""
    from .model_ref import tensor_digest

    d = by_id.get(id(t))
    h.update(f"{name}|{d if d is not None else tensor_digest(t)}|".encode())


_BLOCK_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def block_hashes(model: nn.Module) -> list[str]:
    """[hash of everything outside the blocks + the depth-independent config, hash of block 0, block 1, ...].

    The first entry covers the embedding, the final norm and the head too (by content: a tied head counts as its
    digest again): variants never differ there, and a model whose head differs is then simply not grouped (safe,
    never wrong). A block's hash covers its type, its `layer_types` entry and its tensors under their names within
    the block (`layer.state_dict()`: no block index, so a block moved to another position keeps its hash). Each
    tensor enters by its content digest, taken from the same remembered per-tensor table as the evaluation cache's
    weight hash (`model_ref.tensor_digests`), so the weights' bytes are hashed once for both. Remembered per model
    object while its fingerprint is unchanged (`model_ref`), so scoring the same variants on another suite or on the
    held-out texts does not hash them again."""
    from .model_ref import _remembered, _state_fingerprint, tensor_digests

    return list(_remembered(_BLOCK_HASHES, model, _state_fingerprint, lambda m: _block_hashes(m, tensor_digests(m))))


def _block_hashes(model: nn.Module, digests=None) -> list[str]:
    """`block_hashes` from `digests` (a `model_ref.TensorDigests` of this model; digested afresh when None)."""
    from .model_ref import _tensor_digests

    digests = _tensor_digests(model) if digests is None else digests
    state = model.state_dict(keep_vars=True)
    by_id = {id(t): digests.digest[name] for name, t in state.items() if name in digests.digest}
    adapter = get_adapter(model)
    layers = adapter.layers
    in_blocks = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    rest = hashlib.sha256()
    for name, t in sorted(state.items()):
        if id(t) not in in_blocks:
            _tensor_hash(rest, name, by_id, t)
    config = model.config.to_dict() if hasattr(model, "config") else {}
    rest.update(stable_json({k: v for k, v in config.items() if k not in _DEPTH_KEYS}).encode())
    rest.update(type(model).__name__.encode())
    types = getattr(model.config, "layer_types", None) or []
    out = [rest.hexdigest()]
    for i, layer in enumerate(layers):
        h = hashlib.sha256(f"{type(layer).__name__}|{types[i] if i < len(types) else ''}".encode())
        for name, t in sorted(layer.state_dict(keep_vars=True).items()):
            _tensor_hash(h, name, by_id, t)
        out.append(h.hexdigest())
    return out


def shared_blocks(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading blocks two `block_hashes` lists share (0 when even the embedding differs)."""
    if not a or not b or a[0] != b[0]:
        return 0
    k = 0
    for x, y in zip(a[1:], b[1:]):
        if x != y:
            break
        k += 1
    return k


def prefix_groups(hashes: Sequence[Sequence[str]], min_shared: int = 1) -> list[tuple[list[int], int]]:
    """Partition models (by their `block_hashes`) into groups [(member indices, shared blocks)], in input order.

    Greedy and explainable: the first ungrouped model takes, among the shared-prefix depths k it has with the others,
    the one that saves most block-forwards (k × the models sharing at least k blocks with it); a model that shares
    fewer than `min_shared` blocks with every other stays alone (k = 0)."""
    remaining = list(range(len(hashes)))
    groups = []
    while remaining:
        seed, others = remaining[0], remaining[1:]
        depth = {j: shared_blocks(hashes[seed], hashes[j]) for j in others}
        best_k, best_saving = 0, 0
        for k in sorted(set(depth.values()), reverse=True):
            if k < min_shared:
                continue
            saving = k * sum(1 for j in others if depth[j] >= k)
            if saving > best_saving:
                best_k, best_saving = k, saving
        members = [seed] + ([j for j in others if depth[j] >= best_k] if best_k else [])
        groups.append((members, best_k))
        remaining = [j for j in remaining if j not in members]
    return groups


class _PrefixDone(Exception):
    pass


def prefix_output(model: nn.Module, k: int, forward: Callable[[nn.Module], Any]) -> Any:
    """What block k-1 of `model` returns when `forward(model)` runs; the forward stops there (blocks k.. never run)."""
    if k <= 0:
        raise ValueError("prefix_output needs k >= 1 shared blocks")
    kept: list[Any] = []

    def hook(_module, _inputs, output):
        kept.append(output)
        raise _PrefixDone

    handle = get_adapter(model).layers[k - 1].register_forward_hook(hook)
    try:
        forward(model)
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    if not kept:
        raise RuntimeError(f"block {k - 1} never ran in the prefix forward")
    return kept[0]


@contextlib.contextmanager
def kept_outputs(model: nn.Module, k: int):
    """Inside the block, every forward of `model` runs whole and appends (a clone of) what its block k-1 returned to
    the yielded list: the prefix to replay where the forward must also complete, e.g. to fill its own KV cache."""
    if k <= 0:
        raise ValueError("kept_outputs needs k >= 1 shared blocks")
    kept: list[Any] = []

    def hook(_module, _inputs, output):
        kept.append(_pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, output))

    handle = get_adapter(model).layers[k - 1].register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


class _Replay(nn.Module):
    """Stands in for one of the shared blocks: returns the kept output of block k-1 whatever it is given. Attributes
    the model's forward reads from a block (e.g. `attention_type`) come from the block it replaces."""

    def __init__(self, original: nn.Module, output: Any):
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_output", output)

    def forward(self, *args, **kwargs):
        return self._output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


@contextlib.contextmanager
def replayed(model: nn.Module, k: int, output: Any):
    """Inside the block, `model`'s blocks 0..k-1 return `output` (the shared prefix's result) without computing."""
    layers = get_adapter(model).layers
    originals = [layers[i] for i in range(k)]
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Replay(layer, output)
        yield model
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def model_groups(models: Sequence[nn.Module], pending: Sequence[int], enabled: bool = True) -> list[tuple[list[int], int]]:
    """`prefix_groups` among `models[i]` for i in `pending` (indices into `models`); singletons where grouping cannot
    apply (disabled, one model, not all transformers models, a family without an adapter, different devices)."""
    import transformers

    alone = [([i], 0) for i in pending]
    chosen = [models[i] for i in pending]
    if not enabled or len(chosen) < 2 or not all(isinstance(m, transformers.PreTrainedModel) for m in chosen):
        return alone
    if len({str(next(m.parameters()).device) for m in chosen}) > 1:
        return alone
    try:
        hashes = [block_hashes(m) for m in chosen]
    except Exception:  # noqa: BLE001 - a family without an adapter is scored alone, never wrongly grouped
        return alone
    return [([pending[j] for j in members], k) for members, k in prefix_groups(hashes)]
