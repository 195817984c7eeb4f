"""`replaceme prune` / `distances` end to end on a tiny random model saved to disk, and the Workbench cache."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from replaceme_core import cli
from replaceme_core.io.models import tiny_random_model
from replaceme_core.prune import Calibration, PruneConfig, calibrate, prune
from replaceme_core.select import Run

TEXT = "\n\n".join(
    f"Paragraph {i}: the river flows past the old mill, where {i} children once learned to fish and to count the boats."
    for i in range(40)
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = tiny_random_model()
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def _prune_args(model_dir, calib, out, *extra):
    return ["prune", str(model_dir), "--calib", str(calib), "--samples", "32", "--max-length", "48",
            "--batch-size", "8", "--num-blocks", "2", "--out", str(out), "--quiet", *extra]


def test_prune_writes_a_standard_checkpoint_and_record(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "pruned"
    assert cli.main(_prune_args(tiny_dir, calib_file, out)) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    record = json.loads((out / "replaceme.json").read_text())
    assert model.config.num_hidden_layers == 6
    assert len(record["removed_blocks"]) == 2
    run = record["runs"][0]
    assert record["blocks_receiving_T"] == [run["start"] - 1]
    assert record["removed_blocks"] == list(range(run["start"], run["start"] + 2))
    assert record["calibration"]["source"] == str(calib_file) and record["calibration"]["tokens"] > 0
    assert record["seed"] == 0 and "transformers" in record["versions"]
    ids = torch.tensor([[5, 17, 23, 99]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_prune_explicit_start_and_uidl(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "uidl"
    assert cli.main(_prune_args(tiny_dir, calib_file, out, "--start", "3", "--method", "uidl")) == 0
    record = json.loads((out / "replaceme.json").read_text())
    assert record["removed_blocks"] == [3, 4] and record["blocks_receiving_T"] == []


@pytest.mark.parametrize("extra, message", [
    (["--num-blocks", "0"], "positive"),
    (["--start", "9"], "out of range"),
    (["--num-blocks", "8"], "at most 7"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_dir, calib_file, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert cli.main(_prune_args(tiny_dir, calib_file, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_refused_unless_overwrite(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(_prune_args(tiny_dir, calib_file, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli.main(_prune_args(tiny_dir, calib_file, out, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "replaceme.json").exists()


def test_missing_calibration_file_is_a_clear_error(tiny_dir, tmp_path, capsys):
    assert cli.main(_prune_args(tiny_dir, tmp_path / "nope.txt", tmp_path / "o")) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_distances_csv_and_ranking(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "d.csv"
    args = ["distances", str(tiny_dir), "--calib", str(calib_file), "--samples", "16", "--max-length", "32", "--num-blocks", "2", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    rows = out.read_text().strip().splitlines()
    assert len(rows) == 9 and rows[0].startswith("layer,")
    matrix = torch.tensor([[float(v) for v in r.split(",")[1:]] for r in rows[1:]])
    assert torch.allclose(matrix, matrix.T) and torch.all(matrix.diagonal() == 0)
    assert "best start" in capsys.readouterr().out


def test_precomputed_calibration_gives_the_same_model():
    """prune(calibration=...) with cached statistics equals a prune that captures them itself."""
    model, _ = tiny_random_model()
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 1000, (4, 24)), "attention_mask": torch.ones(4, 24, dtype=torch.long)} for _ in range(3)]
    cfg = PruneConfig(num_blocks=2, method="ls")
    fresh = prune(tiny_random_model()[0], batches, cfg, progress=False)
    cands = [Run(s, 2) for s in range(1, 7)]
    pre = calibrate(model, batches, distances=True, ls_runs=cands, progress=False)
    reused = prune(model, batches, cfg, calibration=Calibration(distances=pre.distances, ls=pre.ls), progress=False)
    assert reused.runs == fresh.runs
    assert "selection_pass_s" not in reused.record["timings"] and "capture_pass_s" not in reused.record["timings"]
    for a, b in zip(reused.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_options_reach_the_solver_config():
    """--optimizer cg --max-iter reach PruneConfig and its IterativeConfig."""
    args = cli.build_parser().parse_args(["prune", "m", "--calib", "wiki", "--num-blocks", "2", "--out", "o", "--method", "cosine",
                   "--optimizer", "cg", "--max-iter", "7"])
    cfg = cli.prune_config_from_args(args)
    assert (cfg.optimizer, cfg.max_iter) == ("cg", 7)
    it = cfg.iterative()
    assert (it.optimizer, it.max_iter) == ("cg", 7)


def test_uidl_at_an_explicit_start_needs_no_calibration(tiny_dir, tmp_path):
    out = tmp_path / "uidl-nocalib"
    args = ["prune", str(tiny_dir), "--num-blocks", "2", "--start", "3", "--method", "uidl", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    record = json.loads((out / "replaceme.json").read_text())
    assert record["removed_blocks"] == [3, 4] and record["calibration"]["source"] is None
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6


def test_calibration_is_required_wherever_it_is_used(tiny_dir, tmp_path, capsys):
    for extra in ([], ["--method", "uidl"], ["--start", "3"]):  # LS needs data; UIDL without --start selects by data
        args = ["prune", str(tiny_dir), "--num-blocks", "2", "--out", str(tmp_path / "x"), "--quiet", *extra]
        assert cli.main(args) == 2
        assert "--calib is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_too_many_samples_are_refused_before_the_model_loads(tiny_dir, calib_file, tmp_path, monkeypatch, capsys):
    import replaceme_core.io.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = _prune_args(tiny_dir, calib_file, tmp_path / "x")
    args[args.index("--samples") + 1] = "41"  # the file holds 40 paragraphs
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "has only 40 samples" in err and "41 were requested" in err and len(err.strip().splitlines()) == 1


def test_an_unreachable_hub_id_fails_fast_with_one_line(tmp_path, monkeypatch, capsys):
    import time

    import replaceme_core.io.data as data

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing in the local hub cache
    for args in (["eval", "no-such-org/no-such-model", "--tasks", "piqa", "--limit", "2"],
                 ["prune", "no-such-org/no-such-model", "--num-blocks", "2", "--start", "3", "--method", "uidl",
                  "--out", str(tmp_path / "y")]):
        t0 = time.perf_counter()
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert time.perf_counter() - t0 < 10
        assert len(err.splitlines()) == 1 and "hub is unreachable" in err and "no-such-org/no-such-model" in err


def test_prune_with_ls_residual_selection(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "lsres"
    assert cli.main(_prune_args(tiny_dir, calib_file, out, "--selection", "ls-residual")) == 0
    run = json.loads((out / "replaceme.json").read_text())["runs"][0]
    assert 0 <= run["heldout_relative_residual"] and "distance" not in run
