"""Estimate the d×d map T with M·T ≈ R, where R = L_{i+n} − Y_i (the paper's Eqs. 5–8, 13; App. A.3).

Closed forms work on the streamed Gram sums (`LSStats`): least squares with ridge (Eq. 6, solved by
Cholesky, never an explicit inverse), diagonal T (Eq. 13) and orthonormal T (Procrustes, U Vᵀ).
The cosine objectives (Eq. 7 exact, Eq. 8 approximate) and MSE have no closed form and are solved
with Adam or L-BFGS over an `ActivationStore`, starting from the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .capture import CalibrationError
from .stats import ActivationStore, LSStats

STRUCTURES = ("full", "diagonal", "orthonormal")
OBJECTIVES = ("cosine", "cosine-exact", "mse")
OPTIMIZERS = ("adam", "lbfgs")


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
    optimizer: str = "adam"  # adam | lbfgs
    lr: float = 1e-4
    batch_tokens: int = 1024
    epochs: int = 10
    l1: float = 0.0  # α‖T‖₁
    l2: float = 0.0  # α‖T‖²_F
    structure: str = "full"  # full | diagonal
    seed: int = 0
    lbfgs_iters: int = 5  # L-BFGS iterations per mini-batch

    def validate(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.structure not in ("full", "diagonal"):
            raise ValueError("iterative solvers support structure 'full' or 'diagonal'")
        if self.epochs <= 0 or self.batch_tokens <= 0 or self.lr <= 0:
            raise ValueError("epochs, batch_tokens and lr must be positive")
        if self.l1 < 0 or self.l2 < 0:
            raise ValueError("l1 and l2 penalties must be ≥ 0")


def columns_for(objective: str) -> tuple[str, ...]:
    """What the store must hold: the exact cosine loss needs Y as well (the paper's 3-tensor variant)."""
    return ("M", "R", "Y") if objective == "cosine-exact" else ("M", "R")


def iterative_loss(T: torch.Tensor, batch: dict[str, torch.Tensor], cfg: IterativeConfig) -> torch.Tensor:
    pred = batch["M"] @ T
    if cfg.objective == "cosine":
        loss = 1 - F.cosine_similarity(pred, batch["R"], dim=-1).mean()
    elif cfg.objective == "cosine-exact":
        loss = 1 - F.cosine_similarity(pred + batch["Y"], batch["R"] + batch["Y"], dim=-1).mean()
    else:
        loss = ((pred - batch["R"]) ** 2).sum(dim=-1).mean()
    if cfg.l1:
        loss = loss + cfg.l1 * T.abs().sum()
    if cfg.l2:
        loss = loss + cfg.l2 * (T * T).sum()
    return loss


def solve_iterative(store: ActivationStore, cfg: IterativeConfig, device="cpu", progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Minimise the configured objective over T from T₀ = I; returns (T in float64, per-epoch mean loss)."""
    cfg.validate()
    missing = set(columns_for(cfg.objective)) - set(store.columns)
    if missing:
        raise ValueError(f"objective {cfg.objective!r} needs stored columns {sorted(missing)}")
    if store.rows == 0:
        raise CalibrationError("the activation store is empty")
    d = store.d
    if cfg.structure == "diagonal":
        param = torch.ones(d, device=device, requires_grad=True)
        as_matrix = lambda p: torch.diag(p)  # noqa: E731
    else:
        param = torch.eye(d, device=device, requires_grad=True)
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
    return as_matrix(param.detach()).to(torch.float64).cpu(), history
