"""A model given by name, path or object, and its content identity (weights, config, tokenizer) for cache keys."""
from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from ..io.cache import hash_bytes, stable_json
from ..io.models import check_hub_model
from .local_tasks import _file_hash


def _config_identity(cfg: Mapping[str, Any]) -> dict:
    # bookkeeping fields that do not change what the model computes (save_pretrained adds `architectures`)
    drop = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "name_or_path", "architectures"}
    return {k: v for k, v in cfg.items() if k not in drop and not k.startswith("_")}


# model → (fingerprint, hash): hashing 0.5 GB of weights takes ~0.7 s, and every evaluation and perplexity call asks
_STATE_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_fingerprint(model) -> tuple:
    """Cheap stand-in for the weights' content: each tensor's name, storage address, version counter (bumped by every
    in-place write: copy_, optimiser steps, `+=` under no_grad), shape, dtype and a strided sample of its values (so a
    new tensor that reuses a freed address is not mistaken for the old one), plus the config."""
    parts = []
    for name, t in model.state_dict(keep_vars=True).items():
        flat = t.detach().reshape(-1)
        probe = float(flat[:: max(1, flat.numel() // 64)].double().sum()) if flat.numel() and t.device.type != "meta" else 0.0
        parts.append((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device), probe))
    cfg = getattr(model, "config", None)
    return tuple(parts), stable_json(_config_identity(cfg.to_dict())) if cfg is not None else ""


def _remembered(table: weakref.WeakKeyDictionary, obj, fingerprint_of, digest_of) -> str:
    """digest_of(obj), reused while fingerprint_of(obj) is unchanged; objects that cannot be weakly referenced are
    digested every time."""
    try:
        fingerprint = fingerprint_of(obj)
        known = table.get(obj)
    except TypeError:
        return digest_of(obj)
    if known is not None and known[0] == fingerprint:
        return known[1]
    digest = digest_of(obj)
    table[obj] = (fingerprint, digest)
    return digest


def hash_state_dict(model) -> str:
    """sha256 over the sorted (name, digest) of every tensor in the state dict (`tensor_digests`: each digest covers
    the tensor's shape, dtype and bytes; a tied tensor is an alias marker naming its first name) + the config identity.

    Remembered per model object while its fingerprint (`_state_fingerprint`) is unchanged; the per-tensor digests it
    is made from are remembered the same way and shared with `prefix.block_hashes`, so each tensor's bytes are hashed
    once for both. A write through `.data` bypasses the version counters; nothing here writes that way, and code that
    does must call `_hash_state_dict` (which digests every tensor afresh)."""
    return _remembered(_STATE_HASHES, model, _state_fingerprint, lambda m: _hash_state_dict(m, tensor_digests(m)))


def _hash_state_dict(model, digests: "TensorDigests | None" = None) -> str:
    import hashlib

    digests = _tensor_digests(model) if digests is None else digests
    h = hashlib.sha256()
    for name in sorted(digests.digest):
        canonical = digests.alias.get(name)
        h.update(f"{name}|{'=alias:' + canonical if canonical else digests.digest[name]}|".encode())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(stable_json(_config_identity(cfg.to_dict())).encode())
    return h.hexdigest()


class TensorDigests(NamedTuple):
    """Per state-dict name: `digest` (sha256 hex of shape, dtype and bytes; the same for every name of a tied tensor)
    and, for the second and later names of a tied tensor (in sorted order), `alias` (the first name)."""

    digest: Mapping[str, str]
    alias: Mapping[str, str]


# model → (fingerprint, TensorDigests): the one place the weights' bytes are hashed, for `hash_state_dict` and
# `prefix.block_hashes` alike
_TENSOR_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tensor_digests(model) -> TensorDigests:
    """`_tensor_digests(model)`, remembered per model object while its fingerprint (`_state_fingerprint`) is unchanged."""
    return _remembered(_TENSOR_DIGESTS, model, _state_fingerprint, _tensor_digests)


def tensor_digest(t) -> str:
    """sha256 hex of a tensor's shape, dtype and bytes (a meta tensor: shape and dtype only). Deterministic across
    processes: nothing about where the tensor lives enters it."""
    import hashlib

    import torch

    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.device.type != "meta":
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).cpu().numpy()))
    return h.hexdigest()


def _tensor_digests(model) -> TensorDigests:
    """Every state-dict tensor's `tensor_digest`, each storage view digested once: names that are the same view of
    the same storage (tied weights, as `_state_fingerprint` would also show) share the first name's digest."""
    digest: dict[str, str] = {}
    alias: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        if t.device.type != "meta":
            ident = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                     t.dtype)
            if ident in seen:
                alias[name] = seen[ident]
                digest[name] = digest[seen[ident]]
                continue
            seen[ident] = name
        digest[name] = tensor_digest(t)
    return TensorDigests(MappingProxyType(digest), MappingProxyType(alias))


def hash_model_dir(path: str | Path) -> str | None:
    """Hash of a checkpoint directory's weight files (by content) and config, or None if it has none."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    cfg_file = path / "config.json"
    if not weights or not cfg_file.is_file():
        return None
    parts = [(p.name, _file_hash(p)) for p in weights]
    cfg = _config_identity(json.loads(cfg_file.read_text()))
    return hash_bytes(stable_json({"files": parts, "config": cfg}))


_TOKENIZER_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tok) -> tuple:
    backend = getattr(tok, "backend_tokenizer", None)
    special = {k: str(v) for k, v in (getattr(tok, "special_tokens_map", {}) or {}).items()}
    post = backend.post_processor if backend is not None else None  # where add_bos/add_eos take effect
    return (type(tok).__name__, len(tok), stable_json(special), str(getattr(tok, "add_bos_token", None)),
            str(getattr(tok, "add_eos_token", None)), post.__getstate__() if post is not None else None,
            backend.get_vocab_size(with_added_tokens=True) if backend is not None else None)


def hash_tokenizer(tok) -> str:
    """Content hash of a tokenizer (serialised backend, special tokens, BOS setting); remembered per object while
    its vocabulary size, special tokens, BOS/EOS settings and post-processor are unchanged (serialising the whole
    backend takes ~0.2 s)."""
    return _remembered(_TOKENIZER_HASHES, tok, _tokenizer_fingerprint, _hash_tokenizer)


def _hash_tokenizer(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # drop the transient truncation/padding state that every tokenizer call with truncation= rewrites
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        body = stable_json(spec)
    else:
        body = stable_json(sorted(tok.get_vocab().items()))
    special = {k: str(v) for k, v in (getattr(tok, "special_tokens_map", {}) or {}).items()}
    return hash_bytes(body, stable_json(special), str(getattr(tok, "add_bos_token", None)))



def default_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str):
    import torch

    return torch.float32 if device.startswith("cpu") else torch.bfloat16


class _ModelRef:
    """A model given by name/path (loaded lazily, hashed by file content) or as an in-memory object."""

    def __init__(self, model, tokenizer=None, device: str | None = None, dtype=None):
        from transformers import PreTrainedModel

        self.device = default_device(device)
        self._model = None
        self._hash: str | None = None
        self._tok = None
        self._tok_src = tokenizer
        if isinstance(model, PreTrainedModel) or hasattr(model, "state_dict"):
            self._model = model
            self.path = None
            self.name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
            self.dtype = str(next(model.parameters()).dtype)
        else:
            from .. import assets

            self.name = str(model)
            self.path = assets.resolve_model(str(model))
            check_hub_model(self.path)
            self._dtype = dtype or _default_dtype(self.device)
            self.dtype = str(self._dtype)
        if self._tok_src is None and self.path is None:
            guess = getattr(self._model, "name_or_path", None)
            if guess and Path(guess).is_dir():
                self._tok_src = guess
            else:
                raise ValueError("an in-memory model needs tokenizer= (a tokenizer object, path or name)")

    @property
    def tokenizer(self):
        if self._tok is None:
            src = self._tok_src if self._tok_src is not None else self.path
            if isinstance(src, (str, Path)):
                from transformers import AutoTokenizer

                if not Path(src).exists() and self.path is None:
                    with contextlib.suppress(Exception):
                        from .. import assets

                        src = str(assets.tokenizer_path(str(src)))
                self._tok = AutoTokenizer.from_pretrained(str(src))
            else:
                self._tok = src
        return self._tok

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            h = hash_model_dir(self.path) if self.path is not None and Path(self.path).is_dir() else None
            self._hash = h if h is not None else hash_state_dict(self.model)
        return self._hash

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self._dtype)
            self._model.eval()
        if str(next(self._model.parameters()).device) != str(self.device) and not (
            self.device == "cuda" and next(self._model.parameters()).device.type == "cuda"
        ):
            self._model.to(self.device)
        return self._model

    def identity(self) -> dict:
        return {"weights": self.weights_hash, "tokenizer": hash_tokenizer(self.tokenizer), "dtype": self.dtype}
