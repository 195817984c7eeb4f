"""Is a torch device (and a dtype on it) usable here? One line that says what is available when it is not.

`replaceme prune/eval --device cuda` on a CPU-only torch used to end in a traceback deep inside the model load
("Torch not compiled with CUDA enabled"). `check_device` runs before any model is loaded and raises `DeviceError`
(a ValueError: the CLIs print it as one line). This file imports nothing but the standard library and torch, so the
GPU bundle's `run.sh` runs it as a plain script with the node's own python before it unpacks or installs anything:

    python3 device_check.py cuda bfloat16     # exit 0 and one line "device ok: …", or exit 3 and the problem
"""
from __future__ import annotations

import os
import sys

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


class DeviceError(ValueError):
    """A device or dtype this torch cannot use; the message is one line and names what is available."""


def _torch():
    import torch

    return torch


def available_devices(torch=None) -> list[str]:
    """What this torch can run on: 'cpu', then 'cuda:i (name)' for each visible GPU, then 'mps' when usable."""
    torch = torch or _torch()
    out = ["cpu"]
    try:
        if torch.backends.cuda.is_built() and torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                out.append(f"cuda:{i} ({torch.cuda.get_device_name(i)})")
    except Exception:  # a broken driver: no GPU is available, which is what we report
        pass
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise DeviceError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return name


def device_problem(device: str | None, dtype=None, *, probe: bool = False, torch=None) -> str | None:
    """None when `device` (and `dtype` on it) can be used, else one line saying why not and what is available.

    `device` None or 'auto' means "whatever is there" and is always fine. `probe` also runs one small operation on the
    device, so that a GPU which is visible but broken (driver mismatch, out of memory) is caught too."""
    torch = torch or _torch()
    dname = _dtype_name(dtype)
    if device is None or str(device) in ("", "auto"):
        return None
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        return f"unknown device {device!r}; available: {', '.join(available_devices(torch))}"
    avail = ", ".join(available_devices(torch))
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        version = torch.__version__
        if not torch.backends.cuda.is_built() or getattr(torch.version, "cuda", None) is None:
            return f"device {device!r}: this torch ({version}) was built without CUDA; available: {avail}"
        try:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception as e:  # noqa: BLE001 - the driver's own words, one line
            return f"device {device!r}: CUDA does not initialise ({str(e).splitlines()[0] if str(e) else type(e).__name__}); available: {avail}"
        if count == 0:
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            seen = f", CUDA_VISIBLE_DEVICES={vis!r}" if vis is not None else ""
            return f"device {device!r}: no GPU is visible to torch {version} (CUDA {torch.version.cuda}{seen}); available: {avail}"
        index = dev.index if dev.index is not None else 0
        if index >= count:
            return f"device {device!r}: only {count} GPU{'s' if count > 1 else ''} visible; available: {avail}"
        if dname == "bfloat16":
            major, minor = torch.cuda.get_device_capability(index)
            if major < 8:
                return (f"dtype bfloat16 on cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability "
                        f"{major}.{minor}) is not supported (needs 8.0+); use --dtype float16 or float32")
        if probe:
            try:
                x = torch.ones(8, device=f"cuda:{index}", dtype=getattr(torch, dname or "float32"))
                float((x + x).sum().item())
            except Exception as e:  # noqa: BLE001
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                return f"device cuda:{index} is visible but does not run ({first}); available: {avail}"
        return None
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return f"device {device!r}: MPS is not available in this torch ({torch.__version__}); available: {avail}"
        if dname == "float64":
            return f"dtype float64 is not supported on mps; use float32; available: {avail}"
        return None
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        return f"device {device!r}: this torch ({torch.__version__}) cannot use {dev.type}; available: {avail}"
    return None


def check_device(device: str | None, dtype=None, *, probe: bool = False, torch=None) -> None:
    """Raise DeviceError (one line) when `device`/`dtype` cannot be used; called before a model loads."""
    problem = device_problem(device, dtype, probe=probe, torch=torch)
    if problem:
        raise DeviceError(problem)


def describe(device: str | None, torch=None) -> str:
    """One line for logs: the torch build and what it runs on."""
    torch = torch or _torch()
    return (f"torch {torch.__version__} (CUDA {getattr(torch.version, 'cuda', None)}); asked {device or 'auto'}; "
            f"available: {', '.join(available_devices(torch))}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: device.py DEVICE [DTYPE]   (exit 0: usable; exit 3: one line saying why not)")
        return 0 if args else 2
    device, dtype = args[0], (args[1] if len(args) > 1 and args[1] not in ("", "auto", "none") else None)
    try:
        problem = device_problem(device, dtype, probe=True)
    except DeviceError as e:
        problem = str(e)
    except ImportError as e:
        problem = f"torch cannot be imported here ({e})"
    if problem:
        print(f"device check: {problem}", file=sys.stderr)
        return 3
    print(f"device ok: {describe(device)}; dtype {dtype or 'default'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
