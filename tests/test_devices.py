"""No path assumes the CPU: what this machine can exercise of a GPU run. bfloat16 models (the GPU dtype) prune with
float64 sums and an exact float64 fold, an explicit device is honoured, the profile's `device` / `dtype` reach the
Workbench and VisionBench, half-precision healing still moves the weights, and non-persisted activation stores stay
bounded on disk."""
import copy

import pytest
import torch

from replaceme_core.arch import get_adapter
from replaceme_core.io.models import tiny_random_model
from replaceme_core.prune import PruneConfig, calibrate, prune
from replaceme_core.select import Run
from replaceme_core.separate import fit_separate
from replaceme_core.solve import IterativeConfig, full_batch_loss, minimize_mse_on_sums, solve_iterative, solve_ls
from replaceme_core.stats import ActivationStore

from conftest import build_model, calib_batches, rel_err


@pytest.fixture(scope="module")
def bf16_llama():
    return build_model("llama", seed=0, dtype=torch.bfloat16)


def test_bf16_model_prunes_with_float64_sums_and_fold(bf16_llama):
    model = copy.deepcopy(bf16_llama)
    batches = calib_batches(seed=1, n_batches=4)
    run = Run(2, 2)
    calib = calibrate(model, batches, ls_runs=[run], progress=False)
    st = calib.ls[run]
    assert st.MtM.dtype == st.MtR.dtype == st.RtR.dtype == torch.float64
    T = solve_ls(st)
    down = get_adapter(model).layers[run.kept].mlp.down_proj
    expected = (T.T @ down.weight.detach().double()).to(torch.bfloat16)  # the fold is computed in float64, then cast
    result = prune(model, batches, PruneConfig(num_blocks=2, start=2), calibration=calib, progress=False)
    assert torch.equal(down.weight, expected)
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())
    assert get_adapter(result.model).num_layers == 3
    assert result.replacements[0].T.dtype == torch.float64 and result.replacements[0].T.device.type == "cpu"
    with torch.no_grad():
        assert torch.isfinite(result.model(**batches[0]).logits.float()).all()


def test_bf16_fit_is_close_to_the_float32_fit(bf16_llama):
    """bf16 activations, float64 sums: the closed form barely moves against the same model run in float32."""
    batches = calib_batches(seed=1, n_batches=4)
    run = Run(2, 2)
    T16 = solve_ls(calibrate(bf16_llama, batches, ls_runs=[run], progress=False).ls[run])
    T32 = solve_ls(calibrate(copy.deepcopy(bf16_llama).float(), batches, ls_runs=[run], progress=False).ls[run])
    assert rel_err(T16, T32) < 0.05


def test_an_explicit_cpu_device_is_honoured(bf16_llama):
    batches = calib_batches(seed=2, n_batches=4)
    run = Run(2, 2)
    calib = calibrate(bf16_llama, batches, ls_runs=[run], store_runs=[run], stats_device="cpu", progress=False)
    try:
        assert calib.ls[run].device.type == "cpu"
        cfg = IterativeConfig(epochs=1, batch_tokens=16)
        T, _ = solve_iterative(calib.stores[run], cfg, device="cpu", progress=False)
        assert T.dtype == torch.float64 and T.device.type == "cpu"
        assert full_batch_loss(calib.stores[run], T, device="cpu") < full_batch_loss(calib.stores[run], torch.eye(T.shape[0]))
    finally:
        calib.close()
    T_mse, _ = minimize_mse_on_sums(calib.ls[run], "cg", max_iter=200, device="cpu")
    assert rel_err(T_mse, solve_ls(calib.ls[run])) < 1e-3
    a = prune(copy.deepcopy(bf16_llama), batches, PruneConfig(num_blocks=2, method="cosine", epochs=1, batch_tokens=16),
              stats_device="cpu", progress=False)
    b = prune(copy.deepcopy(bf16_llama), batches, PruneConfig(num_blocks=2, method="cosine", epochs=1, batch_tokens=16),
              progress=False)  # default: the model's device, the same here
    assert torch.equal(a.replacements[0].T, b.replacements[0].T)
    (rep,) = fit_separate(bf16_llama, batches, [run], "ls", stats_device="cpu", progress=False)
    assert rep.T.dtype == torch.float64 and rep.T.device.type == "cpu"


def test_store_batches_are_the_same_rows_in_the_same_order_on_a_device(tmp_path):
    store = ActivationStore(("M", "R"), 4, directory=tmp_path, chunk_rows=8)
    rows = torch.arange(21 * 8, dtype=torch.float32).reshape(21, 8)
    store.append(M=rows[:, :4], R=rows[:, 4:])
    store.finish()
    first = [b["M"] for b in store.batches(3, torch.Generator().manual_seed(0), device="cpu")]
    again = [b["M"] for b in store.batches(3, torch.Generator().manual_seed(0), device=torch.device("cpu"))]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert sorted(torch.cat(first)[:, 0].tolist()) == rows[:, 0].tolist()
    store.close()


def _tiny_profile(**over):
    prof = {"name": "tiny-bf16", "model": "tiny-random-llama", "dtype": "bfloat16", "device": "cpu", "num_blocks": 2,
            "calibration": {"source": "wiki", "samples": 12, "max_length": 48, "batch_size": 4, "seed": 0},
            "perplexity": {"source": "wiki", "samples": 4, "max_length": 32, "batch_size": 4},
            "eval": {"main": {"tasks": ["arc_easy"], "limit": 2, "batch_size": 4}},
            "cosine": {"epochs": 1, "lr": 1e-3, "batch_tokens": 64}}
    prof.update(over)
    return prof


def test_workbench_honours_the_profile_device_and_dtype(monkeypatch):
    import importlib

    ppl_mod = importlib.import_module("replaceme_core.evaluation.perplexity")  # the package re-exports the function
    runner = importlib.import_module("replaceme_core.evaluation.runner")
    from replaceme_core.experiments.workbench import Workbench

    wb = Workbench(_tiny_profile(), progress=False)
    p = next(wb.model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu"
    v = wb.prune("ls")
    assert all(q.dtype == torch.bfloat16 for q in v.model.parameters())
    runs = [Run(r["start"], r["n"]) for r in v.record["runs"]]
    assert all(st.MtM.dtype == torch.float64 and st.device.type == "cpu" for st in wb.stats(runs, distances=False).ls.values())
    seen = {}
    monkeypatch.setattr(runner, "evaluate", lambda model, **kw: seen.update(eval=kw["device"]) or {})
    monkeypatch.setattr(ppl_mod, "perplexity_many",
                        lambda models, tok, texts, **kw: seen.update(ppl=kw["device"]) or [{"ppl": 1.0}] * len(models))
    wb.evaluate(v.model)
    wb.perplexity(v.model)
    assert seen == {"eval": "cpu", "ppl": "cpu"}  # scored where the model is, never moved to another device
    assert next(Workbench(_tiny_profile(dtype="float32"), progress=False).model.parameters()).dtype == torch.float32


def test_vision_bench_honours_the_profile_device_and_dtype():
    from replaceme_core.experiments.vision_bench import VisionBench

    vision = {"model": "tiny-random-dinov2", "data": "fashion-mnist", "image_size": 56, "probe_images": 8,
              "calibration_images": 8, "test_images": 8, "batch_size": 8, "seed": 0}
    bench = VisionBench({"name": "v", "dtype": "bfloat16", "device": "cpu", "vision": vision}, progress=False)
    p = next(bench.model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu"
    assert bench.features(bench.model, "test").dtype == torch.float32
    own = VisionBench({"name": "v", "dtype": "bfloat16", "vision": {**vision, "dtype": "float32", "device": "cpu"}}, progress=False)
    assert next(own.model.parameters()).dtype == torch.float32  # the vision section's own keys win


def test_bf16_full_healing_moves_the_weights_like_float32():
    """An Adam step of lr 3e-5 is below half a bf16 ulp of these weights: stepping bf16 weights directly would leave
    them unchanged; with float32 master weights the bf16 model follows the float32 run."""
    from replaceme_core.experiments.healing import heal
    from replaceme_core.io.data import load_texts

    model, tok = tiny_random_model(seed=0)
    texts = load_texts("wiki", tok, 12, seed=1, split="train")
    cfg = {"mode": "full", "steps": 10, "batch_size": 2, "seq_len": 32, "lr": 3e-5, "seed": 0}
    w16 = copy.deepcopy(model).to(torch.bfloat16)
    before = get_adapter(w16).layers[1].mlp.down_proj.weight.detach().clone()
    out16 = heal(w16, tok, texts, cfg, progress=False).model
    out32 = heal(copy.deepcopy(model), tok, texts, cfg, progress=False).model
    after = get_adapter(out16).layers[1].mlp.down_proj.weight.detach()
    ref = get_adapter(out32).layers[1].mlp.down_proj.weight.detach()
    assert after.dtype == torch.bfloat16
    large = before.float().abs() > 0.02  # their bf16 ulp (1.2e-4 and up) is over 4 steps of 3e-5
    # measured: 0.75 / 0.53 of the weights moved, cosine 0.93 to the float32 run (bf16 Adam: 0.29 / 0.00, 0.51)
    assert (after != before).float().mean() > 0.5 and (after != before)[large].float().mean() > 0.3
    moved16, moved32 = (after.float() - before.float()), (ref - before.float())
    assert torch.nn.functional.cosine_similarity(moved16.flatten(), moved32.flatten(), dim=0) > 0.85
    assert 0.8 < float(moved16.norm() / moved32.norm()) < 1.25


def test_non_persisted_stores_keep_one_set_on_disk():
    from replaceme_core.experiments.workbench import Workbench

    wb = Workbench(_tiny_profile(persist_activation_stores=False), progress=False)
    a, b = Run(2, 2), Run(4, 2)
    first = wb.activation_stores([a])[a]
    assert first.path.exists() and wb.activation_stores([a])[a] is first  # the same set is shared while it lives
    second = wb.activation_stores([b])[b]
    assert second.path.exists() and not first.path.exists()  # the earlier set is deleted before the next capture
    twin = wb.with_texts(wb.texts[:8], "half")
    twin.activation_stores([a])
    assert not second.path.exists()  # siblings share the bound
    again = wb.activation_stores([a])[a]
    assert again.path.exists() and again.rows == first.rows
