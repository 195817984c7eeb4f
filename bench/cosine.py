"""Section 3: the cosine path's time ÷ LS time, and peak RSS at N and 2N calibration samples (fresh process each)."""
from __future__ import annotations

import sys

from common import calib_batches, child_main, load, log, maxrss_mib, our_prune, real_tokens, rss_mib, run_child, yes

KEY = "cosine"


def child(spec: dict) -> dict:
    """One prune in this (fresh) process: load, calibration batches, prune; seconds and peak RSS."""
    model, tok = load()
    batches = calib_batches(tok, spec["samples"], spec["max_length"])
    base = rss_mib()
    secs, result = our_prune(model, batches, num_blocks=spec["num_blocks"], method=spec["method"], **spec.get("cfg", {}))
    return {"seconds": secs, "tokens": real_tokens(batches), "rss_after_load_mib": base, "peak_rss_mib": maxrss_mib(),
            "removed": result.record["removed_blocks"], "timings": result.record["timings"]}


def measure(samples: int, max_length: int) -> dict:
    rows = {}
    for mult in (1, 2):
        for method in ("ls", "cosine"):
            spec = {"method": method, "samples": samples * mult, "max_length": max_length, "num_blocks": 8}
            rows[(method, mult)] = run_child("cosine.py", spec)
            log(f"{method} × {mult}N: {rows[(method, mult)]['seconds']:.1f}s, peak RSS {rows[(method, mult)]['peak_rss_mib']:.0f} MiB")
    return {
        "N_tokens": rows[("ls", 1)]["tokens"], "2N_tokens": rows[("ls", 2)]["tokens"],
        "rows": {f"{m} {k}N": v for (m, k), v in rows.items()},
        "time_ratio_N": rows[("cosine", 1)]["seconds"] / rows[("ls", 1)]["seconds"],
        "time_ratio_2N": rows[("cosine", 2)]["seconds"] / rows[("ls", 2)]["seconds"],
        "rss_growth_cosine": rows[("cosine", 2)]["peak_rss_mib"] / rows[("cosine", 1)]["peak_rss_mib"],
        "rss_growth_ls": rows[("ls", 2)]["peak_rss_mib"] / rows[("ls", 1)]["peak_rss_mib"],
    }


def summary_rows(R: dict) -> list[str]:
    cos = R[KEY]
    return [
        f"| 3 | cosine time ÷ LS time (N; 2N) | {cos['time_ratio_N']:.2f}; {cos['time_ratio_2N']:.2f} | ≤ 2 (paper: 6.6) | {yes(max(cos['time_ratio_N'], cos['time_ratio_2N']) <= 2)} |",
        f"| 3b | peak RSS at 2N ÷ at N (cosine; LS) | {cos['rss_growth_cosine']:.3f}; {cos['rss_growth_ls']:.3f} | ≤ 1.1 | {yes(max(cos['rss_growth_cosine'], cos['rss_growth_ls']) <= 1.1)} |",
    ]


def section(R: dict) -> list[str]:
    cos = R[KEY]
    lines = [
        "## 3. Cosine path", "",
        "Each row is a fresh process: load, calibration batches, `prune(..., method=...)` with selection (8 blocks); the cosine "
        "solver is the paper's Adam, lr 1e-4, 1024-token batches, 10 epochs, over the disk-backed activation store.",
        "",
        "| method | calibration | tokens | time | peak RSS | RSS after load |", "|---|---|---|---|---|---|",
    ]
    for name, row in cos["rows"].items():
        lines.append(f"| {name.split()[0]} | {name.split()[1]} | {row['tokens']} | {row['seconds']:.2f} s | {row['peak_rss_mib']:.0f} MiB | {row['rss_after_load_mib']:.0f} MiB |")
    return lines + [
        "",
        f"Cosine ÷ LS: {cos['time_ratio_N']:.2f} (N), {cos['time_ratio_2N']:.2f} (2N). Peak RSS 2N ÷ N: cosine "
        f"{cos['rss_growth_cosine']:.3f}, LS {cos['rss_growth_ls']:.3f}.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(child_main(child))
