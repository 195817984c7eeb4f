"""Model-parallel capture through accelerate: a model dispatched with a device map (blocks split between the
CPU and disk offload, so accelerate's hooks load weights on the fly and move activations between "devices")
gives the same statistics and the same pruned model as the plain model."""
from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

from conftest import build_model, calib_batches, logits, make_batch, rel_err
from replaceme_core.prune import PruneConfig, calibrate, prune
from replaceme_core.select import Run

RUNS = [Run(2, 2), Run(1, 3), Run(4, 1)]


def _device_map(offload_embeddings: bool) -> dict:
    """Llama with 5 blocks: blocks 0, 2 run from CPU memory; 1, 3, 4 (and optionally the embeddings) from disk."""
    dm = {"model.embed_tokens": "disk" if offload_embeddings else "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
          "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": ("cpu" if i in (0, 2) else "disk") for i in range(5)})
    return dm


def _dispatched(tmp_path, offload_embeddings=False):
    model = dispatch_model(build_model("llama"), device_map=_device_map(offload_embeddings), offload_dir=str(tmp_path))
    assert hasattr(model.model.layers[1], "_hf_hook")  # accelerate's hooks are really in the path
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # weights live on disk
    return model


@pytest.mark.parametrize("offload_embeddings", [False, True])
def test_dispatched_model_gives_the_same_statistics(tmp_path, offload_embeddings):
    plain = calibrate(build_model("llama"), calib_batches(), distances=True, ls_runs=RUNS, progress=False)
    model = _dispatched(tmp_path, offload_embeddings)
    sharded = calibrate(model, calib_batches(), distances=True, ls_runs=RUNS, progress=False)
    assert sharded.tokens == plain.tokens
    for run in RUNS:
        assert sharded.ls[run].MtM.device.type == "cpu"  # accumulators on one real device, never on meta
        assert rel_err(sharded.ls[run].MtM, plain.ls[run].MtM) <= 1e-12
        assert rel_err(sharded.ls[run].MtR, plain.ls[run].MtR) <= 1e-12
    for key, value in plain.distances.state_dict()["sums"].items():
        assert rel_err(sharded.distances.state_dict()["sums"][key], value) <= 1e-12


def test_early_stop_leaves_the_dispatched_model_usable(tmp_path):
    model = _dispatched(tmp_path)
    batch = make_batch([9, 6])
    before = logits(model, batch)
    calibrate(model, calib_batches(), ls_runs=[Run(1, 1)], progress=False)  # stops inside block 1 (offloaded)
    assert model.model.layers[3].mlp.down_proj.weight.device.type == "meta"  # weights went back to disk
    assert rel_err(logits(model, batch), before) <= 1e-12


def test_prune_dispatched_model_matches_plain(tmp_path):
    cfg = PruneConfig(num_blocks=2, start=3)  # block 2 (in CPU memory) receives T; offloaded blocks 3, 4 go
    plain = prune(build_model("llama"), calib_batches(), cfg, progress=False)
    model = _dispatched(tmp_path)
    sharded = prune(model, calib_batches(), cfg, progress=False)
    assert rel_err(sharded.replacements[0].T, plain.replacements[0].T) <= 1e-12
    assert model.config.num_hidden_layers == 3
    batch = make_batch([9, 6])
    assert rel_err(logits(model, batch), logits(plain.model, batch)) <= 1e-10
