"""The full-batch SciPy solvers (nonlinear CG, trust-ncg) against problems with a known optimum."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from replaceme_core.prune import PruneConfig
from replaceme_core.solve import IterativeConfig, data_loss, full_batch_rows, penalty, solve_iterative, solve_ls
from replaceme_core.stats import ActivationStore

from conftest import ls_problem


def problem(n=300, d=6, seed=0, noise=0.1):
    return ls_problem(n, d, seed, noise, chunk=n)


def make_store(tmp_path, chunk_rows=64, **cols):
    d = next(iter(cols.values())).shape[1]
    store = ActivationStore(tuple(cols), d, directory=tmp_path, chunk_rows=chunk_rows)
    store.append(**cols)
    return store.finish()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("optimizer", ["cg", "trust-ncg"])
def test_mse_reaches_least_squares_closed_form(tmp_path, optimizer):
    M, R, stats, _ = problem(seed=1)
    with make_store(tmp_path, M=M, R=R) as store:
        T, history = solve_iterative(store, IterativeConfig(objective="mse", optimizer=optimizer, max_iter=200), progress=False)
    T_ls = torch.linalg.lstsq(M, R).solution  # independent of the Gram-sum solver
    assert T.dtype == torch.float64 and T.shape == (6, 6)
    assert rel(T, T_ls) < 1e-5
    # history[0] is the loss at T = I; the last entry is the LS optimum's mean squared residual
    assert history[0] == pytest.approx(float(((M - R) ** 2).sum(-1).mean()), rel=1e-6)
    assert history[-1] == pytest.approx(float(((M @ T_ls - R) ** 2).sum(-1).mean()), rel=1e-6)


@pytest.mark.parametrize("optimizer", ["cg", "trust-ncg"])
def test_mse_with_l2_penalty_reaches_ridge_closed_form(tmp_path, optimizer):
    # mean_k ‖m_k T − r_k‖² + λ‖T‖² has the ridge solution with α = nλ on the Gram sums
    M, R, stats, _ = problem(n=200, d=5, seed=2)
    lam = 0.3
    with make_store(tmp_path, M=M, R=R) as store:
        T, _ = solve_iterative(store, IterativeConfig(objective="mse", optimizer=optimizer, l2=lam, max_iter=300), progress=False)
    ridge = torch.linalg.solve(M.T @ M + 200 * lam * torch.eye(5, dtype=torch.float64), M.T @ R)
    assert rel(T, ridge) < 1e-5
    assert rel(solve_ls(stats, 200 * lam), ridge) < 1e-10


@pytest.mark.parametrize("optimizer", ["cg", "trust-ncg"])
def test_cosine_recovers_a_noiseless_map_up_to_scale(tmp_path, optimizer):
    # R = M·T* exactly: the approximate cosine loss (Eq. 8) is 0 at every positive multiple of T*, and only there
    g = torch.Generator().manual_seed(3)
    d = 5
    M = torch.randn(400, d, generator=g, dtype=torch.float64)
    T_star = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    R = 3.0 * (M @ T_star)
    with make_store(tmp_path, M=M, R=R) as store:
        T, history = solve_iterative(store, IterativeConfig(objective="cosine", optimizer=optimizer, max_iter=300), progress=False)
    assert history[-1] < 1e-6 < history[0]
    scale = float((T * T_star).sum() / (T_star * T_star).sum())
    assert scale > 0
    assert rel(T / scale, T_star) < 1e-2


def test_exact_cosine_full_batch_matches_direct_loss(tmp_path):
    M, R, _, _ = problem(n=150, d=4, seed=4, noise=0.5)
    Y = torch.randn(150, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with make_store(tmp_path, M=M, R=R, Y=Y) as store:
        T, history = solve_iterative(store, IterativeConfig(objective="cosine-exact", optimizer="cg", max_iter=50), progress=False)
    direct = lambda A: float(1 - F.cosine_similarity(M @ A + Y, R + Y, dim=-1).mean())  # noqa: E731
    assert history[0] == pytest.approx(direct(torch.eye(4, dtype=torch.float64)), abs=1e-5)
    assert history[-1] == pytest.approx(direct(T), abs=1e-5)
    assert direct(T) < direct(torch.eye(4, dtype=torch.float64))
    # a local optimum: no small random perturbation improves it
    g = torch.Generator().manual_seed(6)
    for _ in range(10):
        assert direct(T) <= direct(T + 1e-3 * torch.randn(4, 4, generator=g, dtype=torch.float64)) + 1e-7


def test_diagonal_structure_full_batch(tmp_path):
    M, R, stats, _ = problem(n=200, d=4, seed=7)
    with make_store(tmp_path, M=M, R=R) as store:
        T, _ = solve_iterative(store, IterativeConfig(objective="mse", optimizer="cg", structure="diagonal", max_iter=100), progress=False)
    assert torch.count_nonzero(T - torch.diag(torch.diagonal(T))) == 0
    expected = torch.stack([M[:, j] @ R[:, j] / (M[:, j] @ M[:, j]) for j in range(4)])
    assert rel(torch.diagonal(T), expected) < 1e-6


def test_hessian_vector_products_match_finite_differences(tmp_path):
    # trust-ncg relies on double backward through the cosine loss: check H·v against (∇f(x+εv) − ∇f(x−εv)) / 2ε
    M, R, _, _ = problem(n=80, d=3, seed=8, noise=0.4)
    T0 = torch.eye(3, dtype=torch.float64) + 0.1
    v = torch.randn(3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    batch = {"M": M, "R": R}

    def grad(T):
        T = T.clone().requires_grad_(True)
        return torch.autograd.grad(data_loss(T, batch, "cosine"), T)[0]

    T = T0.clone().requires_grad_(True)
    g, = torch.autograd.grad(data_loss(T, batch, "cosine"), T, create_graph=True)
    hv, = torch.autograd.grad((g * v).sum(), T)
    eps = 1e-5
    fd = (grad(T0 + eps * v) - grad(T0 - eps * v)) / (2 * eps)
    assert rel(hv, fd) < 1e-6


def test_subsample_is_fixed_and_bounded(tmp_path):
    M, R, _, _ = problem(n=500, d=3, seed=10)
    with make_store(tmp_path, M=M, R=R) as store:
        a = full_batch_rows(store, 120, seed=1)
        b = full_batch_rows(store, 120, seed=1)
        c = full_batch_rows(store, 120, seed=2)
        everything = full_batch_rows(store, 10_000)
    assert a["M"].shape == (120, 3) and torch.equal(a["M"], b["M"]) and not torch.equal(a["M"], c["M"])
    assert torch.allclose(everything["M"].double(), M, atol=1e-6) and torch.allclose(everything["R"].double(), R, rtol=1e-6, atol=1e-4)
    # every subsampled row is a real (M, R) pair of the store
    rows = {tuple(np.round(r, 4)) for r in M.float().numpy()}
    assert all(tuple(np.round(r, 4)) in rows for r in a["M"].numpy())


def test_penalty_terms():
    T = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)
    assert float(penalty(T, IterativeConfig(l1=0.1))) == pytest.approx(0.35)
    assert float(penalty(T, IterativeConfig(l2=0.1))) == pytest.approx(0.525)


def test_prune_config_wires_the_optimizer():
    cfg = PruneConfig(num_blocks=2, method="cosine", optimizer="trust-ncg", max_iter=7)
    it = cfg.iterative()
    assert (it.optimizer, it.max_iter, it.objective) == ("trust-ncg", 7, "cosine")
    cfg.validate(8)
    with pytest.raises(ValueError, match="optimizer"):
        PruneConfig(num_blocks=2, method="cosine", optimizer="newton").validate(8)
    with pytest.raises(ValueError, match="max_iter"):
        IterativeConfig(optimizer="cg", max_iter=0).validate()


@pytest.mark.parametrize("objective", ["cosine", "cosine-exact", "mse"])
def test_full_batch_loss_matches_direct_computation(tmp_path, objective):
    from replaceme_core.solve import full_batch_loss

    M, R, _, _ = problem(n=90, d=4, seed=11, noise=0.5)
    Y = torch.randn(90, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64) + 0.2
    with make_store(tmp_path, M=M, R=R, Y=Y) as store:
        value = full_batch_loss(store, T, objective, chunk_rows=32)
    if objective == "cosine":
        expected = 1 - F.cosine_similarity(M @ T, R, dim=-1).mean()
    elif objective == "cosine-exact":
        expected = 1 - F.cosine_similarity(M @ T + Y, R + Y, dim=-1).mean()
    else:
        expected = ((M @ T - R) ** 2).sum(-1).mean()
    assert value == pytest.approx(float(expected), rel=1e-5)
    with make_store(tmp_path, M=M, R=R) as store:
        with pytest.raises(ValueError, match="Y"):
            full_batch_loss(store, T, "cosine-exact")


@pytest.mark.parametrize("optimizer", ["cg", "trust-ncg"])
def test_mse_on_sums_reaches_lstsq_and_ridge(optimizer):
    from replaceme_core.solve import minimize_mse_on_sums

    M, R, stats, _ = problem(n=250, d=7, seed=13)
    T, history = minimize_mse_on_sums(stats, optimizer, max_iter=500)
    T_ls = torch.linalg.lstsq(M, R).solution
    assert rel(T, T_ls) < 1e-6
    assert history[0] == pytest.approx(float(((M - R) ** 2).sum() / (R ** 2).sum()), rel=1e-9)
    assert history[-1] == pytest.approx(float(((M @ T_ls - R) ** 2).sum() / (R ** 2).sum()), rel=1e-6)
    Tr, _ = minimize_mse_on_sums(stats, optimizer, max_iter=500, ridge=40.0)
    assert rel(Tr, torch.linalg.solve(M.T @ M + 40.0 * torch.eye(7, dtype=torch.float64), M.T @ R)) < 1e-6
    with pytest.raises(ValueError, match="optimizer"):
        minimize_mse_on_sums(stats, "adam")
