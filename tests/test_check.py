"""The offline profile check (experiments/check/): every shipped profile passes it, and each kind of mistake it
exists for fails it with one clear line — a key a notebook reads, an lm-eval task name, a model family, a dataset field."""
import io
import json
import socket

import pytest
import yaml

from replaceme_core.experiments import check
from replaceme_core.experiments.workbench import load_profile


def run(profile, **kw):
    out = io.StringIO()
    rc = check.run_check(profile, out=out, **kw)
    return rc, out.getvalue()


def as_file(tmp_path, profile: dict, name="variant.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu", "paper"])
def test_every_profile_passes(name):
    rc, text = run(name)
    assert rc == 0, text
    assert f"[check] profile {name}: OK" in text
    assert "GPU estimate per notebook" in text and "rule: GPU time = forward tokens × 2 × parameters" in text


def test_paper_lists_its_downloads_and_gpu_downloads_nothing():
    _, paper = run("paper")
    assert "model   meta-llama/Meta-Llama-3-8B-Instruct: llama, 32 blocks" in paper and "≈16.1 GB" in paper
    assert "dataset Open-Orca/SlimOrca" in paper and "dataset EleutherAI/race" in paper
    _, gpu = run("gpu")
    assert "would download from the Hugging Face hub: nothing" in gpu


def test_the_cli_flag_runs_the_check_and_no_notebook(capsys):
    from replaceme_core.experiments.paper import main

    assert main(["--profile", "smoke", "--check"]) == 0
    assert "[check] profile smoke: OK" in capsys.readouterr().out


def test_a_key_a_notebook_reads_is_missing(tmp_path):
    prof = load_profile("paper")
    del prof["objectives_and_solvers"]["mse_reference"]
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1
    assert "profile paper: notebook 05 reads objectives_and_solvers.mse_reference, which the profile lacks" in text.splitlines()


def test_keys_read_through_a_suite_name_and_per_list_element(tmp_path):
    prof = load_profile("cpu")
    prof["objectives_and_solvers"]["suite"] = "fast"           # notebook 05 reads wb.profile["eval"][P["suite"]]
    del prof["10_models_and_scale"]["models"][1]["table_blocks"]  # notebook 10: for m in cfg["models"]: m["table_blocks"]
    rc, text = run(as_file(tmp_path, prof))
    lines = text.splitlines()
    assert rc == 1
    assert "profile cpu: notebook 05 reads eval.fast, which the profile lacks" in lines
    assert "profile cpu: notebook 10 reads 10_models_and_scale.models[1].table_blocks, which the profile lacks" in lines


def test_optional_reads_are_not_required(tmp_path):
    prof = load_profile("cpu")
    assert "adam_fast_lr" not in prof["objectives_and_solvers"]   # notebook 05: `if P.get("adam_fast_lr")`
    del prof["selection_sweep"]                                      # notebook 03: wb.profile.get("selection_sweep", {...})
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 0, text


def test_an_unknown_task_name(tmp_path):
    prof = load_profile("cpu")
    prof["eval"]["main"]["tasks"].append("hellaswag_v9")
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1
    assert "profile cpu: eval.main lists task 'hellaswag_v9', which evaluation/suite.py TASKS does not define" in text


def test_a_suite_task_that_lm_eval_does_not_have(monkeypatch):
    from replaceme_core.evaluation import suite

    monkeypatch.setitem(suite.TASKS, "race", suite.TaskSpec("race_v9", "acc", 0, None))
    rc, text = run("paper")
    assert rc == 1
    assert "profile paper: eval.main: task race maps to lm-eval task 'race_v9', which lm-eval 0.4.13 does not have" in text


def test_a_metric_the_lm_eval_task_does_not_compute(monkeypatch):
    from replaceme_core.evaluation import suite

    monkeypatch.setitem(suite.TASKS, "race", suite.TaskSpec("race", "acc_norm", 0, None))
    rc, text = run("paper")
    assert rc == 1 and "task race reports metric 'acc_norm', but lm-eval's race computes acc" in text


def test_a_hub_model_of_an_unsupported_family(tmp_path, monkeypatch):
    monkeypatch.setitem(check.HUB_MODELS, "acme/encoder-12L", check.HubModel("bert", 12, 768, 0.11e9, 0.44, False))
    prof = load_profile("paper")
    prof["10_models_and_scale"]["models"][0]["model"] = "acme/encoder-12L"
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1
    assert ("profile paper: 10_models_and_scale.models[0]: acme/encoder-12L is a 'bert' model, a family "
            "replaceme_core/arch.py does not support") in text


def test_hub_ids_that_are_malformed_or_undocumented(tmp_path):
    prof = load_profile("paper")
    prof["model"] = "meta-llama/Meta Llama 3"
    prof["10_models_and_scale"]["models"][0]["model"] = "acme/unknown-7b"
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1
    assert "not a packaged model, a local directory or a valid hub repo id" in text
    assert "hub model acme/unknown-7b has no documented model_type in experiments/check/facts.py HUB_MODELS" in text


def test_more_blocks_than_the_model_has(tmp_path):
    prof = load_profile("paper")
    prof["10_models_and_scale"]["models"][0]["table_blocks"] = [16]   # Llama-3.2-1B has 16 blocks
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1 and "cannot remove 16 of the 16 blocks of meta-llama/Llama-3.2-1B-Instruct (at most 15)" in text


def test_a_slimorca_loader_reading_the_wrong_field(monkeypatch):
    """The usual mistake: OpenAI-style `role`/`content` turns instead of SlimOrca's ShareGPT `from`/`value`."""
    from replaceme_core.io import data

    def wrong(tokenizer, n, chat):
        rows = data._hub_rows("Open-Orca/SlimOrca", None, "train", n + 8, "Open-Orca/SlimOrca")
        texts = []
        for row in rows:
            conv = row.get("conversations") or []
            turns = {t.get("role"): t.get("content") for t in conv}
            if "user" in turns and "assistant" in turns:
                texts.append(data.render_pair(turns["user"], turns["assistant"], tokenizer, chat))
        if len(texts) < n:
            raise data._too_few("Open-Orca/SlimOrca", n, len(texts))
        return texts[:n]

    monkeypatch.setattr(data, "_orca_texts", wrong)
    rc, text = run("cpu")   # the loaders are checked for every profile, not only those that use the hub
    assert rc == 1
    assert ("profile cpu: io/data.py loader for Open-Orca/SlimOrca reads field 'conversations[].role', which the dataset "
            "card does not document (documented: conversations, conversations[].from, conversations[].value, "
            "conversations[].weight)") in text.splitlines()


def test_a_loader_comparing_a_field_with_an_undocumented_value(monkeypatch):
    from replaceme_core.io import data

    def wrong(tokenizer, n, chat):
        rows = data._hub_rows("Open-Orca/SlimOrca", None, "train", n + 8, "Open-Orca/SlimOrca")
        return [row["conversations"][1]["value"] for row in rows if row["conversations"][1]["from"] == "user"][:n] or ["x"] * n

    monkeypatch.setattr(data, "_orca_texts", wrong)
    rc, text = run("smoke")
    assert rc == 1 and "compares field 'conversations[].from' with 'user', a value the dataset card does not list" in text


def test_a_hub_source_with_an_undocumented_config(monkeypatch):
    from replaceme_core.io import data

    monkeypatch.setitem(data.HUB_SOURCES, "HuggingFaceFW/fineweb", ("text", "HuggingFaceFW/fineweb", "sample-5BT"))
    rc, text = run("smoke")
    assert rc == 1 and "loads HuggingFaceFW/fineweb with config 'sample-5BT', which its card does not list" in text


def test_a_notebook_without_a_parameters_cell(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": "profile = 'cpu'\n"}], "metadata": {},
          "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "00_plain.ipynb").write_text(json.dumps(nb))
    rc, text = run("smoke", notebooks_dir=tmp_path)
    assert rc == 1
    assert ("profile smoke: notebook 00 cannot take the profile's parameters: it has no cell tagged `parameters` "
            "(papermill cannot pass the profile)") in text


def test_more_samples_than_a_packaged_corpus_holds(tmp_path):
    prof = load_profile("gpu")
    prof["calibration_data"]["sizes"] = [1000, 20000]
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1 and "calibration_data sizes (20000) asks for 20000 samples of olmo-instructions (train split)" in text


def test_the_vision_setting_the_notebook_cannot_load(tmp_path):
    prof = load_profile("paper")
    prof["vision"] = prof["vision_paper_setting"]
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1 and "vision.data 'clip-benchmark' is not an image set VisionBench can load" in text


def test_a_wrong_type(tmp_path):
    prof = load_profile("cpu")
    prof["calibration"]["samples"] = "128"
    prof["eval"]["main"]["limit"] = 0
    rc, text = run(as_file(tmp_path, prof))
    lines = text.splitlines()
    assert rc == 1
    assert "profile cpu: calibration.samples is '128', expected a positive integer" in lines
    assert "profile cpu: eval.main.limit is 0, expected null, a positive integer or a fraction in (0, 1)" in lines


def test_no_network_refuses_connections_and_restores_everything(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = socket.create_connection
    with check.no_network():
        with pytest.raises(check.NetworkUsed):
            socket.create_connection(("huggingface.co", 443), timeout=1)
        with pytest.raises(check.NetworkUsed):
            socket.getaddrinfo("huggingface.co", 443)
        import os

        assert os.environ["HF_HUB_OFFLINE"] == "1"
    import os

    assert socket.create_connection is before and "HF_HUB_OFFLINE" not in os.environ


def test_the_scan_follows_aliases_loops_and_guards(tmp_path):
    code = "\n".join([
        "wb = Workbench(profile)",
        "P = wb.profile['sec']",
        "x = P['a'] + wb.profile.get('opt', 3)",
        "if P.get('maybe'):",
        "    y = P['maybe']",
        "for m in P['items']:",
        "    print(m['name'])",
        "    z = {'k': m['only_some']} if 'only_some' in m else {}",
        "for mode in ('lt', 'full'):",
        "    c = wb.profile['heal'][mode]",
        "res = wb.evaluate(model, P['suite'])",
        "other = {'profile': 1}['profile']",
    ])
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "profile = 'cpu'\nfigures_dir = '.'"},
                    {"cell_type": "code", "metadata": {}, "source": code}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "99_scan.ipynb"
    path.write_text(json.dumps(nb))
    reads = check.scan_notebook(path)
    profile = {"sec": {"a": 1, "items": [{"name": "x"}, {}], "suite": "s"}, "heal": {"lt": {}}, "eval": {}}
    missing = sorted(filter(None, (check._missing(profile, steps) for steps in reads)))
    assert missing == ["eval.s", "heal.full", "sec.items[1].name"]


def test_a_model_too_large_for_one_gpu(tmp_path):
    """The 70B of Table 9, which paper.yaml had: a Workbench holds it and a pruned copy on one device."""
    prof = load_profile("paper")
    prof["10_models_and_scale"]["models"].append(
        {"model": "meta-llama/Meta-Llama-3-70B-Instruct", "sweep_blocks": [10, 20, 30], "table_blocks": [20, 30]})
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1
    assert ("profile paper: meta-llama/Meta-Llama-3-70B-Instruct: its weights (141 GB) and the pruned copy a Workbench "
            "makes do not fit one 141 GB GPU") in text


def test_healing_settings_go_through_the_healing_code(tmp_path):
    prof = load_profile("gpu")
    prof["healing"]["full"]["learning_rate"] = 1e-5
    rc, text = run(as_file(tmp_path, prof))
    assert rc == 1 and "profile gpu: healing.full: unknown healing options ['learning_rate']" in text
