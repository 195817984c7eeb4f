"""Solvers against explicit computations on synthetic (M, R)."""
from __future__ import annotations

import pytest
import torch

from replaceme_core.capture import CalibrationError
from replaceme_core.solve import (
    IterativeConfig, iterative_loss, solve_closed_form, solve_diagonal, solve_iterative, solve_ls, solve_orthonormal,
)
from replaceme_core.stats import ActivationStore, LSStats

from conftest import ls_problem


def problem(n=400, d=8, seed=0, noise=0.1):
    return ls_problem(n, d, seed, noise)[:3]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_solve_ls_equals_lstsq_and_ridge_normal_equations():
    M, R, stats = problem()
    assert rel(solve_ls(stats), torch.linalg.lstsq(M, R).solution) < 1e-10
    alpha = 25.0
    ridge = torch.linalg.solve(M.T @ M + alpha * torch.eye(M.shape[1], dtype=M.dtype), M.T @ R)
    assert rel(solve_ls(stats, alpha), ridge) < 1e-10
    assert rel(solve_closed_form(stats, "full", alpha), ridge) < 1e-10


def test_solve_ls_needs_enough_tokens_or_ridge():
    M, R, _ = problem(n=5, d=8)
    stats = LSStats(8)
    stats.update(M, R)
    with pytest.raises(CalibrationError) as exc:
        solve_ls(stats)
    assert "ridge" in str(exc.value) and "tokens" in str(exc.value)
    T = solve_ls(stats, ridge=1e-2)
    assert torch.isfinite(T).all()
    with pytest.raises(ValueError, match="ridge"):
        solve_ls(stats, ridge=-1)


def test_solve_ls_singular_gram_is_reported():
    M, R, _ = problem(n=50, d=6)
    M[:, 2] = 0.0  # a feature that never fires: MᵀM is singular
    stats = LSStats(6)
    stats.update(M, R)
    with pytest.raises(CalibrationError, match="ridge"):
        solve_ls(stats)


def test_diagonal_equals_per_feature_1d_least_squares():
    M, R, stats = problem(seed=1)
    T = solve_diagonal(stats)
    assert torch.count_nonzero(T - torch.diag(torch.diagonal(T))) == 0
    for j in range(M.shape[1]):
        tj = torch.linalg.lstsq(M[:, j:j + 1], R[:, j:j + 1]).solution.item()
        assert T[j, j].item() == pytest.approx(tj, rel=1e-10)
    alpha = 3.0
    Tr = solve_closed_form(stats, "diagonal", alpha)
    for j in range(M.shape[1]):
        assert Tr[j, j].item() == pytest.approx(float(M[:, j] @ R[:, j] / (M[:, j] @ M[:, j] + alpha)), rel=1e-10)
    # the diagonal optimum beats any perturbed diagonal
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        P = T + torch.diag(0.05 * torch.randn(M.shape[1], generator=g, dtype=torch.float64))
        assert stats.residual(T) < stats.residual(P)


def test_orthonormal_is_orthonormal_and_beats_random_rotations():
    M, R, stats = problem(seed=2, noise=0.5)
    T = solve_orthonormal(stats)
    d = T.shape[0]
    assert torch.allclose(T.T @ T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(solve_closed_form(stats, "orthonormal"), T)
    best = float(((M @ T - R) ** 2).sum())
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        assert best <= float(((M @ Q - R) ** 2).sum()) + 1e-9
    for _ in range(10):  # also small perturbations of the optimum (a local check of optimality)
        A = 1e-3 * torch.randn(d, d, generator=g, dtype=torch.float64)
        Q = T @ torch.linalg.matrix_exp(A - A.T)
        assert best <= float(((M @ Q - R) ** 2).sum()) + 1e-12
    with pytest.raises(ValueError, match="structure"):
        solve_closed_form(stats, "banded")


def make_store(M, R, tmp_path, Y=None, chunk_rows=128):
    cols = ("M", "R") if Y is None else ("M", "R", "Y")
    store = ActivationStore(cols, M.shape[1], directory=tmp_path, chunk_rows=chunk_rows)
    data = {"M": M, "R": R} if Y is None else {"M": M, "R": R, "Y": Y}
    store.append(**data)
    return store.finish()


def test_mse_adam_approaches_least_squares(tmp_path):
    M, R, stats = problem(n=600, d=6, seed=3)
    T_ls = solve_ls(stats)
    with make_store(M, R, tmp_path) as store:
        cfg = IterativeConfig(objective="mse", lr=0.02, epochs=80, batch_tokens=100, seed=0)
        T, history = solve_iterative(store, cfg, progress=False)
    assert T.dtype == torch.float64 and T.shape == (6, 6)
    assert history[-1] < history[0]
    assert rel(T, T_ls) < 0.05
    assert stats.residual(T) <= 1.05 * stats.residual(T_ls)


def test_mse_lbfgs_approaches_least_squares(tmp_path):
    M, R, stats = problem(n=300, d=5, seed=4)
    with make_store(M, R, tmp_path, chunk_rows=1000) as store:  # one full batch: the global objective
        cfg = IterativeConfig(objective="mse", optimizer="lbfgs", lr=1.0, epochs=3, batch_tokens=300, lbfgs_iters=50)
        T, _ = solve_iterative(store, cfg, progress=False)
    assert rel(T, solve_ls(stats)) < 1e-3


@pytest.mark.parametrize("objective", ["cosine", "cosine-exact"])
def test_cosine_objectives_decrease_loss(tmp_path, objective):
    M, R, _ = problem(n=300, d=6, seed=5, noise=0.3)
    g = torch.Generator().manual_seed(9)
    Y = torch.randn(300, 6, generator=g, dtype=torch.float64)
    with make_store(M, R, tmp_path, Y=Y if objective == "cosine-exact" else None) as store:
        cfg = IterativeConfig(objective=objective, lr=0.01, epochs=15, batch_tokens=64)
        T, history = solve_iterative(store, cfg, progress=False)
        full = {k: v.float() for k, v in store.all_rows().items()}
    assert history[-1] < history[0]
    eye = torch.eye(6)
    assert iterative_loss(T.float(), full, cfg) < iterative_loss(eye, full, cfg)
    if objective == "cosine":
        expected = 1 - torch.nn.functional.cosine_similarity(M @ T, R, dim=-1).mean()
    else:
        expected = 1 - torch.nn.functional.cosine_similarity(M @ T + Y, R + Y, dim=-1).mean()
    assert float(iterative_loss(T.float(), full, cfg)) == pytest.approx(float(expected), abs=1e-5)


def test_penalties_and_diagonal_structure(tmp_path):
    M, R, _ = problem(n=200, d=4, seed=6)
    T = torch.randn(4, 4, dtype=torch.float64)
    batch = {"M": M, "R": R}
    base = iterative_loss(T, batch, IterativeConfig(objective="mse"))
    assert float(base) == pytest.approx(float(((M @ T - R) ** 2).sum(-1).mean()))
    l1 = iterative_loss(T, batch, IterativeConfig(objective="mse", l1=0.5))
    l2 = iterative_loss(T, batch, IterativeConfig(objective="mse", l2=0.5))
    assert float(l1 - base) == pytest.approx(0.5 * float(T.abs().sum()))
    assert float(l2 - base) == pytest.approx(0.5 * float((T * T).sum()))
    with make_store(M, R, tmp_path) as store:
        Td, _ = solve_iterative(store, IterativeConfig(objective="mse", structure="diagonal", lr=0.05, epochs=30,
                                                       batch_tokens=50), progress=False)
        stats = LSStats(4)
        stats.update(M, R)
        assert torch.count_nonzero(Td - torch.diag(torch.diagonal(Td))) == 0
        assert rel(torch.diagonal(Td), torch.diagonal(solve_diagonal(stats))) < 0.05
        # a strong L1 penalty shrinks T
        Tl1, _ = solve_iterative(store, IterativeConfig(objective="mse", lr=0.05, epochs=20, batch_tokens=50, l1=5.0),
                                 progress=False)
        Tfree, _ = solve_iterative(store, IterativeConfig(objective="mse", lr=0.05, epochs=20, batch_tokens=50),
                                   progress=False)
        assert Tl1.abs().sum() < Tfree.abs().sum()


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "hinge"}, "objective"), ({"optimizer": "sgd"}, "optimizer"), ({"structure": "orthonormal"}, "structure"),
    ({"epochs": 0}, "positive"), ({"lr": -1.0}, "positive"), ({"l1": -0.1}, "penalties"),
])
def test_iterative_config_validation(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        IterativeConfig(**kwargs).validate()


def test_iterative_needs_columns_and_rows(tmp_path):
    with ActivationStore(("M", "R"), 3, directory=tmp_path) as store:
        store.finish()
        with pytest.raises(ValueError, match="Y"):
            solve_iterative(store, IterativeConfig(objective="cosine-exact"), progress=False)
        with pytest.raises(CalibrationError, match="empty"):
            solve_iterative(store, IterativeConfig(objective="cosine"), progress=False)


def test_divergence_is_reported(tmp_path):
    M, R, _ = problem(n=100, d=4, seed=7)
    with make_store(M * 1e3, R, tmp_path) as store:
        with pytest.raises(CalibrationError, match="diverged"):
            solve_iterative(store, IterativeConfig(objective="mse", optimizer="adam", lr=1e30, epochs=2,
                                                   batch_tokens=10), progress=False)


def test_ls_initialised_solver_starts_at_the_closed_form(tmp_path):
    """init 'ls': the first step starts from T_LS (one step at a tiny lr stays there); plain init starts from I."""
    M, R, stats = problem(n=300, d=6, seed=7, noise=0.3)
    T_ls = solve_ls(stats)
    with make_store(M, R, tmp_path, chunk_rows=1000) as store:
        tiny = dict(objective="cosine", lr=1e-9, epochs=1, batch_tokens=300)
        T, history = solve_iterative(store, IterativeConfig(init="ls", **tiny), progress=False, T0=T_ls)
        full = {k: v.float() for k, v in store.all_rows().items()}
        assert rel(T, T_ls) < 1e-6
        assert history[0] == pytest.approx(float(iterative_loss(T_ls.float(), full, IterativeConfig(**tiny))), rel=1e-5)
        T_eye, _ = solve_iterative(store, IterativeConfig(**tiny), progress=False)
        assert rel(T_eye, torch.eye(6, dtype=torch.float64)) < 1e-6
        Td, _ = solve_iterative(store, IterativeConfig(init="ls", structure="diagonal", **tiny), progress=False,
                                T0=torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64)))
        assert torch.allclose(Td, torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64)), atol=1e-6)
        with pytest.raises(ValueError, match="needs the LS closed form"):
            solve_iterative(store, IterativeConfig(init="ls", **tiny), progress=False)
        with pytest.raises(ValueError, match="only init 'ls'"):
            solve_iterative(store, IterativeConfig(**tiny), progress=False, T0=T_ls)


def test_tolerance_stops_at_the_plateau(tmp_path):
    M, R, _ = problem(n=300, d=6, seed=8, noise=0.3)
    with make_store(M, R, tmp_path) as store:
        cfg = dict(objective="cosine", lr=0.01, batch_tokens=64, epochs=400)
        _, fixed = solve_iterative(store, IterativeConfig(**cfg), progress=False)
        _, stopped = solve_iterative(store, IterativeConfig(tol=1e-3, **cfg), progress=False)
    assert len(fixed) == 400 and 1 < len(stopped) < 400
    assert stopped == fixed[: len(stopped)]  # the same path (same seed), cut where an epoch gained < 0.1%
    assert stopped[-2] - stopped[-1] < 1e-3 * stopped[-2]
    assert all(a - b >= 1e-3 * a for a, b in zip(stopped[:-2], stopped[1:-1]))
    with pytest.raises(ValueError, match="tol"):
        IterativeConfig(tol=-1).validate()
