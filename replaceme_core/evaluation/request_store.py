"""Each request scored once per model: answers kept per model identity, looked up the way lm-eval's cache does.

lm-eval's own request cache (`simple_evaluate(use_cache=PATH)`, its `CachingLM`) looks every request up by
`hash_args(kind, request arguments)`, passes only the misses to the model and stores what comes back. It does not fit
as it is: `simple_evaluate` wraps the model itself (a pre-wrapped `CachingLM` is refused: it is no `LM`), one SQLite
file per path is written by both `make paper` lanes at once, and a grouped scorer must write answers for models other
than the one being run. So the backend (`SharedContextHFLM.loglikelihood`) does the same lookup with the same key over a
`RequestStore`: one JSON file per model identity (weights, tokenizer, dtype, backend, maximum length, lm-eval version),
rewritten whole through a temporary file and a rename (merged with what is on disk at that moment), so never
half-written; a corrupted file reads as empty and is scored again. Two lanes writing one model's store at the same
instant can only lose entries (scored again later), never mix them.

The arguments are strings and the tokenizer is part of the store's identity, so equal keys mean equal token sequences.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from lm_eval.api.model import hash_args

from ..io.cache import atomic_write_text, cache_dir, hash_bytes, stable_json

STORE_VERSION = 1


def store_key(identity: dict, backend: str, max_length: int, lm_eval_version: str) -> str:
    return hash_bytes(stable_json({"v": STORE_VERSION, "model": identity, "backend": backend, "max_length": max_length,
                                   "lm_eval": lm_eval_version}))


class RequestStore:
    """{lm-eval request hash: answer} of one model, persisted atomically on `commit()`."""

    def __init__(self, key: str, directory: Path | None = None, fresh: bool = False):
        """`fresh`: answers stored before are not used (every request is scored again), but kept on commit."""
        self.path = (directory or cache_dir("requests")) / f"{key}.json"
        self._entries: dict[str, Any] = {}
        self._written: set[str] | None = set() if fresh else None
        self._dirty = False
        if self.path.is_file():
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self._entries = {}  # corrupted: every request is scored again

    def __contains__(self, hsh: str) -> bool:
        return hsh in self._entries and (self._written is None or hsh in self._written)

    def __getitem__(self, hsh: str):
        value = self._entries[hsh]
        return tuple(value) if isinstance(value, list) else value  # (loglikelihood, is_greedy) as lm-eval returns it

    def __setitem__(self, key, value) -> None:
        """`store[hsh] = answer` (lm-eval's CachingLM) or `store[kind, request args] = answer`."""
        if isinstance(key, tuple):
            key = hash_args(*key)
        self._entries[key] = list(value) if isinstance(value, tuple) else value
        if self._written is not None:
            self._written.add(key)
        self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def answer(self, kind: str, requests: Sequence, compute: Callable[[list], list]) -> list:
        """lm-eval's answers to `requests` (Instances) of one kind: stored ones looked up, the rest `compute`d (in
        their order) and stored."""
        hashes = [hash_args(kind, req.args) for req in requests]
        missing = [j for j, h in enumerate(hashes) if h not in self]
        fresh = compute([requests[j] for j in missing]) if missing else []
        for j, value in zip(missing, fresh, strict=True):
            self[hashes[j]] = value
        self.commit()
        new = dict(zip(missing, fresh))
        return [new[j] if j in new else self[h] for j, h in enumerate(hashes)]

    def commit(self) -> None:
        """Write the entries, merged with what another process (a `make paper` lane) stored meanwhile."""
        if not self._dirty:
            return
        try:
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            on_disk = {}
        self._entries = {**on_disk, **self._entries}
        atomic_write_text(self.path, json.dumps(self._entries))
        self._dirty = False
