"""Capture (hooks, pad masking, early stop) and the streaming statistics, against explicit computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import (
    ALL_FAMILIES, GENERAL_FOLD_FAMILIES, blocks_of, build_model, calib_batches, make_batch, record, rel_err, unpad,
)
from replaceme_core.arch import get_adapter
from replaceme_core.capture import CalibrationError, run_capture
from replaceme_core.prune import PruneConfig, calibrate, prune
from replaceme_core.select import Run
from replaceme_core.stats import ActivationStore, DistanceStats, LSStats


def stacked(model, family, batches, kept, last):
    """M_k, R = L_{k+n} − Y_k and Y_k on real tokens, from our own hooks, pad rows dropped."""
    Ms, Rs, Ys = [], [], []
    for b in batches:
        L, M = record(model, family, b, blocks=sorted({kept, last}))
        mask = b["attention_mask"].bool()
        m = M[kept][mask]
        y = L[kept][mask] - m
        Ms.append(m)
        Ys.append(y)
        Rs.append(L[last][mask] - y)
    return torch.cat(Ms), torch.cat(Rs), torch.cat(Ys)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_ls_from_prune_equals_lstsq_on_stacked_real_tokens(family):
    model = build_model(family)
    batches = calib_batches(seed=1)
    start, n = 2, 2
    M, R, _ = stacked(model, family, batches, start - 1, start + n - 1)
    assert M.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
    expected = torch.linalg.lstsq(M, R).solution
    if family == "gemma3_text":
        cal = calibrate(model, batches, ls_runs=[Run(start, n)], progress=False)
        from replaceme_core.solve import solve_ls

        T = solve_ls(cal.ls[Run(start, n)])
    else:
        res = prune(model, batches, PruneConfig(num_blocks=n, start=start), progress=False)
        T = res.replacements[0].T
        assert res.record["calibration"]["tokens"] == M.shape[0]
    assert rel_err(T, expected) <= 1e-8
    # and it is not the identity: the test would notice a wrong target
    assert rel_err(torch.eye(T.shape[0], dtype=T.dtype), expected) > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_ridge_equals_normal_equation_solve(family):
    model = build_model(family)
    batches = calib_batches(seed=2)
    run = Run(2, 1)
    M, R, _ = stacked(model, family, batches, run.kept, run.last)
    alpha = 0.7
    expected = torch.linalg.solve(M.T @ M + alpha * torch.eye(M.shape[1], dtype=M.dtype), M.T @ R)
    res = prune(model, batches, PruneConfig(num_blocks=1, start=2, ridge=alpha), progress=False)
    assert rel_err(res.replacements[0].T, expected) <= 1e-8
    assert rel_err(torch.linalg.lstsq(M, R).solution, expected) > 1e-6  # the ridge matters here


@pytest.mark.parametrize("family", GENERAL_FOLD_FAMILIES + ["gemma3_text"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batch_gives_same_stats_as_unpadded_texts(family, padding):
    model = build_model(family)
    batches = calib_batches(seed=3, padding=padding)
    singles = [s for b in batches for s in unpad(b)]
    run = Run(2, 2)
    padded = calibrate(model, batches, ls_runs=[run], progress=False).ls[run]
    single = calibrate(model, singles, ls_runs=[run], progress=False).ls[run]
    assert padded.tokens == single.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert rel_err(padded.MtM, single.MtM) <= 1e-9
    assert rel_err(padded.MtR, single.MtR) <= 1e-9
    from replaceme_core.solve import solve_ls

    assert rel_err(solve_ls(padded), solve_ls(single)) <= 1e-7


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "opt"])
def test_target_is_raw_last_block_output_not_final_normed_hidden_state(family):
    model = build_model(family)
    batches = calib_batches(seed=4)
    L = len(blocks_of(model, family))
    run = Run(L - 2, 2)  # ends at the final block
    cal = calibrate(model, batches, ls_runs=[run], progress=False)
    M, R, Y = stacked(model, family, batches, run.kept, run.last)
    stats = cal.ls[run]
    assert torch.allclose(stats.MtR, M.T @ R, rtol=1e-10, atol=1e-12)
    # transformers' hidden_states[-1] is final-normed: using it would give a different target
    normed = []
    for b in batches:
        with torch.no_grad():
            hs = model(**b, output_hidden_states=True, use_cache=False).hidden_states[-1]
        normed.append(hs[b["attention_mask"].bool()])
    R_wrong = torch.cat(normed) - Y
    assert rel_err(M.T @ R_wrong, M.T @ R) > 1e-2
    assert rel_err(stats.MtR, M.T @ R_wrong) > 1e-2


def test_ls_stats_residual_equals_explicit():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(50, 6, generator=g, dtype=torch.float64)
    R = torch.randn(50, 6, generator=g, dtype=torch.float64)
    s = LSStats(6)
    s.update(M[:20], R[:20])
    s.update(M[20:], R[20:])
    assert s.tokens == 50
    for seed in range(3):
        T = torch.randn(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        explicit = float(((M @ T - R) ** 2).sum())
        assert math.isclose(s.residual(T), explicit, rel_tol=1e-10)
        assert math.isclose(s.relative_residual(T), explicit / float((R * R).sum()), rel_tol=1e-10)
    other = LSStats(6)
    other.update(M, R)
    merged = LSStats(6).merge_(s).merge_(other)
    assert merged.tokens == 100 and torch.allclose(merged.MtM, 2 * M.T @ M)


# --- distances -------------------------------------------------------------------------------------

def direct_distances(model, family, batches):
    outs_all, outs_last = [], []
    for b in batches:
        L, _ = record(model, family, b)
        mask = b["attention_mask"].bool()
        pos = torch.arange(mask.shape[1]).expand_as(mask)
        last = torch.where(mask, pos, -1).max(dim=1).values
        outs_all.append(torch.stack([L[i][mask] for i in sorted(L)]))
        outs_last.append(torch.stack([L[i][torch.arange(mask.shape[0]), last] for i in sorted(L)]))
    result = {}
    for name, outs in (("all", outs_all), ("last", outs_last)):
        X = torch.cat(outs, dim=1)  # [L, N, d]
        unit = X / X.norm(dim=-1, keepdim=True)
        cos = torch.einsum("and,bnd->abn", unit, unit)
        result[name] = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean(dim=-1)
    return result


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_parallel", "gemma3_text"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_angular_distance_matrix_equals_direct_computation(family, padding):
    model = build_model(family)
    batches = calib_batches(seed=5, padding=padding)
    cal = calibrate(model, batches, distances=True, progress=False)
    direct = direct_distances(model, family, batches)
    for tokens in ("all", "last"):
        m = cal.distances.matrix("angular", tokens)
        L = m.shape[0]
        assert m.shape == (L, L) == direct[tokens].shape
        assert torch.allclose(m, m.T)
        assert torch.all(torch.diagonal(m) == 0)
        off = ~torch.eye(L, dtype=torch.bool)
        assert torch.allclose(m[off], direct[tokens][off], atol=2e-6, rtol=1e-5)
        assert float(m[off].min()) > 0
    assert cal.distances.counts["last"] == sum(b["input_ids"].shape[0] for b in batches)
    assert cal.distances.counts["all"] == sum(int(b["attention_mask"].sum()) for b in batches)
    cos = cal.distances.matrix("cosine", "all")
    assert torch.allclose(torch.diagonal(cos), torch.ones(cos.shape[0], dtype=cos.dtype))


def test_distance_stats_state_dict_roundtrip_and_merge():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(7, 5, generator=g) for _ in range(4)]
    a = DistanceStats(4)
    a.update(outs, "last")
    b = DistanceStats.from_state_dict(a.state_dict())
    assert torch.equal(a.matrix("l2", "last"), b.matrix("l2", "last"))
    a.merge_(b)
    assert a.counts["last"] == 14
    assert torch.allclose(a.matrix("angular", "last"), b.matrix("angular", "last"))
    with pytest.raises(ValueError):
        a.matrix("angular", "all")  # nothing accumulated
    with pytest.raises(ValueError):
        a.matrix("bogus", "last")


# --- capture ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_forward_stops_after_deepest_needed_block(family):
    model = build_model(family)
    adapter = get_adapter(model)
    fired = {"later": 0, "head": 0, "needed": 0}
    h1 = blocks_of(model, family)[2].register_forward_hook(lambda *a: fired.__setitem__("later", fired["later"] + 1))
    h2 = model.get_output_embeddings().register_forward_hook(lambda *a: fired.__setitem__("head", fired["head"] + 1))
    h3 = blocks_of(model, family)[1].register_forward_hook(lambda *a: fired.__setitem__("needed", fired["needed"] + 1))
    seen = []
    try:
        tokens = run_capture(model, adapter, calib_batches(seed=6), seen.append, block_outputs=[1], mlp_outputs=[0],
                             progress=False)
    finally:
        for h in (h1, h3):
            h.remove()
    assert fired == {"later": 0, "head": 0, "needed": 3}
    assert tokens == sum(int(b["attention_mask"].sum()) for b in calib_batches(seed=6))
    assert len(seen) == 3 and set(seen[0].block_out) == {1} and set(seen[0].mlp_out) == {0}
    # the model is usable (hooks removed) afterwards
    with torch.no_grad():
        model(**make_batch([3]))
    h2.remove()
    assert fired["head"] == 1


def test_captured_mlp_output_is_not_modified_in_place_later():
    """Falcon's parallel block adds attention into the MLP output tensor in place; capture must copy."""
    family = "falcon_parallel"
    model = build_model(family)
    batch = make_batch([5, 3], seed=7)
    L, M = record(model, family, batch, blocks=[1])
    seen = []
    run_capture(model, get_adapter(model), [batch], seen.append, block_outputs=[1], mlp_outputs=[1], progress=False)
    mask = batch["attention_mask"].bool()
    assert torch.equal(seen[0].mlp_out[1][mask], M[1][mask])
    assert torch.equal(seen[0].block_out[1][mask], L[1][mask])


def test_capture_rejects_bad_requests_and_empty_data():
    model = build_model("llama")
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match="nothing to capture"):
        run_capture(model, adapter, [make_batch([3])], lambda a: None, progress=False)
    with pytest.raises(ValueError, match="block indices"):
        run_capture(model, adapter, [make_batch([3])], lambda a: None, block_outputs=[9], progress=False)
    with pytest.raises(CalibrationError, match="no tokens"):
        run_capture(model, adapter, [], lambda a: None, block_outputs=[1], progress=False)
    empty = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(CalibrationError, match="no tokens"):
        run_capture(model, adapter, [empty], lambda a: None, block_outputs=[1], progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_are_reported(bad):
    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = bad
    with pytest.raises(CalibrationError, match="non-finite"):
        calibrate(model, calib_batches(), ls_runs=[Run(2, 1)], progress=False)


# --- activation store ------------------------------------------------------------------------------

def test_activation_store_roundtrip_and_epochs(tmp_path):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(103, 4, generator=g)
    R = torch.randn(103, 4, generator=g)
    store = ActivationStore(("M", "R"), 4, directory=tmp_path, chunk_rows=16)
    for s in range(0, 103, 10):
        store.append(M=M[s:s + 10], R=R[s:s + 10])
    store.finish()
    assert store.rows == 103
    rows = store.all_rows()
    assert torch.equal(rows["M"], M) and torch.equal(rows["R"], R)
    gen = torch.Generator().manual_seed(1)
    for _epoch in range(2):
        seen = []
        for batch in store.batches(7, gen):
            assert batch["M"].shape[0] <= 7  # mini-batch never crosses a chunk, so memory ≤ chunk_rows rows
            seen.append(torch.cat([batch["M"], batch["R"]], dim=1))
        seen = torch.cat(seen)
        assert seen.shape[0] == 103
        # every row exactly once: sort both sets of rows and compare
        key = lambda x: x[np.lexsort(x.numpy().T[::-1])]  # noqa: E731
        assert torch.equal(key(seen), key(torch.cat([M, R], dim=1)))
    with pytest.raises(ValueError, match="expected columns"):
        ActivationStore(("M", "R"), 4, directory=tmp_path).append(M=M)
    store.close()
    assert not store.path.exists()


def test_activation_store_chunks_are_bounded(tmp_path, monkeypatch):
    """Reading back never materialises more than chunk_rows rows at once."""
    store = ActivationStore(("M", "R"), 3, directory=tmp_path, chunk_rows=10)
    store.append(M=torch.randn(45, 3), R=torch.randn(45, 3))
    store.finish()
    sizes = []
    real_from_buffer = np.frombuffer

    def spy(buf, dtype):
        arr = real_from_buffer(buf, dtype=dtype)
        sizes.append(arr.size // store.width)
        return arr

    monkeypatch.setattr(np, "frombuffer", spy)
    total = sum(b["M"].shape[0] for b in store.batches(100, torch.Generator().manual_seed(0)))
    assert total == 45
    assert sorted(sizes) == [5, 10, 10, 10, 10]
    assert max(sizes) <= store.chunk_rows
    store.close()


def test_calibrate_store_rows_match_explicit_activations(tmp_path):
    family = "llama"
    model = build_model(family)
    batches = calib_batches(seed=8)
    run = Run(2, 2)
    cal = calibrate(model, batches, store_runs=[run], store_columns=("M", "R", "Y"), store_dir=tmp_path,
                    progress=False)
    try:
        rows = cal.stores[run].all_rows()
        M, R, Y = stacked(model, family, batches, run.kept, run.last)
        for name, ref in (("M", M), ("R", R), ("Y", Y)):
            assert torch.allclose(rows[name].double(), ref, rtol=1e-5, atol=1e-6)
    finally:
        cal.close()
    assert list(tmp_path.iterdir()) == []


def test_rows_without_real_tokens_are_ignored():
    """An empty text in a batch (all pad) contributes nothing, not even to the last-token statistics."""
    model = build_model("llama")
    batches = calib_batches(seed=10)
    with_empty = []
    for b in batches:
        ids = torch.cat([b["input_ids"], torch.zeros(1, b["input_ids"].shape[1], dtype=torch.long)])
        mask = torch.cat([b["attention_mask"], torch.zeros(1, b["attention_mask"].shape[1], dtype=torch.long)])
        with_empty.append({"input_ids": ids, "attention_mask": mask})
    run = Run(2, 1)
    a = calibrate(model, batches, distances=True, ls_runs=[run], progress=False)
    b = calibrate(model, with_empty, distances=True, ls_runs=[run], progress=False)
    assert a.tokens == b.tokens and a.ls[run].tokens == b.ls[run].tokens
    assert torch.allclose(a.ls[run].MtR, b.ls[run].MtR, rtol=1e-10, atol=1e-14)
    assert b.distances.counts["last"] == a.distances.counts["last"] == 12
    for tokens in ("all", "last"):
        assert torch.allclose(a.distances.matrix("angular", tokens), b.distances.matrix("angular", tokens), atol=1e-6)


def test_persisted_store_round_trip_and_survives_close(tmp_path):
    g = torch.Generator().manual_seed(0)
    M, R = torch.randn(37, 4, generator=g), torch.randn(37, 4, generator=g)
    store = ActivationStore(("M", "R"), 4, directory=tmp_path, chunk_rows=16)
    store.append(M=M[:20], R=R[:20])
    store.append(M=M[20:], R=R[20:])
    temp_dir = store.path.parent
    store.persist(tmp_path / "kept")
    assert not temp_dir.exists() and store.path == tmp_path / "kept" / "rows.f32"
    store.close()
    assert store.path.exists()  # a cache entry outlives close()
    again = ActivationStore.open_persisted(tmp_path / "kept")
    rows = again.all_rows()
    assert again.rows == 37 and torch.equal(rows["M"], M) and torch.equal(rows["R"], R)
    seen = torch.cat([b["M"] for b in again.batches(8, torch.Generator().manual_seed(1))])
    assert seen.shape == M.shape and torch.allclose(seen.sum(0), M.sum(0), atol=1e-5)
    again.close()
    assert again.path.exists()


def test_incomplete_persisted_store_is_ignored(tmp_path):
    assert ActivationStore.open_persisted(tmp_path / "nothing") is None
    store = ActivationStore(("M",), 2, directory=tmp_path)
    store.append(M=torch.ones(5, 2))
    store.persist(tmp_path / "kept")
    meta = (tmp_path / "kept" / "meta.json").read_text()
    (tmp_path / "kept" / "meta.json").unlink()  # interrupted before the commit marker
    assert ActivationStore.open_persisted(tmp_path / "kept") is None
    with open(tmp_path / "kept" / "rows.f32", "ab") as f:
        f.write(b"\0" * 4)
    (tmp_path / "kept" / "meta.json").write_text(meta)
    assert ActivationStore.open_persisted(tmp_path / "kept") is None  # size does not match the rows: not trusted
