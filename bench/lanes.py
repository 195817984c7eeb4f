"""Two single-threaded lanes ÷ one two-thread process: what `make paper`'s `lanes` buy on this machine.

    python bench/lanes.py [--limit 40] [--reps 2] [--json OUT.json]

Why: on the cpu and smoke profiles `make paper` runs the notebooks after the tutorial as two single-threaded
processes side by side (the profile's `lanes`, experiments/paper.py) instead of one process on both cores. That is
worth it only if two one-thread processes do more work per wall second than one two-thread process, which depends on
how well torch's two threads scale on this CPU. This script times the same work both ways:

* the work W: one `loglikelihood` pass of the shared-context backend (`replaceme`) over lm-eval's requests for the
  first `--limit` documents of ARC-Easy and PIQA, on the packaged SmolLM2-135M-Instruct (float32) — the forward
  passes that dominate `make paper`;
* **serial**: one process, torch on 2 threads, runs W twice;
* **lanes**: two processes, 1 thread each (OMP/MKL = 1, as paper.py sets them), run W once each, released together
  by a barrier so that they really overlap;
* schedule serial, lanes, serial, lanes, … (`--reps` of each); the ratio uses each side's best wall time. Model
  loading and request building happen before the barrier and are not timed.

The ratio serial ÷ lanes is the throughput gain of the lanes (> 1: lanes win). Each process also returns the sum of
its log-likelihoods, so the two ways are checked to score the same (to float rounding across thread counts).
bench/bench.py runs this in a fresh subprocess (`--json`) and renders its section with `render_section`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MODEL, finish_script

HERE = Path(__file__).resolve().parent
TASKS = ("arc_easy", "piqa")
BATCH = 16
TOL = 1e-2  # nats, on a sum over ~250 requests: float32 rounding across thread counts stays far below


def log(msg: str) -> None:
    print(f"[lanes-bench] {msg}", file=sys.stderr, flush=True)


def child(threads: int, repeat: int, limit: int, barrier: Path, index: int, parties: int) -> dict:
    """Load, build the requests, wait for every party, then time `repeat` passes of W."""
    import torch

    torch.set_num_threads(threads)
    from eval_backend import build_requests

    from replaceme_core.evaluation.quiet import quiet_lm_eval
    from replaceme_core.evaluation.shared_context import SharedContextHFLM
    from replaceme_core.io.models import load_model

    model, tok = load_model(MODEL, dtype=torch.float32, device="cpu")
    with quiet_lm_eval():
        lm = SharedContextHFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, device="cpu")
    reqs = [r for _, rs in build_requests(TASKS, limit).values() for r in rs]
    lm.loglikelihood(reqs[:8], disable_tqdm=True)  # first-call costs (thread pool, allocator) stay out of the timing
    (barrier / f"ready-{index}").touch()
    deadline = time.time() + 600
    while len(list(barrier.glob("ready-*"))) < parties:
        if time.time() > deadline:
            raise TimeoutError("the other lane never got ready")
        time.sleep(0.02)
    start = time.time()
    total = 0.0
    for _ in range(repeat):
        total = sum(ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True))
    return {"start": start, "end": time.time(), "requests": len(reqs), "loglik_sum": total, "threads": torch.get_num_threads()}


def spawn(threads: int, repeat: int, limit: int, parties: int) -> list[dict]:
    """`parties` child processes with `threads` threads each, released together; their reports."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="replaceme-lanes-") as barrier:
        procs = [subprocess.Popen([sys.executable, __file__, "--child", json.dumps(
            {"threads": threads, "repeat": repeat, "limit": limit, "barrier": barrier, "index": i, "parties": parties})],
            env=env, stdout=subprocess.PIPE) for i in range(parties)]
        outs = [p.communicate()[0] for p in procs]
    for p in procs:
        if p.returncode != 0:
            raise RuntimeError(f"a bench/lanes.py child failed (exit {p.returncode})")
    return [json.loads(o) for o in outs]


def run(limit: int = 40, reps: int = 2) -> dict:
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    serial, lanes, sums = [], [], []
    for r in range(reps):
        (one,) = spawn(threads=2, repeat=2, limit=limit, parties=1)
        serial.append(one["end"] - one["start"])
        two = spawn(threads=1, repeat=1, limit=limit, parties=2)
        lanes.append(max(c["end"] for c in two) - min(c["start"] for c in two))
        sums += [one["loglik_sum"]] + [c["loglik_sum"] for c in two]
        log(f"rep {r + 1}/{reps}: serial (2 threads, W twice) {serial[-1]:.1f} s; lanes (2 × 1 thread, W once each) {lanes[-1]:.1f} s")
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "limit": limit, "tasks": list(TASKS),
            "requests": one["requests"], "reps": reps, "serial_s": serial, "lanes_s": lanes,
            "ratio": min(serial) / min(lanes), "loglik_spread": max(sums) - min(sums), "same_scores": max(sums) - min(sums) < TOL,
            "loadavg_start": load0, "loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - t0}


def render_section(L: dict, number: int = 8) -> list[str]:
    return [
        f"## {number}. Lanes: two single-threaded processes vs one two-thread process", "",
        f"`bench/lanes.py` (its own run: {L['date_utc']}, {L['wall_s']:.0f} s, load average {L['loadavg_start'][0]:.2f} → "
        f"{L['loadavg_end'][0]:.2f}). The work W: the shared-context backend's `loglikelihood` over the first {L['limit']} "
        f"documents of {', '.join(L['tasks'])} ({L['requests']} requests) on SmolLM2-135M-Instruct, float32. Serial: one "
        "process, 2 torch threads, W twice. Lanes: two processes of 1 thread each (OMP/MKL = 1), W once each, released "
        "together. Alternated serial, lanes, …; best of each.", "",
        "| | wall s (each repetition) | best |", "|---|---|---|",
        f"| serial, 2 threads | {', '.join(f'{s:.1f}' for s in L['serial_s'])} | {min(L['serial_s']):.1f} |",
        f"| lanes, 2 × 1 thread | {', '.join(f'{s:.1f}' for s in L['lanes_s'])} | {min(L['lanes_s']):.1f} |", "",
        f"**Throughput of the lanes ÷ serial: {L['ratio']:.2f}×** (> 1: the lanes do more work per wall second). Scores: the "
        f"sums of log-likelihoods agree to {L['loglik_spread']:.1e} nats ({'same' if L['same_scores'] else 'DIFFERENT'} "
        f"scores, tolerance {TOL:g}). `make paper` also gains from overlapping the notebooks' single-threaded overheads "
        "(kernel start, imports, plotting), which this section does not time.", "",
    ]


KEY = "lanes"


def summary_rows(R: dict) -> list[str]:
    L = R[KEY]
    return [f"| 8 | make paper's lanes: work per wall second of two 1-thread processes ÷ one 2-thread process | "
            f"{L['ratio']:.2f}× | report (> 1: lanes win) | — |"]


def section(R: dict) -> list[str]:
    return render_section(R[KEY], number=8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=40, help="documents per task (default 40)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of each side (default 2)")
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["threads"], spec["repeat"], spec["limit"], Path(spec["barrier"]), spec["index"], spec["parties"])))
        return 0
    if args.limit <= 0 or args.reps <= 0:
        p.error("--limit and --reps must be positive")
    return finish_script(run(args.limit, args.reps), args.json, render_section)


if __name__ == "__main__":
    sys.exit(main())
