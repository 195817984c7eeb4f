"""Section 4: LS solutions for every (start, n) of a compression sweep from ONE pass vs one prune() per sweep point."""
from __future__ import annotations

import time

from common import log, our_prune

KEY = "sweep"


def measure(model, batches, sweep: list[int]) -> dict:
    from replaceme_core.prune import calibrate
    from replaceme_core.select import Run
    from replaceme_core.solve import solve_ls

    L = model.config.num_hidden_layers
    runs = [Run(s, n) for n in sweep for s in range(1, L - n + 1)]
    t = time.perf_counter()
    calib = calibrate(model, batches, distances=True, ls_runs=runs, progress=False)
    Ts = {run: solve_ls(calib.ls[run]) for run in runs}
    one_pass_s = time.perf_counter() - t
    log(f"sweep one pass: {len(runs)} runs in {one_pass_s:.1f}s")
    per_config, agree = [], []
    for n in sweep:
        s, res = our_prune(model, batches, num_blocks=n)
        per_config.append(s)
        rep = res.replacements[0]
        agree.append(float((Ts[rep.run] - rep.T).norm() / rep.T.norm()))
        del res
    log(f"sweep per-config: {per_config}")
    # Doing one capture per (start, n) instead: each stops after block start+n-1 → estimate from the bare forward
    frac = sum((r.start + r.n) / L for r in runs)
    return {"sweep_blocks": sweep, "runs": len(runs), "one_pass_s": one_pass_s, "one_pass_passes": 1,
            "per_config_s": sum(per_config), "per_config_passes": len(sweep), "per_config_each_s": per_config,
            "speedup": sum(per_config) / one_pass_s, "max_rel_diff_T": max(agree),
            "per_run_capture_equivalent_passes": frac, "memory_gram_mib": len(runs) * 2 * model.config.hidden_size ** 2 * 8 / 2**20}


def summary_rows(R: dict) -> list[str]:
    sw = R[KEY]
    return [f"| 4 | sweep {sw['sweep_blocks']}: one prune() per point ÷ one pass for all {sw['runs']} (start, n) | {sw['speedup']:.2f}× ({sw['per_config_passes']} passes → 1) | report | — |"]


def section(R: dict) -> list[str]:
    sw = R[KEY]
    return [
        "## 4. One-pass sweeps", "",
        f"Sweep over n ∈ {sw['sweep_blocks']} (the cpu profile's compression sweep): LS sums for all {sw['runs']} (start, n) "
        f"pairs plus the distance statistics from ONE capture pass, then {sw['runs']} Cholesky solves: {sw['one_pass_s']:.2f} s "
        f"(Gram sums held: {sw['memory_gram_mib']:.0f} MiB). One `prune()` per sweep point ({sw['per_config_passes']} passes): "
        f"{sw['per_config_s']:.2f} s ({', '.join(f'{x:.2f}' for x in sw['per_config_each_s'])}). Speedup {sw['speedup']:.2f}×; the "
        f"chosen runs' T agree to {sw['max_rel_diff_T']:.1e} relative. One capture per (start, n) pair would cost about "
        f"{sw['per_run_capture_equivalent_passes']:.0f} full forward passes (each stopping after its last block).",
        "",
    ]
