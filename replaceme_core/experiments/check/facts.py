"""The facts the check compares a profile with, as data, each with where it comes from: hub models, packaged
parameter counts, dataset cards, benchmark costs and the GPU the estimate assumes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HubModel:
    """What a hub checkpoint is, from its published config.json / model card (not fetched here)."""

    model_type: str          # config.model_type: the family `arch.py` dispatches on
    layers: int              # num_hidden_layers
    hidden: int              # hidden_size
    params: float            # parameters
    download_gb: float       # weight files `from_pretrained` fetches (bf16 safetensors unless noted)
    gated: bool | None       # the repo asks to accept a licence first (None: not known here)
    note: str = ""


#: The hub models the profiles name. Source: each repository's config.json and model card on huggingface.co.
HUB_MODELS: dict[str, HubModel] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": HubModel("llama", 32, 4096, 8.03e9, 16.1, True),
    "meta-llama/Llama-3.1-8B-Instruct": HubModel("llama", 32, 4096, 8.03e9, 16.1, True),
    "meta-llama/Llama-3.2-1B-Instruct": HubModel("llama", 16, 2048, 1.24e9, 2.5, True),
    "meta-llama/Meta-Llama-3-70B-Instruct": HubModel("llama", 80, 8192, 70.6e9, 141.0, True),
    "meta-llama/Llama-2-7b-hf": HubModel("llama", 32, 4096, 6.74e9, 13.5, True),
    "Qwen/Qwen2.5-7B-Instruct": HubModel("qwen2", 28, 3584, 7.62e9, 15.2, False),
    "tiiuae/falcon-11B": HubModel("falcon", 60, 4096, 11.1e9, 22.2, None, "Falcon2-11B"),
    "mistralai/Mistral-7B-Instruct-v0.3": HubModel("mistral", 32, 4096, 7.25e9, 14.5, True,
                                                   "the repo also holds consolidated.safetensors (same size); "
                                                   "from_pretrained fetches only the HF shards"),
    "openai/clip-vit-large-patch14": HubModel("clip_vision_model", 24, 1024, 0.30e9, 1.7, False,
                                              "CLIP ViT-L/14; the vision tower (clip_vision_model) is what is "
                                              "pruned; float32 checkpoint of the whole CLIP model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": HubModel("llama", 30, 576, 0.135e9, 0.27, False, "packaged offline too"),
    "google/gemma-3-270m": HubModel("gemma3_text", 18, 640, 0.268e9, 0.54, True, "packaged offline too"),
}

#: Parameters of the packaged / config-built models (their configs give blocks and width; these give the size).
PACKAGED_PARAMS: dict[str, float] = {
    "smollm2-135m-instruct": 0.1345e9, "gemma-3-270m": 0.268e9, "dinov2s-imgfocus": 0.0221e9,
    "tiny-random-llama": 3.3e6, "tiny-random-gemma3": 3.4e6, "tiny-random-dinov2": 0.1e6,
}


@dataclass(frozen=True)
class DatasetCard:
    """A hub dataset as its card documents it: configs and their splits, the fields of a row, a sample row."""

    card: str
    configs: dict[str | None, tuple[str, ...]]
    fields: dict[str, Any]        # field path -> documented type, or a tuple of the allowed values
    example: dict
    size: str                     # what a run reads, where known
    aliases: tuple[str, ...] = ()


#: Calibration / perplexity / healing sources of io/data.py (HUB_SOURCES). Field paths use `[]` for list elements.
DATASET_CARDS: dict[str, DatasetCard] = {
    "Open-Orca/SlimOrca": DatasetCard(
        card="https://huggingface.co/datasets/Open-Orca/SlimOrca",
        configs={None: ("train",)},
        fields={"conversations": list, "conversations[].from": ("system", "human", "gpt"),
                "conversations[].value": str, "conversations[].weight": float},
        example={"conversations": [
            {"from": "system", "value": "You are an AI assistant. Provide a detailed answer.", "weight": None},
            {"from": "human", "value": "Translate to French: The weather is nice today.", "weight": 0.0},
            {"from": "gpt", "value": "Il fait beau aujourd'hui.", "weight": 1.0}]},
        size="one ≈1 GB JSONL of ≈518k conversations, streamed: only the rows read are transferred"),
    "HuggingFaceFW/fineweb": DatasetCard(
        card="https://huggingface.co/datasets/HuggingFaceFW/fineweb",
        configs={"default": ("train",), "sample-10BT": ("train",), "sample-100BT": ("train",), "sample-350BT": ("train",)},
        fields={"text": str, "id": str, "dump": str, "url": str, "date": str, "file_path": str, "language": str,
                "language_score": float, "token_count": int},
        example={"text": "How to plant tomatoes in spring ...", "id": "<urn:uuid:0>", "dump": "CC-MAIN-2013-20",
                 "url": "http://example.com/tomatoes", "date": "2013-05-18T05:48:54Z", "file_path": "s3://commoncrawl/0",
                 "language": "en", "language_score": 0.93, "token_count": 120},
        size="sample-10BT ≈ 10B tokens of parquet, streamed: the first shard only for 8k documents"),
    "allenai/c4": DatasetCard(
        card="https://huggingface.co/datasets/allenai/c4",
        configs={"en": ("train", "validation"), "en.noblocklist": ("train", "validation"),
                 "en.noclean": ("train", "validation"), "realnewslike": ("train", "validation")},
        fields={"text": str, "timestamp": str, "url": str},
        example={"text": "Beginners BBQ Class Taking Place in Missoula! ...", "timestamp": "2019-04-25T12:57:54Z",
                 "url": "https://example.com/bbq"},
        size="en ≈ 305 GB in 1024 json.gz shards (≈320 MB, ≈356k documents each), streamed"),
    "wikitext": DatasetCard(
        card="https://huggingface.co/datasets/Salesforce/wikitext",
        configs={"wikitext-2-raw-v1": ("train", "validation", "test"), "wikitext-2-v1": ("train", "validation", "test"),
                 "wikitext-103-raw-v1": ("train", "validation", "test"), "wikitext-103-v1": ("train", "validation", "test")},
        fields={"text": str},
        example={"text": " = Robert Boulter = \n"},
        size="wikitext-2-raw-v1 ≈ 13 MB, downloaded whole (not streamed)",
        aliases=("Salesforce/wikitext",)),
}

#: lm-eval benchmarks at full size: documents of the split lm-eval scores, and tokens per document summed over its
#: requests (context + continuation for every choice; few-shot contexts included), ±50%; generated tokens for
#: generative tasks. Source: the lm-eval 0.4.13 task configs and the datasets' published split sizes.
TASK_COST: dict[str, tuple[int, int, int]] = {  # task -> (documents, tokens per document, generated per document)
    "race": (1045, 1520, 0), "winogrande": (1267, 360, 0), "piqa": (1838, 90, 0), "boolq": (3270, 290, 0),
    "openbookqa": (500, 80, 0), "sciq": (1000, 480, 0), "lambada_openai": (5153, 80, 0),
    "arc_easy": (2376, 140, 0), "arc_challenge": (1172, 160, 0), "hellaswag": (10042, 340, 0), "mmlu": (14042, 280, 0),
    "leaderboard_bbh": (5761, 4000, 0), "leaderboard_gpqa": (1192, 1000, 0), "leaderboard_math_hard": (1324, 1000, 1024),
    "leaderboard_musr": (756, 3000, 0), "leaderboard_mmlu_pro": (12032, 15000, 0),
}
BIGBENCH_TOKENS_PER_DOC = 300

#: Calibration text whose tokens cannot be counted offline: assumed mean tokens per sample (before truncation).
HUB_TOKENS_PER_SAMPLE = {"Open-Orca/SlimOrca": 400, "HuggingFaceFW/fineweb": 900, "allenai/c4": 500, "wikitext": 100,
                         "fineweb_and_orca": 650}
CHARS_PER_TOKEN = 2.9  # measured: 8000 olmo-instructions samples, 5.34M characters, 1.83M SmolLM2 tokens (LaTeX and code: dense)

#: One GPU of the H100/H200 class, as the estimate assumes it (printed with every estimate).
GPU = {
    "name": "H100/H200 SXM",
    "peak_bf16_tflops": 989.0,
    "mfu_large": 0.35,    # models ≥ 1B parameters: big GEMMs, HF eager attention, batches of 8-16
    "mfu_small": 0.03,    # smaller models: kernels too small to fill the GPU, launch- and Python-bound
    "hbm_tb_s": 3.35,     # decoding reads every weight once per step (H100; H200: 4.8)
    "memory_gb": (80.0, 141.0),  # H100, H200
    "adam_step_overhead_s": 3e-4,
}
