"""`replaceme prune MODEL --method NAME` for the registry methods, end to end on a tiny random model saved to disk."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_cli import tiny_dir  # noqa: F401 - the saved tiny model (8 Llama blocks, the packaged SmolLM2 tokenizer)

from replaceme_core import cli
from replaceme_core.io.models import tiny_random_model
from replaceme_core.merge import Replacement
from replaceme_core.methods import REGISTRY, Outcome, register
from replaceme_core.select import Run

TEXT = "\n\n".join(
    f"Note {i}: the lighthouse keeper wrote down the {i} ships that passed before the storm reached the harbour."
    for i in range(30)
)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def _args(model_dir, calib, out, method, *extra):
    return ["prune", str(model_dir), "--calib", str(calib), "--method", method, "--num-blocks", "2",
            "--out", str(out), "--quiet", *extra]


def _errors(capsys) -> list[str]:
    """Our error lines on stderr (transformers' own progress bars may share it)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _record(out):
    return json.loads((out / "replaceme.json").read_text())


def test_sleb_checkpoint_reloads_and_records_what_ran(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "sleb"
    assert cli.main(_args(tiny_dir, calib_file, out, "sleb", "--samples", "4", "--max-length", "24")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    rec = _record(out)
    assert model.config.num_hidden_layers == 6
    assert rec["method"] == "sleb" and rec["options"] == {"early_barrier": 1, "latter_barrier": 1}
    order = rec["method_record"]["removal_order"]
    assert rec["removed_blocks"] == sorted(order) and len(set(order)) == 2 and all(1 <= b <= 6 for b in order)
    assert rec["standard_checkpoint"] is True and rec["blocks_receiving_T"] == []
    assert rec["calibration"]["source"] == str(calib_file) and rec["calibration"]["samples"] == 4
    assert rec["calibration"]["max_length"] == 24 and rec["calibration"]["tokens"] > 0
    assert rec["paper_data_defaults"] == {"samples": 5, "max_length": 2048, "batch_size": 1}
    # the saved model is the original with those blocks deleted
    original, _ = tiny_random_model()
    from replaceme_core.arch import get_adapter

    get_adapter(original).delete_blocks(order)
    ids = torch.tensor([[5, 17, 23, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)


def test_paper_data_defaults_apply_when_not_given(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "taylor"
    args = _args(tiny_dir, calib_file, out, "shortened-taylor", "--option", "keep_first=1", "--option", "keep-last=1")
    assert cli.main(args) == 0
    rec = _record(out)
    assert rec["options"] == {"plus_heuristic": True, "keep_first": 1, "keep_last": 1}
    cal = rec["calibration"]
    assert (cal["samples"], cal["max_length"], cal["batch_size"]) == (10, 128, 10)  # Shortened LLaMA: 10 × 128, one batch
    assert all(1 <= b <= 6 for b in rec["removed_blocks"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6


def test_list_methods_names_every_method_with_paper_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prune", "--list-methods"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in ("block-influence", "sleb", "shortened-ppl", "shortened-taylor"):
        assert f"  {name}: " in text
    assert "arXiv 2402.09025" in text and "early_barrier=1" in text and "--samples 10, --max-length 128" in text


@pytest.mark.parametrize("extra,message", [
    (("--method", "nope"), "unknown depth-pruning method 'nope'"),
    (("--method", "sleb", "--option", "depth=2"), "takes no option depth"),
    (("--method", "sleb", "--option", "early_barrier=one"), "takes a int"),
    (("--method", "sleb", "--start", "3"), "--start is ReplaceMe's"),
    (("--method", "ls", "--option", "x=1"), "--option sets a registry method's"),
    (("--method", "sleb", "--num-blocks", "7"), "can remove at most 6 of 8 blocks, not 7"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_dir, calib_file, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    args = ["prune", str(tiny_dir), "--calib", str(calib_file), "--samples", "4", "--max-length", "16",
            "--num-blocks", "2", "--out", str(out), "--quiet", *extra]
    assert cli.main(args) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()


@pytest.fixture
def fake_separate_methods():
    """Two throw-away registry entries that keep a separate layer: one declared, one only in its outcome."""
    def fn(model, batches, num_blocks, options, progress):
        return Outcome(separate=[Replacement(Run(1, num_blocks), torch.eye(model.config.hidden_size))])

    register("test-separate-declared", summary="test", paper="test", standard_checkpoint=False)(fn)
    register("test-separate-undeclared", summary="test", paper="test")(fn)
    yield
    for name in ("test-separate-declared", "test-separate-undeclared"):
        REGISTRY.pop(name, None)


@pytest.mark.parametrize("name", ["test-separate-declared", "test-separate-undeclared"])
def test_a_separate_layer_is_refused_for_saving(tiny_dir, calib_file, tmp_path, capsys, fake_separate_methods, name):
    out = tmp_path / "sep"
    assert cli.main(_args(tiny_dir, calib_file, out, name, "--samples", "2", "--max-length", "8")) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "stock checkpoint cannot hold" in errors[0] and "cannot be saved" in errors[0]
    assert not out.exists()
