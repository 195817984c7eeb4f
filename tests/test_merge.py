"""Saved checkpoints: plain from_pretrained, same logits, KV-cache generation, record, shrunk config."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    GENERAL_FOLD_FAMILIES, blocks_of, build_model, calib_batches, logits, make_batch, reference_logits, rel_err,
)
from replaceme_core.arch import get_adapter
from replaceme_core.merge import Replacement, apply_replacements, save_checkpoint
from replaceme_core.prune import PruneConfig, prune
from replaceme_core.select import Run


def reload(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def check_generate(model):
    prompt = make_batch([6], seed=11)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=5)
    with torch.no_grad():
        with_cache = model.generate(**prompt, use_cache=True, **kw)
        without = model.generate(**prompt, use_cache=False, **kw)
    assert with_cache.shape == (1, 11)
    assert torch.equal(with_cache, without)
    # left-padded batch generation with the cache matches the texts generated one by one
    batch = make_batch([6, 3], padding="left", seed=12)
    with torch.no_grad():
        both = model.generate(**batch, use_cache=True, **kw)
        one = model.generate(input_ids=batch["input_ids"][1:, 3:], attention_mask=batch["attention_mask"][1:, 3:],
                             use_cache=True, **kw)
    assert torch.equal(both[1, 6:], one[0, 3:])


def check_layer_idx(model, family):
    for new_idx, block in enumerate(blocks_of(model, family)):
        idxs = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idxs <= {new_idx}


@pytest.mark.parametrize("family", GENERAL_FOLD_FAMILIES)
def test_saved_checkpoint_reloads_and_matches(family, tmp_path):
    original = build_model(family)
    model = build_model(family)
    L = len(blocks_of(model, family))
    batches = calib_batches(seed=1)
    res = prune(model, batches, PruneConfig(num_blocks=2), calibration_info={"source": "random"}, progress=False)
    (run,) = res.runs
    T = res.replacements[0].T
    out = save_checkpoint(model, None, tmp_path / "ckpt", res.record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    rec = json.loads((out / "replaceme.json").read_text())
    assert rec["method"] == "ls"
    assert rec["removed_blocks"] == run.removed and rec["blocks_receiving_T"] == [run.kept]
    assert rec["num_layers_before"] == L and rec["num_layers_after"] == L - 2
    assert rec["calibration"] == {"source": "random", "tokens": sum(int(b["attention_mask"].sum()) for b in batches)}
    assert rec["runs"][0]["relative_residual"] < rec["runs"][0]["identity_relative_residual"]
    assert {"versions", "timings", "seed", "config"} <= set(rec)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == L - 2
    assert "auto_map" not in cfg

    loaded = reload(out)
    assert len(blocks_of(loaded, family)) == L - 2
    check_layer_idx(model, family)
    check_layer_idx(loaded, family)
    batch = make_batch([7, 4, 6], seed=9)
    mask = batch["attention_mask"].bool()
    got = logits(loaded, batch)
    assert rel_err(got, logits(model, batch)) <= 1e-12
    # end to end: the saved model equals the original with block `kept` → Y + M·T and the run skipped
    expected = reference_logits(original, family, batch, [(run.kept, run.removed, T)])
    assert rel_err(got[mask], expected[mask]) <= 1e-5
    check_generate(loaded)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "falcon_parallel", "opt"])
def test_two_transforms_in_one_model(family, tmp_path):
    original = build_model(family)
    model = build_model(family)
    res = prune(model, calib_batches(seed=2), PruneConfig(num_blocks=2, num_transforms=2, start=[3, 1]),
                progress=False)
    assert res.runs == [Run(1, 1), Run(3, 1)]
    assert res.record["removed_blocks"] == [1, 3] and res.record["blocks_receiving_T"] == [0, 2]
    Ts = {r.run.kept: r.T for r in res.replacements}
    assert rel_err(Ts[0], Ts[2]) > 1e-3
    save_checkpoint(model, None, tmp_path / "m", res.record)
    loaded = reload(tmp_path / "m")
    batch = make_batch([8, 5], seed=4)
    mask = batch["attention_mask"].bool()
    expected = reference_logits(original, family, batch, [(0, [1], Ts[0]), (2, [3], Ts[2])])
    got = logits(loaded, batch)
    assert rel_err(got[mask], expected[mask]) <= 1e-5
    # swapping the two transforms gives something else: the order matters and is right
    swapped = reference_logits(original, family, batch, [(0, [1], Ts[2]), (2, [3], Ts[0])])
    assert rel_err(swapped[mask], expected[mask]) > 1e-4
    if family == "qwen2":
        types = original.config.layer_types
        assert loaded.config.layer_types == [types[i] for i in (0, 2, 4)]
    check_generate(loaded)


def test_two_transforms_chosen_by_selection_are_separated(tmp_path):
    model = build_model("llama", seed=5)
    res = prune(model, calib_batches(seed=3), PruneConfig(num_blocks=2, num_transforms=2, separated=True),
                progress=False)
    assert len(res.runs) == 2 and all(r.n == 1 for r in res.runs)
    assert not res.runs[0].touches(res.runs[1])
    assert res.record["num_layers_after"] == 3


@pytest.mark.parametrize("how", ["diagonal", "uidl", "cosine-diagonal"])
def test_gemma3_diagonal_and_uidl_checkpoints(how, tmp_path):
    family = "gemma3_text"
    original = build_model(family)
    model = build_model(family)
    types = list(original.config.layer_types)
    cfg = {
        "diagonal": PruneConfig(num_blocks=2, start=2, structure="diagonal"),
        "uidl": PruneConfig(num_blocks=2, method="uidl"),
        "cosine-diagonal": PruneConfig(num_blocks=2, start=2, method="cosine", structure="diagonal", epochs=2,
                                       lr=1e-2, batch_tokens=32),
    }[how]
    res = prune(model, calib_batches(seed=6), cfg, progress=False)
    (run,) = res.runs
    save_checkpoint(model, None, tmp_path / "g", res.record)
    loaded = reload(tmp_path / "g")
    kept = [i for i in range(6) if i not in run.removed]
    assert loaded.config.num_hidden_layers == 4
    assert loaded.config.layer_types == [types[i] for i in kept]
    check_layer_idx(loaded, family)
    batch = make_batch([7, 5], seed=8)
    mask = batch["attention_mask"].bool()
    T = res.replacements[0].T
    if how == "uidl":
        assert T is None and res.record["blocks_receiving_T"] == []
        T = torch.eye(32, dtype=torch.float64)
    else:
        assert torch.count_nonzero(T - torch.diag(torch.diagonal(T))) == 0
        assert res.record["blocks_receiving_T"] == [run.kept]
    expected = reference_logits(original, family, batch, [(run.kept, run.removed, T)])
    assert rel_err(logits(loaded, batch)[mask], expected[mask]) <= 1e-5
    check_generate(loaded)


def test_apply_replacements_rejects_touching_runs():
    model = build_model("llama")
    with pytest.raises(ValueError, match="touch"):
        apply_replacements(get_adapter(model), [Replacement(Run(1, 1)), Replacement(Run(2, 1))])
    assert len(model.model.layers) == 5


def test_existing_output_dir_is_refused_unless_overwrite(tmp_path):
    model = build_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(model, None, out, {"method": "ls"})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_checkpoint(model, None, out, {"method": "ls"}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "replaceme.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert rel_err(logits(reload(out), make_batch([4])), logits(model, make_batch([4]))) <= 1e-12


def test_failure_mid_save_leaves_nothing_behind(tmp_path):
    model = build_model("llama")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, BrokenTokenizer(), tmp_path / "out", {"method": "ls"})
    assert list(tmp_path.iterdir()) == []
    # an existing checkpoint survives a failed overwrite untouched
    save_checkpoint(model, None, tmp_path / "out", {"method": "first"})
    with pytest.raises(OSError):
        save_checkpoint(model, BrokenTokenizer(), tmp_path / "out", {"method": "second"}, overwrite=True)
    assert json.loads((tmp_path / "out" / "replaceme.json").read_text())["method"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unserialisable_record_leaves_nothing_behind(tmp_path):
    model = build_model("llama")

    class Weird:
        def __str__(self):
            raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        save_checkpoint(model, None, tmp_path / "o", {"x": Weird()})
    assert list(tmp_path.iterdir()) == []
