"""Estimate the d×d map T with M·T ≈ R, where R = L_{i+n} − Y_i (the paper's Eqs. 5–8, 13; App. A.3).

Closed forms work on the streamed Gram sums (`LSStats`): least squares with ridge (Eq. 6, solved by
Cholesky, never an explicit inverse), diagonal T (Eq. 13) and orthonormal T (Procrustes, U Vᵀ).
The cosine objectives (Eq. 7 exact, Eq. 8 approximate) and MSE have no closed form and are solved
over an `ActivationStore`, starting from the identity: with Adam or L-BFGS on shuffled mini-batches, or
with SciPy's nonlinear conjugate gradient ("cg") or trust-region Newton-CG ("trust-ncg") on the full
batch (a fixed, seeded subsample when the store holds more than `full_batch_rows` rows), the loss,
gradient and Hessian-vector products being computed in torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .capture import CalibrationError
from .stats import ActivationStore, LSStats

STRUCTURES = ("full", "diagonal", "orthonormal")
OBJECTIVES = ("cosine", "cosine-exact", "mse")
OPTIMIZERS = ("adam", "lbfgs", "cg", "trust-ncg")
FULL_BATCH_OPTIMIZERS = ("cg", "trust-ncg")  # SciPy methods on the full (or subsampled) batch
INITS = ("identity", "ls")  # where the iterative solvers start: T₀ = I (paper, Table 14) or the LS closed form


def check_choice(what: str, value: str, options) -> None:
    """One wording for every 'unknown option' error."""
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")


def solve_ls(stats: LSStats, ridge: float = 0.0) -> torch.Tensor:
    """T = (MᵀM + αI)⁻¹ Mᵀ R via a Cholesky factorisation, in float64."""
    if ridge < 0:
        raise ValueError(f"ridge must be ≥ 0, got {ridge}")
    if ridge == 0 and stats.tokens < stats.d:
        raise CalibrationError(
            f"least squares is ill-posed with {stats.tokens} real tokens for hidden size {stats.d}: give at least "
            f"{stats.d} tokens of calibration data (more samples or longer ones), or set a ridge penalty (--ridge)"
        )
    A = stats.MtM + ridge * torch.eye(stats.d, dtype=torch.float64, device=stats.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise CalibrationError(
            "the Gram matrix MᵀM is singular (the MLP outputs do not span the hidden space on this data): "
            "set a ridge penalty (--ridge, e.g. 1e-3 × trace(MᵀM)/d) or use more calibration data"
        )
    return torch.cholesky_solve(stats.MtR, L)


def solve_diagonal(stats: LSStats, ridge: float = 0.0) -> torch.Tensor:
    """Eq. 13: t_j = (MᵀR)_jj / ((MᵀM)_jj + α), returned as diag(t)."""
    denom = torch.diagonal(stats.MtM) + ridge
    if (denom <= 0).any():
        raise CalibrationError("some MLP output features are always zero on this data: set a ridge penalty (--ridge)")
    return torch.diag(torch.diagonal(stats.MtR) / denom)


def solve_orthonormal(stats: LSStats) -> torch.Tensor:
    """argmin over orthonormal T of ‖M T − R‖: T = U Vᵀ with MᵀR = U Σ Vᵀ (orthogonal Procrustes)."""
    U, _, Vh = torch.linalg.svd(stats.MtR)
    return U @ Vh


def solve_closed_form(stats: LSStats, structure: str = "full", ridge: float = 0.0) -> torch.Tensor:
    if structure == "full":
        return solve_ls(stats, ridge)
    if structure == "diagonal":
        return solve_diagonal(stats, ridge)
    if structure == "orthonormal":
        return solve_orthonormal(stats)
    check_choice("structure", structure, STRUCTURES)


@dataclass
class IterativeConfig:
    """Defaults are the paper's App. A.15 Table 14: Adam, lr 1e-4, 1024-token batches, 10 epochs, T₀ = I."""

    objective: str = "cosine"  # cosine (Eq. 8) | cosine-exact (Eq. 7) | mse
    optimizer: str = "adam"  # adam | lbfgs (mini-batch) | cg | trust-ncg (SciPy, full batch)
    lr: float = 1e-4
    batch_tokens: int = 1024
    epochs: int = 10
    l1: float = 0.0  # α‖T‖₁
    l2: float = 0.0  # α‖T‖²_F
    structure: str = "full"  # full | diagonal
    seed: int = 0
    lbfgs_iters: int = 5  # L-BFGS iterations per mini-batch
    max_iter: int = 100  # cg / trust-ncg: iterations of the SciPy method (each: ≥ 1 full-batch loss and gradient)
    full_batch_rows: int = 32768  # cg / trust-ncg: at most this many rows (a fixed seeded subsample beyond it)
    init: str = "identity"  # identity (paper) | ls: start from the LS closed form (the caller passes it as T0)
    tol: float = 0.0  # adam / lbfgs: stop once an epoch lowers the mean loss by < tol (relative); 0 = all epochs

    def validate(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.structure not in ("full", "diagonal"):
            raise ValueError("iterative solvers support structure 'full' or 'diagonal'")
        if self.epochs <= 0 or self.batch_tokens <= 0 or self.lr <= 0:
            raise ValueError("epochs, batch_tokens and lr must be positive")
        if self.l1 < 0 or self.l2 < 0:
            raise ValueError("l1 and l2 penalties must be ≥ 0")
        if self.max_iter <= 0 or self.full_batch_rows <= 0:
            raise ValueError("max_iter and full_batch_rows must be positive")
        check_choice("init", self.init, INITS)
        if self.tol < 0:
            raise ValueError("tol must be ≥ 0 (0 runs every epoch)")


def columns_for(objective: str) -> tuple[str, ...]:
    """What the store must hold: the exact cosine loss needs Y as well (the paper's 3-tensor variant)."""
    return ("M", "R", "Y") if objective == "cosine-exact" else ("M", "R")


def data_loss(T: torch.Tensor, batch: dict[str, torch.Tensor], objective: str, reduction: str = "mean") -> torch.Tensor:
    """The objective's per-token loss over `batch`, averaged (or summed), without penalties."""
    pred = batch["M"] @ T
    if objective == "cosine":
        per_token = 1 - F.cosine_similarity(pred, batch["R"], dim=-1)
    elif objective == "cosine-exact":
        per_token = 1 - F.cosine_similarity(pred + batch["Y"], batch["R"] + batch["Y"], dim=-1)
    else:
        per_token = ((pred - batch["R"]) ** 2).sum(dim=-1)
    return per_token.mean() if reduction == "mean" else per_token.sum()


def penalty(T: torch.Tensor, cfg: IterativeConfig) -> torch.Tensor:
    """α₁‖T‖₁ + α₂‖T‖²_F (the paper's Eq. 9 regulariser on T for the cosine objective)."""
    out = T.new_zeros(())
    if cfg.l1:
        out = out + cfg.l1 * T.abs().sum()
    if cfg.l2:
        out = out + cfg.l2 * (T * T).sum()
    return out


def iterative_loss(T: torch.Tensor, batch: dict[str, torch.Tensor], cfg: IterativeConfig) -> torch.Tensor:
    return data_loss(T, batch, cfg.objective) + penalty(T, cfg)


def solve_iterative(store: ActivationStore, cfg: IterativeConfig, device="cpu", progress: bool = True,
                    T0: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Minimise the configured objective over T from T₀ (the identity, or `T0` — required with init 'ls');
    returns (T in float64, the loss history: per-epoch mean loss, or per iteration for the full-batch methods).
    With `cfg.tol` the epochs stop once one lowers the mean loss by less than tol (relative): run to a plateau."""
    cfg.validate()
    if (cfg.init == "ls") != (T0 is not None):
        raise ValueError("init 'ls' needs the LS closed form as T0, and only init 'ls' takes a T0")
    missing = set(columns_for(cfg.objective)) - set(store.columns)
    if missing:
        raise ValueError(f"objective {cfg.objective!r} needs stored columns {sorted(missing)}")
    if store.rows == 0:
        raise CalibrationError("the activation store is empty")
    d = store.d
    start = torch.eye(d, dtype=torch.float64) if T0 is None else T0.detach().to("cpu", torch.float64)
    if start.shape != (d, d):
        raise ValueError(f"T0 has shape {tuple(start.shape)}, the store's T is {d}×{d}")
    if cfg.optimizer in FULL_BATCH_OPTIMIZERS:
        return _solve_full_batch(store, cfg, device=device, progress=progress, start=start)
    if cfg.structure == "diagonal":
        param = torch.diagonal(start).to(device, torch.float32).clone().requires_grad_(True)
        as_matrix = lambda p: torch.diag(p)  # noqa: E731
    else:
        param = start.to(device, torch.float32).clone().requires_grad_(True)
        as_matrix = lambda p: p  # noqa: E731
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam([param], lr=cfg.lr)
    else:
        opt = torch.optim.LBFGS([param], lr=cfg.lr, max_iter=cfg.lbfgs_iters, line_search_fn="strong_wolfe")
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    for _ in tqdm(range(cfg.epochs), desc=f"{cfg.optimizer} ({cfg.objective})", disable=not progress, unit="epoch"):
        total, count = 0.0, 0
        for batch in store.batches(cfg.batch_tokens, gen, device=device):

            def closure():
                opt.zero_grad()
                loss = iterative_loss(as_matrix(param), batch, cfg)
                loss.backward()
                return loss

            loss = opt.step(closure)
            total += float(loss.detach()) * batch["M"].shape[0]
            count += batch["M"].shape[0]
        history.append(total / count)
        if not torch.isfinite(param).all():
            raise CalibrationError(f"{cfg.optimizer} diverged (non-finite T); lower the learning rate")
        if cfg.tol and len(history) > 1 and history[-2] - history[-1] < cfg.tol * abs(history[-2]):
            break  # the plateau: this epoch gained less than tol
    return as_matrix(param.detach()).to(torch.float64).cpu(), history


def full_batch_rows(store: ActivationStore, max_rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """All rows of `store`, or a fixed subsample of `max_rows` of them (seeded, in store order), as float32 tensors."""
    data = np.memmap(store.path, dtype=np.float32, mode="r", shape=(store.rows, store.width))
    if store.rows > max_rows:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(store.rows, generator=gen)[:max_rows].sort().values.numpy()
        rows = torch.from_numpy(np.ascontiguousarray(data[idx]))
    else:
        rows = torch.from_numpy(np.array(data))
    return {col: rows[:, j * store.d : (j + 1) * store.d] for j, col in enumerate(store.columns)}


def _solve_full_batch(store: ActivationStore, cfg: IterativeConfig, device="cpu", progress: bool = True,
                      chunk_rows: int = 8192, start: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """SciPy's CG (Polak–Ribière nonlinear conjugate gradient) or trust-ncg on the full-batch objective.

    The parameter lives in float64 (SciPy's line searches need it); the loss, its gradient and — for
    trust-ncg — Hessian-vector products (double backward) are computed in torch over the rows in chunks
    and summed, so the objective is exactly the mean over all used rows plus the penalty. Returns T and
    the objective after every iteration (the first entry is the loss at T₀ = I).
    """
    from scipy.optimize import minimize

    rows = full_batch_rows(store, cfg.full_batch_rows, cfg.seed)
    n = next(iter(rows.values())).shape[0]
    d = store.d
    dtype = torch.float64 if cfg.objective == "mse" else torch.float32  # MSE sums are large: keep precision
    chunks = [{k: v[s : s + chunk_rows].to(device, dtype) for k, v in rows.items()} for s in range(0, n, chunk_rows)]
    diagonal = cfg.structure == "diagonal"
    as_matrix = (lambda p: torch.diag(p)) if diagonal else (lambda p: p.reshape(d, d))  # noqa: E731
    start = torch.eye(d, dtype=torch.float64) if start is None else start
    x0 = torch.diagonal(start).numpy().copy() if diagonal else start.numpy().ravel().copy()

    def to_param(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(device).requires_grad_(True)

    def fun_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        p = to_param(x)
        total, grad = 0.0, torch.zeros_like(p)
        for batch in chunks:
            loss = data_loss(as_matrix(p.to(dtype)), batch, cfg.objective, reduction="sum") / n
            g, = torch.autograd.grad(loss, p)
            total += float(loss.detach())
            grad += g
        pen = penalty(as_matrix(p), cfg)
        if pen.requires_grad:
            g, = torch.autograd.grad(pen, p)
            grad += g
        return total + float(pen.detach()), grad.detach().cpu().numpy().astype(np.float64)

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        p = to_param(x)
        vt = torch.from_numpy(np.asarray(v, dtype=np.float64)).to(device)
        out = torch.zeros_like(p)
        for batch in chunks:
            loss = data_loss(as_matrix(p.to(dtype)), batch, cfg.objective, reduction="sum") / n
            g, = torch.autograd.grad(loss, p, create_graph=True)
            hv, = torch.autograd.grad((g * vt).sum(), p)
            out += hv
        if cfg.l2:  # the L1 term has no curvature (almost everywhere)
            out += 2 * cfg.l2 * vt
        return out.detach().cpu().numpy().astype(np.float64)

    history = [fun_and_grad(x0)[0]]
    bar = tqdm(total=cfg.max_iter, desc=f"{cfg.optimizer} ({cfg.objective}, {n} rows)", disable=not progress, unit="it")

    def callback(intermediate_result):  # SciPy passes the current OptimizeResult (x, fun) by this name
        history.append(float(intermediate_result.fun))
        bar.update(1)

    options = {"maxiter": cfg.max_iter, "gtol": 1e-10}
    kw = {"hessp": hessp} if cfg.optimizer == "trust-ncg" else {}
    try:
        res = minimize(fun_and_grad, x0, jac=True, method="CG" if cfg.optimizer == "cg" else "trust-ncg",
                       callback=callback, options=options, **kw)
    finally:
        bar.close()
    if not np.all(np.isfinite(res.x)):
        raise CalibrationError(f"{cfg.optimizer} diverged (non-finite T)")
    T = as_matrix(torch.from_numpy(res.x)).to(torch.float64).cpu()
    return T, history


@torch.no_grad()
def full_batch_loss(store: ActivationStore, T: torch.Tensor, objective: str = "cosine", chunk_rows: int = 8192,
                    device=None) -> float:
    """The objective's mean over every row of `store` (no penalty) at a given T — e.g. to compare solvers.

    Rows are read chunk by chunk from the file (memory bounded by `chunk_rows`, however large the store) and scored on
    `device` (default: T's device)."""
    check_choice("objective", objective, OBJECTIVES)
    missing = set(columns_for(objective)) - set(store.columns)
    if missing:
        raise ValueError(f"objective {objective!r} needs stored columns {sorted(missing)}")
    if store.rows == 0:
        raise CalibrationError("the activation store is empty")
    device = torch.device(device) if device is not None else T.device
    dtype = torch.float64 if objective == "mse" else torch.float32
    data = np.memmap(store.path, dtype=np.float32, mode="r", shape=(store.rows, store.width))
    Td = T.to(device, dtype)
    total = 0.0
    for s in range(0, store.rows, chunk_rows):
        block = torch.from_numpy(np.array(data[s : s + chunk_rows])).to(device, dtype)
        batch = {col: block[:, j * store.d : (j + 1) * store.d] for j, col in enumerate(store.columns)}
        total += float(data_loss(Td, batch, objective, reduction="sum"))
    return total / store.rows


def minimize_mse_on_sums(stats: LSStats, optimizer: str = "cg", max_iter: int = 1000, ridge: float = 0.0,
                         device=None) -> tuple[torch.Tensor, list[float]]:
    """Minimise the MSE objective Σ‖M T − R‖² (+ α‖T‖²) numerically from T₀ = I, using only the Gram sums.

    The same objective as MSE over every stored token (‖MT − R‖² = ‖R‖² − 2⟨T, MᵀR⟩ + ⟨T, MᵀM T⟩), so a
    converging solver must reach the LS closed form: this is the cheap, exact form of Table 8's "MSE solved
    numerically" check. optimizer: "cg" (SciPy nonlinear CG; on a quadratic, linear CG) or "trust-ncg".
    The d×d products (d³ each, thousands of times) run in float64 on `device` (default: where the sums are), SciPy
    only steers. Returns T (host) and the relative residual Σ‖MT − R‖²/Σ‖R‖² after every iteration (first: T = I).
    """
    from scipy.optimize import minimize

    check_choice("optimizer", optimizer, FULL_BATCH_OPTIMIZERS)
    if max_iter <= 0:
        raise ValueError("max_iter must be positive")
    d = stats.d
    device = torch.device(device) if device is not None else stats.device
    A = (stats.MtM + ridge * torch.eye(d, dtype=torch.float64, device=stats.device)).to(device, torch.float64)
    B = stats.MtR.to(device, torch.float64)
    rr = float(stats.RtR)
    scale = max(rr, 1e-300)  # objective divided by Σ‖R‖²: the relative residual, O(1)

    def as_matrix(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(d, d)).to(device)

    def fun_and_grad(x):
        T = as_matrix(x)
        AT = A @ T
        f = (rr - 2 * float((T * B).sum()) + float((T * AT).sum())) / scale
        return f, (2 * (AT - B) / scale).cpu().numpy().ravel()

    def hessp(_x, v):
        return (2 * (A @ as_matrix(v)) / scale).cpu().numpy().ravel()

    x0 = np.eye(d).ravel()
    history = [fun_and_grad(x0)[0]]
    res = minimize(fun_and_grad, x0, jac=True, method="CG" if optimizer == "cg" else "trust-ncg",
                   hessp=hessp if optimizer == "trust-ncg" else None,
                   callback=lambda intermediate_result: history.append(float(intermediate_result.fun)),
                   options={"maxiter": max_iter, "gtol": 1e-12})
    return torch.from_numpy(res.x.reshape(d, d)).to(torch.float64), history
