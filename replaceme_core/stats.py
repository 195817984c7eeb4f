"""Streaming statistics: memory that does not grow with the number of calibration tokens.

* `LSStats`: float64 sums MᵀM, Mᵀ R and ‖R‖² — all the least-squares family of solvers needs.
* `DistanceStats`: sums of angular / cosine / L2 distances between block outputs, for every pair.
* `ActivationStore`: a disk-backed table of rows (M, R[, Y]) for the iterative solvers, read back in
  shuffled chunks so RAM stays bounded by the chunk size, not by the calibration set.

Every accumulator can be merged with another (and all-reduced across processes), which is how
data-parallel calibration combines shards.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .io.cache import atomic_write_text


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class LSStats:
    """Σ MᵀM, Σ MᵀR, Σ‖R‖² and the token count for one (M, R) pair, in float64.

    Sums, not means: the ridge α is on the same scale as the paper's (un-normalised Gram sums).
    """

    def __init__(self, d: int, device: str | torch.device = "cpu"):
        self.d = d
        self.device = torch.device(device)
        self.MtM = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.MtR = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.RtR = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = 0

    def update(self, M: torch.Tensor, R: torch.Tensor, MtM: torch.Tensor | None = None) -> None:
        """Add a batch of real-token rows; `MtM` may be passed in when several runs share the same M."""
        M = M.to(self.device, torch.float64)
        R = R.to(self.device, torch.float64)
        self.MtM += (M.T @ M) if MtM is None else MtM.to(self.device, torch.float64)
        self.MtR += M.T @ R
        self.RtR += (R * R).sum()
        self.tokens += M.shape[0]

    def merge_(self, other: "LSStats") -> "LSStats":
        self.MtM += other.MtM.to(self.device)
        self.MtR += other.MtR.to(self.device)
        self.RtR += other.RtR.to(self.device)
        self.tokens += other.tokens
        return self

    def minus(self, other: "LSStats") -> "LSStats":
        """The sums of the tokens in `self` but not in `other` (a subset of them): e.g. all tokens minus held-out ones."""
        out = LSStats(self.d, self.device)
        out.MtM = self.MtM - other.MtM.to(self.device)
        out.MtR = self.MtR - other.MtR.to(self.device)
        out.RtR = self.RtR - other.RtR.to(self.device)
        out.tokens = self.tokens - other.tokens
        return out

    def all_reduce_(self) -> "LSStats":
        """Sum over all processes of a torch.distributed group (no-op when not distributed)."""
        for t in (self.MtM, self.MtR, self.RtR):
            _all_reduce(t)
        count = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.device)
        self.tokens = int(_all_reduce(count).item())
        return self

    def residual(self, T: torch.Tensor) -> float:
        """Σ‖M T − R‖² without the activations: ‖R‖² − 2 tr(Tᵀ MᵀR) + tr(Tᵀ MᵀM T)."""
        T = T.to(self.device, torch.float64)
        return float(self.RtR - 2 * (T * self.MtR).sum() + (T * (self.MtM @ T)).sum())

    def relative_residual(self, T: torch.Tensor) -> float:
        return self.residual(T) / max(float(self.RtR), 1e-300)


def angular_distance(cos: torch.Tensor) -> torch.Tensor:
    """arccos(cos)/π: the paper's angular distance from a cosine similarity, in [0, 1]."""
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


class DistanceStats:
    """Pairwise distances between block outputs L_a and L_b, averaged over tokens.

    Two token sets, as the paper allows: `all` real tokens, and each sequence's `last` real token (what
    the official code uses). For each pair we keep the mean angular distance arccos(cos)/π, the mean
    cosine similarity (for ShortGPT's Block Influence) and the mean L2 distance of unit-RMS-normalised
    vectors (scale-free, so layers of different norms compare).
    """

    metrics = ("angular", "cosine", "l2")

    def __init__(self, num_layers: int, device: str | torch.device = "cpu"):
        self.L = num_layers
        self.device = torch.device(device)
        z = lambda: torch.zeros(num_layers, num_layers, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums = {(tokens, m): z() for tokens in ("all", "last") for m in self.metrics}
        self.counts = {"all": 0, "last": 0}

    @torch.no_grad()
    def update(self, outputs: list[torch.Tensor], tokens: str) -> None:
        """`outputs[i]` is block i's output on the selected tokens, [N, d].

        One batched matmul gives every token's L×L cosine matrix; the L2 distance of unit-RMS vectors is a
        function of it (‖a/rms(a) − b/rms(b)‖/√d = √(2 − 2cos)), so no [L, N, d] difference is formed.
        """
        X = torch.stack([o.to(self.device, torch.float32) for o in outputs])  # [L, N, d]
        unit = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = unit.transpose(0, 1)  # [N, L, d]
        cos = torch.bmm(unit, unit.transpose(1, 2)).to(torch.float64)  # [N, L, L]
        off = ~torch.eye(self.L, dtype=torch.bool, device=cos.device)
        l2 = (2 * (1 - cos)).clamp_min(0).sqrt()
        for metric, values in (("angular", angular_distance(cos)), ("cosine", cos), ("l2", l2)):
            self.sums[(tokens, metric)] += values.sum(dim=0) * off
        self.counts[tokens] += X.shape[1]

    def merge_(self, other: "DistanceStats") -> "DistanceStats":
        for k in self.sums:
            self.sums[k] += other.sums[k].to(self.device)
        for k in self.counts:
            self.counts[k] += other.counts[k]
        return self

    def all_reduce_(self) -> "DistanceStats":
        for t in self.sums.values():
            _all_reduce(t)
        counts = torch.tensor([float(self.counts["all"]), float(self.counts["last"])], dtype=torch.float64, device=self.device)
        _all_reduce(counts)
        self.counts = {"all": int(counts[0]), "last": int(counts[1])}
        return self

    def matrix(self, metric: str = "angular", tokens: str = "last") -> torch.Tensor:
        """[L, L] mean distance (or cosine similarity) between block outputs; diagonal is 0 (cosine: 1)."""
        if (tokens, metric) not in self.sums:
            raise ValueError(f"unknown metric/tokens {metric!r}/{tokens!r}; metrics: {self.metrics}, tokens: all, last")
        if self.counts[tokens] == 0:
            raise ValueError(f"no {tokens!r}-token statistics were accumulated")
        m = self.sums[(tokens, metric)] / self.counts[tokens]
        if metric == "cosine":
            m = m + torch.eye(self.L, dtype=m.dtype, device=m.device)
        return m.cpu()

    def state_dict(self) -> dict:
        # copies: a state dict must not alias the live accumulators (merging it back would double-count)
        return {"L": self.L, "counts": dict(self.counts), "sums": {f"{t}/{m}": v.detach().cpu().clone() for (t, m), v in self.sums.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DistanceStats":
        obj = cls(state["L"])
        obj.counts = dict(state["counts"])
        for key, v in state["sums"].items():
            t, m = key.split("/")
            obj.sums[(t, m)] = v.to(torch.float64).clone()
        return obj


class ActivationStore:
    """Append-only on-disk table of float32 rows with named column blocks, each `d` wide.

    Reading back yields shuffled mini-batches: chunks are visited in a random order and rows are
    shuffled within a chunk, so at most one chunk (`chunk_rows` × width × 4 bytes) is in memory.
    """

    def __init__(self, columns: tuple[str, ...], d: int, directory: str | os.PathLike | None = None, chunk_rows: int = 32768):
        self.columns, self.d, self.chunk_rows = tuple(columns), d, chunk_rows
        self.width = d * len(self.columns)
        self._dir: Path | None = Path(tempfile.mkdtemp(prefix="replaceme-store-", dir=directory))  # None: a kept cache entry
        self.path = self._dir / "rows.f32"
        self._file = open(self.path, "wb")
        self.rows = 0

    # --- a finished store kept as a cache entry (rows.f32 + meta.json; meta.json is written last) ------------
    def persist(self, directory: str | os.PathLike) -> "ActivationStore":
        """Move the finished rows into `directory` and keep them there after `close()` (a cache entry).

        The rows are renamed into place before `meta.json` is written, so a directory without `meta.json` is an
        interrupted write that `open_persisted` ignores (and the next `persist` replaces)."""
        self.finish()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".rows.{os.getpid()}.tmp"
        shutil.move(str(self.path), tmp)
        os.replace(tmp, directory / "rows.f32")
        meta = {"columns": list(self.columns), "d": self.d, "rows": self.rows, "chunk_rows": self.chunk_rows}
        atomic_write_text(directory / "meta.json", json.dumps(meta))
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir, self.path = None, directory / "rows.f32"
        return self

    @classmethod
    def open_persisted(cls, directory: str | os.PathLike) -> "ActivationStore | None":
        """A store that `persist` wrote into `directory`, read-only; None if there is none (or it is incomplete)."""
        directory = Path(directory)
        meta_path, rows_path = directory / "meta.json", directory / "rows.f32"
        if not (meta_path.is_file() and rows_path.is_file()):
            return None
        meta = json.loads(meta_path.read_text())
        width = meta["d"] * len(meta["columns"])
        if rows_path.stat().st_size != meta["rows"] * width * 4:
            return None
        store = cls.__new__(cls)
        store.columns, store.d, store.chunk_rows = tuple(meta["columns"]), int(meta["d"]), int(meta["chunk_rows"])
        store.width, store.rows, store.path, store._dir, store._file = width, int(meta["rows"]), rows_path, None, None
        return store

    def append(self, **tensors: torch.Tensor) -> None:
        if set(tensors) != set(self.columns):
            raise ValueError(f"expected columns {self.columns}, got {sorted(tensors)}")
        block = torch.cat([tensors[c].detach().to("cpu", torch.float32) for c in self.columns], dim=1)
        self._file.write(block.contiguous().numpy().tobytes())
        self.rows += block.shape[0]

    def finish(self) -> "ActivationStore":
        if self._file is not None and not self._file.closed:
            self._file.flush()
            self._file.close()
        return self

    def batches(self, batch_rows: int, generator: torch.Generator, device="cpu") -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of shuffled mini-batches on `device` as {column: [b, d] float32 tensor}.

        Each chunk crosses to `device` once and is shuffled there: a GPU solver then pays one host-to-device copy per
        chunk, not one per mini-batch. The permutations come from the (host) `generator`, so the order of rows is the
        same on every device."""
        n_chunks = max(1, math.ceil(self.rows / self.chunk_rows))
        order = torch.randperm(n_chunks, generator=generator).tolist()
        device = torch.device(device)
        with open(self.path, "rb") as f:
            for c in order:
                start = c * self.chunk_rows
                count = min(self.chunk_rows, self.rows - start)
                f.seek(start * self.width * 4)
                chunk = torch.from_numpy(np.frombuffer(f.read(count * self.width * 4), dtype=np.float32).reshape(count, self.width).copy())
                chunk = chunk.to(device)
                perm = torch.randperm(count, generator=generator).to(device)
                for b in range(0, count, batch_rows):
                    rows = chunk[perm[b : b + batch_rows]]
                    yield {col: rows[:, j * self.d : (j + 1) * self.d] for j, col in enumerate(self.columns)}

    def all_rows(self) -> dict[str, torch.Tensor]:
        """Everything in memory (tests and small problems only)."""
        data = torch.from_numpy(np.fromfile(self.path, dtype=np.float32).reshape(self.rows, self.width))
        return {col: data[:, j * self.d : (j + 1) * self.d] for j, col in enumerate(self.columns)}

    def close(self) -> None:
        """Delete a temporary store; a persisted one (a cache entry) stays on disk."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
