"""experiments.publish: executed notebooks for figures/notebooks/ keep results and drop what changes on every run."""
import json

from replaceme_core.experiments.publish import MAX_STREAM_LINES, publish


def executed(tmp_path, run: int):
    """A notebook as papermill leaves it; `run` changes only what differs between two executions."""
    nb = {
        "cells": [
            {"cell_type": "code", "id": f"random-{run}", "execution_count": 1, "source": ["figures_dir = \"/abs/repo/figures\"\n"],
             "metadata": {"tags": ["injected-parameters"], "papermill": {"duration": 0.1 * run}}, "outputs": []},
            {"cell_type": "code", "id": "c2", "execution_count": 2, "source": ["print('hi')\n"],
             "metadata": {"execution": {"iopub.status.busy": f"2026-12-0{run}"}, "papermill": {"start_time": str(run)}},
             "outputs": [
                 {"output_type": "stream", "name": "stderr", "text": [f"100%|███| took {run}s\n"]},
                 {"output_type": "stream", "name": "stdout", "text": ["wrote /abs/repo/figures/table2.md\n"]},
                 {"output_type": "stream", "name": "stderr", "text": ["warning\n"]},
                 # the kernel splits prints by timing: joined into one output; lm-eval's progress line dropped
                 *([{"output_type": "stream", "name": "stdout", "text": ["bootstrapping for stddev: perplexity\n", "n=4\n"]}]
                   if run == 1 else
                   [{"output_type": "stream", "name": "stdout", "text": ["n=4\n"]}]),
                 {"output_type": "display_data", "metadata": {"needs_background": "light"},
                  "data": {"image/png": "iVBORw0KGgo=", "application/pdf": "JVBERi0=", "text/plain": ["<Figure>"]}},
                 {"output_type": "display_data", "metadata": {},
                  "data": {"application/vnd.jupyter.widget-view+json": {"model_id": f"w{run}"}}},
                 {"output_type": "execute_result", "execution_count": 2, "metadata": {},
                  "data": {"text/html": ["<table/>"], "text/plain": ["   a\n0  1"]}},
             ]},
            {"cell_type": "code", "id": "c3", "execution_count": 3, "source": ["for i in range(999): print(i)\n"],
             "metadata": {}, "outputs": [{"output_type": "stream", "name": "stdout", "text": [f"{i}\n" for i in range(100)]}]},
            {"cell_type": "markdown", "id": "m1", "source": ["# Title"], "metadata": {}},
        ],
        "metadata": {"papermill": {"start_time": f"t{run}", "input_path": "/abs/repo/notebooks/x.ipynb"},
                     "widgets": {"state": run}, "kernelspec": {"name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    path = tmp_path / f"run{run}.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_publish_keeps_results_and_drops_volatile_parts(tmp_path):
    out = publish(executed(tmp_path, 1), tmp_path / "pub" / "x.ipynb", {"/abs/repo/figures": "../figures", "/abs/repo": ".."})
    nb = json.loads(out.read_text())
    inj, code, long, md = nb["cells"]
    assert inj["id"] == "injected-parameters" and inj["source"] == ["figures_dir = \"../figures\"\n"]
    assert "papermill" not in inj["metadata"] and "execution" not in code["metadata"]
    kinds = [(o["output_type"], o.get("name"), sorted(o.get("data", {}))) for o in code["outputs"]]
    assert kinds == [("stream", "stdout", []), ("display_data", None, ["image/png"]),
                     ("execute_result", None, ["text/html", "text/plain"])]
    assert code["outputs"][0]["text"] == ["wrote ../figures/table2.md\n", "n=4\n"]
    assert len(long["outputs"][0]["text"]) == MAX_STREAM_LINES + 1 and "40 more lines" in long["outputs"][0]["text"][-1]
    assert md["source"] == ["# Title"]
    assert "papermill" not in nb["metadata"] and "widgets" not in nb["metadata"] and nb["metadata"]["kernelspec"]


def test_two_runs_publish_the_same_bytes(tmp_path):
    swap = {"/abs/repo/figures": "../figures"}
    a = publish(executed(tmp_path, 1), tmp_path / "a.ipynb", swap).read_bytes()
    b = publish(executed(tmp_path, 2), tmp_path / "b.ipynb", swap).read_bytes()
    assert a == b


def test_publish_writes_atomically(tmp_path):
    out = publish(executed(tmp_path, 1), tmp_path / "x.ipynb")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"] == []
    assert json.loads(out.read_text())["nbformat"] == 4
