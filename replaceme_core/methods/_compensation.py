"""Helpers shared by LaCo, LinearPatch and Prune&Comp (private: not a method, `load_all` skips it).

* `hadamard(d)`: a normalised d×d Hadamard matrix (Sylvester ⊗ Paley) or, where none of those constructions exists
  for d, a block-diagonal of normalised Sylvester blocks — always orthogonal, and the record says which it was.
* `first_sequences(batches, k)`: the calibration batches cut to their first k sequences (a paper's "128 windows").
* `channel_mean_abs(acts, x)`: per sequence, the mean over its real tokens of |x| in every channel.
* `capture_block_io(...)`: one `capture.run_capture` pass that hands the consumer the *input* and the output of chosen
  blocks (the input from a forward pre-hook: block 0's input is the embeddings, which no block outputs).
* `final_norm(adapter)`: the decoder's final norm, for methods that compare post-norm states (LaCo).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..arch import Adapter, UnsupportedModelError
from ..capture import Activations, run_capture


# --- Hadamard matrices -------------------------------------------------------------------------------------------

def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, int(math.isqrt(q)) + 1))


def _sylvester(n: int) -> torch.Tensor:
    """±1 Sylvester matrix of order n (a power of two): entry (i, j) is (−1)^popcount(i & j)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) over GF(q), q an odd prime; χ the quadratic character (0 at 0, ±1 for (non-)squares)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley_1(q: int) -> torch.Tensor:
    """Paley I, order q+1 for a prime q ≡ 3 (mod 4): I + [[0, 1ᵀ], [−1, Q]]."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + S


def _paley_2(q: int) -> torch.Tensor:
    """Paley II, order 2(q+1) for a prime q ≡ 1 (mod 4): C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]],
    C = [[0, 1ᵀ], [1, Q]]."""
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1.0
    C[1:, 0] = 1.0
    C[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _core(m: int) -> tuple[torch.Tensor, str] | None:
    """A ±1 Hadamard matrix of order m from one Paley construction (prime q only), or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64), "1"
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley_1(m - 1), f"paley-I(q={m - 1})"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley_2(m // 2 - 1), f"paley-II(q={m // 2 - 1})"
    return None


def hadamard(d: int) -> tuple[torch.Tensor, str]:
    """(H, construction): an orthogonal d×d matrix, float64, HᵀH = I.

    Where a Hadamard matrix of order d is built here it is Sylvester(2^k) ⊗ core, with the largest power of two that
    leaves a core of order m = d/2^k with a Paley construction (m−1 a prime ≡ 3 mod 4, or m/2−1 a prime ≡ 1 mod 4),
    scaled by 1/√d: every entry ±1/√d. E.g. 576 = 16·36 (Paley II, q = 17), 3584 = 128·28 (Paley II, q = 13),
    4096 = Sylvester. QuaRot's `get_hadK`, which LinearPatch's code calls, uses hard-coded cores for some orders (36,
    52, 108, …): a Hadamard matrix of the same order but not the same one, so P differs from the code's for such d
    (for a power of two both are Sylvester). Where no construction is known here (d = 6, or 52 = 4·13, which needs
    GF(25)), H is block-diagonal with one normalised Sylvester block per binary digit of d: orthogonal, but not a
    Hadamard matrix (its blocks do not mix all channels); the construction string says so.
    """
    if d <= 0:
        raise ValueError(f"hadamard: order must be positive, got {d}")
    k = (d & -d).bit_length() - 1  # largest power of two dividing d
    for j in range(k, -1, -1):
        core = _core(d >> j)
        if core is None:
            continue
        C, name = core
        H = torch.kron(_sylvester(1 << j), C) / math.sqrt(d)
        label = f"sylvester({1 << j})" if name == "1" else (name if j == 0 else f"sylvester({1 << j}) ⊗ {name}")
        return H, f"hadamard {label}"
    blocks = [1 << b for b in range(d.bit_length() - 1, -1, -1) if d >> b & 1]
    H = torch.block_diag(*[_sylvester(n) / math.sqrt(n) for n in blocks])
    return H, "block-diagonal sylvester(" + ", ".join(map(str, blocks)) + "): no Hadamard construction for d=" + str(d)


# --- calibration data --------------------------------------------------------------------------------------------

def count_sequences(batches: Iterable[dict]) -> int:
    return sum(int(b["input_ids"].shape[0]) for b in batches)


def first_sequences(batches: Sequence[dict], k: int | None) -> list[dict]:
    """The batches cut to their first k sequences, in order (None or more than there are: all of them)."""
    if k is None:
        return list(batches)
    if k <= 0:
        raise ValueError(f"the number of calibration sequences must be positive, got {k}")
    out, left = [], int(k)
    for b in batches:
        if left <= 0:
            break
        rows = int(b["input_ids"].shape[0])
        out.append(b if rows <= left else {key: v[:left] if torch.is_tensor(v) else v for key, v in b.items()})
        left -= rows
    return out


def channel_mean_abs(acts: Activations, x: torch.Tensor) -> torch.Tensor:
    """[sequences with a real token, d] float64: per sequence, mean over its real tokens of |x| per channel."""
    mask = acts.mask.to(x.device)
    w = mask.to(torch.float64)
    counts = w.sum(dim=1)
    sums = torch.einsum("bt,btd->bd", w, x.to(torch.float64).abs())
    keep = counts > 0
    return sums[keep] / counts[keep, None]


def capture_block_io(model: nn.Module, adapter: Adapter, batches: Sequence[dict], blocks: Iterable[int],
                     consume: Callable[[Activations, dict[int, torch.Tensor]], None], *, progress: bool = False,
                     desc: str = "capture") -> int:
    """One `run_capture` pass; `consume(acts, inputs)` gets each batch's activations (block outputs of `blocks` in
    `acts.block_out`) and `inputs[i]`, the hidden state entering block i, for every i in `blocks`."""
    blocks = sorted(set(int(b) for b in blocks))
    pending: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}

    def pre_hook(i):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            pending[i].append(x.detach().clone())

        return hook

    def on_batch(acts: Activations) -> None:
        consume(acts, {i: pending[i].pop() for i in blocks})

    handles = [adapter.layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in blocks]
    try:
        return run_capture(model, adapter, batches, on_batch, block_outputs=blocks, progress=progress, desc=desc,
                           total=len(batches) if hasattr(batches, "__len__") else None)
    finally:
        for h in handles:
            h.remove()


# --- model parts -------------------------------------------------------------------------------------------------

_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm")


def final_norm(adapter: Adapter) -> nn.Module:
    """The norm the decoder applies after its last block (a sibling of the block list: `model.norm`, `ln_f`, …)."""
    parent_path = adapter.layers_path.rpartition(".")[0]
    parent = adapter._get(adapter.model, parent_path) if parent_path else adapter.model
    for name in _FINAL_NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(f"no final norm found beside the blocks of this {adapter.config.model_type!r} model "
                                f"(looked for {', '.join(_FINAL_NORM_NAMES)} in `{parent_path or 'the model'}`)")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm and the families' own *Norm classes)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def norm_parameter_names(block: nn.Module) -> set[str]:
    """Names (as in `block.named_parameters()`) of the parameters that belong to a norm inside `block`."""
    names = set()
    for mod_name, module in block.named_modules():
        if is_norm(module):
            names |= {f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)}
    return names
