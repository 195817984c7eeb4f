"""Wall time, energy and CO2 of one piece of work, measured with CodeCarbon (the paper used CodeCarbon 2.4.1).

`measure(fn)` runs `fn()` inside CodeCarbon's *offline* tracker: no network, nothing written to disk, a fixed
country code for the carbon intensity (emissions are energy × that intensity, so ratios of emissions between
runs on one machine equal ratios of energy). How the energy is obtained depends on the hardware, and the result
says which way it was:

* GPUs through NVML and CPUs through Intel RAPL (or similar counters) are **measured**;
* a CPU without readable power counters (most VMs and containers) is **estimated**: CodeCarbon multiplies a TDP
  constant by the CPU load. We track the *process* (its own CPU time and memory), so on a machine shared with
  other jobs the estimate follows this work's CPU time, not the whole machine's load.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

__all__ = ["Measurement", "measure", "describe_mode"]


@dataclass
class Measurement:
    """What `measure` returns: the function's result and the cost of computing it."""

    result: Any
    seconds: float
    energy_kwh: float
    emissions_kg: float
    mode: str  # how the energy was obtained, e.g. "cpu: estimated (TDP 85 W × process CPU load); ram: estimated"

    def cost(self) -> dict:
        """The cost fields only (JSON-friendly), without the result."""
        d = asdict(self)
        d.pop("result")
        return d

    def __iter__(self):  # (result, seconds, energy_kwh, emissions_kg, mode) = measure(fn)
        return iter((self.result, self.seconds, self.energy_kwh, self.emissions_kg, self.mode))


_MEASURED = {"intel_rapl": "RAPL counters", "intel_power_gadget": "Intel Power Gadget", "apple_powermetrics": "powermetrics",
             "windows_emi": "Windows EMI"}


def describe_mode(tracker) -> str:
    """Say, per hardware component CodeCarbon tracks, whether its energy is measured or estimated (and from what)."""
    parts = []
    for hw in getattr(tracker, "_hardware", []) or []:
        kind = type(hw).__name__
        mode = getattr(hw, "_mode", None)
        if kind == "CPU":
            tdp = getattr(hw, "_tdp", None)
            if mode in _MEASURED:
                parts.append(f"cpu: measured ({_MEASURED[mode]})")
            elif mode == "cpu_load":
                parts.append(f"cpu: estimated (TDP {tdp} W × {getattr(hw, '_tracking_mode', 'machine')} CPU load)")
            elif mode == "constant":
                parts.append(f"cpu: estimated (constant share of TDP {tdp} W)")
            else:
                parts.append(f"cpu: {mode or 'unknown mode'}")
        elif kind == "GPU":
            parts.append("gpu: measured (NVML)")
        elif kind == "RAM":
            parts.append("ram: estimated (from memory size)")
        else:
            parts.append(f"{kind.lower()}: {mode or 'tracked'}")
    return "; ".join(parts) or "unknown (no hardware reported by CodeCarbon)"


def _quiet_codecarbon() -> None:
    logger = logging.getLogger("codecarbon")
    logger.setLevel(logging.ERROR)
    for handler in logger.handlers:
        handler.setLevel(logging.ERROR)


def measure(fn: Callable[[], Any], *, country_iso_code: str = "USA", tracking_mode: str = "process",
            measure_power_secs: float = 5.0) -> Measurement:
    """Run `fn()` under CodeCarbon's offline tracker and return its result with wall seconds, kWh, kg CO2eq and mode.

    `country_iso_code` is a 3-letter ISO code (fixes the carbon intensity; no network lookup). `tracking_mode`
    "process" (default) attributes CPU/RAM power to this process; "machine" charges the whole machine's load.
    """
    if not (isinstance(country_iso_code, str) and len(country_iso_code) == 3 and country_iso_code.isalpha()):
        raise ValueError(f"country_iso_code must be a 3-letter ISO 3166 code such as 'USA' or 'DEU', got {country_iso_code!r}")
    if tracking_mode not in ("process", "machine"):
        raise ValueError(f"tracking_mode must be 'process' or 'machine', got {tracking_mode!r}")
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError as e:  # pragma: no cover - it is a pinned dependency
        raise ImportError("energy measurement needs codecarbon: pip install codecarbon (see pyproject.toml)") from e

    _quiet_codecarbon()
    tracker = OfflineEmissionsTracker(
        country_iso_code=country_iso_code.upper(), log_level="error", save_to_file=False, save_to_api=False,
        tracking_mode=tracking_mode, measure_power_secs=measure_power_secs, allow_multiple_runs=True,
    )
    _quiet_codecarbon()
    tracker.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    except BaseException:
        tracker.stop()
        raise
    seconds = time.perf_counter() - t0
    emissions = tracker.stop()
    data = tracker.final_emissions_data
    energy = float(getattr(data, "energy_consumed", float("nan")))
    return Measurement(result=result, seconds=seconds, energy_kwh=energy,
                       emissions_kg=float(emissions if emissions is not None else float("nan")), mode=describe_mode(tracker))
