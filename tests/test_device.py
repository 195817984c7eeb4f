"""The device check (issue 25): a device or dtype torch cannot use is refused before the model loads, in one line."""
from __future__ import annotations

import types

import pytest

from replaceme_core.io import device as dev
from replaceme_core.io.device import DeviceError, check_device, device_problem


class FakeTorch:
    """torch with a chosen CUDA situation: built or not, N GPUs, their compute capability."""

    def __init__(self, built=True, gpus=(), capability=(9, 0), broken=False):
        import torch

        self.device = torch.device
        self.__version__ = "2.11.0+cu130" if built else "2.13.0+cpu"
        self.version = types.SimpleNamespace(cuda="13.0" if built else None)
        self.backends = types.SimpleNamespace(cuda=types.SimpleNamespace(is_built=lambda: built),
                                              mps=types.SimpleNamespace(is_available=lambda: False))
        self.float32, self.bfloat16 = torch.float32, torch.bfloat16

        def ones(*a, **k):
            if broken:
                raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")
            return torch.ones(*a, dtype=k.get("dtype"))

        self.ones = ones
        self.cuda = types.SimpleNamespace(
            is_available=lambda: built and bool(gpus), device_count=lambda: len(gpus),
            get_device_name=lambda i: gpus[i], get_device_capability=lambda i: capability)


def test_cpu_and_auto_are_always_fine():
    t = FakeTorch(built=False)
    assert device_problem("cpu", "float32", torch=t) is None
    assert device_problem(None, torch=t) is None and device_problem("auto", "bfloat16", torch=t) is None


def test_cuda_on_a_cpu_build_is_one_line_naming_what_is_available():
    msg = device_problem("cuda", torch=FakeTorch(built=False))
    assert "built without CUDA" in msg and msg.endswith("available: cpu") and "\n" not in msg


def test_no_gpu_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    msg = device_problem("cuda", torch=FakeTorch(gpus=()))
    assert "no GPU is visible" in msg and "CUDA_VISIBLE_DEVICES=''" in msg and "available: cpu" in msg


def test_index_past_the_last_gpu():
    msg = device_problem("cuda:1", torch=FakeTorch(gpus=("NVIDIA H200",)))
    assert "only 1 GPU visible" in msg and "cuda:0 (NVIDIA H200)" in msg
    assert device_problem("cuda:0", "bfloat16", torch=FakeTorch(gpus=("NVIDIA H200",))) is None


def test_bfloat16_on_a_pre_ampere_gpu():
    msg = device_problem("cuda", "bfloat16", torch=FakeTorch(gpus=("Tesla V100",), capability=(7, 0)))
    assert "bfloat16" in msg and "7.0" in msg and "float16" in msg
    assert device_problem("cuda", "float16", torch=FakeTorch(gpus=("Tesla V100",), capability=(7, 0))) is None


def test_probe_catches_a_visible_but_broken_gpu():
    t = FakeTorch(gpus=("NVIDIA H200",), broken=True)
    assert device_problem("cuda", torch=t) is None
    msg = device_problem("cuda", probe=True, torch=t)
    assert "does not run" in msg and "no kernel image" in msg and "\n" not in msg


def test_unknown_device_and_dtype():
    t = FakeTorch(built=False)
    assert "unknown device" in device_problem("gpu7", torch=t)
    with pytest.raises(DeviceError, match="unknown dtype"):
        device_problem("cpu", "int4", torch=t)
    with pytest.raises(ValueError, match="built without CUDA"):  # DeviceError is a ValueError: the CLIs print one line
        check_device("cuda", torch=t)


def test_script_exits_3_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(dev, "_torch", lambda: FakeTorch(built=False))
    assert dev.main(["cuda", "bfloat16"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("device check:") and len(err.splitlines()) == 1
    assert dev.main(["cpu"]) == 0


def test_cli_prune_and_eval_refuse_before_loading(monkeypatch, capsys):
    import torch

    from replaceme_core import cli
    from replaceme_core.io import models

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(models, "load_model", no_load)
    assert cli.main(["prune", "smollm2-135m-instruct", "--calib", "wiki", "--num-blocks", "2", "--device", "cuda",
                     "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "built without CUDA" in err and len(err.splitlines()) == 1
    from replaceme_core.evaluation import cli as ecli

    monkeypatch.setattr(ecli, "evaluate", no_load)
    assert cli.main(["eval", "smollm2-135m-instruct", "--tasks", "arc_easy", "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "built without CUDA" in err and len(err.splitlines()) == 1
