"""The GPU bundle's pieces that need no network (issue 25): parts and their sha256, the transfer limit, missing wheels,
the slot, which packages travel, the node-side version check and packing. The whole path is `make bundle-check`."""
from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from replaceme_core.bundle import builder, pack, slices, verify_env
from replaceme_core.bundle.builder import (MIB, BundleError, Target, carry_decision, check_wheels, join_parts,
                                           read_node, split_file, validate_parts)
from replaceme_core.bundle.slices import SLICES, SliceError, check_slot, get_slice


def test_split_join_round_trip_with_sha256(tmp_path):
    data = os.urandom(3 * 1000 + 17)
    src = tmp_path / "payload"
    src.write_bytes(data)
    parts = split_file(src, tmp_path, 1000)
    assert [p["size"] for p in parts] == [1000, 1000, 1000, 17]
    out = join_parts(parts, tmp_path, tmp_path / "joined", builder.sha256_file(src))
    assert out.read_bytes() == data
    (tmp_path / parts[2]["name"]).write_bytes(b"x" * 1000)
    with pytest.raises(BundleError, match="part-002.bin is corrupt"):
        join_parts(parts, tmp_path, tmp_path / "joined2")
    (tmp_path / parts[1]["name"]).unlink()
    with pytest.raises(BundleError, match="missing part part-001.bin"):
        join_parts(parts, tmp_path, tmp_path / "joined3")


def test_run_sh_joins_like_python(tmp_path):
    """The bash side: SHA256SUMS lists the parts in order; cat + sha256sum gives the payload's digest."""
    data = os.urandom(5000)
    (tmp_path / "p").write_bytes(data)
    parts = split_file(tmp_path / "p", tmp_path, 1200)
    (tmp_path / "SHA256SUMS").write_text("".join(f"{p['sha256']}  {p['name']}\n" for p in parts))
    script = ('cd "$1" && sha256sum --quiet -c SHA256SUMS && '
              'while read -r _s n; do cat "$n"; done < SHA256SUMS | sha256sum | cut -d" " -f1')
    got = subprocess.run(["bash", "-c", script, "_", str(tmp_path)], capture_output=True, text=True, check=True).stdout.strip()
    assert got == builder.sha256_file(tmp_path / "p")


def test_a_part_over_the_transfer_limit_is_refused_in_one_line():
    parts = [{"name": "part-000.bin", "size": 50 * MIB}, {"name": "part-001.bin", "size": 53 * MIB}]
    validate_parts(parts[:1], 60 * MIB, 8 * MIB, beside_first=MIB // 2)
    with pytest.raises(BundleError) as e:
        validate_parts(parts, 60 * MIB, 8 * MIB)
    assert "part-001.bin is 53.0 MiB" in str(e.value) and "60 MiB transfer limit" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_wheel_is_refused_in_one_line(tmp_path):
    (tmp_path / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"")
    t = Target()
    assert check_wheels({"gguf": "0.19.0"}, [tmp_path], t)["gguf"].name.startswith("gguf-0.19.0")
    with pytest.raises(BundleError) as e:
        check_wheels({"gguf": "0.19.0", "sqlitedict": "2.1.0"}, [tmp_path], t)
    assert str(e.value) == "missing wheel: sqlitedict==2.1.0 for cp312 / manylinux_2_28_x86_64"


def test_a_slice_over_its_slot_is_refused_in_one_line():
    s = get_slice("gpu-01", "gpu")
    assert check_slot(s, {"01": 6 * 60}) == pytest.approx(6.0)
    with pytest.raises(SliceError) as e:
        check_slot(slices.Slice("too-big", "gpu", ("01", "02"), "x"), {"01": 365.0, "02": 324.0})
    assert "exceeds its 8-minute slot" in str(e.value) and "01 6.1, 02 5.4" in str(e.value) and "\n" not in str(e.value)


def test_build_refuses_over_slot_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "resolve", lambda *a, **k: pytest.fail("nothing may be resolved"))
    with pytest.raises(SliceError, match="exceeds"):
        builder.build_bundle(get_slice("gpu-01"), tmp_path / "b", estimates={"01": 9 * 60})


def test_unknown_or_mismatched_slice():
    with pytest.raises(SliceError, match="unknown slice"):
        get_slice("gpu-99")
    with pytest.raises(SliceError, match="runs profile gpu, not smoke"):
        get_slice("gpu-01", "smoke")
    assert get_slice(None, "gpu").name == "gpu-01"
    with pytest.raises(SliceError, match="no slice for profile 'cpu'"):
        get_slice(None, "cpu")


def test_the_gpu_plan_covers_every_notebook_and_names_reduced_slices():
    gpu = [s for s in SLICES.values() if s.profile == "gpu"]
    covered = {nb for s in gpu for nb in s.notebooks}
    assert covered == {f"{i:02d}" for i in range(13)}
    assert SLICES["gpu-01"].notebooks == ("01",) and not SLICES["gpu-01"].overrides
    for s in gpu:
        assert s.slot_minutes == slices.SLOT_MINUTES
        assert bool(s.reduced) == ("REDUCED" in s.about)


def test_slices_fit_their_slot_by_the_offline_estimator():
    """The estimator of `make paper PROFILE=gpu CHECK=1` itself (no download, ~10 s per profile)."""
    for name in ("gpu-01",):
        s = SLICES[name]
        assert check_slot(s, slices.slice_estimate(s)) <= slices.SLOT_MINUTES


def test_which_packages_travel():
    node = {"torch": "2.11.0", "transformers": "5.17.0", "numpy": "2.5.2", "pandas": None, "scipy": None,
            "accelerate": "1.15.0", "nvidia-cublas": None}
    pins = {"transformers": "5.24.0", "scipy": "1.17.1", "accelerate": "1.15.0"}
    resolved = {"torch": "2.11.0+node", "transformers": "5.24.0", "numpy": "2.5.2", "pandas": "3.1.1", "scipy": "1.17.1",
                "accelerate": "1.15.0", "sqlitedict": "2.1.0", "nvidia-cublas": "13.0", "triton": "3.6.0",
                "nvidia-ml-py": "13.615.71"}  # pure Python (codecarbon needs it): it travels when the node lacks it
    assert carry_decision(resolved, node, pins) == {"transformers": "5.24.0", "scipy": "1.17.1", "sqlitedict": "2.1.0",
                                                    "nvidia-ml-py": "13.615.71"}


def test_node_file_and_freeze_are_read_alike(tmp_path):
    (tmp_path / "n.txt").write_text("# c\nTorch==2.13.0+cpu\nPyYAML==6.0.3\nscikit_learn\n-e git+x#egg=y\n")
    assert read_node(tmp_path / "n.txt") == {"torch": "2.13.0+cpu", "pyyaml": "6.0.3", "scikit-learn": None}
    h200 = read_node(builder.HERE / "node_h200.txt")
    assert h200["torch"] == "2.11.0" and h200["transformers"] == "5.17.0" and "pandas" in h200


def test_target_pip_flags():
    f = Target(python_version="3.11").pip_flags()
    assert f[:7] == ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    assert "manylinux2014_x86_64" in f


def _dist(site: Path, name: str, version: str, requires: list[str] = ()) -> None:
    di = site / f"{name}-{version}.dist-info"
    di.mkdir(parents=True)
    (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_verify_env_checks_shadowing_and_requirements(tmp_path, monkeypatch):
    import sys

    site = tmp_path / "site"
    _dist(site, "fakepkg-a", "1.0", ["fakepkg-b>=2", "fakepkg-c; python_version<'3'"])
    _dist(site, "fakepkg-b", "1.5")
    req = tmp_path / "requirements.txt"
    req.write_text("fakepkg-a==1.0  # carried\nfakepkg-b==1.5  # node\n")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    found = verify_env.problems(req, site)
    assert found == ["fakepkg-a needs fakepkg-b>=2; the node has 1.5"]
    req.write_text("fakepkg-a==1.1  # carried\n")
    assert any("not the carried 1.1" in p for p in verify_env.problems(req, site))


def test_pack_brings_back_at_most_eight_files(tmp_path):
    work, res = tmp_path / "work", tmp_path / "res"
    (work / "figures" / "notebooks").mkdir(parents=True)
    (work / "figures" / "old.md").write_text("same")
    before = work / "figures.before"
    digest = __import__("hashlib").sha256(b"same").hexdigest()
    before.write_text(f"{digest}  {work / 'figures' / 'old.md'}\n")
    (work / "figures" / "table.md").write_text("| a |\n")
    (work / "figures" / "notebooks" / "01.ipynb").write_text("{}")
    (work / "timings.json").write_text(json.dumps({"01_main_results": 300.0}))
    (work / "run.log").write_text("log\n")
    man = {"slice": "gpu-01", "profile": "gpu", "estimate_seconds": {"01": 365.0}, "estimate_minutes": 6.1}
    out = pack.pack(work, res, man, 0, 400.0, "cpu")
    assert len(out) <= 8 and {p.name for p in out} == {"results-gpu-01.tar.gz", "run-gpu-01.log", "run-gpu-01.json"}
    import tarfile

    with tarfile.open(res / "results-gpu-01.tar.gz") as t:
        assert sorted(t.getnames()) == ["notebooks/01.ipynb", "table.md"]
    rec = json.loads((res / "run-gpu-01.json").read_text())
    assert rec["notebooks"]["01_main_results"] == {"measured_s": 300.0, "estimated_s": 365.0, "ratio": 0.82}
    assert rec["device"]["asked"] == "cpu"


def test_run_sh_template_has_every_placeholder_filled():
    man = {"slice": "gpu-01", "profile_arg": "gpu", "device": "cuda", "dtype": "bfloat16",
           "payload": {"sha256": "ab" * 32}, "notebooks": ["01_main_results"]}
    text = builder._render_run_sh(man)
    import re

    assert not re.findall(r"@[A-Z0-9_]+@", text)
    assert 'device_check.py" "$DEVICE" "$DTYPE" || exit 3' in text
    assert text.index("device_check.py") < text.index("sha256sum") < text.index("pip install")
    assert "--no-index" in text and "--target" in text


def test_concatenate_files_leaves_nothing_behind_on_a_bad_digest(tmp_path):
    """The one join both the GGUF parts and the bundle parts use: the result's sha256, and on a mismatch neither the
    output nor a temporary file remains."""
    import hashlib

    from replaceme_core.io.cache import concatenate_files

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 7)
    digest = concatenate_files([a, b], tmp_path / "out")
    assert digest == hashlib.sha256(b"x" * 10 + b"y" * 7).hexdigest()
    assert (tmp_path / "out").read_bytes() == b"x" * 10 + b"y" * 7
    with pytest.raises(RuntimeError, match="sha256"):
        concatenate_files([a, b], tmp_path / "bad", "0" * 64, error=RuntimeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]
