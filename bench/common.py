"""What every bench section shares: the log line, peak memory, the packaged model and its calibration batches, the
machine's description, fresh child processes and atomic writes."""
from __future__ import annotations

import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def maxrss_mib() -> float:
    """Peak RSS of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child
    started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # fallback (KiB on Linux)


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def real_tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def best(xs):
    return min(xs)


def yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


# ------------------------------------------------------------------------------------------------ data/model
def load(dtype=torch.float32):
    from replaceme_core.io.models import load_model

    return load_model(MODEL, dtype=dtype, device="cpu")


def calib_batches(tokenizer, samples: int, max_length: int, batch_size: int = 8, seed: int = 0):
    from replaceme_core.io.data import load_texts, token_batches

    texts = load_texts("wiki", tokenizer, samples, seed=seed)
    return list(token_batches(texts, tokenizer, batch_size=batch_size, max_length=max_length))


def our_prune(model, batches, **cfg):
    """(seconds, PruneResult) of `prune` on a copy of `model`."""
    from replaceme_core.prune import PruneConfig, prune

    m = copy.deepcopy(model)
    t = time.perf_counter()
    result = prune(m, batches, PruneConfig(**cfg), progress=False)
    return time.perf_counter() - t, result


# ------------------------------------------------------------------------------------------------ processes
def run_child(script: str, spec: dict) -> dict:
    """Run `bench/<script> --child SPEC` in a fresh process; its last stdout line is the JSON it reports."""
    proc = subprocess.run([sys.executable, str(HERE / script), "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {script} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(handler) -> int:
    """The `--child SPEC` entry point of a section script: `handler(spec)`'s dict, as JSON on the last line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        raise SystemExit(f"usage: {sys.argv[0]} --child SPEC (run by bench/bench.py)")
    torch.manual_seed(0)
    print(json.dumps(handler(json.loads(sys.argv[2]))))
    return 0


def run_script(script: str, limit: int, what: str) -> dict:
    """A section that runs as its own script (`bench/<script> --limit N --json OUT`), in a fresh process: its own
    memory, threads and timings. Its progress goes to our stderr; the table is rendered here."""
    with tempfile.TemporaryDirectory(prefix=f"replaceme-bench-{what}-") as work:
        out = Path(work) / f"{what}.json"
        proc = subprocess.run([sys.executable, str(HERE / script), "--limit", str(limit), "--json", str(out)],
                              stdout=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/{script} --limit {limit} failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def finish_script(result: dict, json_path: str | None, render) -> int:
    """End of a section script run alone: the results to `--json`, the section's markdown to stdout."""
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(render(result)))
    return 0


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict:
    import accelerate
    import psutil
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "platform": platform.platform(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
