"""Data-parallel calibration: 2 gloo processes on CPU give the single-process statistics and T (float64)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import build_model, calib_batches, rel_err
from replaceme_core import cli
from replaceme_core.distributed import calibrate_distributed, prune_distributed, shard, world
from replaceme_core.io.models import tiny_random_model
from replaceme_core.prune import PruneConfig, calibrate, prune
from replaceme_core.select import Run

RUNS = [Run(1, 2), Run(2, 2), Run(2, 1)]


def _batches():
    # 5 batches: the two ranks get 3 and 2 (uneven shards), > hidden size real tokens in total
    return calib_batches(seed=3, n_batches=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        assert world() == (rank, world_size)
        model = build_model("llama")
        calib = calibrate_distributed(model, _batches(), distances=True, ls_runs=RUNS, progress=False)
        result = prune_distributed(model, _batches(), PruneConfig(num_blocks=2), progress=False)
        state = {
            "tokens": calib.tokens,
            "distances": calib.distances.state_dict(),
            "ls": {(r.start, r.n): (calib.ls[r].MtM, calib.ls[r].MtR, calib.ls[r].RtR, calib.ls[r].tokens) for r in RUNS},
            "T": None if result is None else result.replacements[0].T,
            "runs": None if result is None else [(r.start, r.n) for r in result.runs],
            "record_tokens": None if result is None else result.record["calibration"]["tokens"],
        }
        torch.save(state, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shard_is_a_strided_partition():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for p in parts for x in p) == items


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = build_model("llama")
    single = calibrate(model, _batches(), distances=True, ls_runs=RUNS, progress=False)
    ref = prune(build_model("llama"), _batches(), PruneConfig(num_blocks=2), progress=False)

    for rank, state in enumerate(ranks):  # every rank holds the global sums
        assert state["tokens"] == single.tokens
        for r in RUNS:
            MtM, MtR, RtR, tokens = state["ls"][(r.start, r.n)]
            assert tokens == single.ls[r].tokens
            assert rel_err(MtM, single.ls[r].MtM) <= 1e-12
            assert rel_err(MtR, single.ls[r].MtR) <= 1e-12
            assert abs(float(RtR) / float(single.ls[r].RtR) - 1) <= 1e-12
        got = state["distances"]
        assert got["counts"] == single.distances.counts
        for key, value in single.distances.state_dict()["sums"].items():
            assert rel_err(got["sums"][key], value) <= 1e-12
    assert ranks[1]["T"] is None  # rank 0 solves
    assert ranks[0]["runs"] == [(r.start, r.n) for r in ref.runs]
    assert ranks[0]["record_tokens"] == ref.record["calibration"]["tokens"]
    assert rel_err(ranks[0]["T"], ref.replacements[0].T) <= 1e-10


def test_iterative_methods_are_refused():
    with pytest.raises(ValueError, match="closed-form"):
        prune_distributed(build_model("llama"), _batches(), PruneConfig(num_blocks=2, method="cosine"), progress=False)


def test_torchrun_entry_point_matches_replaceme_prune(tmp_path):
    model, tok = tiny_random_model()
    src = tmp_path / "model"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the river flows past the old mill where {i} children learned to fish."
                                 for i in range(40)))
    common = [str(src), "--calib", str(calib), "--samples", "24", "--max-length", "48", "--batch-size", "4",
              "--num-blocks", "2", "--dtype", "float64", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "replaceme_core.distributed", *common, "--out", str(tmp_path / "dp")],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert cli.main(["prune", *common, "--out", str(tmp_path / "single")]) == 0
    record = json.loads((tmp_path / "dp" / "replaceme.json").read_text())
    assert record["data_parallel"]["world_size"] == 2
    assert record["calibration"]["tokens"] == json.loads((tmp_path / "single" / "replaceme.json").read_text())["calibration"]["tokens"]
    dp, single = load_file(tmp_path / "dp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert dp.keys() == single.keys()
    for k in single:
        assert rel_err(dp[k].double(), single[k].double()) <= 1e-10, k
