"""LLM-Streamline (replaceme_core/methods/streamline.py): selection, training with the causal mask, stock checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, calib_batches, logits, make_batch
from transformers import AutoModelForCausalLM

from replaceme_core.arch import UnsupportedModelError
from replaceme_core.merge import save_checkpoint
from replaceme_core.methods import get_method
from replaceme_core.methods.apply import run_method
from replaceme_core.methods.streamline import capture_window, layer_forward, streamline

LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3"]
FAST = {"steps": 20, "lr": 3e-3, "val_fraction": 0.0}  # tiny data: no held-out sequence, keep the last state


def own_inputs_outputs(model, batch):
    """Block inputs and outputs from our own hooks on model.model.layers (no output_hidden_states)."""
    layers = model.model.layers
    ins, outs, handles = {}, {}, []
    for i, layer in enumerate(layers):
        def pre(_m, args, kwargs, i=i):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        def post(_m, _a, out, i=i):
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    try:
        logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def hand_scores(model, batches, n):
    L = len(model.model.layers)
    per_seq = {j: [] for j in range(L - n)}
    for batch in batches:
        ins, outs = own_inputs_outputs(model, batch)
        mask = batch["attention_mask"].bool()
        for j in per_seq:
            for r in range(mask.shape[0]):
                a, b = ins[j][r][mask[r]], outs[j + n][r][mask[r]]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
                per_seq[j].append(float((0.5 + 0.5 * cos).mean()))
    return {j: sum(v) / len(v) for j, v in per_seq.items()}


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_selection_equals_hand_computation(n, padding):
    model = build_model("llama", seed=3)
    batches = calib_batches(seed=1, padding=padding)
    expected = hand_scores(model, batches, n)
    res = run_method(model, batches, "streamline", n, options={"steps": 0}, progress=False)
    rec = res.record["method_record"]
    got = {int(k): v for k, v in rec["scores"].items()}
    assert sorted(got) == list(range(0, 5 - n))  # j = 0 (the embeddings as input) … L−n−1
    for j in expected:
        assert got[j] == pytest.approx(expected[j], abs=1e-10)
    j = max(expected, key=lambda k: (expected[k], -k))
    assert rec["window"] == [j, j + n] and rec["replacement_layer"] == j
    assert res.record["removed_blocks"] == list(range(j + 1, j + n + 1))
    assert res.record["num_layers_after"] == 5 - n
    assert rec["label"] == "LLM-Streamline (None)" and rec["training"]["optimizer_steps"] == 0


def test_selection_window_may_start_at_block_zero():
    """Window 0 … n compares the embeddings with block n's output; make it the most similar by shrinking the
    residual updates of blocks 0 … 1, so the rule must be able to pick j = 0."""
    model = build_model("llama", seed=0)
    with torch.no_grad():
        for i in (0, 1):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    res = run_method(model, calib_batches(), "streamline", 1, options={"steps": 0}, progress=False)
    assert res.record["method_record"]["window"] == [0, 1]
    assert res.record["removed_blocks"] == [1]


def _window_mse(model, batches, j, n, block_out_model=None):
    """MSE over real tokens between block j's output (in `block_out_model`, default the original) on the original
    input of block j and the original output of block j+n."""
    total, count = 0.0, 0
    for batch in batches:
        ins, outs = own_inputs_outputs(model, batch)
        probe = block_out_model if block_out_model is not None else model
        _, new_outs = own_inputs_outputs(probe, batch)
        mask = batch["attention_mask"].bool()
        err = ((new_outs[j] - outs[j + n]) ** 2).sum(-1)[mask]
        total, count = total + float(err.sum()), count + int(mask.sum()) * outs[j].shape[-1]
    return total / count


@pytest.mark.parametrize("padding", ["right", "left"])
def test_training_loss_falls(padding):
    model = build_model("llama", seed=1)
    original = build_model("llama", seed=1)
    batches = calib_batches(seed=2, padding=padding)
    res = run_method(model, batches, "streamline", 2, options={**FAST, "start": 2}, progress=False)
    tr = res.record["method_record"]["training"]
    assert tr["train_mse_after"] < 0.5 * tr["train_mse_before"]
    assert tr["train_loss_curve"][-1] < tr["train_loss_curve"][0]
    assert tr["optimizer_steps"] == 20 and len(tr["train_loss_curve"]) == 20
    # independently, with our own hooks: block 1 (kept, new weights) now maps the window's input closer to block 3's
    # output than the original block 1 did (blocks before it are unchanged, so its input is the same)
    before = _window_mse(original, batches, 1, 2)
    after = _window_mse(original, batches, 1, 2, block_out_model=model)
    assert after < 0.5 * before


def _trained_block(model, batches, **opts):
    run_method(model, batches, "streamline", 2, options={**FAST, "start": 2, **opts}, progress=False)
    return {k: v.clone() for k, v in model.model.layers[1].state_dict().items()}


def test_causal_mask_changes_training():
    batches = calib_batches(seed=2)
    causal = _trained_block(build_model("llama", seed=1), batches)
    bidirectional = _trained_block(build_model("llama", seed=1), batches, causal=False)
    diff = max(float((causal[k] - bidirectional[k]).abs().max()) for k in causal)
    assert diff > 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False])
def test_training_forward_is_causal(attn, padded):
    """The layer as the training loop calls it: outputs at t < 6 ignore a change of the inputs at t ≥ 6 under the
    model's mask, and see it with causal=False (so the check itself can fail)."""
    model = build_model("llama", seed=1)
    model.config._attn_implementation = attn
    batch = make_batch([12, 9, 12] if padded else [12, 12], seed=4)
    data, _ = capture_window(model, [batch], 1, 2, torch.float64)
    wb = data[0]
    assert (wb.attention_mask is None) == (attn == "sdpa" and not padded)
    layer = model.model.layers[1]
    idx = torch.arange(wb.rows)
    before = {c: layer_forward(layer, wb, idx, causal=c).detach() for c in (True, False)}
    wb.x[:, 6:] += torch.randn_like(wb.x[:, 6:])
    after = {c: layer_forward(layer, wb, idx, causal=c).detach() for c in (True, False)}
    real = wb.real[:, :6]
    assert torch.allclose(before[True][:, :6][real], after[True][:, :6][real], atol=1e-12)
    assert not torch.allclose(before[False][:, :6][real], after[False][:, :6][real], atol=1e-6)
    assert not torch.allclose(before[True][:, 6:], after[True][:, 6:], atol=1e-6)


def test_pruned_model_is_causal():
    model = build_model("llama", seed=1)
    run_method(model, calib_batches(), "streamline", 2, options=FAST, progress=False)
    batch = make_batch([12, 12], seed=5)
    a = logits(model, batch)
    batch["input_ids"][:, 8:] = (batch["input_ids"][:, 8:] + 7) % 120 + 3
    b = logits(model, batch)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-12)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-6)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_saves_and_reloads_identical(family, tmp_path):
    model = build_model(family, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_method(model, calib_batches(), "streamline", 2, options=FAST, progress=False)
    j = res.record["method_record"]["replacement_layer"]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert type(model.model.layers[j]).__name__.endswith("DecoderLayer")
    # block j carries trained weights; the blocks before it are untouched; the ones after it are shifted originals
    changed = [k for k, v in model.model.layers[j].state_dict().items()
               if not torch.equal(v, before[f"model.layers.{j}.{k}"])]
    assert changed
    for i in range(j):
        for k, v in model.model.layers[i].state_dict().items():
            assert torch.equal(v, before[f"model.layers.{i}.{k}"])
    for new_i in range(j + 1, 3):
        old_i = new_i + 2
        for k, v in model.model.layers[new_i].state_dict().items():
            assert torch.equal(v, before[f"model.layers.{old_i}.{k}"])
    out = save_checkpoint(model, None, tmp_path / "pruned", res.record)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    batch = make_batch([12, 7, 10], seed=9)
    assert torch.equal(logits(model, batch), logits(reloaded, batch))
    saved = json.loads((out / "replaceme.json").read_text())
    assert saved["method"] == "streamline" and saved["method_record"]["replacement_layer"] == j
    assert saved["method_record"]["training"]["optimizer_steps"] == 20


@pytest.mark.parametrize("family,seed,untrained", [("qwen3", 2, True), ("llama", 2, False)])
def test_best_validation_state_is_kept(family, seed, untrained):
    """With held-out sequences the returned layer is the state of lowest validation MSE, the untrained one included
    (qwen3: the 11 training sequences overfit and the validation MSE only rises; llama: it is lowest mid-way)."""
    model = build_model(family, seed=seed)
    original = build_model(family, seed=seed)
    batches = calib_batches()
    res = run_method(model, batches, "streamline", 2, options={"steps": 20, "lr": 3e-3}, progress=False)
    rec = res.record["method_record"]
    tr, j = rec["training"], rec["replacement_layer"]
    curve = [v for _, v in tr["val_curve"]]
    assert tr["val_sequences"] == 1 and len(curve) >= 2
    assert tr["val_mse_best"] == min([tr["val_mse_before"]] + curve)
    assert tr["best_state"].startswith("untrained") == untrained
    if not untrained:
        assert tr["val_mse_best"] < curve[-1]  # the best state is not the last one
    # our own hooks on the held-out sequence: the returned block j's MSE there is the recorded best
    (b, r), = tr["held_out"]
    one = {k: v[r:r + 1] for k, v in batches[b].items()}
    assert _window_mse(original, [one], j, 2, block_out_model=model) == pytest.approx(tr["val_mse_best"], rel=1e-9)


def test_half_precision_model_trains_in_float32():
    model = build_model("llama", seed=1, dtype=torch.bfloat16)
    res = run_method(model, calib_batches(), "streamline", 1, options={"steps": 3, "start": 2}, progress=False)
    rec = res.record["method_record"]
    assert rec["train_dtype"] == "float32"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(logits(model, make_batch([12, 7], seed=3)).float()).all()


def test_deterministic_under_seed():
    batches = calib_batches(seed=2)
    opts = {"steps": 6, "lr": 3e-3, "batch_size": 2, "start": 2}
    a = _trained_block(build_model("llama", seed=1), batches, **opts)
    b = _trained_block(build_model("llama", seed=1), batches, **opts)
    c = _trained_block(build_model("llama", seed=1), batches, **opts, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_record_labels_budget_and_defaults():
    method = get_method("streamline")
    assert method.defaults["lr"] == 2e-4 and method.defaults["min_lr"] == 5e-5
    assert method.defaults["weight_decay"] == 1e-3 and method.defaults["batch_size"] == 8
    assert method.defaults["steps"] == 200 and method.defaults["causal"] is True
    model = build_model("llama", seed=1)
    batches = calib_batches(seed=2, n_batches=4)  # 16 sequences: 2 held out at val_fraction 0.1
    res = run_method(model, batches, "streamline", 1, options={"steps": 7, "batch_size": 3, "grad_accum": 2},
                     progress=False)
    rec = res.record["method_record"]
    tr = rec["training"]
    assert rec["label"] == "LLM-Streamline (MSE, 7 steps)" and rec["causal_mask"] is True
    assert tr["optimizer_steps"] == 7 and tr["micro_batches"] == 14
    assert tr["val_sequences"] == 2 and tr["train_sequences"] == 14
    assert tr["train_tokens"] < sum(int(b["attention_mask"].sum()) for b in batches)
    assert rec["passes"] == 2 and res.record["options"]["steps"] == 7
    # steps=None: the paper's rule, `epochs` passes over the training sequences
    model = build_model("llama", seed=1)
    res = run_method(model, batches, "streamline", 1, options={"steps": None, "epochs": 2, "batch_size": 2},
                     progress=False)
    tr = res.record["method_record"]["training"]
    assert tr["epochs_seen"] == 2.0 and tr["optimizer_steps"] == tr["micro_batches"]


def test_bad_input_one_clear_line():
    model = build_model("llama")
    with pytest.raises(ValueError, match="cannot remove 5 blocks") as e:
        run_method(model, calib_batches(), "streamline", 5, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot remove 5 blocks net") as e:
        streamline(model, calib_batches(), 5, {}, False)
    with pytest.raises(ValueError, match="start 4 is out of range") as e:
        run_method(model, calib_batches(), "streamline", 2, options={"start": 4}, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedModelError, match="model type 'gpt2' is not supported") as e:
        run_method(build_model("gpt2"), calib_batches(), "streamline", 1, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        run_method(build_model("phi3"), calib_batches(), "streamline", 1, progress=False)
    with pytest.raises(ValueError, match="takes no option"):
        run_method(model, calib_batches(), "streamline", 1, options={"learning_rate": 1.0}, progress=False)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        run_method(model, calib_batches(), "streamline", 1, options={"batch_size": 0}, progress=False)
    assert len(model.model.layers) == 5  # nothing was removed by a refused call
