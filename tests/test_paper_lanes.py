"""make paper's lanes: every notebook in exactly one lane, and the shipped profiles' lanes name the notebooks there are."""
from pathlib import Path

import pytest

from replaceme_core.experiments.paper import notebook_names, plan_lanes
from replaceme_core.experiments.workbench import load_profile

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_no_lanes_is_one_serial_lane():
    assert plan_lanes(None, ["00_a", "01_b"]) == [["00_a", "01_b"]]


def test_lanes_kept_in_the_given_order():
    assert plan_lanes([["00_a"], ["02_c", "01_b"]], ["00_a", "01_b", "02_c"]) == [["00_a"], ["02_c", "01_b"]]


@pytest.mark.parametrize("lanes, message", [
    ([["00_a"], ["01_b"]], "missing ['02_c']"),
    ([["00_a", "01_b"], ["02_c", "09_z"]], "unknown ['09_z']"),
    ([["00_a", "01_b"], ["02_c", "01_b"]], "listed twice ['01_b']"),
])
def test_a_lane_plan_that_misses_or_repeats_a_notebook_is_refused(lanes, message):
    with pytest.raises(ValueError, match="must list every notebook once") as err:
        plan_lanes(lanes, ["00_a", "01_b", "02_c"])
    assert message in str(err.value)


@pytest.mark.parametrize("profile", ["cpu", "smoke", "gpu", "paper"])
def test_shipped_profiles_plan_every_notebook(profile):
    names = notebook_names(NOTEBOOKS)
    lanes = plan_lanes(load_profile(profile).get("lanes"), names)
    assert sorted(n for lane in lanes for n in lane) == names
    if load_profile(profile).get("lanes"):
        assert lanes[0] == ["00_tutorial"]  # it fills the shared caches before the lanes fan out


def test_timing_log_appends_one_line_per_call_only_when_asked(tmp_path, monkeypatch):
    import json

    from replaceme_core.experiments.workbench import _timed

    class Bench:
        @_timed("evaluate")
        def evaluate(self, model, suite="main", **kw):
            return (model, suite)

    log = tmp_path / "timing.jsonl"
    monkeypatch.delenv("REPLACEME_TIMING_LOG", raising=False)
    assert Bench().evaluate("m", "window") == ("m", "window") and not log.exists()
    monkeypatch.setenv("REPLACEME_TIMING_LOG", str(log))
    monkeypatch.setenv("REPLACEME_NOTEBOOK", "02_x")
    assert Bench().evaluate(object(), "window", limit=3)[1] == "window"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["notebook"] == "02_x" and rows[0]["op"] == "evaluate" and rows[0]["detail"] == ["window", "limit=3"]
    assert rows[0]["seconds"] >= 0


def test_every_notebook_cell_carries_an_id():
    """nbformat warns (MissingIDFieldWarning, soon an error) for a cell without an id: every source notebook has them,
    unique within the notebook."""
    import json
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        ids = [c.get("id") for c in cells]
        assert all(ids), f"{path.name}: a cell has no id (nbformat.validator.normalize adds them)"
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"
