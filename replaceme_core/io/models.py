"""Load a causal LM and its tokenizer from a packaged name, a local directory or a hub id."""
from __future__ import annotations

from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to try."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are several times slower there), bfloat16 on accelerators."""
    return torch.float32 if str(device).startswith("cpu") else torch.bfloat16


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# Randomly initialised models for the smoke profile and tests: built from a config, nothing downloaded.
TINY_MODELS = {
    "tiny-random-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    # Gemma 3 layout (post-feedforward RMSNorm before the residual add: only a diagonal T folds), for the smoke
    # profile of notebook 10; sliding/full attention alternate as in Gemma 3 (window 32 here)
    "tiny-random-gemma3": dict(arch="gemma3", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                               sliding_window=32, tie_word_embeddings=True),
}


def tiny_random_model(name: str = "tiny-random-llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A seeded random Llama with the packaged SmolLM2 tokenizer (so real text and lm-eval tasks work)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..assets import tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path("smollm2-135m-instruct"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = dict(TINY_MODELS[name])
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if spec.pop("arch", "llama") == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config, cls = Gemma3TextConfig(**ids, **spec), Gemma3ForCausalLM
    else:
        config, cls = LlamaConfig(**ids, **spec), LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    return model, tokenizer


def check_hub_model(source: str) -> None:
    """Fail in seconds, with one line, when `source` is a hub id that cannot be had: not a local directory, not in
    the local Hugging Face cache, and the hub unreachable (transformers would otherwise retry for ~30 s)."""
    from .data import hub_offline_mode, hub_reachable

    if Path(source).is_dir() or hub_offline_mode() or hub_reachable():
        return  # offline mode: transformers reads its local cache and says itself what is missing
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return
    except Exception:  # noqa: BLE001 - an invalid repo id is reported below like any other miss
        pass
    raise ModelLoadError(
        f"{source!r} is not a packaged model name or a local directory, and the Hugging Face hub is unreachable from "
        "this machine: use a packaged model (`replaceme assets list`) or a local checkpoint directory")


def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = None, device: str | None = None, device_map=None):
    """Return (model, tokenizer), model in eval mode. `device_map="auto"` shards across devices via accelerate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import resolve_model

    device = device or default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if name_or_path in TINY_MODELS:
        model, tokenizer = tiny_random_model(name_or_path, dtype=dtype or torch.float32)
        return model.to(device), tokenizer
    source = resolve_model(str(name_or_path))
    dtype = dtype or default_dtype(device)
    is_local = Path(source).is_dir()
    check_hub_model(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if is_local:
            raise ModelLoadError(f"could not load a model from {source}: {err}") from None
        raise ModelLoadError(
            f"could not load {source!r}: it is not a packaged model name or a local directory, and the Hugging Face "
            f"hub could not provide it ({type(err).__name__}). Offline, use a packaged model "
            "(`replaceme assets list`) or a local checkpoint directory."
        ) from None
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
