"""cost.measure: CodeCarbon offline, nothing written, emissions = energy × a fixed carbon intensity."""
import math
import os
import time

import pytest
import torch

from replaceme_core.experiments.cost import Measurement, measure


def _busy(seconds: float = 0.3) -> int:
    end = time.perf_counter() + seconds
    a = torch.randn(256, 256)
    k = 0
    while time.perf_counter() < end:
        a = torch.tanh(a @ a.T / 256)
        k += 1
    return k


def test_measure_returns_result_time_energy_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = measure(lambda: (time.sleep(0.2), "done")[1])
    assert isinstance(m, Measurement)
    result, seconds, energy, emissions, mode = m
    assert result == "done"
    assert seconds >= 0.2
    assert math.isfinite(energy) and energy >= 0
    assert math.isfinite(emissions) and emissions >= 0
    assert "cpu:" in mode and ("measured" in mode or "estimated" in mode)
    assert os.listdir(tmp_path) == []  # save_to_file=False: no emissions.csv, no lock file
    assert set(m.cost()) == {"seconds", "energy_kwh", "emissions_kg", "mode"}


def test_emissions_follow_the_country_intensity():
    # emissions = energy × intensity(country): the ratio is the same for two runs in one country and differs
    # between a low-carbon and a high-carbon grid
    a = measure(_busy, country_iso_code="FRA")
    b = measure(_busy, country_iso_code="FRA")
    c = measure(_busy, country_iso_code="POL")
    assert a.energy_kwh > 0 and b.energy_kwh > 0 and c.energy_kwh > 0
    ia, ib, ic = (m.emissions_kg / m.energy_kwh for m in (a, b, c))
    assert ia == pytest.approx(ib, rel=1e-6)
    assert ic > 2 * ia  # Poland's grid is far more carbon-intensive than France's


def test_more_work_costs_more_energy():
    short = measure(lambda: _busy(0.2))
    long = measure(lambda: _busy(1.0))
    assert long.seconds > short.seconds
    assert long.energy_kwh > short.energy_kwh


def test_bad_input_and_errors():
    with pytest.raises(ValueError, match="3-letter"):
        measure(lambda: 1, country_iso_code="Germany")
    with pytest.raises(ValueError, match="tracking_mode"):
        measure(lambda: 1, tracking_mode="gpu")

    def boom():
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        measure(boom)
